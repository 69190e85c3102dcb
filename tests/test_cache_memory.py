"""When the global model's cache cannot grow (out of memory), the engine goes on without that growth.

The global cache is a pool of pages that the sequences' patches take as they need them, and grows by
doubling (paged_cache.py). Here its allocations fail past a number of patches (cache._allocate, as CUDA's
would past the free memory), and its first size is one page a slot: the pool then grows by smaller steps;
the states kept for later prompts give their pages back; a prefill chunk is cut to the patches the pages
hold; where even that leaves no room, the last sequence to come waits (preempted: its pages go back), and only a
sequence that cannot go on alone fails, with finish_reason "error", while every other request's bytes stay
those of full recompute.
"""

import numpy as np
import pytest
import torch
from enginekit import replay_full_recompute, run_engine
from factory import PARITY_TEXT

from blt_runtime import cache, load_model, paged_cache
from blt_runtime.cache import CacheFull
from blt_runtime.engine import Engine
from blt_runtime.paged_cache import PAGE, PagedKVCache
from blt_runtime.sampling import SamplingParams


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return load_model(hf_checkpoint("1b")[1])


@pytest.fixture
def preempted(monkeypatch) -> list[tuple[str, bool]]:
    """(request id, whether its state was kept) of every preemption."""
    seen, real = [], Engine._preempt

    def counted(self, seq, retain=True):
        seen.append((seq.request_id, retain))
        return real(self, seq, retain)

    monkeypatch.setattr(Engine, "_preempt", counted)
    return seen


@pytest.fixture
def memory(monkeypatch):
    """memory["patches"]: the most patches a pool of pages may hold (the null page not counted); more fails as
    CUDA's allocation does. A pool starts at one page a slot."""
    limit = {"patches": None, "refused": 0, "sizes": []}
    real = cache._allocate

    def allocate(like, shape):
        if limit["patches"] is not None and len(shape) == 6 and (shape[3] - 1) * shape[4] > limit["patches"]:
            limit["refused"] += 1
            limit["sizes"].append(shape[3])
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {shape} (test)")
        return real(like, shape)

    monkeypatch.setattr(cache, "_allocate", allocate)
    monkeypatch.setattr(paged_cache, "FIRST_PATCHES", PAGE)
    return limit


def test_a_pool_grows_by_smaller_steps_when_doubling_runs_out_of_memory(memory, monkeypatch):
    kv = PagedKVCache(1, 2, 1, 4, 10_000, "cpu", torch.float32)  # 3 pages: the null page and one a slot
    kv.reserve_rows([(0, 0, 10)])
    kv.kv[:, 0, kv.host[0, 0]] = 5.0
    memory["patches"] = 3 * PAGE
    kv.reserve_rows([(0, 10, 40)])  # 4 pages: 6 (doubling) is refused, 4 (1.5x, and what is needed) fits
    assert kv.num_pages == 4 and memory["sizes"] == [6] and (kv.kv[:, 0, kv.host[0, 0]] == 5.0).all()
    with pytest.raises(CacheFull, match="from 48 to 64 patches for all sequences together"):
        kv.reserve_rows([(1, 0, 10)])  # 5 pages: 8 and 6, not below the 6 refused just now, are not tried; 5 is
    assert memory["sizes"] == [6, 5]
    assert kv.num_pages == 4 and kv.held == [3, 0] and (kv.kv[:, 0, kv.host[0, 0]] == 5.0).all()  # as it was
    memory["patches"] = None
    with pytest.raises(CacheFull):  # what was refused a moment ago is not tried again at once
        kv.reserve_rows([(1, 0, 10)])
    assert memory["sizes"] == [6, 5]
    monkeypatch.setattr(cache, "RETRY_REFUSED_S", 0.0)  # later, it is
    kv.reserve_rows([(1, 0, 10)])
    assert kv.num_pages == 8 and kv.held == [3, 1]


def test_a_pool_leaves_a_share_of_a_gpu_free_when_it_grows(monkeypatch):
    """On a GPU the pool grows only as far as leaves paged_cache.HEADROOM of the device free (the steps'
    activations and later graph captures need it); the new pool is allocated beside the old, so it must fit in
    what is spare besides. Here a stand-in device of 100 pages' bytes, 40 of them spare: 35 pages may be had."""
    kv = PagedKVCache(1, 2, 1, 4, 10_000, "cpu", torch.float32)  # 9 pages: the null page and 4 a slot
    per_page = kv.page_bytes
    monkeypatch.setattr(paged_cache.devices, "spare_memory", lambda device: (40 * per_page, 100 * per_page))
    kv.reserve_rows([(0, 0, 12 * PAGE)])  # 13 pages needed: 18 (doubling) fits in 35
    assert kv.num_pages == 18
    kv.reserve_rows([(1, 0, 20 * PAGE)])  # 33 needed: 36 (doubling) would leave too little; 33 does not
    assert kv.num_pages == 33
    with pytest.raises(CacheFull, match="from 512 to 560 patches"):
        kv.reserve_rows([(1, 20 * PAGE, 23 * PAGE)])  # 36 needed, past the 35
    assert kv.num_pages == 33 and kv.held == [12, 20]


def test_an_error_that_is_not_memory_is_raised(monkeypatch):
    def broken(like, shape):
        raise RuntimeError("something else")

    monkeypatch.setattr(cache, "_allocate", broken)
    kv = PagedKVCache(1, 2, 1, 4, 10_000, "cpu", torch.float32)
    with pytest.raises(RuntimeError, match="something else"):
        kv.reserve_rows([(0, 0, 1000)])
    assert kv.held == [0, 0] and np.all(kv.host == 0)


def patches_alone(model, requests: dict[str, tuple[bytes, SamplingParams]]) -> dict[str, int]:
    """The patches each request takes run alone, with no limit: what the limits below are set from, so that
    they hold for any test model's patches (scripts/seeds.sh)."""
    return {rid: run_engine(Engine(model, prefill_chunk=96), {rid: request})[rid][1].usage.global_steps
            for rid, request in requests.items()}


def pages_below(patches: int) -> int:
    """The most patches, in whole pages, that leave out a request of `patches`."""
    return (patches - 1) // PAGE * PAGE


def greedy(max_bytes: int) -> SamplingParams:
    return SamplingParams(max_bytes=max_bytes, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("static, overlap", [(False, False), (True, False), (True, True)])
def test_sequences_that_do_not_fit_beside_others_wait_and_only_one_that_cannot_fit_alone_fails(
        model, memory, preempted, static, overlap):
    """A pool of pages that cannot grow past the patches of the shorter of two long requests (seed 0's models:
    416 patches). Where the others' pages leave a sequence no room, the last to come is preempted (its pages
    go back; it waits, nobody else is admitted until a sequence leaves, and it goes on later where it was).
    A prompt of more patches than the pool (425) fails once it is alone; so does a request whose output
    passes it (451), having sent what fitted. The short requests (46 and 59 patches) are served to the end,
    byte for byte as full recompute, whether or not they were preempted."""
    requests = {"short": (PARITY_TEXT[:40], greedy(60)), "long_prompt": (PARITY_TEXT[:1100], greedy(20)),
                "long_output": (PARITY_TEXT[:200], greedy(900)), "late": (PARITY_TEXT[300:340], greedy(80))}
    alone = patches_alone(model, requests)
    limit = pages_below(min(alone["long_prompt"], alone["long_output"]))
    assert alone["short"] + alone["late"] + 2 * PAGE <= limit, alone
    memory["patches"] = limit
    engine = Engine(model, max_batch_size=4, prefill_chunk=96, static=static, overlap=overlap)
    results = run_engine(engine, requests, {"late": 30})
    for rid in ("short", "late"):
        generated, final = results[rid]
        assert final.finish_reason == "length" and final.error is None, rid
        replay_full_recompute(model, requests[rid][0], requests[rid][1], 0, generated)
    for rid in ("long_prompt", "long_output"):
        final = results[rid][1]
        assert final.finish_reason == "error", rid
        assert "out of memory" in final.error and "alone" in final.error
        assert final.usage.global_steps <= limit  # it held what fitted, and no more
    assert results["long_prompt"][0] == b""  # failed during its prefill
    generated = results["long_output"][0]
    assert 0 < len(generated) < 900  # it ran until its patches passed the limit, and what it sent was right
    replay_full_recompute(model, requests["long_output"][0], requests["long_output"][1], 0, generated)
    assert preempted and all(not retain for _, retain in preempted), preempted  # for pages, keeping none
    assert memory["refused"] > 0 and engine.runner.global_kv.num_pages <= 1 + limit // PAGE
    # what is left is the pages of the states kept for later prompts: the longs' went back
    kept = engine.sharing.retained.values()
    assert engine.runner.global_kv.pages_held() == sum(-(-held.num_patches // PAGE) for held in kept)
    assert not engine.has_work() and engine.scheduler.num_running == 0 and engine.slots.num_free == 4
    assert not engine.admission_paused


def test_a_prefill_chunk_is_cut_to_the_patches_the_cache_holds(model, memory):
    """Near the limit a chunk of 96 bytes could close 96 patches: it is cut to what the pages hold, so that
    a prompt whose patches fit is served whole, not failed for a chunk's worst case."""
    prompt, params = PARITY_TEXT[:700], greedy(30)
    alone = run_engine(Engine(model, prefill_chunk=96), {"p": (prompt, params)})["p"]
    # room for every patch it closes (297), not for a chunk more
    memory["patches"] = -(-(alone[1].usage.global_steps + 1) // PAGE) * PAGE
    engine = Engine(model, max_batch_size=2, prefill_chunk=96)
    chunks, plan = [], engine._plan

    def recorded():
        p = plan()
        if p.prefill is not None:
            chunks.append(p.chunk[1] - p.chunk[0])
        return p

    engine._plan = recorded
    got = run_engine(engine, {"p": (prompt, params)})["p"]
    assert got[0] == alone[0] and got[1].finish_reason == "length"
    assert memory["refused"] > 0 and min(chunks[:-1]) < 96, chunks  # cut before the prompt's end
    # no size tried again after it was refused, at each step near the limit (on CUDA each costs a wait)
    assert len(memory["sizes"]) == len(set(memory["sizes"])), memory


@pytest.mark.parametrize("static", [False, True])
def test_followers_of_a_leader_that_fails_go_on_without_it(model, memory, static):
    """Requests waiting to copy a leader's state (shared prompts) whose leader fails: one that forked before
    it failed is served; one that waited for a prefix beyond the failure prefills itself (and fails the same
    way, its prompt being too long as well); nothing waits forever. The leader's pages that the early follower
    took stay its own. The pool holds fewer patches than the follower takes alone (seed 0's models: 320 of 324)."""
    requests = {"leader": (PARITY_TEXT[:1100], greedy(20)), "follower": (PARITY_TEXT[:800] + b"tail", greedy(20)),
                "early_follower": (PARITY_TEXT[:150] + b"x", greedy(30))}
    alone = patches_alone(model, requests)
    memory["patches"] = pages_below(alone["follower"])
    assert alone["early_follower"] + PAGE <= memory["patches"], alone
    engine = Engine(model, max_batch_size=4, prefill_chunk=96, static=static)
    results = run_engine(engine, requests)
    assert [results[rid][1].finish_reason for rid in requests] == ["error", "error", "length"]
    assert results["early_follower"][1].usage.shared_prompt_bytes == 150
    replay_full_recompute(model, *requests["early_follower"], 0, results["early_follower"][0])
    assert not engine.has_work() and engine.slots.num_free == 4


@pytest.mark.parametrize("static", [False, True])
def test_more_sequences_than_the_pages_hold_take_turns(model, memory, preempted, static):
    """Six requests of about 150 patches each, four slots, and a pool of a page more than the longest takes
    alone (seed 0's models: 176 patches): fewer than three fit at once. The others wait (preempted where they
    had started), nobody is admitted while the pages are short, and every request is served in the end, byte
    for byte as full recompute (greedy and seeded), in a bounded number of steps: preempting does not go round
    in circles."""
    params = [greedy(60), SamplingParams(max_bytes=60, temperature=0.9, seed=11, ignore_eos=True)]
    requests = {f"r{i}": (PARITY_TEXT[40 * i:40 * i + 250], params[i % 2]) for i in range(6)}
    alone = patches_alone(model, requests)
    memory["patches"] = -(-max(alone.values()) // PAGE) * PAGE + PAGE
    assert sum(sorted(alone.values())[:3]) > memory["patches"], alone
    engine = Engine(model, max_batch_size=4, prefill_chunk=96, static=static)
    first = engine.runner.global_kv.num_pages  # a page a slot, whatever the limit on its growth
    steps = [0]
    step = engine.step

    def counted_step():
        steps[0] += 1
        assert steps[0] < 2000, "the engine goes round in circles"
        return step()

    engine.step = counted_step
    results = run_engine(engine, requests)
    for rid, (generated, final) in results.items():
        assert final.finish_reason == "length" and 60 <= len(generated) <= 63, rid  # (a character finished)
        replay_full_recompute(model, *requests[rid], requests[rid][1].seed or 0, generated)
    assert 0 < len(preempted) <= 3 * len(requests) and memory["refused"] > 0  # each preempted a few times at most
    pages = engine.runner.global_kv.num_pages
    assert not engine.admission_paused and pages <= max(first, 1 + memory["patches"] // PAGE)
