"""Kernel launches per decode step, counted on any machine: the CPU-measurable side of issue 8.

At batch 1 a GPU decode step is bound by kernel launches (each a few microseconds, CUDA graphs or not),
so the count is what the step's latency scales with. This script runs static-shaped decode steps
(static.py) of a model with the released 1B layer counts and head counts, and counts for each piece
(encode; patch, when a patch closes; finish) the operators that launch a kernel: those that write
memory (a new tensor, or in place), not views and not same-dtype casts. It counts twice:
- eager: the element-wise stretches as the eager step runs them;
- compiled: each stretch of fused.py counted as the kernels torch.compile makes of it: one, or for
  `positions` three (its outputs have three shapes; inductor's CPU output is one function for each
  stretch, Triton may need a kernel per shape). The GPU check's profile confirms it there.
- eager_triton, compiled_triton: the same, with the self-attention of one new position through
  attention.py's Triton kernel (counted as the one kernel it is, computed here with SDPA): it stores
  the new keys and values too, and gathers no cache rows. eager_triton is the CUDA default.
Widths are scaled down by default (the count does not depend on them) so that it runs in seconds;
the threshold is set as in the GPU check, for about 4.5 bytes per patch on English text.

    .venv/bin/python bench/step_kernels.py            # JSON line last
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_check import set_threshold  # noqa: E402
from blt_runtime import BltConfig, BltModel, Engine, SamplingParams, runner  # noqa: E402
from blt_runtime.attention import sdpa_attention  # noqa: E402
from blt_runtime.fused import StepOps  # noqa: E402

NARROW = {"patcher_config": dict(hidden_size=96, intermediate_size=192),
          "encoder_config": dict(hidden_size=128),
          "global_config": dict(hidden_size=256, intermediate_size=512),
          "decoder_config": dict(hidden_size=128, intermediate_size=256),
          "encoder_hash_byte_group_vocab": 1009}


class KernelCount(TorchDispatchMode):
    """Counts the operators that write memory; `paused` while a stretch is counted as one kernel."""

    def __init__(self):
        super().__init__()
        self.kernels = Counter()
        self.bytes_written = 0  # by the operators counted: new tensors, and the targets of in-place ones
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused and self._writes(func, args, out):
            self.kernels[func.__name__.split(".")[0]] += 1
            if func.__name__.split(".")[0].endswith("_"):
                values = [a for a in args[1:] if isinstance(a, torch.Tensor)]  # what an in-place op stores
                self.bytes_written += max((v.numel() * v.element_size() for v in values), default=0)
            else:
                outputs = out if isinstance(out, (tuple, list)) else (out,)
                self.bytes_written += sum(o.numel() * o.element_size() for o in outputs if isinstance(o, torch.Tensor))
        return out

    @staticmethod
    def _writes(func, args, out) -> bool:
        if func.__name__.split(".")[0].endswith("_"):  # in place
            return True
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        return any(isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in inputs for o in outputs)


class CountedOps(StepOps):
    """The eager stretches, each counted as the kernels CompiledOps launches for it."""

    def __init__(self, counter: KernelCount):
        self.counter = counter

    def _one(self, method, *args, kernels: int = 1):
        self.counter.paused = True
        try:
            return method(self, *args)
        finally:
            self.counter.paused = False
            self.counter.kernels["compiled stretch"] += kernels

    def add_norm(self, *args):
        return self._one(StepOps.add_norm, *args)

    def double_residual_norm(self, *args):
        return self._one(StepOps.double_residual_norm, *args)

    def heads(self, *args):
        q, k, v, _ = self._one(StepOps.heads, *args)
        self.counter.paused = True  # what CompiledOps returns: keys and values side by side (a view of its output)
        kv = torch.stack((k, v), dim=1).permute(0, 3, 1, 2, 4)
        self.counter.paused = False
        return q, k, v, kv

    def silu_mul(self, *args):
        return self._one(StepOps.silu_mul, *args)

    def entropy(self, *args):
        return self._one(StepOps.entropy, *args)

    def positions(self, *args):
        return self._one(StepOps.positions, *args, kernels=3)


def counted_attention(counter: KernelCount):
    """attention.decode_attention, counted as its one kernel and what it writes (the output; the new
    keys and values it stores)."""

    def attend(q, kv, layer, rows, span, mask, block=None, store=None):
        counter.paused = True
        try:
            if store is not None:
                k, v, write_rows, write_index = store
                kv[:, layer][:, write_rows, :, write_index] = torch.stack((k, v), dim=1).permute(0, 3, 1, 2, 4)
                counter.bytes_written += 2 * k.numel() * k.element_size()
            both = kv[:, layer, rows, :, :span] if isinstance(rows, slice) else kv[:, layer, :, :, :span][:, rows]
            out = sdpa_attention(q, both[0], both[1], mask)
        finally:
            counter.paused = False
        counter.kernels["attention kernel"] += 1
        counter.bytes_written += out.numel() * out.element_size()
        return out
    return attend


def count(model: BltModel, batch: int, mode: str, steps: int) -> dict:
    """Kernels per piece of a decode step, over `steps` steps of `batch` greedy sequences."""
    counter = KernelCount()
    engine = Engine(model, max_batch_size=batch, static=True, cuda_graphs=False, attention="sdpa")
    if mode.startswith("compiled"):
        engine.runner.ops = CountedOps(counter)
    if mode.endswith("_triton"):
        engine.runner.attention = "triton"
        runner.decode_attention = counted_attention(counter)  # for this script's process only
    text = (ROOT / "README.md").read_bytes()
    for i in range(batch):
        engine.add_request(str(i), text[100 * i:100 * i + 200], SamplingParams(max_bytes=steps + 50, temperature=0.0,
                                                                                ignore_eos=True))
    while any(s.status.name != "RUNNING" for s in engine.sequences.values()):
        engine.step()
    pieces: dict[str, list[int]] = {}
    details: dict[str, Counter] = {}
    written: dict[str, list[int]] = {}
    run = engine.static._run

    def counted(key, piece):
        counter.kernels, counter.bytes_written = Counter(), 0
        with counter:
            run(key, piece)
        pieces.setdefault(key[0], []).append(sum(counter.kernels.values()))
        written.setdefault(key[0], []).append(counter.bytes_written)
        details.setdefault(key[0], counter.kernels)

    engine.static._run = counted
    for _ in range(steps):
        engine.step()
    per_piece = {name: max(set(n), key=n.count) for name, n in pieces.items()}  # the usual count
    patches = len(pieces.get("patch", []))
    mb = {name: round(max(set(w), key=w.count) / 2**20, 3) for name, w in written.items()}
    return {"per_piece": per_piece, "byte_step": per_piece["encode"] + per_piece["finish"],
            "mb_written_byte_step": round(mb["encode"] + mb["finish"], 3),
            "per_byte_with_patches": round((sum(sum(n) for n in pieces.values())) / steps, 1),
            "mb_written_per_byte_with_patches": round(sum(sum(w) for w in written.values()) / steps / 2**20, 3),
            "patch_steps": patches, "top_ops": dict(details["finish"].most_common(12))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--full-width", action="store_true", help="the released widths too (slower)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    cfg = BltConfig.from_dict({"model_type": "blt", **({} if args.full_width else NARROW)})
    torch.manual_seed(0)
    model = BltModel(cfg).to(getattr(torch, args.dtype)).eval().requires_grad_(False)
    set_threshold(model)
    layers = {name: getattr(cfg, name).num_layers for name in ("patcher", "encoder", "global_model", "decoder")}
    result = {"layers": layers, "dtype": args.dtype, "batch": args.batch}
    with torch.inference_mode():
        for mode in ("eager", "eager_triton", "compiled", "compiled_triton"):
            result[mode] = count(model, args.batch, mode, args.steps)
            c = result[mode]
            print(f"{mode:15s} kernels per byte step {c['byte_step']:4d}  pieces {c['per_piece']}  "
                  f"per byte with patch steps {c['per_byte_with_patches']}  "
                  f"MB written per byte step {c['mb_written_byte_step']}, with patch steps "
                  f"{c['mb_written_per_byte_with_patches']}")
    result["byte_step_ratio"] = round(result["eager"]["byte_step"] / result["compiled"]["byte_step"], 2)
    sdpa, triton = result["compiled"], result["compiled_triton"]
    result["triton_saves_per_byte"] = {
        "kernels": round(sdpa["per_byte_with_patches"] - triton["per_byte_with_patches"], 1),
        "mb_written": round(sdpa["mb_written_per_byte_with_patches"] - triton["mb_written_per_byte_with_patches"], 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
