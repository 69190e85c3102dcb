"""The GPU check: a BLT with the released 1B shapes and random weights, built on the device, checked
and timed in one run. Prints a table and, last, one JSON line.

1. Builds the model in bf16 directly on the device (output heads scaled x10, spec section 8) and
   sets the threshold so that English text averages about 4.5 bytes per patch.
2. Checks: CUDA graph replay against the same static steps run eagerly on 256 greedy bytes
   ("graphs_equal_eager"; on a CPU, static steps against the dynamic step), greedy output against
   itself run again (determinism, batch 1 and every stream count), and top-1 agreement when full
   recompute in bf16 scores the engine's own greedy output (>= 99% asked). Every engine overlaps its
   steps (the next one queued before a step's outputs go back, the CUDA default); the primary one
   also runs without ("overlap_equal_no_overlap", and `..._no_overlap` bytes/s at batch 1 and at
   the largest stream count).
3. Times batch-1 bytes/s (graphs and eager), time to first byte for a 1 KB prompt (at the default
   `prefill_chunk`, 2,048 on CUDA; in one chunk: `..._one_chunk`; in chunks of 512: `..._512_chunks`),
   aggregate bytes/s at 8, 32 and 64 streams, and peak memory; and batch 1 and the largest stream
   count sampling with temperature 0.8 and top-p 0.95 (`..._sampled`; seeded, so also checked against
   the comparison engine and against itself), and 64 bytes at batch 1 with penalties and a logit bias
   as well, checked against the comparison engine (`..._penalised`). Each timed run follows an
   identical untimed one, so graph captures (one per new step shape) are not in the figures. On CUDA,
   profiles 32 batch-1 steps (graphs, and eager) and 32 steps of the largest stream count (graphs):
   kernels per step, their summed time, wall time per step, the costliest kernels.
4. Then the later parts, in this order, each timed (`parts_s`) and followed by a JSON line with all so
   far; one that would start after `--budget-s` is skipped and named in `skipped`, so the last line is
   whole within gpu_check.sh's 6 minutes:
   - `bandwidth_floor`: the most bytes/s an H200's stated bandwidth allows for the batch-1 run and the
     largest stream count (bench/roofline.py, at the bytes per patch of the greedy run), and the share
     of it each of those measured figures is.
   - `transformers`: BltForCausalLM.generate(use_cache=False) on the same weights.
   - `no_lookahead`: batch 1 again without decoding ahead (lookahead_rows 0, static.py), and whether its
     bytes are the primary engine's.
   - `unsplit_attention`: batch 1 and the largest stream count again with the attention kernel unsplit
     (attention.MAX_SPLITS 1), and whether its batch-1 bytes are the primary engine's.
   - `kernel_calls` (CUDA, where "auto" picked the Triton kernels, kernels.py): per call, the sampling
     kernel against the eager sampler (`sample_us`), the attention kernel against SDPA on rows read
     from a cache at the step's shapes (`attention_us`), the norm and gate kernels against the eager
     stretches (`stretch_us`).
   - `compiled`: the engine again with its element-wise stretches compiled (fused.py): compile time,
     graphs against eager, determinism, top-1 agreement, batch 1, the largest stream count, profile.
   - `guided`: the largest stream count, greedy, free and guided by a pattern of words and punctuation
     (bytes/s, and whether graphs and eager steps agree on the guided bytes).
   - `shared_prompts`: 8 choices of the 1 KB prompt, sampled, with shared prompts (one prefill,
     copied) and with each prefilling its own (the time until every choice has its first byte, and
     whether the bytes are the same both ways), and four new conversations after the same 1 KB of
     instructions, one after the other, with and without shared prompts (the third and fourth start
     from the copy of the instructions' state the second kept: `conversation_first_byte_ms`, their
     median, and each of the four, `conversation_first_bytes_ms`; `conversations_equal`).
   - `prompt_scores`: echo's scoring, the engine's prefill scoring the 1 KB prompt against the full
     forward's scores in the same dtype (largest difference, top-1 agreement, milliseconds of each).
   - `burst`: as many requests as the largest stream count, with 100-byte prompts, arriving together:
     the first bytes (first, median, last) with the prompts prefilled together at the default bytes a
     step, at 512 and at 2,048, and one per step; and 8 of them a step after a 3,000-byte prompt,
     before its next chunk and after all of them (`burst.behind`).
   - `torch_kernels` (CUDA): the engine with PyTorch's kernels, as in 2-3 at the largest stream count.
   - `triton_gemv` (CUDA): where they pass their check (`gemv_self_check`), the projections with their
     norms and gate inside (gemv.py) per call against what the default runs in their place
     (`gemv_us`), and the engine with `--kernels triton-gemv` as with `torch_kernels`.

Last, `decisions`: what the figures say about the defaults they were measured for (bench/gpu_decisions.py).

Needs torch (and transformers for `transformers`), never the web stack. `--small` runs tiny shapes, which
is how the script itself is tested on a CPU:

    python3 bench/gpu_check.py                      # on the GPU machine (bench/gpu_check.sh)
    .venv/bin/python bench/gpu_check.py --small --device cpu --dtype float32
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.burst import burst  # noqa: E402
from bench.gpu_decisions import decide  # noqa: E402
from bench.shared_prompts import run as run_choices  # noqa: E402
from bench.shared_prompts import turned  # noqa: E402
from blt_runtime import BltConfig, BltModel, Engine, SamplingParams, attention, encode_tensor  # noqa: E402
from blt_runtime.attention import Visible, decode_attention, sdpa_attention  # noqa: E402
from blt_runtime.cache import KVCache  # noqa: E402
from blt_runtime.guide import ByteGuide  # noqa: E402
from blt_runtime.kernels import gemv_check, sampling_check, self_check  # noqa: E402
from blt_runtime.model.blt import checkpoint_key  # noqa: E402
from blt_runtime.model.entropy import entropy_nats  # noqa: E402
from blt_runtime.paged_cache import PagedKVCache  # noqa: E402

ENGLISH = [ROOT.parent / "shared" / "data" / "tinyshakespeare.txt", ROOT / "README.md", ROOT / "weights" / "README.md"]
SMALL = {"patcher_config": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
         "encoder_config": dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4),
         "global_config": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
         "decoder_config": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
         "encoder_hash_byte_group_vocab": 1009}


def english(n_bytes: int) -> bytes:
    data = b"\n\n".join(p.read_bytes() for p in ENGLISH if p.is_file())
    data = (data * (n_bytes // max(len(data), 1) + 1))[:n_bytes]
    return data.decode("utf-8", "ignore").encode()


def stream_prompts(n: int) -> list[bytes]:
    """The prompts of n streams: 200 bytes of English each, each ending elsewhere."""
    return [english(200 + 37 * i)[-200:] for i in range(n)]


def digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()[:16]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(small: bool, device: torch.device, dtype: torch.dtype) -> BltModel:
    """Random weights with the released 1B shapes (or tiny ones), made on the device."""
    cfg = BltConfig.from_dict({"model_type": "blt", **(SMALL if small else {})})
    torch.manual_seed(0)
    with torch.device(device):
        model = BltModel(cfg).to(dtype).eval().requires_grad_(False)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
        model.patcher.lm_head.weight.mul_(10.0)
    return model


def set_threshold(model: BltModel, bytes_per_patch: float = 4.5) -> float:
    """The entropy quantile at which about 1 byte in `bytes_per_patch` starts a patch."""
    ids = encode_tensor(english(4000), model.device)
    with torch.inference_mode():
        h = entropy_nats(model.patcher(ids))[0, 1:].float()
    values = h.double().sort().values
    k = int(len(values) * (1.0 - 1.0 / bytes_per_patch))
    lo, hi = max(k - 40, 0), min(k + 40, len(values) - 1)
    gaps = values[lo + 1:hi + 1] - values[lo:hi]
    i = lo + int(gaps.argmax())  # the widest gap near the quantile: no byte sits on the threshold (spec section 8)
    threshold = float((values[i] + values[i + 1]) / 2)
    object.__setattr__(model.config, "patching_threshold", threshold)
    return threshold


def make_engine(model: BltModel, graphs: bool, static: bool = True, compile: bool = False,
                kernels: str = "auto", share: bool = False, lookahead_rows: int | None = None) -> Engine:
    """Overlapped steps (the CUDA default) on any device, so that the CPU test of this script runs
    the same paths. Shared prompts only with `share` (`measure_shared`): the timings run the same
    prompts again, and from the third time a kept copy of a prompt's state would spare its prefill."""
    return Engine(model, max_batch_size=64, max_model_len=4096, static=static, cuda_graphs=graphs, compile=compile,
                  kernels=kernels, overlap=True, share_prompts=share, lookahead_rows=lookahead_rows)


SAMPLED = dict(temperature=0.8, top_p=0.95)  # how a client who samples might ask
# the sampler's other variant: penalties and a logit bias, read from the slots' tables
PENALISED = dict(SAMPLED, repetition_penalty=1.1, frequency_penalty=0.3, presence_penalty=0.2,
                 logit_bias={32: 1.0, 101: -2.0})


def run_engine(engine: Engine, prompts: list[bytes], n_bytes: int, sampled: bool | dict = False
               ) -> tuple[dict, list[bytes]]:
    """Greedy generation for all prompts at once (`sampled`: with SAMPLED, or these parameters; request i
    seeded i); an engine is reused: its graphs stay captured."""
    run = RUNS.pop()
    ids = [f"{run}-{i}" for i in range(len(prompts))]
    for i, (rid, p) in enumerate(zip(ids, prompts)):
        how = dict(SAMPLED if sampled is True else sampled, seed=i) if sampled else dict(temperature=0.0)
        engine.add_request(rid, p, SamplingParams(max_bytes=n_bytes, ignore_eos=True, **how))
    out = {rid: bytearray() for rid in ids}
    patches = 0
    device = engine.model.device
    sync(device)
    start, first = time.perf_counter(), None
    while engine.has_work():
        for o in engine.step():
            out[o.request_id] += o.new_bytes
            patches += o.usage.completion_patches if o.usage else 0
            if first is None and o.new_bytes:
                sync(device)
                first = time.perf_counter() - start
    sync(device)
    elapsed = time.perf_counter() - start
    made = sum(len(b) for b in out.values())
    return {"bytes_per_s": made / elapsed, "ttfb_s": first, "seconds": elapsed, "bytes": made,
            "completion_patches": patches}, [bytes(out[rid]) for rid in ids]


RUNS = list(range(10_000, 0, -1))  # unique request ids across runs


def without_overlap(engine: Engine, prompts: list[bytes], n_bytes: int) -> tuple[dict, list[bytes]]:
    """run_engine with the engine's steps not overlapped (nothing is queued between runs)."""
    engine.overlap = False
    try:
        return run_engine(engine, prompts, n_bytes)
    finally:
        engine.overlap = True


def profile_steps(engine: Engine, prompts: list[bytes], steps: int = 32) -> dict:
    try:
        return _profile_steps(engine, prompts, steps)
    except Exception as e:  # noqa: BLE001 - a profiler failure must not hide the figures around it
        traceback.print_exc()
        for rid in [rid for rid in engine.sequences if rid.startswith("profile-")]:
            engine.abort(rid)  # the engine goes on to other runs
        while engine.has_work():
            engine.step()
        return {"error": f"{type(e).__name__}: {e}"[:400]}


class PieceTimes:
    """The device time of each piece of the static steps (encode, patch, finish: static.py) while on: CUDA
    events recorded around each piece's replay, read once the steps are done (on a CPU, where pieces
    run as they are called, the clock)."""

    def __init__(self, engine: Engine):
        self.engine, self.cuda = engine, engine.model.device.type == "cuda"
        self.marks: list[tuple[str, object, object]] = []

    def __enter__(self) -> PieceTimes:
        static = self.engine.static
        if static is not None:
            run = self.run = static._run

            def timed(key, piece):
                start, end = self._mark(), None
                try:
                    run(key, piece)
                finally:
                    end = self._mark()
                    self.marks.append((key[0], start, end))

            static._run = timed
        return self

    def __exit__(self, *exc) -> None:
        if self.engine.static is not None:
            self.engine.static._run = self.run

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def per_step(self, steps: int) -> dict:
        """Microseconds per engine step in each piece, and how many times each ran (after a sync)."""
        spent: dict[str, float] = {}
        runs: dict[str, int] = {}
        for name, start, end in self.marks:
            us = start.elapsed_time(end) * 1000 if self.cuda else (end - start) * 1e6
            spent[name] = spent.get(name, 0.0) + us
            runs[name] = runs.get(name, 0) + 1
        return {"us_per_step": {name: round(us / steps, 1) for name, us in spent.items()}, "runs": runs}


def _profile_steps(engine: Engine, prompts: list[bytes], steps: int) -> dict:
    """What the device does in a decode step of as many streams as prompts: kernels (and copies)
    launched per step, their summed duration, and the wall time per step, from torch.profiler (CUDA
    only); and the device time of each piece of the steps (`pieces`: PieceTimes) with the wall time per
    step of those steps (the profiler's own cost left out). Kernel time far below wall time means the
    step waits on launches or on the host, not on the kernels."""
    from torch.profiler import ProfilerActivity, profile

    rids = [f"profile-{RUNS.pop()}" for _ in prompts]
    for rid, prompt in zip(rids, prompts):
        engine.add_request(rid, prompt, SamplingParams(max_bytes=steps + 80, temperature=0.0, ignore_eos=True))
    for _ in range(64):  # the prefills and first bytes (captured before the profile), then a few steps
        engine.step()
        if all(engine.sequences[rid].generated for rid in rids if rid in engine.sequences):
            break
    for _ in range(4):
        engine.step()
    device = engine.model.device
    sync(device)
    cuda = device.type == "cuda"  # (on a CPU, as tests run it, no device events: zeros)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync(device)
        wall = time.perf_counter() - start
    with PieceTimes(engine) as pieces:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync(device)
        unprofiled = time.perf_counter() - start
    while engine.has_work():
        engine.step()
    on_device = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, float] = {}
    for e in on_device:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.time_range.elapsed_us()
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:8]
    return {"device_ops_per_step": round(len(on_device) / steps, 1),
            "device_us_per_step": round(sum(by_name.values()) / steps, 1),
            "wall_us_per_step_profiled": round(wall / steps * 1e6, 1),
            "top_device_ops_us_per_step": {name[:60]: round(us / steps, 1) for name, us in top},
            "pieces": pieces.per_step(steps) | {"wall_us_per_step": round(unprofiled / steps * 1e6, 1)}}


def time_in_graph(fn, calls: int = 20, replays: int = 10) -> float:
    """Microseconds per call of `fn` on the device, `calls` of it recorded in one CUDA graph (so
    launches from Python are not in the figure), replayed `replays` times."""
    current = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(current)
    with torch.cuda.stream(side):
        fn()  # compiles and initialises outside the capture
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (calls * replays)


SPLITS = (1, 2, 4, 8, 16)  # the attention kernel's splits timed beside its default (attention.default_splits)
SWEEP_BLOCKS = (64, 32)  # and its entries per loop iteration, beside its default (attention.default_block)


def attention_us(model: BltModel) -> dict:
    """The Triton kernel against SDPA on rows read from a cache (in place, or gathered: a patch step's
    closing rows), one layer's attention at the step's shapes, with the mask a step gives it (Visible: it
    reads each row's entries up to its new position): the local models' 512-entry ring, full, at 1 and
    64 streams, the global model's cache filled to 3/4 of its span for 16 closing rows of 64 and for 1.
    The kernel with its default block and splits (`triton`; `triton_two_launches`: the splits combined by a
    second kernel, not where they meet in the first), with each of SPLITS at its default block and
    at SWEEP_BLOCKS entries a block (`block_x_splits`, what sets default_splits and default_block), and
    reading the whole span under an additive mask (`triton_additive_mask`); for the global model's, the kernel
    and SDPA over the same rows in a cache of pages, as the engine's is (`triton_paged`, `sdpa_paged`)."""
    cfg, device, dtype = model.config, model.device, model.dtype
    local, glob = cfg.decoder, cfg.global_model
    cases = {"local_b1_in_place": (local, 512, 1, False), "local_b64_in_place": (local, 512, 64, False),
             "global_b16_of_64_gathered_span128": (glob, 128, 16, True),
             "global_b16_of_64_gathered_span1024": (glob, 1024, 16, True),
             "global_b1_gathered_span1024": (glob, 1024, 1, True)}
    return run_cases({name: functools.partial(_attention_case, *case, device, dtype) for name, case in cases.items()})


def run_cases(cases: dict[str, Callable[[], dict]]) -> dict:
    """Each case's figures, or the error it raised: one failing case must not hide the others."""
    out = {}
    for name, case in cases.items():
        try:
            out[name] = case()
        except Exception as e:  # noqa: BLE001 - reported in its place
            traceback.print_exc()
            out[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return out


def _attention_case(stack, span: int, B: int, gathered: bool, device: torch.device, dtype: torch.dtype) -> dict:
    cache = KVCache(1, 65, stack.num_kv_heads, stack.head_dim, stack.window, 4096, device, dtype, stack.num_heads)
    cache.reserve(span)
    cache.kv.normal_()
    q = torch.randn(B, stack.num_heads, 1, stack.head_dim, device=device, dtype=dtype)
    length = 2 * span if cache.window else span * 3 // 4  # a full ring; the global cache 3/4 of its span
    visible = Visible(torch.full((B,), length, device=device), cache.window, stack.window)
    mask = visible.additive(span, dtype)
    rows = torch.arange(B, device=device) * 4 if gathered else slice(0, B)

    def timed(mask, block=None, splits=None, counts=cache.split_counts) -> float:
        return round(time_in_graph(lambda: decode_attention(q, cache.kv, 0, rows, span, mask, block, splits=splits,
                                                            counts=counts)), 2)

    block = attention.default_block(stack.head_dim, span, device)
    sweep = {f"{b}x{n}": timed(visible, b, n) for b in sorted({block, *SWEEP_BLOCKS}, reverse=True) for n in SPLITS
             if n <= -(-span // b)}  # entries a loop iteration x splits (more splits than blocks: as many as blocks)
    out = {"triton": timed(visible), "triton_two_launches": timed(visible, counts=None), "block_x_splits": sweep,
           "triton_additive_mask": timed(mask),
           "sdpa": round(time_in_graph(lambda: sdpa_attention(q, *cache.read(0, rows, span), mask)), 2)}
    if cache.window is None:  # the engine's global cache is one of pages (paged_cache.py): the same rows read there
        paged = PagedKVCache(1, 65, stack.num_kv_heads, stack.head_dim, 4096, device, dtype, stack.num_heads)
        paged.reserve_rows([(slot, 0, span) for slot in range(65)])
        paged.kv.normal_()
        out["triton_paged"] = round(time_in_graph(lambda: decode_attention(
            q, paged.kv, 0, rows, span, visible, counts=paged.split_counts, pages=paged.pages)), 2)
        out["sdpa_paged"] = round(time_in_graph(lambda: sdpa_attention(q, *paged.read(0, rows, span), mask)), 2)
    return out


def stretch_us(model: BltModel) -> dict:
    """The Triton norm and gate kernels (triton_ops.py) against the eager stretches they replace, per
    call at the decoder's and the global model's widths, 1 and 64 rows."""
    return run_cases({f"{name}_b{B}": functools.partial(_stretch_case, stack.layers[0], B, model.device, model.dtype)
                      for name, stack in (("decoder", model.local_decoder), ("global", model.global_transformer))
                      for B in (1, 64)})


def _stretch_case(block, B: int, device: torch.device, dtype: torch.dtype) -> dict:
    from blt_runtime.fused import EAGER
    from blt_runtime.triton_ops import TritonOps

    norm = block.post_attention_layernorm.bound(device)
    d, f = norm.weight.shape[0], block.mlp.gate_proj.weight.shape[0]
    h, delta = (torch.randn(B, 1, d, device=device, dtype=dtype) for _ in range(2))
    gate_up = torch.randn(B, 1, 2 * f, device=device, dtype=dtype)
    out = {}
    for name, ops in (("triton", TritonOps()), ("eager", EAGER)):
        out[f"add_norm_{name}"] = round(time_in_graph(lambda: ops.add_norm(h, delta, norm)), 2)  # noqa: B023
        out[f"silu_mul_{name}"] = round(time_in_graph(lambda: ops.silu_mul(gate_up)), 2)  # noqa: B023
    return out


def gemv_us(model: BltModel) -> dict:
    """gemv.norm_linear (the projections of "triton-gemv", the norm and the gate inside) against what
    "triton" runs in its place (the norm kernel and cuBLAS, and for the gate/up product the gate
    kernel), and gemv.plain_linear (its output and down projections) against cuBLAS, per call, for each
    stack's first block at 1, 16 and 64 rows (the global model: 1 and 16, the closing rows of 64
    streams). GemvOps fuses up to gemv.FUSED_ROWS rows: this says where."""
    stacks = (("entropy", model.patcher, (1, 16, 64)), ("decoder", model.local_decoder, (1, 16, 64)),
              ("global", model.global_transformer, (1, 16)))
    return run_cases({f"{name}_b{B}": functools.partial(_gemv_case, stack.layers[0], B, model.device, model.dtype)
                      for name, stack, batches in stacks for B in batches})


def _gemv_case(block, B: int, device: torch.device, dtype: torch.dtype) -> dict:
    from blt_runtime.gemv import norm_linear, plain_linear
    from blt_runtime.step_weights import BlockStep
    from blt_runtime.triton_ops import ADD, TritonOps

    b = BlockStep.of(block, device, transposed=False)
    d = b.norm1.weight.shape[0]
    h, delta = (torch.randn(B, 1, d, device=device, dtype=dtype) for _ in range(2))
    ops = TritonOps()
    gated = torch.randn(B, 1, b.down.shape[1], device=device, dtype=dtype)
    return {"qkv_gemv": round(time_in_graph(lambda: norm_linear(h, delta, b.norm1, b.qkv, ADD)), 2),
            "qkv_triton": round(time_in_graph(lambda: ops.add_norm_linear(h, delta, b.norm1, b.qkv)), 2),
            "gate_up_gemv": round(time_in_graph(lambda: norm_linear(h, delta, b.norm2, b.gate_up, ADD, gated=True)), 2),
            "gate_up_triton": round(time_in_graph(lambda: ops.add_norm_swiglu(h, delta, b.norm2, b.gate_up)), 2),
            "o_gemv": round(time_in_graph(lambda: plain_linear(h, b.o)), 2),
            "o_cublas": round(time_in_graph(lambda: F.linear(h, b.o)), 2),
            "down_gemv": round(time_in_graph(lambda: plain_linear(gated, b.down)), 2),
            "down_cublas": round(time_in_graph(lambda: F.linear(gated, b.down)), 2)}


def sample_us(model: BltModel) -> dict:
    """sample_kernel.sample_pick (a step's choice of byte when its rows sample) against what `torch`
    runs in its place (sampling.sample and the bookkeeping), per call, at 1 and 64 rows, with temperature
    0.8 and top-p 0.95 (the kernel's ranking path), and temperature alone."""
    return run_cases({f"{name}_b{B}": functools.partial(_sample_case, B, how, model.device, model.dtype)
                      for name, how in (("top_p", SAMPLED), ("temperature", dict(temperature=0.8)))
                      for B in (1, 64)})


def _sample_case(B: int, how: dict, device: torch.device, dtype: torch.dtype) -> dict:
    from blt_runtime.sample_kernel import sample_pick
    from blt_runtime.sampling import SamplingBatch, never_sampled, sample
    from blt_runtime.tokenizer import EOS_ID

    V = 260
    batch = SamplingBatch.build([SamplingParams(**how)] * B, list(range(B)), device)
    logits = torch.randn(B, V, device=device, dtype=dtype) * 3
    counts, seen = torch.zeros(B, V, device=device), torch.zeros(B, V, dtype=torch.bool, device=device)
    bias = torch.zeros(B, V, device=device)
    slots, positions = torch.arange(B, device=device), torch.full((B,), 100, device=device)
    embed, never = torch.randn(V, 512, device=device, dtype=dtype), never_sampled(V, device)
    out = torch.zeros(B, 2, dtype=torch.float64, device=device)

    def eager():
        ids = sample(logits, batch, positions, counts[slots], seen[slots], EOS_ID, bias[slots])
        counts[slots, ids] += 1
        seen[slots, ids] = torch.ones_like(ids, dtype=torch.bool)  # as runner.choose: no host scalar in a graph
        out[:, 0].copy_(ids)
        return torch.nn.functional.embedding(ids[:, None], embed)

    return {"kernel": round(time_in_graph(lambda: sample_pick(logits, batch, positions, never, counts, seen, bias,
                                                               slots, embed, EOS_ID, out)), 2),
            "eager": round(time_in_graph(eager), 2)}


def largest_streams(args) -> int:
    return max(int(s) for s in args.streams.split(","))


def measure_torch(model: BltModel, prompt: bytes, args, result: dict) -> None:
    """The engine with PyTorch's kernels (the primary one runs the Triton kernels), measured as the
    primary one is, at the largest stream count only."""
    out: dict = {}
    measure(model, make_engine(model, graphs=True, kernels="torch"),
            make_engine(model, graphs=False, kernels="torch"), ("graphs", "eager"), prompt, args, out,
            streams=[largest_streams(args)])
    result["torch_kernels"] = out


def attempt(measure_part, key: str, model: BltModel, prompt: bytes, args, result: dict, reraise: bool = False) -> None:
    """One of the later measurements; should it fail, its error goes into result[key + "_error"] and
    the figures before it stand (`reraise`: fail instead, as the CPU test of this script wants)."""
    try:
        measure_part(model, prompt, args, result)
    except Exception as e:  # noqa: BLE001 - reported in its place
        if reraise:
            raise
        traceback.print_exc()
        result[f"{key}_error"] = f"{type(e).__name__}: {e}"[:800]


def measure_gemv(model: BltModel, prompt: bytes, args, result: dict) -> None:
    """The engine with `--kernels triton-gemv` (gemv.py), measured as the primary one is, at the largest
    stream count only."""
    out: dict = {}
    measure(model, make_engine(model, graphs=True, kernels="triton-gemv"),
            make_engine(model, graphs=False, kernels="triton-gemv"), ("graphs", "eager"), prompt, args, out,
            streams=[largest_streams(args)])
    result["triton_gemv"] = out


def measure_kernel_calls(model: BltModel, prompt: bytes, args, result: dict) -> None:
    """The Triton kernels per call against what they replace (sample_us, attention_us, stretch_us)."""
    result.update(sample_us=sample_us(model), attention_us=attention_us(model), stretch_us=stretch_us(model))


def measure_gemv_part(model: BltModel, prompt: bytes, args, result: dict) -> None:
    """The projections of `--kernels triton-gemv` per call and in the engine, where they pass their check."""
    result["gemv_self_check"] = gemv_check(model.device, model.dtype) or "passed"
    if result["gemv_self_check"] == "passed":
        result["gemv_us"] = gemv_us(model)
        attempt(measure_gemv, "triton_gemv", model, prompt, args, result)


def measure_compiled(model: BltModel, prompt: bytes, args, result: dict) -> None:
    """The engine with its element-wise stretches compiled (fused.py), measured as the plain one is
    (against the same compiled steps run eagerly), at the largest stream count only."""
    cuda = model.device.type == "cuda"
    out: dict = {}
    start = time.perf_counter()
    primary = make_engine(model, graphs=cuda, compile=True)
    run_engine(primary, [prompt], 8)  # compiles the batch-1 variants (prefill chunks, decode steps)
    out["compile_s"] = round(time.perf_counter() - start, 1)
    measure(model, primary, make_engine(model, graphs=False, static=cuda, compile=True),
            ("graphs", "eager") if cuda else ("static", "dynamic"), prompt, args, out,
            streams=[largest_streams(args)])
    result["compiled"] = out


def measure_variant(model: BltModel, prompt: bytes, args, result: dict, streams: bool, **engine_args) -> dict:
    """The primary engine's batch 1 (and with `streams` its largest stream count) with other arguments,
    graphs where there is a GPU, and whether its batch-1 bytes are the primary engine's."""
    engine, out = make_engine(model, graphs=model.device.type == "cuda", **engine_args), {}
    run_engine(engine, [prompt], args.bytes)  # captures what batch 1 needs
    one, (greedy,) = run_engine(engine, [prompt], args.bytes)
    out["batch1_bytes_per_s"] = round(one["bytes_per_s"], 1)
    out["batch1_equal_primary"] = digest(greedy) == result.get("batch1_greedy_digest")
    if streams:
        n = largest_streams(args)
        run_engine(engine, stream_prompts(n), args.bytes)
        stats, _ = run_engine(engine, stream_prompts(n), args.bytes)
        out[f"aggregate_bytes_per_s_{n}"] = round(stats["bytes_per_s"], 1)
    return out


def measure_floor(model: BltModel, prompt: bytes, args, result: dict) -> None:
    """The bandwidth floor of the batch-1 run and of the largest stream count (bench/roofline.py: the weights
    each piece reads, measured on this machine's CPU, and the caches' entries) at an H200's bandwidth and
    the run's bytes per patch, and the share of it each measured figure is."""
    from bench.roofline import H200_TB_S, floor, measured_reads  # (it imports this module)

    reads, floors = measured_reads(), {"tb_s": H200_TB_S}
    n, stream_cached = largest_streams(args), len(stream_prompts(1)[0]) + 1  # BOS and the prompt
    for name, rows, cached, measured in (("batch_1", 1, len(prompt) + 1, "batch1_bytes_per_s"),
                                         (f"streams_{n}", n, stream_cached, f"aggregate_bytes_per_s_{n}")):
        f = floor(model.config, reads, rows, cached, args.bytes, result["bytes_per_patch"], H200_TB_S * 1e12)
        floors[name] = {"floor_bytes_per_s": f["floor_bytes_per_s"],
                        "measured_share": float(f"{result[measured] / f['floor_bytes_per_s']:.3g}")}
    result["bandwidth_floor"] = floors


def measure_no_lookahead(model: BltModel, prompt: bytes, args, result: dict) -> None:
    """Batch 1 without decoding ahead (lookahead_rows 0; static.py): what the second branch beside the
    entropy model's look-ahead gives, and that the bytes are the same."""
    result["no_lookahead"] = measure_variant(model, prompt, args, result, False, lookahead_rows=0)


def measure_unsplit(model: BltModel, prompt: bytes, args, result: dict) -> None:
    """Batch 1 and the largest stream count with the attention kernel unsplit (attention.MAX_SPLITS 1):
    whether the splits pay in whole steps, not only per call (`attention_us`), and the bytes (the splits
    sum in another order)."""
    saved, attention.MAX_SPLITS = attention.MAX_SPLITS, 1
    try:
        result["unsplit_attention"] = measure_variant(model, prompt, args, result, True)
    finally:
        attention.MAX_SPLITS = saved


def measure_shared(model: BltModel, prompt: bytes, args, result: dict) -> None:
    """8 choices of one prompt with shared prompts and without, on one engine (bench/shared_prompts.py)."""
    engine, device, n, n_bytes = make_engine(model, model.device.type == "cuda", share=True), str(model.device), 8, 32
    figures = {}
    for share in (True, False):
        engine.share_prompts = share
        # captures this way's step shapes; another prompt of the same length, so that the timed run's
        # prompt finds no state of its own left (it would keep a copy of it, and cut its prefill there)
        run_choices(engine, turned(prompt, 1 + share), n, n_bytes, device, 2 * share)
        figures[share] = run_choices(engine, prompt, n, n_bytes, device, 2 * share + 1)
    out = result["shared_prompts"] = {"first_bytes_ms_8": round(figures[True][0], 2),
                                      "first_bytes_ms_8_unshared": round(figures[False][0], 2),
                                      "all_done_ms_8": round(figures[True][1], 2),
                                      "all_done_ms_8_unshared": round(figures[False][1], 2),
                                      "outputs_equal": figures[True][2] == figures[False][2]}
    # new conversations one after another, the 1 KB as their instructions: from the third on they start
    # from the copy the second kept (sharing.keep)
    firsts, answers = {True: [], False: []}, {True: [], False: []}
    for share in (True, False):
        engine.share_prompts = share
        for i in range(4):
            first, _, (answer,) = run_choices(engine, turned(prompt, 3) + f" {i}: a question?".encode(), 1, n_bytes,
                                              device, f"conversation-{share}-{i}")
            firsts[share].append(first)
            answers[share].append(answer)
    out["conversation_first_byte_ms"] = round(statistics.median(firsts[True][2:]), 2)
    out["conversation_first_byte_ms_unshared"] = round(statistics.median(firsts[False][2:]), 2)
    # each of the four: on the H200 the median with sharing was slower than without, unexplained
    out["conversation_first_bytes_ms"] = [round(f, 2) for f in firsts[True]]
    out["conversation_first_bytes_ms_unshared"] = [round(f, 2) for f in firsts[False]]
    out["conversations_equal"] = answers[True] == answers[False]


def measure_scores(model: BltModel, prompt: bytes, args, result: dict) -> None:
    """echo with logprobs: the engine's prefill scores the 1 KB prompt (max_bytes 0); the full forward's
    scores (same dtype) are the reference. Their largest difference, the share of bytes whose top id
    agrees, and the milliseconds of each."""
    engine = make_engine(model, graphs=model.device.type == "cuda")
    params = SamplingParams(max_bytes=0, prompt_logprobs=1)
    for i in range(3):  # the last run is timed
        sync(model.device)
        start = time.perf_counter()
        engine.add_request(f"score-{i}", prompt, params)
        outputs = []
        while engine.has_work():
            outputs += engine.step()
        engine_ms = (time.perf_counter() - start) * 1000
    scores = next(o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None)
    for _ in range(2):
        sync(model.device)
        start = time.perf_counter()
        want = model.prompt_logprobs(prompt, 1)
        forward_ms = (time.perf_counter() - start) * 1000
    result["prompt_scores"] = {
        "bytes": len(scores), "max_abs_diff": round(max(abs(g[0] - w[0]) for g, w in zip(scores, want)), 4),
        "top1_agreement": round(sum(g[1][0][0] == w[1][0][0] for g, w in zip(scores, want)) / len(want), 4),
        "engine_ms": round(engine_ms, 2), "full_forward_ms": round(forward_ms, 2)}


def measure_burst(model: BltModel, prompt: bytes, args, result: dict) -> None:
    """The largest stream count of requests with 100-byte prompts arriving together, 16 bytes each: their
    first bytes with the prompts prefilled together (the default) and one per step (bench/burst.py).
    Then 8 of them a step after a 3,000-byte prompt: going before its next chunk (the default) and after
    all of them (`behind`)."""
    n = largest_streams(args)
    engine = make_engine(model, graphs=model.device.type == "cuda")
    text = english(100 * n + 3000)
    prompts, long = [text[100 * i:100 * i + 100] for i in range(n)], text[-3000:]
    together, figures = engine.scheduler.batch_prompt, {}
    chunk = engine.scheduler.prefill_chunk
    # (name, rows of several prompts, bytes a step): the default, and 512 and 2,048 bytes a step (a CPU's
    # and CUDA's defaults)
    ways = (("together", together, chunk), ("one_per_step", None, chunk), ("together_512_bytes", together, 512),
            ("together_2048_bytes", together, 2048))
    for way, limit, budget in ways * 2:  # the second round is kept
        engine.scheduler.batch_prompt, engine.scheduler.prefill_chunk = limit, budget
        figures[way] = {k: round(v, 2) for k, v in burst(engine, prompts, 16, model.device).items()}
    engine.scheduler.batch_prompt, engine.scheduler.prefill_chunk, behind = together, chunk, {}
    for way, short_first in (("short_first", True), ("in_order", False)) * 2:
        engine.scheduler.short_first = short_first
        behind[way] = {k: round(v, 2) for k, v in burst(engine, prompts[:8], 16, model.device, long).items()}
    engine.scheduler.short_first = True
    result["burst"] = {"requests": n, **figures, "behind": behind}


def measure_guided(model: BltModel, prompt: bytes, args, result: dict) -> None:
    """The largest stream count, greedy, free and guided (guide.py), on one engine (the second run of each
    kept); then 8 guided streams on eager static steps, which must give the bytes the graphs give."""
    n = largest_streams(args)
    prompts = stream_prompts(n)
    guide = ByteGuide.regex(r"([A-Za-z]+[ ,.;:!?'\n]{1,3}){1," + str(args.bytes) + "}")
    ways = {"free": dict(temperature=0.0), "guided": dict(temperature=0.0, guide=guide)}
    engine, figures, outputs = make_engine(model, graphs=model.device.type == "cuda"), {}, {}
    for way, how in list(ways.items()) * 2:
        stats, outputs[way] = run_engine(engine, prompts, args.bytes, sampled=how)
        figures[f"bytes_per_s_{way}"] = round(stats["bytes_per_s"], 1)
    few = prompts[:8], 64  # eager steps are slow: 8 streams of 64 bytes
    replayed = run_engine(engine, *few, sampled=ways["guided"])[1]
    eager = run_engine(make_engine(model, graphs=False), *few, sampled=ways["guided"])[1]
    result["guided"] = {"streams": n, **figures, "states": guide.num_states, "graphs_equal_eager": eager == replayed,
                        "within_guide": all(guide.state_after(b) is not None for b in outputs["guided"])}


def top1_agreement(model: BltModel, prompt: bytes, generated: bytes) -> float:
    """Share of the engine's greedy bytes that full recompute (same dtype) also ranks first."""
    ids = encode_tensor(prompt + generated, model.device)
    logits = model.logits(ids)[0]
    n = len(generated)
    predicted = logits[-n - 1:-1, 4:].argmax(dim=-1)  # bytes only: the engine ran with ignore_eos
    actual = torch.tensor(list(generated), device=model.device)
    return float((predicted == actual).float().mean())


def time_transformers(model: BltModel, prompt: bytes, new_bytes: int) -> dict:
    try:
        from transformers import BltConfig as HFConfig
        from transformers import BltForCausalLM
    except ImportError as e:
        return {"error": f"transformers unavailable: {e}"}
    hf_cfg = HFConfig(**{k: v for k, v in model.config.to_dict().items() if k not in ("architectures", "model_type")})
    with torch.device(model.device):
        hf = BltForCausalLM(hf_cfg).to(model.dtype).eval()
    hf.load_state_dict({checkpoint_key(k): v for k, v in model.state_dict().items()}, strict=True)
    ids = encode_tensor(prompt, model.device)
    with torch.inference_mode():
        hf.generate(ids, max_new_tokens=2, do_sample=False, use_cache=False)  # warm-up
        sync(model.device)
        start = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=new_bytes, do_sample=False, use_cache=False)
        sync(model.device)
    elapsed = time.perf_counter() - start
    made = out.shape[1] - ids.shape[1]
    del hf
    return {"bytes_per_s": made / elapsed, "bytes": made, "seconds": elapsed}


def measure_transformers(model: BltModel, prompt: bytes, args, result: dict) -> None:
    """transformers' generate on the same weights and 256 bytes of the prompt, and the engine's batch-1
    speed over it (whichever version the machine has: should it not load these weights, its error is
    reported instead)."""
    hf = time_transformers(model, prompt[:256], args.hf_bytes)
    result["transformers"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in hf.items()}
    if "bytes_per_s" in hf:
        result["speedup_vs_transformers_batch1"] = round(result["batch1_bytes_per_s"] / hf["bytes_per_s"], 1)


def measure(model: BltModel, primary: Engine, other: Engine, names: tuple[str, str], prompt: bytes, args,
            result: dict, streams: list[int] | None = None) -> None:
    """Checks and timings of `primary`, with `other` as the comparison for exactness and batch 1, at
    `streams` concurrent streams (default: --streams)."""
    result["graphs"] = "captured per step shape" if primary.uses_cuda_graphs else "off"
    result["kernels"] = primary.kernels
    for engine in (primary, other):
        run_engine(engine, [prompt[:64]], 8)  # warm-up
    first_run, (greedy,) = run_engine(primary, [prompt], args.bytes)  # captures what batch 1 needs
    one, (again,) = run_engine(primary, [prompt], args.bytes)
    result["deterministic"] = greedy == again
    result["batch1_greedy_digest"] = digest(greedy)
    slow, (reference,) = run_engine(other, [prompt], args.bytes)
    result[f"{names[0]}_equal_{names[1]}"] = greedy == reference
    result["batch1_bytes_per_s"] = round(one["bytes_per_s"], 1)
    result[f"batch1_bytes_per_s_{names[1]}"] = round(slow["bytes_per_s"], 1)
    result["first_run_bytes_per_s"] = round(first_run["bytes_per_s"], 1)  # includes graph capture
    result["ttfb_1kb_prompt_ms"] = round(one["ttfb_s"] * 1000, 2)
    chunk = primary.scheduler.prefill_chunk  # the default, the prompt in one chunk, and in chunks of 512
    result["prefill_chunk"] = chunk
    for name, size in (("one_chunk", len(prompt)), ("512_chunks", 512)):
        primary.scheduler.prefill_chunk = size
        run_engine(primary, [prompt], 8)
        result[f"ttfb_1kb_prompt_ms_{name}"] = round(run_engine(primary, [prompt], 8)[0]["ttfb_s"] * 1000, 2)
    primary.scheduler.prefill_chunk = chunk
    result["bytes_per_patch"] = round(one["bytes"] / max(one["completion_patches"], 1), 2)
    result["top1_agreement_full_recompute"] = round(top1_agreement(model, prompt, greedy), 4)
    if primary.overlap:  # the same engine with each step queued only after the last one's outputs
        serial, (plain,) = without_overlap(primary, [prompt], args.bytes)
        result["overlap_equal_no_overlap"] = plain == greedy
        result["batch1_bytes_per_s_no_overlap"] = round(serial["bytes_per_s"], 1)
    # sampling (temperature and top-p, seeded): the same bytes again, and from the comparison engine
    run_engine(primary, [prompt], args.bytes, sampled=True)  # captures the sampling variant's graphs
    drawn, (sampled,) = run_engine(primary, [prompt], args.bytes, sampled=True)
    result["deterministic"] &= run_engine(primary, [prompt], args.bytes, sampled=True)[1][0] == sampled
    _, (other_sampled,) = run_engine(other, [prompt], args.bytes, sampled=True)
    result[f"{names[0]}_equal_{names[1]}_sampled"] = other_sampled == sampled
    result["batch1_bytes_per_s_sampled"] = round(drawn["bytes_per_s"], 1)
    run_engine(primary, [prompt], 64, sampled=PENALISED)  # and with penalties and a logit bias, 64 bytes
    penalised = [run_engine(engine, [prompt], 64, sampled=PENALISED)[1] for engine in (primary, other)]
    result[f"{names[0]}_equal_{names[1]}_penalised"] = penalised[0] == penalised[1]
    counts = streams or [int(s) for s in args.streams.split(",")]
    for k, n in enumerate(counts):
        prompts = stream_prompts(n)
        _, outputs = run_engine(primary, prompts, args.bytes)  # captures this bucket's graphs
        stats, again = run_engine(primary, prompts, args.bytes)
        result[f"aggregate_bytes_per_s_{n}"] = round(stats["bytes_per_s"], 1)
        result["deterministic"] &= outputs == again
        if k == 0:  # the comparison once more with several rows, patch steps of several sizes among them
            result[f"{names[0]}_equal_{names[1]}_{n}_streams"] = run_engine(other, prompts, args.bytes)[1] == outputs
        if n == max(counts):  # the same streams sampling
            run_engine(primary, prompts, args.bytes, sampled=True)
            stats, _ = run_engine(primary, prompts, args.bytes, sampled=True)
            result[f"aggregate_bytes_per_s_{n}_sampled"] = round(stats["bytes_per_s"], 1)
        if primary.overlap and n == max(counts):
            serial, plain = without_overlap(primary, prompts, args.bytes)
            result["overlap_equal_no_overlap"] &= plain == outputs
            result[f"aggregate_bytes_per_s_{n}_no_overlap"] = round(serial["bytes_per_s"], 1)
    if primary.static is not None:
        result["step_shapes_run"] = len(primary.static.keys_seen)
    if primary.uses_cuda_graphs:
        result["graph_captures"] = primary.static.graphs.captures
    if model.device.type == "cuda":
        result[f"profile_batch1_{names[0]}"] = profile_steps(primary, [prompt])
        result[f"profile_batch1_{names[1]}"] = profile_steps(other, [prompt])
        n = max(counts)  # where the aggregate target is: the streams' step, graphs only (eager is slow)
        result[f"profile_{n}_streams_{names[0]}"] = profile_steps(primary, stream_prompts(n))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--small", action="store_true", help="tiny shapes (a CPU test of this script)")
    p.add_argument("--bytes", type=int, default=256, help="greedy bytes for the checks and batch-1 timing")
    p.add_argument("--streams", default="8,32,64")
    p.add_argument("--hf-bytes", type=int, default=8, help="bytes transformers generates (it recomputes all)")
    p.add_argument("--no-compiled", dest="compiled", action="store_false",
                   help="skip the engine with compiled element-wise stretches (fused.py)")
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="start no later part after this many seconds (gpu_check.sh stops the run at 360)")
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    t0 = time.perf_counter()
    model = build(args.small, device, dtype)
    sync(device)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "dtype": args.dtype, "shapes": "small" if args.small else "blt-1b",
              "parameters": sum(p.numel() for p in model.parameters()), "build_s": round(time.perf_counter() - t0, 1)}
    result["threshold"] = set_threshold(model)
    prompt = english(1024)
    cuda = device.type == "cuda"
    if cuda:
        result["triton_self_check"] = self_check(device, dtype) or "passed"
        result["sampling_check"] = sampling_check(device, dtype) or "passed"  # else `auto` samples eagerly
    # The primary engine replays CUDA graphs where there is a GPU; on a CPU it runs the static steps
    # eagerly and the dynamic step is its comparison (the CPU test of this script).
    try:
        measure(model, make_engine(model, graphs=cuda), make_engine(model, graphs=False, static=cuda),
                ("graphs", "eager") if cuda else ("static", "dynamic"), prompt, args, result)
    except Exception as e:  # noqa: BLE001 - one GPU run must still report what the rest does
        if not cuda:
            raise
        traceback.print_exc()
        result["primary_error"] = f"{type(e).__name__}: {e}"[:800]
        try:  # without the Triton kernels, then without graphs too
            measure(model, make_engine(model, graphs=True, kernels="torch"),
                    make_engine(model, graphs=False, kernels="torch"), ("graphs", "eager"), prompt, args, result)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            result["torch_graphs_error"] = f"{type(e).__name__}: {e}"[:800]
            measure(model, make_engine(model, graphs=False, kernels="torch"),
                    make_engine(model, graphs=False, static=False, kernels="torch"), ("eager", "dynamic"), prompt,
                    args, result)
    if device.type == "cuda":
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    result["parts_s"] = {"build_and_primary": round(time.perf_counter() - t0, 1)}
    print(json.dumps(result), flush=True)
    # The later parts, most wanted first. Each is timed into parts_s, a JSON line with everything so far
    # follows each, and a part that would start after --budget-s is skipped (named in "skipped"), so that
    # the last line is a whole result within gpu_check.sh's limit.
    triton = cuda and result.get("kernels") == "triton"  # the per-call timings and comparisons are CUDA's
    parts = [("bandwidth_floor", measure_floor), ("transformers", measure_transformers),
             ("no_lookahead", measure_no_lookahead),
             ("unsplit_attention", measure_unsplit)]
    parts += [("kernel_calls", measure_kernel_calls)] * triton  # (its sweep sets attention's defaults)
    parts += [("compiled", measure_compiled)] * args.compiled
    parts += [("guided", measure_guided), ("shared_prompts", measure_shared), ("prompt_scores", measure_scores),
              ("burst", measure_burst)]
    parts += [("torch_kernels", measure_torch), ("triton_gemv", measure_gemv_part)] * triton
    for name, measure_part in parts:
        if time.perf_counter() - t0 > args.budget_s:
            result.setdefault("skipped", []).append(name)
            continue
        started = time.perf_counter()
        attempt(measure_part, name, model, prompt, args, result, reraise=not cuda)
        result["parts_s"][name] = round(time.perf_counter() - started, 1)
        print(json.dumps(result), flush=True)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    result["decisions"] = decide(result)  # what the figures say about the defaults they were measured for
    for key, value in result.items():
        print(f"{key:>34}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
