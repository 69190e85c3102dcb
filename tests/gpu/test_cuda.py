"""CUDA checks; skipped, and reported as skipped, where no GPU is present (CI has none)."""

import pytest
import torch
from factory import PARITY_TEXT

from blt_runtime import encode, load_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; CI machines have none")]


def test_cuda_matches_cpu(hf_checkpoint):
    _, directory = hf_checkpoint("1b")
    ids = torch.tensor([encode(PARITY_TEXT)])
    cpu = load_model(directory).logits(ids)
    gpu = load_model(directory, device="cuda").logits(ids)
    assert torch.equal(load_model(directory, device="cuda").patch_lengths(ids).cpu(),
                       load_model(directory).patch_lengths(ids))
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-3, rtol=0)


def test_triton_kernels_on_cuda():
    """The compiled Triton kernels agree with PyTorch's (kernels.self_check), so "auto" picks them; and
    so do the projections of "triton-gemv" (kernels.gemv_check)."""
    from blt_runtime.kernels import gemv_check, resolve, sampling_check, self_check

    device = torch.device("cuda")
    for dtype in (torch.float32, torch.bfloat16):
        assert self_check(device, dtype) is None and sampling_check(device, dtype) is None
        assert gemv_check(device, dtype) is None
        assert resolve("auto", device, dtype) == "triton"


@pytest.mark.parametrize("compile, kernels", [(False, "torch"), (False, "triton"), (False, "triton-gemv"),
                                             (True, "triton")])
def test_graph_replay_equals_eager(hf_checkpoint, compile, kernels):
    """256 greedy bytes for three requests joining at different steps: CUDA graph replay gives the
    bytes and patches of the same static steps run eagerly (greedy, seeded sampling with logprobs, and
    guided: guide.py),
    and every piece was captured; with either kernels, and the element-wise stretches compiled."""
    from enginekit import run_engine

    from blt_runtime.engine import Engine
    from blt_runtime.guide import ByteGuide
    from blt_runtime.sampling import SamplingParams

    _, directory = hf_checkpoint("gqa")
    model = load_model(directory, device="cuda")
    requests = {f"r{i}": (PARITY_TEXT[:100 * i], SamplingParams(max_bytes=256, temperature=0.0, ignore_eos=True))
                for i in range(3)} | {"s": (b"seeded", SamplingParams(max_bytes=256, temperature=0.8, seed=7,
                                                                       logprobs=2)),
                                      "g": (b"guided", SamplingParams(max_bytes=200, temperature=0.9, seed=8,
                                                                      guide=ByteGuide.regex(r"([a-z]+ ){5,40}")))}
    joins = {"r0": 0, "r1": 3, "r2": 9, "s": 5, "g": 11}
    graphs = Engine(model, max_batch_size=5, static=True, cuda_graphs=True, compile=compile, kernels=kernels)
    assert graphs.kernels == kernels
    replayed = run_engine(graphs, requests, joins)
    eager = run_engine(Engine(model, max_batch_size=5, static=True, cuda_graphs=False, compile=compile,
                              kernels=kernels), requests, joins)
    for rid in requests:
        assert replayed[rid][0] == eager[rid][0], rid
        assert replayed[rid][1].usage == eager[rid][1].usage, rid
    assert {key[0] for key in graphs.static.graphs.graphs} == {"encode", "patch", "finish"}
    # no key captured twice but after its graph was dropped (a buffer it read had grown)
    assert graphs.static.graphs.captures == len(graphs.static.graphs) + graphs.static.graphs.forgotten


def test_prompts_prefilled_together_and_scored_on_cuda(hf_checkpoint):
    """Short prompts arriving together (prefilled as the rows of one batch), one of them scoring its
    prompt: on CUDA the bytes of the CPU engine, and scores within rounding of its."""
    from blt_runtime.engine import Engine
    from blt_runtime.sampling import SamplingParams

    _, directory = hf_checkpoint("1b")
    runs = {}
    for device in ("cpu", "cuda"):
        engine, got, scores = Engine(load_model(directory, device=device), max_batch_size=8), {}, None
        for i in range(6):
            engine.add_request(f"p{i}", PARITY_TEXT[60 * i:60 * i + 20 + 15 * i],
                               SamplingParams(max_bytes=40, temperature=0.0, ignore_eos=True,
                                              prompt_logprobs=2 if i == 1 else None))
        while engine.has_work():
            for o in engine.step():
                got[o.request_id] = got.get(o.request_id, b"") + o.new_bytes
                scores = o.prompt_logprobs if o.prompt_logprobs is not None else scores
        runs[device] = got, scores
    assert runs["cuda"][0] == runs["cpu"][0]
    gpu, cpu = runs["cuda"][1], runs["cpu"][1]
    assert len(gpu) == len(cpu) == 35 and all(abs(g[0] - c[0]) < 1e-3 for g, c in zip(gpu, cpu))


def test_kept_prefixes_on_cuda(hf_checkpoint):
    """New conversations after the same instructions, one after the other, on CUDA's defaults (graphs,
    overlapped steps): the third and fourth start from the kept copy, with the CPU engine's bytes."""
    from blt_runtime.engine import Engine
    from blt_runtime.sampling import SamplingParams

    _, directory = hf_checkpoint("1b")
    instructions = PARITY_TEXT[:600] + b"\nQ: "
    runs = {}
    for device in ("cpu", "cuda"):
        engine, got = Engine(load_model(directory, device=device), max_batch_size=4), []
        for question in (b"what now?", b"and then?", b"who?", b"so?"):
            engine.add_request("q", instructions + question, SamplingParams(max_bytes=40, temperature=0.0,
                                                                             ignore_eos=True))
            out = b""
            while engine.has_work():
                for o in engine.step():
                    out += o.new_bytes
                    shared = o.usage.shared_prompt_bytes if o.finished else None
            got.append((out, shared))
        runs[device] = got
    assert runs["cuda"] == runs["cpu"]
    assert [shared for _, shared in runs["cuda"]] == [0, 0, len(instructions), len(instructions)]


def test_guided_jump_forward_on_cuda(hf_checkpoint):
    """Bytes a guide forces, prefilled as chunks between graph-replayed decode steps (overlapped): the bytes of
    CUDA without jump-forward (its default there), and greedy, the CPU engine's."""
    from blt_runtime.engine import Engine
    from blt_runtime.guide import ByteGuide
    from blt_runtime.sampling import SamplingParams

    _, directory = hf_checkpoint("1b")
    guide = ByteGuide.regex(r"(yes|no|maybe), (the|a) [a-z]{2,6}( [a-z0-9]{1,5}){0,3}\. (Done|Over and out)\.")
    runs = {}
    for device, least in (("cpu", 2), ("cuda", 0), ("cuda", 2)):
        engine = Engine(load_model(directory, device=device), max_batch_size=4, jump_forward=least)
        for i in range(4):
            engine.add_request(str(i), PARITY_TEXT[40 * i:40 * i + 60], SamplingParams(
                max_bytes=90, temperature=0.0 if i % 2 else 0.9, seed=i, guide=guide))
        out = {str(i): b"" for i in range(4)}
        while engine.has_work():
            for o in engine.step():
                out[o.request_id] += o.new_bytes
        runs[device, least] = out
        assert (engine.forced_bytes > 0) == bool(least)
    assert runs["cuda", 2] == runs["cuda", 0]
    assert all(runs["cuda", 2][rid] == runs["cpu", 2][rid] for rid in ("1", "3"))  # greedy (sampled ones could
    # part where fp32 sums on the two devices differ)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_attention_on_cuda(dtype):
    """At the 1B shapes' few rows the decode-attention kernel splits each row's span (attention.default_splits)
    and gives SDPA's result, as the unsplit kernel does, with a mask and the new entry stored; given
    counters, the splits meet in the kernel, with the second kernel's result bit for bit."""
    from blt_runtime.attention import decode_attention, default_splits, sdpa_attention

    device, g = torch.device("cuda"), torch.Generator().manual_seed(0)
    tolerance = 2e-5 if dtype == torch.float32 else 2e-2
    for B, H, D, span in ((1, 16, 64, 512), (1, 16, 128, 1024), (3, 12, 64, 512)):
        kv = torch.randn(2, 1, 4, H, span, D, generator=g).to(device, dtype)
        q = torch.randn(B, H, 1, D, generator=g).to(device, dtype)
        new = torch.randn(2, B, H, 1, D, generator=g).to(device, dtype)
        rows, where = torch.arange(B, device=device), torch.full((B, 1), span // 3, device=device)
        mask = torch.zeros(B, 1, 1, span, device=device, dtype=dtype)
        mask[..., span * 3 // 4:] = float("-inf")
        expected = kv.clone()
        expected[:, 0][:, rows[:, None], :, where] = new.permute(1, 3, 0, 2, 4)
        picked = expected[:, 0, rows, :, :span]
        want = sdpa_attention(q, picked[0], picked[1], mask)
        assert default_splits(B * H, span // 64, device) > 1
        counts = torch.zeros(B * H, device=device, dtype=torch.int32)
        got = {}
        for splits, given in ((None, None), (1, None), (None, counts), (16, counts)):
            cache = kv.clone()
            got[splits, given is not None] = decode_attention(q, cache, 0, rows, span, mask, splits=splits,
                                                              store=(new[0], new[1], rows[:, None], where),
                                                              counts=given)
            assert torch.equal(cache, expected)
            torch.testing.assert_close(got[splits, given is not None], want, atol=tolerance, rtol=tolerance)
        assert torch.equal(got[None, True], got[None, False])  # met in the kernel: the second kernel's sums
        # the last split to finish, whichever it is, combines: the same bytes however the programs were
        # scheduled, many times over, and the counters back at 0 after each
        for _ in range(200):
            assert torch.equal(decode_attention(q, kv.clone(), 0, rows, span, mask, counts=counts),
                               decode_attention(q, kv.clone(), 0, rows, span, mask))
        assert not counts.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_on_cuda(dtype):
    """The global model's cache of pages (paged_cache.py) on a GPU: the kernel through shuffled pages gives the
    kernel through rows bit for bit, stored entries included, at a patch step's shapes (16 closing rows of 64
    gathered, 1,024 entries; one row, split), with the splits meeting in the kernel."""
    from test_paged_cache import paged, rows_of

    from blt_runtime.attention import RotationTable, Visible, decode_attention

    device, g = torch.device("cuda"), torch.Generator().manual_seed(1)
    for B, H, H_kv, D, span in ((16, 16, 16, 128, 1024), (1, 16, 16, 128, 1024), (4, 8, 2, 64, 200)):
        kv = torch.randn(2, 1, 64, H_kv, 1024, D, generator=g).to(dtype)
        pool, table = (t.to(device) for t in paged(kv, 16, seed=B))
        kv = kv.to(device)
        q = torch.randn(B, H, 1, D, generator=g).to(device, dtype)
        new = torch.randn(2, B, H_kv, 1, D, generator=g).to(device, dtype)
        slots = torch.randperm(64, generator=g)[:B].to(device)
        lengths = torch.randint(span // 2, span, (B,), generator=g).to(device)
        rotation = RotationTable.of(1024, D, 10000.0, device)
        counts = torch.zeros(B * H, device=device, dtype=torch.int32)
        want = decode_attention(q, kv, 0, slots, span, Visible(lengths, None, None), rotation=rotation,
                                store=(new[0], new[1], slots[:, None], None), counts=counts)
        got = decode_attention(q, pool, 0, slots, span, Visible(lengths, None, None), rotation=rotation,
                               store=(new[0], new[1], slots[:, None], None), counts=counts, pages=(table, 16))
        assert torch.equal(got, want) and torch.equal(rows_of(pool, table), kv) and not counts.any()


def test_decoding_ahead_on_cuda(hf_checkpoint):
    """Steps that decode their sampled bytes ahead in a second CUDA stream beside the entropy model's
    look-ahead (static.py), captured into CUDA graphs as two branches, give the bytes and patches of the
    same engine without decoding ahead: one request at a time (a bucket of one row throughout), then two
    together (lookahead_rows 2)."""
    from enginekit import run_engine

    from blt_runtime.engine import Engine
    from blt_runtime.sampling import SamplingParams

    _, directory = hf_checkpoint("gqa")
    model = load_model(directory, device="cuda")
    greedy = SamplingParams(max_bytes=200, temperature=0.0, ignore_eos=True)
    cases = [({"a": (PARITY_TEXT[:80], greedy)}, {"a": 0}, 1),
             ({"s": (b"seeded", SamplingParams(max_bytes=200, temperature=0.8, seed=7, logprobs=2))}, {"s": 0}, 1),
             ({"a": (PARITY_TEXT[:80], greedy), "b": (PARITY_TEXT[100:140], greedy)}, {"a": 0, "b": 0}, 2)]
    for requests, joins, rows in cases:
        ahead = Engine(model, max_batch_size=2, static=True, cuda_graphs=True, lookahead_rows=rows)
        got = run_engine(ahead, requests, joins)
        want = run_engine(Engine(model, max_batch_size=2, static=True, cuda_graphs=True, lookahead_rows=0),
                          requests, joins)
        for rid in requests:
            assert got[rid][0] == want[rid][0] and got[rid][1].usage == want[rid][1].usage, rid
        assert any(key[0] == "finish" and key[-2] == (True, True) for key in ahead.static.graphs.graphs)


def test_a_share_of_the_gpu_on_cuda(hf_checkpoint):
    """vLLM's --gpu-memory-utilization on a real device (pool_size.use_device_share): a share of the GPU 2 GiB
    above what was in use before the model; after warm-up steps (CUDA graphs) and the share's profile, the
    process took no more than its share, the pool most of it, and the engine's bytes are the CPU engine's,
    sequences taking turns where a small fixed pool of a budget cannot hold them together."""
    from enginekit import run_engine

    from blt_runtime import pool_size
    from blt_runtime.device import memory_info
    from blt_runtime.engine import Engine
    from blt_runtime.sampling import SamplingParams

    device = torch.device("cuda")
    torch.cuda.synchronize()
    free_at_start, total = memory_info(device)
    fraction = (total - free_at_start + 2 * 2**30) / total
    _, directory = hf_checkpoint("1b")
    greedy = SamplingParams(max_bytes=60, temperature=0.0, ignore_eos=True)
    requests = {f"r{i}": (PARITY_TEXT[40 * i:40 * i + 250], greedy) for i in range(6)}
    want = run_engine(Engine(load_model(directory), max_batch_size=4, max_model_len=320), requests)
    engine = Engine(load_model(directory, device=device), max_batch_size=4, max_model_len=320)
    run_engine(engine, {"warm": (PARITY_TEXT[:100], greedy)})
    pages = pool_size.use_device_share(engine, fraction, free_at_start)
    torch.cuda.synchronize()
    taken = free_at_start - memory_info(device)[0]
    assert taken <= 2 * 2**30 and engine.cache_bytes()["global"] > 2**30, (taken, pages)
    got = run_engine(engine, requests)
    assert {rid: g[0] for rid, g in got.items()} == {rid: w[0] for rid, w in want.items()}
    per_page = engine.runner.global_kv.page_bytes
    small = Engine(load_model(directory, device=device), max_batch_size=4, max_model_len=320,
                   global_cache_bytes=per_page * 23)  # 22 pages and the null one: a full context, 324 patches, takes 21
    got = run_engine(small, requests)
    assert {rid: g[0] for rid, g in got.items()} == {rid: w[0] for rid, w in want.items()}


def test_a_growing_pool_leaves_a_share_of_the_gpu_free():
    """paged_cache.HEADROOM on a real device: a pool of pages asked to grow past what leaves 5% of the GPU free
    says it is full (CacheFull, not CUDA's out-of-memory error), and grows within it."""
    from blt_runtime.cache import CacheFull
    from blt_runtime.device import spare_memory
    from blt_runtime.paged_cache import HEADROOM, PagedKVCache

    device = torch.device("cuda")
    kv = PagedKVCache(4, 2, 8, 128, 1 << 20, device, torch.bfloat16)
    spare, total = spare_memory(device)
    most = int(spare - HEADROOM * total) // kv.page_bytes
    with pytest.raises(CacheFull):
        kv.grow(most + 2)
    kv.grow(most // 4)
    assert kv.num_pages >= most // 4 and spare_memory(device)[0] >= HEADROOM * total
    del kv
    torch.cuda.empty_cache()
