"""The global model's pool of pages given its size at start-up (pool_size.py): from a byte budget (vLLM's
kv_cache_memory_bytes) or from a share of the GPU (vLLM's gpu_memory_utilization), measured here through a
stand-in for the device's memory figures. A pool of a fixed size never grows, holds one full context at least,
and sequences beyond what it holds take turns, each served byte for byte as full recompute."""

import pytest
import torch
from enginekit import replay_full_recompute, run_engine
from factory import PARITY_TEXT

from blt_runtime import device as devices
from blt_runtime import load_model, pool_size
from blt_runtime.cache import CacheFull
from blt_runtime.engine import Engine
from blt_runtime.errors import ConfigError
from blt_runtime.paged_cache import PAGE, PagedKVCache
from blt_runtime.sampling import SamplingParams


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return load_model(hf_checkpoint("1b")[1])


def test_a_fixed_pool_never_grows_and_says_so_when_full():
    kv = PagedKVCache(1, 3, 1, 4, 10_000, "cpu", torch.float32)
    kv.fix(4)
    assert kv.fixed and kv.num_pages == 5 and kv.pool.shape[3] == 5 and kv.free == [1, 2, 3, 4]
    kv.reserve_rows([(0, 0, 2 * PAGE), (1, 0, PAGE)])
    kv.kv[:, 0, kv.host[0, 0]] = 3.0
    with pytest.raises(CacheFull, match="its pool of a fixed size holds 64 patches for all sequences together, "
                                        "and 80 were asked for"):
        kv.reserve_rows([(2, 0, 2 * PAGE)])
    assert kv.num_pages == 5 and kv.held == [2, 1, 0] and (kv.kv[:, 0, kv.host[0, 0]] == 3.0).all()  # as it was
    kv.reserve_rows([(2, 0, PAGE)])  # the last page
    with pytest.raises(CacheFull):
        kv.grow(6)
    with pytest.raises(RuntimeError, match="only while no slot holds a page"):
        kv.fix(8)
    for slot in range(3):
        kv.trim(slot, 0)
    kv.fix(8)  # a new size, once every page went back
    assert kv.num_pages == 9 and kv.pages_held() == 0


def greedy(max_bytes: int) -> SamplingParams:
    return SamplingParams(max_bytes=max_bytes, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("static", [False, True])
def test_sequences_beyond_a_fixed_pool_take_turns_and_none_fails(model, static):
    """Six requests of 250-byte prompts and 60 bytes each, four slots, and a pool of exactly one full context
    of 320 bytes (at a patch a byte; a budget a byte short of a page more): the four slots' requests do not fit
    at once (seed 0's models: 127 to 153 patches each against the pool's 336). The pool never grows; the
    requests it cannot hold together wait their turn (preempted), and every request is served to the end,
    byte for byte as full recompute."""
    requests = {f"r{i}": (PARITY_TEXT[40 * i:40 * i + 250], greedy(60)) for i in range(6)}
    probe = Engine(model, max_batch_size=4, max_model_len=320)
    full = probe.runner.global_kv.pages_for(probe.runner.global_kv.max_len)
    per_page = probe.runner.global_kv.page_bytes
    alone = {rid: run_engine(Engine(model, prefill_chunk=96), {rid: r})[rid][1].usage.global_steps
             for rid, r in requests.items()}
    assert sum(sorted(alone.values())[:4]) > full * PAGE, alone  # four at once do not fit
    preempted = []
    engine = Engine(model, max_batch_size=4, max_model_len=320, prefill_chunk=96, static=static,
                    global_cache_bytes=(full + 1) * per_page + per_page - 1)  # (the null page; a page less one byte)
    real = engine._preempt
    engine._preempt = lambda seq, retain=True: (preempted.append(seq.request_id), real(seq, retain))
    pool = engine.runner.global_kv.pool
    results = run_engine(engine, requests)
    for rid, (generated, final) in results.items():
        assert final.finish_reason == "length" and final.error is None, rid
        replay_full_recompute(model, *requests[rid], 0, generated)
    assert engine.runner.global_kv.pool is pool and engine.runner.global_kv.num_pages == full + 1
    assert 0 < len(preempted) <= 3 * len(requests), preempted  # each waited a few times at most


def test_a_byte_budget_below_one_full_context_is_refused_with_what_would_do(model):
    per_page = Engine(model, max_batch_size=2, max_model_len=1000).runner.global_kv.page_bytes
    # 1,004 patches (the cache's 1,000 bytes and 4 more) need 63 pages, and the null page
    Engine(model, max_batch_size=2, max_model_len=1000, global_cache_bytes=64 * per_page)
    with pytest.raises(ConfigError, match=rf"holds 992 patches .* fewer than one sequence of max_model_len 1,000 "
                                          rf"bytes may take \(1,004: a patch a byte at most\): give it "
                                          rf"{64 * per_page / 2**20:,.1f} MiB or more, or a max_model_len of 988"):
        Engine(model, max_batch_size=2, max_model_len=1000, global_cache_bytes=64 * per_page - 1)
    with pytest.raises(ConfigError, match="holds 0 patches"):
        Engine(model, max_batch_size=2, max_model_len=1000, global_cache_bytes=10)


@pytest.fixture
def device_memory(monkeypatch):
    """A stand-in for the device's (free, total) memory figures, which tests set: memory["free"], ["total"]."""
    memory = {"free": None, "total": None}
    monkeypatch.setattr(devices, "memory_info", lambda device: (memory["free"], memory["total"]))
    return memory


def test_a_share_of_the_device_gives_the_pool_what_the_model_and_its_steps_leave(model, device_memory,
                                                                                  monkeypatch):
    """Of a device of 10 GiB with 9 GiB free before the model, a share of 0.5: the process took 1 GiB since,
    its pool of pages included (which the new pool replaces): the pool gets 4 GiB and the pool now. The share
    is measured after a prefill of a whole chunk (its activations are the largest a step makes)."""
    engine = Engine(model, max_batch_size=2, max_model_len=1000, prefill_chunk=96)
    engine.add_request("earlier", PARITY_TEXT[:300], greedy(5))  # a state kept for later prompts: forgotten
    while engine.has_work():
        engine.step()
    assert engine.runner.global_kv.pages_held() > 0
    chunks = []
    real = pool_size.profile_chunk

    def profiled(e):
        chunks.append(e.scheduler.prefill_chunk)
        real(e)

    monkeypatch.setattr(pool_size, "profile_chunk", profiled)
    pool_now = engine.runner.global_kv.pool.nbytes
    device_memory.update(free=2**30 * 8, total=2**30 * 10)
    pages = pool_size.use_device_share(engine, 0.5, free_at_start=2**30 * 9)
    per_page = engine.runner.global_kv.page_bytes
    budget = 4 * 2**30 + pool_now
    assert chunks == [96] and pages == budget // per_page - 1 and engine.runner.global_kv.fixed
    assert engine.cache_bytes()["global"] == (pages + 1) * per_page <= budget
    assert engine.runner.global_kv.pages_held() == 0 and not engine.sharing.retained
    assert run_engine(engine, {"after": (PARITY_TEXT[:50], greedy(10))})["after"][1].finish_reason == "length"


@pytest.mark.parametrize("free_at_start, taken, words", [
    (2**30 * 4, 2**30, "had 4.00 GiB free at start-up, less than gpu_memory_utilization 0.5 of its 10.00 GiB"),
    (2**30 * 9, 2**30 * 6, "leaves nothing for the global model's cache: the model and its steps take 6.00 GiB"),
    (2**30 * 9, 2**30 * 5 - 2**17, "fewer than one sequence of max_model_len 1,000 bytes")])  # 128 KiB left
def test_a_share_that_leaves_too_little_is_refused(model, device_memory, free_at_start, taken, words):
    """Of a device of 10 GiB, a share of 0.5: `taken` is what the process took since start-up but its pool."""
    engine = Engine(model, max_batch_size=2, max_model_len=1000, prefill_chunk=96)
    device_memory.update(free=free_at_start - taken - engine.runner.global_kv.pool.nbytes, total=2**30 * 10)
    with pytest.raises(ConfigError, match=words):
        pool_size.use_device_share(engine, 0.5, free_at_start)
    assert not engine.runner.global_kv.fixed


def test_a_share_needs_a_gpu(model):
    engine = Engine(model, max_batch_size=2, max_model_len=1000)
    with pytest.raises(ConfigError, match="the model is on cpu, not a GPU"):
        pool_size.use_device_share(engine, 0.5, 2**30)
    with pytest.raises(ConfigError, match=r"a fraction of the device's memory, in \(0, 1\]"):
        pool_size.share_budget(1.5, 10, 10, 10, 0)
