"""Static-shaped decode steps (the form CUDA graphs replay) equal the dynamic step and full recompute.

CPU, fp32, random tiny models. The CUDA graph replay of the same pieces is checked in tests/gpu.
"""

import copy
from collections import Counter

import pytest
import torch
from enginekit import assert_close_scores, replay_full_recompute, run_engine, with_local_window
from factory import PARITY_TEXT

from blt_runtime import load_model, paged_cache
from blt_runtime.cache import KVCache
from blt_runtime.engine import Engine
from blt_runtime.graphs import StepGraphs
from blt_runtime.model.local_encoder import PATCH_BLOCK
from blt_runtime.paged_cache import PAGE, PagedKVCache
from blt_runtime.sampling import SamplingParams
from blt_runtime.static import PIECE_BUFFERS, StaticDecoder, batch_buckets, bucket, span_bucket


@pytest.fixture(scope="module")
def models(hf_checkpoint):
    return {s: load_model(hf_checkpoint(s)[1]) for s in ("1b", "gqa", "mixed_heads")}


@pytest.mark.parametrize("structure, window, prompt_len", [
    ("gqa", 512, 700),  # ring buffers past the window, global cache read past 64 patches
    ("1b", 48, 100),  # a small ring that wraps many times
    ("mixed_heads", None, 1),  # local caches without a window: read at power-of-two spans
])
def test_static_greedy_equals_full_recompute(models, structure, window, prompt_len):
    model = models[structure] if window == 512 else with_local_window(models[structure], window)
    prompt = PARITY_TEXT[:prompt_len - 1]
    engine = Engine(model, static=True)
    params = SamplingParams(max_bytes=600, temperature=0.0, ignore_eos=True, logprobs=1)
    engine.add_request("g", prompt, params)
    seq = engine.sequences["g"]
    outputs = []
    while engine.has_work():
        outputs += engine.step()
    generated = b"".join(o.new_bytes for o in outputs)
    assert len(generated) >= 600
    replay_full_recompute(model, prompt, params, seq.seed, generated, engine_logprobs=[o.logprobs for o in outputs])
    assert seq.num_patches > 64, "the global cache should have been read past 64 patches (and 4 pages)"
    assert outputs[-1].usage.global_steps == seq.num_patches


def test_static_equals_dynamic_batched(models):
    """Eight requests of every sampling kind joining at different steps, in buckets of 1 to 8 rows:
    the same bytes, patches and logprobs as the dynamic step."""
    model = models["1b"]
    kinds = [dict(temperature=0.0), dict(temperature=0.8, top_p=0.9), dict(temperature=1.0, top_k=20),
             dict(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5), dict(temperature=0.7, min_p=0.1),
             dict(temperature=0.0, logprobs=3), dict(temperature=1.0, presence_penalty=1.0, logprobs=2),
             dict(temperature=0.9, logit_bias={32: 4.0, 101: -100.0}, logprobs=1)]
    requests = {f"r{i}": (PARITY_TEXT[i * 37:i * 37 + 13 * i + 1],
                          SamplingParams(max_bytes=150 + 15 * i, seed=i, ignore_eos=i % 2 == 0, **kind))
                for i, kind in enumerate(kinds)}
    joins = {f"r{i}": (i * 5) % 23 for i in range(len(kinds))}

    def run(static: bool):
        engine = Engine(model, max_batch_size=8, prefill_chunk=64, static=static)
        logprobs = {rid: [] for rid in requests}
        step = engine.step

        def step_recording():
            outputs = step()
            for o in outputs:
                if o.logprobs is not None:
                    logprobs[o.request_id].append(o.logprobs)
            return outputs

        engine.step = step_recording
        return run_engine(engine, requests, joins), logprobs

    (dynamic, dynamic_lp), (static, static_lp) = run(False), run(True)
    for rid in requests:
        assert static[rid][0] == dynamic[rid][0], rid
        assert static[rid][1].usage == dynamic[rid][1].usage
        assert static[rid][1].finish_reason == dynamic[rid][1].finish_reason
        for (chosen_s, top_s), (chosen_d, top_d) in zip(static_lp[rid], dynamic_lp[rid], strict=True):
            assert abs(chosen_s - chosen_d) < 1e-4  # fp32: masked full-window reads sum in another order
            assert [i for i, _ in top_s] == [i for i, _ in top_d]
    assert any(static_lp.values())


HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")


def watch_host_reads(monkeypatch) -> list[str]:
    """Record every read of device values on the host (the Tensor methods that sync) and every tensor
    built from host data (torch.tensor), in call order."""
    calls: list[str] = []

    def recorded(name, original):
        def call(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)
        return call

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, recorded(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "tensor", recorded("torch.tensor", torch.tensor))
    return calls


def test_pieces_never_wait_for_the_host(models, monkeypatch):
    """A captured piece may not sync or copy from the host: inside the pieces, anything that reads a
    device value on the host or builds a tensor from host data fails this test."""
    engine = Engine(models["1b"], max_batch_size=4, static=True)
    calls = watch_host_reads(monkeypatch)
    run = StaticDecoder._run

    def watched_run(self, key, piece):
        before = len(calls)
        run(self, key, piece)
        assert not calls[before:], f"{calls[before:]} inside the static piece {key}"

    monkeypatch.setattr(StaticDecoder, "_run", watched_run)
    for i in range(3):
        engine.add_request(str(i), PARITY_TEXT[:20 * i], SamplingParams(max_bytes=40, temperature=0.5 * i, logprobs=i))
    pieces = set()
    while engine.has_work():
        engine.step()
        pieces |= {key[0] for key in engine.static.keys_seen}
    assert pieces == {"encode", "patch", "finish"}


def test_byte_pieces_read_caches_in_place(models, monkeypatch):
    """Row b of a static step is slot b whenever that needs no larger bucket than the batch's own, and
    then the encode and finish pieces read every cache in place (a gathered copy of each layer's window
    would move gigabytes per step at 64 streams on a GPU); otherwise they gather the rows. The batch
    here has holes (a finished request's slot, a prompt still prefilling) and a tail with one request
    on a high slot; test_static_equals_dynamic_batched checks the outputs of such steps."""
    engine = Engine(models["1b"], max_batch_size=4, static=True)
    reads: list[tuple[tuple, object]] = []
    expected: list[bool] = []  # per decode step: does the bucket above the highest slot equal the batch's
    chosen: list[bool] = []  # per decode step: did it read in place
    read, paged_read, run, step = KVCache.read, PagedKVCache.read, StaticDecoder._run, StaticDecoder.step
    piece = []

    def watched_read(self, layer, slots, span):
        reads.append((piece[-1] if piece else ("outside",), slots))
        return (paged_read if isinstance(self, PagedKVCache) else read)(self, layer, slots, span)

    def watched_run(self, key, fn):
        piece.append(key)
        if key[0] == "encode":
            chosen.append(key[-1])
        try:
            run(self, key, fn)
        finally:
            piece.pop()

    def watched_step(self, slots, *args):
        expected.append(bucket(max(slots) + 1, self.sizes) == bucket(len(slots), self.sizes))
        return step(self, slots, *args)

    monkeypatch.setattr(KVCache, "read", watched_read)
    monkeypatch.setattr(PagedKVCache, "read", watched_read)
    monkeypatch.setattr(StaticDecoder, "_run", watched_run)
    monkeypatch.setattr(StaticDecoder, "step", watched_step)
    requests = {str(i): (PARITY_TEXT[:30 + 40 * i], SamplingParams(max_bytes=12 + 30 * (i % 2), temperature=0.0))
                for i in range(4)}
    run_engine(engine, requests, {"0": 0, "1": 0, "2": 2, "3": 20})
    byte_reads = [(key, slots) for key, slots in reads if key[0] in ("encode", "finish")]
    for key, slots in byte_reads:
        assert isinstance(slots, slice) == key[-1], (key, slots)  # the key's last field: in place
        assert not isinstance(slots, slice) or slots.start == 0
    assert chosen == expected and set(expected) == {True, False}  # both kinds of step happened
    assert any(key[0] == "patch" for key, _ in reads)  # patch steps gather their few closing rows


def test_graphs_need_cuda_and_static_steps(models):
    with pytest.raises(ValueError, match="CUDA device"):
        Engine(models["1b"], static=True, cuda_graphs=True)
    with pytest.raises(ValueError, match="static=True"):
        Engine(models["1b"], static=False, cuda_graphs=True)
    assert Engine(models["1b"]).static is None  # on CPU the dynamic step is the default


def test_buckets():
    assert batch_buckets(16) == [1, 2, 4, 8, 16] and batch_buckets(12) == [1, 2, 4, 8, 12]
    assert batch_buckets(1) == [1]
    assert [bucket(n, [1, 2, 4, 8, 12]) for n in (1, 3, 5, 9, 12)] == [1, 4, 8, 12, 12]
    assert span_bucket(1) == 64 and span_bucket(65) == 128 and span_bucket(3, 16) == 16


def test_the_global_cache_grows_no_further_than_a_sequence_can_hold():
    """Without a window a cache doubles as the longest sequence needs, but not past max_len, unless a static
    step's span (a power of two) asks for more."""
    cache = KVCache(1, 2, 1, 4, None, 100, "cpu", torch.float32)
    cache.kv[:, 0, 1, 0, 5] = 7.0
    sizes = []
    for needed in (64, 70, 100, 128):
        cache.reserve(needed)
        sizes.append(cache.kv.shape[4])
    assert sizes == [64, 100, 100, 128] and (cache.kv[:, 0, 1, 0, 5] == 7.0).all()  # kept what it held


class RecordedPiece:
    """A CPU stand-in for a CUDA graph: replay runs the piece recorded at capture time, and fails if a
    buffer that a real graph of that piece would read by address has been replaced since."""

    def __init__(self, key, piece, static):
        self.key, self.piece, self.static = key, piece, static
        self.addresses = self.buffers()

    def buffers(self):
        r, growing = self.static.r, self.static.growing_buffers()
        tensors = [r.history, r.latest, r.output_counts, r.seen]
        tensors += [growing[name] for name in PIECE_BUFFERS[self.key[0]]]
        if self.static._ahead_logits is not None:
            tensors += [self.static._ahead_logits, self.static._ahead_history]
        return [t.data_ptr() for t in tensors]

    def replay(self):
        assert self.buffers() == self.addresses, f"replay of {self.key} on a buffer that was replaced after capture"
        self.piece()


class CpuStepGraphs(StepGraphs):
    def __init__(self, static):
        self.static, self.graphs, self.captures, self.forgotten, self.pool = static, {}, 0, 0, None
        self.captured: dict[tuple, int] = {}  # captures by key

    def _run_eagerly(self, piece):
        piece()

    def _record(self, key, piece):
        self.captured[key] = self.captured.get(key, 0) + 1
        return RecordedPiece(key, piece, self.static)


def test_graph_keys_name_every_shape(models, monkeypatch):
    """With graphs stood in by replays of the piece recorded at capture, a key that failed to name
    something a piece depends on (bucket, spans, sampling mode, patch shape) or a graph kept across a
    buffer's growth would give other bytes than the eager static steps. The global cache's pool starts at
    one page a slot here, so that it grows."""
    monkeypatch.setattr(paged_cache, "FIRST_PATCHES", PAGE)
    model = models["1b"]
    kinds = [dict(temperature=0.0), dict(temperature=3.0, top_p=0.95, logprobs=2), dict(temperature=0.0,
             repetition_penalty=1.2)]
    # r0 (greedy) runs alone first and r4 (sampled) alone last, both in the bucket of one row
    mixed = {f"r{i}": (PARITY_TEXT[i * 50:i * 50 + 40 * i],
                       SamplingParams(max_bytes=200 + 30 * i, seed=i, ignore_eos=True, **kinds[i % 3]))
             for i in range(5)}
    # and, with no buffer growing in between, a greedy request alone, then a sampled one alone
    one_by_one = {"greedy": (b"one", SamplingParams(max_bytes=40, temperature=0.0)),
                  "sampled": (b"one", SamplingParams(max_bytes=40, temperature=3.0, seed=5, repetition_penalty=1.5))}
    for requests, joins in ((mixed, {f"r{i}": 4 * i for i in range(5)}), (one_by_one, {"sampled": 60})):
        eager = run_engine(Engine(model, max_batch_size=8, static=True), requests, joins)
        for lookahead in (0, 2):  # and with steps of up to 2 rows decoding ahead
            engine = Engine(model, max_batch_size=8, static=True, lookahead_rows=lookahead)
            engine.static.graphs = graphs = CpuStepGraphs(engine.static)
            replayed = run_engine(engine, requests, joins)
            for rid in requests:
                assert replayed[rid][0] == eager[rid][0] and replayed[rid][1].usage == eager[rid][1].usage, rid
            assert {key[0] for key in graphs.graphs} == {"encode", "patch", "finish"}
            if lookahead:
                assert {key[-2] for key in graphs.graphs if key[0] == "finish"} > {(True, True)}
                assert any(key[-1] for key in graphs.graphs if key[0] == "patch")  # closing rows decoded again
            assert graphs.captures == len(graphs.graphs) + graphs.forgotten
            if requests is mixed:  # the global cache grew: only patch steps, which read it, were captured again
                assert engine.runner.global_kv.num_pages > 1 + 13
                assert {key[0] for key, n in graphs.captured.items() if n > 1} == {"patch"}, graphs.captured
                assert all(key in graphs.graphs for key in graphs.captured if key[0] != "patch")


def test_local_caches_without_a_window_grow_under_their_pieces_graphs(models):
    """Local caches without a window grow like the global one: the graphs of the byte pieces that read them
    go with the old buffers (their spans change with them, so new keys are captured), none is kept on a
    replaced buffer (RecordedPiece would fail its replay), and the bytes stay those of the eager static
    steps."""
    model = with_local_window(models["mixed_heads"], None)
    requests = {"g": (PARITY_TEXT[:30], SamplingParams(max_bytes=150, temperature=0.0, ignore_eos=True))}
    eager = run_engine(Engine(model, max_batch_size=2, static=True), requests, {"g": 0})
    engine = Engine(model, max_batch_size=2, static=True)
    engine.static.graphs = graphs = CpuStepGraphs(engine.static)
    assert run_engine(engine, requests, {"g": 0})["g"][0] == eager["g"][0]
    spans = {key[2] for key in graphs.captured if key[0] != "patch"}
    assert len(spans) == 3  # the local caches grew twice
    assert {key[2] for key in graphs.graphs if key[0] != "patch"} == {max(spans)}  # the older ones are gone
    assert all(graph.buffers() == graph.addresses for graph in graphs.graphs.values())


def run_counting_ways(engine, requests, joins):
    """run_engine, and how many finish pieces ran each way, (ahead, fork) -> count, and how many patch pieces
    decoded their closing rows again ("again")."""
    ways = Counter()
    run = engine.static._run

    def counted(key, piece):
        if key[0] == "finish":
            ways[key[-2]] += 1
        if key[0] == "patch" and key[-1]:
            ways["again"] += 1
        run(key, piece)

    engine.static._run = counted
    return run_engine(engine, requests, joins), ways


@pytest.mark.parametrize("structure, window", [("1b", 512), ("gqa", 48), ("mixed_heads", None)])
def test_decoding_ahead_changes_no_output(models, structure, window):
    """Static steps that decode their sampled bytes ahead (lookahead_rows; on CUDA beside the entropy
    model) give the bytes, patches and logprobs of the plain static steps, with requests joining and
    leaving (steps of one row and of several), greedy, sampled with logprobs, and penalised: among them
    steps that sample from the logits decoded ahead, patch steps that decode their closing rows again
    under the new patch, and steps after a join (encoded again)."""
    model = models[structure] if window == 512 else with_local_window(models[structure], window)
    requests = {"g": (PARITY_TEXT[:60], SamplingParams(max_bytes=150, temperature=0.0, ignore_eos=True)),
                "s": (PARITY_TEXT[100:130], SamplingParams(max_bytes=90, temperature=0.9, seed=3, logprobs=2,
                                                            ignore_eos=True)),
                "p": (b"penalised", SamplingParams(max_bytes=40, temperature=0.7, seed=4, repetition_penalty=1.3,
                                                   presence_penalty=0.5, ignore_eos=True))}
    joins = {"g": 0, "s": 40, "p": 60}
    plain = run_engine(Engine(model, max_batch_size=4, static=True), requests, joins)
    ahead, ways = run_counting_ways(Engine(model, max_batch_size=4, static=True, lookahead_rows=4), requests, joins)
    for rid in requests:
        assert ahead[rid][0] == plain[rid][0], rid
        assert ahead[rid][1].usage == plain[rid][1].usage, rid
        assert_close_scores(ahead[rid][1].logprobs, plain[rid][1].logprobs, rid)  # rows batched otherwise: fp32 noise
    assert ways[(True, True)] > 100 and ways["again"] > 20 and ways[(False, True)] >= 3, ways


@pytest.mark.parametrize("static", [False, True])
def test_one_wait_for_the_device_per_step(models, monkeypatch, static):
    """Decoding, a prefill chunk, first bytes and logprobs in the same steps: each engine step reads
    device values on the host once (HostTransfer.fetch), however much it does (with first bytes a step
    after their prefill, as on CUDA: first_byte_at_once, a CPU's default, reads them in a second)."""
    engine = Engine(models["1b"], max_batch_size=4, prefill_chunk=48, static=static, first_byte_at_once=False)
    calls = watch_host_reads(monkeypatch)
    for i in range(4):
        engine.add_request(str(i), PARITY_TEXT[:90 * i], SamplingParams(max_bytes=60, temperature=0.5 * (i % 2),
                                                                        logprobs=i if i % 2 else None))
    kinds = set()
    while engine.has_work():
        plan = engine.scheduler.plan()
        kinds |= {k for k, v in (("decode", plan.decode), ("prefill", plan.prefill), ("first", plan.first)) if v}
        before = len(calls)
        engine.step()
        reads = [c for c in calls[before:] if c != "torch.tensor"]  # building inputs is no wait
        assert len(reads) <= 1, reads
    assert kinds == {"decode", "prefill", "first"}


def test_a_chunk_of_many_patches_is_one_wait(models, monkeypatch):
    """A prefill chunk that closes more patches than a full forward cross-attends at once (PATCH_BLOCK):
    the engine's patch slots still read nothing back from the device (the model's full forward would)."""
    model = copy.deepcopy(models["1b"])
    object.__setattr__(model.config, "patching_threshold", -1.0)  # every byte a patch
    engine = Engine(model, max_batch_size=2, prefill_chunk=300, static=True, first_byte_at_once=False)
    calls = watch_host_reads(monkeypatch)
    engine.add_request("many", PARITY_TEXT[:600], SamplingParams(max_bytes=3, temperature=0.0, ignore_eos=True))
    while engine.has_work():
        before = len(calls)
        out = engine.step()
        assert len([c for c in calls[before:] if c != "torch.tensor"]) <= 1
    assert out[-1].usage.prompt_patches == 601 > 2 * PATCH_BLOCK
