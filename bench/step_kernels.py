"""Kernel launches per decode step, counted on any machine: the CPU-measurable side of issue 8.

At batch 1 a GPU decode step is bound by kernel launches (each a few microseconds, CUDA graphs or not),
so the count is what the step's latency scales with. This script runs static-shaped decode steps
(static.py) of a model with the released 1B layer counts and head counts, and counts for each piece
(encode; patch, when a patch closes; finish) the operators that launch a kernel: those that write
memory (a new tensor, or in place), not views and not same-dtype casts, and the megabytes they write
(a stretch counted as one kernel writes what it returns). It counts five ways:
- eager: `--kernels torch`, the element-wise stretches as the eager step runs them, SDPA;
- triton: `--kernels triton`, the CUDA default: the self-attention of one new position through
  attention.py's Triton kernel (counted as the one kernel it is, computed here with RoPE and SDPA:
  it rotates, stores the new keys and values, and gathers no cache rows), the norms and
  SwiGLU's gate through triton_ops.py's kernels (one each), the new bytes' hash embeddings through
  byte_embedding.py's and the greedy choice and the entropy's patch flag through tail_kernels.py's
  (one each, computed here as the eager step computes them);
- triton_gemv: `--kernels triton-gemv`, as triton, with each norm and the projection after it one
  kernel, and the gate/up projection with SwiGLU's gate (gemv.py; counted as "gemv");
- compiled: `--compile --kernels torch`, each stretch of fused.py counted as the kernels
  torch.compile makes of it: one, or for `positions` three (its outputs have three shapes;
  inductor's CPU output is one function for each stretch, Triton may need a kernel per shape). The
  GPU check's profile confirms it there;
- compiled_triton: `--compile`, the stretches compiled and the attention kernel.
It also counts, with `triton`, steps that decode their sampled bytes ahead (static.py): the kernels per
byte in all, and on the critical path (all but the shorter of the two branches that run side by side
on CUDA). And, eager and with `triton`, a step whose rows sample (temperature 0.8, top-p 0.95: with
`triton` the choice is sample_kernel.py's one kernel), and the kernels from a 1,024-byte prompt's arrival to its first
byte, per engine step (prefill chunks of 512, then the step that samples the first byte; these run
eagerly, not from CUDA graphs): what the GPU check's time to first byte scales with.
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
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_check import set_threshold  # noqa: E402
from blt_runtime import BltConfig, BltModel, Engine, SamplingParams, runner, static  # noqa: E402
from blt_runtime.attention import RotationTable, Visible, sdpa_attention  # noqa: E402
from blt_runtime.fused import StepOps  # noqa: E402
from blt_runtime.gemv import FUSED_ROWS  # noqa: E402
from blt_runtime.model.entropy import entropy_nats  # noqa: E402
from blt_runtime.model.hashing import embed_with_hashes  # noqa: E402
from blt_runtime.model.layers import apply_rope  # noqa: E402
from blt_runtime.patcher import starts_next  # noqa: E402
from blt_runtime.sampling import allowed, sample  # noqa: E402

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
    """The eager stretches, those named in `fused` each counted as the kernels it launches when
    compiled (CompiledOps: all of them), written in Triton (TritonOps: the norms and the gate) or
    fused into the projection after them (GemvOps: for a decode step's rows, at most gemv.FUSED_ROWS),
    and as what it writes: the tensors it returns that are not its inputs."""

    COMPILED = {"add_norm": 1, "double_residual_norm": 1, "heads": 1, "silu_mul": 1, "entropy": 1, "positions": 3}
    TRITON = {"add_norm": 1, "double_residual_norm": 1, "silu_mul": 1}
    GEMV = TRITON | {"add_norm_linear": 1, "add_norm_swiglu": 1, "double_residual_norm_linear": 1}

    def __init__(self, counter: KernelCount, fused: dict[str, int]):
        self.counter, self.fused = counter, fused

    def _run(self, name: str, *args):
        method = getattr(StepOps, name)
        projection = name.endswith(("linear", "swiglu"))
        if name not in self.fused or (projection and args[0].numel() > FUSED_ROWS * args[0].shape[-1]):
            return method(self, *args)
        outer = self.counter.paused  # a stretch inside one counted whole
        self.counter.paused = True
        try:
            out = method(self, *args)
        finally:
            self.counter.paused = outer
        if not outer:
            label = "gemv" if projection else "compiled stretch" if self.fused is self.COMPILED else "triton stretch"
            self.counter.kernels[label] += self.fused[name]
            inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            self.counter.bytes_written += sum(o.numel() * o.element_size() for o in (out if isinstance(out, tuple)
                                              else (out,)) if isinstance(o, torch.Tensor)
                                              and o.untyped_storage().data_ptr() not in inputs)
        return out

    def add_norm_linear(self, *args):
        return self._run("add_norm_linear", *args)

    def add_norm_swiglu(self, *args):
        return self._run("add_norm_swiglu", *args)

    def double_residual_norm_linear(self, *args):
        return self._run("double_residual_norm_linear", *args)

    def add_norm(self, *args):
        return self._run("add_norm", *args)

    def double_residual_norm(self, *args):
        return self._run("double_residual_norm", *args)

    def heads(self, *args):
        q, k, v, _ = self._run("heads", *args)
        if "heads" not in self.fused:
            return q, k, v, None
        self.counter.paused = True  # what CompiledOps returns: keys and values side by side (a view of its output)
        kv = torch.stack((k, v), dim=1).permute(0, 3, 1, 2, 4)
        self.counter.paused = False
        return q, k, v, kv

    def silu_mul(self, *args):
        return self._run("silu_mul", *args)

    def entropy(self, *args):
        return self._run("entropy", *args)

    def positions(self, *args):
        return self._run("positions", *args)


def counted_attention(counter: KernelCount):
    """attention.decode_attention, counted as its one kernel and what it writes (the output; the new
    keys and values it stores). A GPU's splits meet in that kernel (`counts`): still one."""

    def attend(q, kv, layer, rows, span, mask, block=None, store=None, rotation=None, splits=None, counts=None,
               pages=None):
        counter.paused = True
        try:
            if isinstance(rotation, RotationTable):  # the kernel reads the rows' lengths' rows of the table
                rotation = torch.view_as_complex(rotation.table[mask.lengths])[:, None, None]
            if store is not None and store[3] is None:  # and stores at their new positions' entries
                window = mask.cache_window
                index = (mask.lengths if window is None else mask.lengths % window)[:, None]
                write_rows = store[2]
                if pages is not None:  # a cache of pages: the page and entry of each row's new position
                    table, page = pages
                    write_rows, index = table[write_rows, index // page].long(), index % page
                store = store[:2] + (write_rows, index)
            if rotation is not None:  # q and the new key come unrotated
                q = apply_rope(q.transpose(1, 2), rotation).transpose(1, 2)
                if store is not None:
                    store = (apply_rope(store[0].transpose(1, 2), rotation).transpose(1, 2),) + tuple(store[1:])
            if store is not None:
                k, v, write_rows, write_index = store
                kv[:, layer][:, write_rows, :, write_index] = torch.stack((k, v), dim=1).permute(0, 3, 1, 2, 4)
                counter.bytes_written += 2 * k.numel() * k.element_size()
            if isinstance(mask, Visible):  # the kernel works it out: no kernel of its own
                mask = mask.additive(span, kv.dtype)
            if pages is not None:  # the rows' pages, in position order
                table, page = pages
                both = kv[:, layer][:, table[rows, :-(-span // page)].long()]
                both = both.permute(0, 1, 3, 2, 4, 5).flatten(3, 4)[:, :, :, :span]
            else:
                both = kv[:, layer, rows, :, :span] if isinstance(rows, slice) else kv[:, layer, :, :, :span][:, rows]
            out = sdpa_attention(q, both[0], both[1], mask)
        finally:
            counter.paused = False
        counter.kernels["attention kernel"] += 1
        counter.bytes_written += out.numel() * out.element_size()
        return out
    return attend


def counted_embedding(counter: KernelCount):
    """byte_embedding.embed_new_bytes, counted as its one kernel and what it writes (the embeddings;
    the rows' histories)."""

    def embed(ids, history, rows, powers, hashed, byte_table, vocab, history_out=None):
        counter.paused = True
        try:
            context = torch.cat([history[rows], ids], dim=1)
            out = embed_with_hashes(context, 1, powers, hashed, byte_table, vocab)
            (history if history_out is None else history_out)[rows] = context[:, 1:]
        finally:
            counter.paused = False
        counter.kernels["embedding kernel"] += 1
        counter.bytes_written += out.numel() * out.element_size() + ids.shape[0] * history[0].numel() * 8
        return out
    return embed


def counted_tail(counter: KernelCount):
    """tail_kernels.greedy_pick and entropy_flags, and sample_kernel.sample_pick, counted as one kernel
    each and what they write, computed as the eager step computes them."""

    def pick(name, choose, counts, seen, slots, embed, out):
        """A choice of bytes and its bookkeeping, as one kernel: ids, counts, flags, output, embeddings."""
        counter.paused = True
        try:
            ids = choose()
            counts[slots, ids] += 1
            seen[slots, ids] = True
            out[:, 0].copy_(ids)
            embedded = F.embedding(ids[:, None], embed)
        finally:
            counter.paused = False
        counter.kernels[name] += 1
        counter.bytes_written += ids.numel() * (8 + 8 + 4 + 1) + embedded.numel() * embedded.element_size()
        return ids, embedded

    def greedy_pick(logits, allow_eos, never, counts, seen, slots, embed, eos_id, out):
        return pick("greedy kernel", lambda: allowed(logits, allow_eos, eos_id).argmax(dim=-1), counts, seen, slots,
                    embed, out)

    def sample_pick(logits, s, positions, never, counts, seen, bias, slots, embed, eos_id, out):
        return pick("sampling kernel",
                    lambda: sample(logits, s, positions, counts[slots], seen[slots], eos_id, bias[slots]),
                    counts, seen, slots, embed, out)

    def entropy_flags(logits, positions, threshold, out):
        counter.paused = True
        try:
            out[:, 1].copy_(starts_next(entropy_nats(logits), positions, threshold))
        finally:
            counter.paused = False
        counter.kernels["entropy kernel"] += 1
        counter.bytes_written += out.shape[0] * 8
    return greedy_pick, sample_pick, entropy_flags


def count_prefill(model: BltModel, mode: str, prompt_bytes: int = 1024) -> dict:
    """Kernels per engine step from a prompt's arrival to its first byte (the prefill chunks, then the
    step that samples the first byte): what the GPU check's time to first byte scales with."""
    counter = KernelCount()
    engine = counted_engine(model, 1, mode, counter)
    prompt = (ROOT / "README.md").read_bytes()[:prompt_bytes]
    engine.add_request("p", prompt, SamplingParams(max_bytes=4, temperature=0.0, ignore_eos=True))
    steps = []
    while not engine.sequences["p"].generated:
        counter.kernels = Counter()
        with counter:
            engine.step()
        steps.append(sum(counter.kernels.values()))
    return {"prompt_bytes": len(prompt), "per_step": steps, "total": sum(steps)}


def counted_engine(model: BltModel, batch: int, mode: str, counter: KernelCount) -> Engine:
    """A static-step engine whose kernels `counter` counts as `mode` would launch them."""
    engine = Engine(model, max_batch_size=batch, static=True, cuda_graphs=False, kernels="torch",
                    first_byte_at_once=False)  # as on CUDA
    if mode.startswith("compiled"):
        engine.runner.ops = CountedOps(counter, CountedOps.COMPILED)
    elif mode == "triton":
        engine.runner.ops = CountedOps(counter, CountedOps.TRITON)
    elif mode == "triton_gemv":
        engine.runner.ops = CountedOps(counter, CountedOps.GEMV)
    if mode.endswith(("triton", "gemv")):
        engine.runner.kernels, engine.runner.sample_kernel = "triton", True
        engine.runner.make_rotation_tables()
        runner.decode_attention = counted_attention(counter)  # for this script's process only
        runner.embed_new_bytes = counted_embedding(counter)
        runner.greedy_pick, runner.sample_pick, static.entropy_flags = counted_tail(counter)
    return engine


SAMPLED = dict(temperature=0.8, top_p=0.95)  # what a client who samples might ask for


def count(model: BltModel, batch: int, mode: str, steps: int, sampled: bool = False, lookahead: bool = False) -> dict:
    """Kernels per piece of a decode step, over `steps` steps of `batch` greedy sequences (`sampled`:
    sequences that sample with SAMPLED). `lookahead`: steps decoding ahead (static.py), with the kernels
    per byte on the critical path: all but those of the shorter of the two branches, which run beside
    the longer one on CUDA."""
    counter = KernelCount()
    engine = counted_engine(model, batch, mode, counter)
    if lookahead:
        engine.static.lookahead_rows = batch
    overlapped = []  # per step that branched: the kernels of its shorter branch

    def counted_branches(first, second):
        sizes = []
        for branch in (first, second):
            before = sum(counter.kernels.values())
            branch()
            sizes.append(sum(counter.kernels.values()) - before)
        overlapped.append(min(sizes))

    engine.static._branches = counted_branches
    text = (ROOT / "README.md").read_bytes()
    how = dict(SAMPLED, seed=0) if sampled else dict(temperature=0.0)
    for i in range(batch):
        engine.add_request(str(i), text[100 * i:100 * i + 200], SamplingParams(max_bytes=steps + 50, ignore_eos=True,
                                                                                **how))
    while any(s.status.name != "RUNNING" for s in engine.sequences.values()):
        engine.step()
    pieces: dict[str, list[int]] = {}
    ways: list[tuple] = []  # each finish piece's (ahead, fork)
    details: dict[str, Counter] = {}
    written: dict[str, list[int]] = {}
    run = engine.static._run

    def counted(key, piece):
        counter.kernels, counter.bytes_written = Counter(), 0
        with counter:
            run(key, piece)
        pieces.setdefault(key[0], []).append(sum(counter.kernels.values()))
        if key[0] == "finish":
            ways.append(key[-2])
        written.setdefault(key[0], []).append(counter.bytes_written)
        details.setdefault(key[0], counter.kernels)

    engine.static._run = counted
    overlapped.clear()  # the counted steps' only
    for _ in range(steps):
        engine.step()
    per_piece = {name: max(set(n), key=n.count) for name, n in pieces.items()}  # the usual count
    patches = len(pieces.get("patch", []))
    mb = {name: round(max(set(w), key=w.count) / 2**20, 3) for name, w in written.items()}
    mb.setdefault("encode", 0.0)  # (steps decoding ahead may run none)
    total = sum(sum(n) for n in pieces.values())
    critical = {"critical_per_byte": round((total - sum(overlapped)) / steps, 1),
                "steps_ahead": ways.count((True, True))} if lookahead else {}
    return critical | {"per_piece": per_piece, "byte_step": per_piece.get("encode", 0) + per_piece["finish"],
            "mb_written_byte_step": round(mb["encode"] + mb["finish"], 3),
            "per_byte_with_patches": round(total / steps, 1),
            "mb_written_per_byte_with_patches": round(sum(sum(w) for w in written.values()) / steps / 2**20, 3),
            "patch_steps": patches, "finish_ops": dict(details["finish"].most_common())}


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
        for mode in ("eager", "triton", "triton_gemv", "compiled", "compiled_triton"):
            result[mode] = count(model, args.batch, mode, args.steps)
            c = result[mode]
            print(f"{mode:15s} kernels per byte step {c['byte_step']:4d}  pieces {c['per_piece']}  "
                  f"per byte with patch steps {c['per_byte_with_patches']}  "
                  f"MB written per byte step {c['mb_written_byte_step']}, with patch steps "
                  f"{c['mb_written_per_byte_with_patches']}")
        for mode in ("eager", "triton"):  # sampling with temperature and top-p: the choice of byte differs
            c = result[f"sampled_{mode}"] = count(model, args.batch, mode, args.steps, sampled=True)
            print(f"{mode:15s} kernels per byte step when sampling with {SAMPLED}: {c['byte_step']:4d}  "
                  f"pieces {c['per_piece']}")
        c = result["lookahead_triton"] = count(model, args.batch, "triton", args.steps, lookahead=True)
        print(f"{'triton':15s} decoding ahead: kernels per byte {c['per_byte_with_patches']}, on the critical path "
              f"{c['critical_per_byte']} (against {result['triton']['per_byte_with_patches']} without); "
              f"{c['steps_ahead']} of {args.steps} steps sampled from logits decoded ahead")
        for mode in ("eager", "triton"):
            result[f"prefill_{mode}"] = c = count_prefill(model, mode)
            print(f"{mode:15s} kernels from a {c['prompt_bytes']}-byte prompt to its first byte {c['total']:5d}  "
                  f"per engine step {c['per_step']}")
    result["byte_step_ratio"] = round(result["eager"]["byte_step"] / result["compiled"]["byte_step"], 2)
    result["triton_byte_step_ratio"] = round(result["eager"]["byte_step"] / result["triton"]["byte_step"], 2)
    sdpa, triton = result["compiled"], result["compiled_triton"]
    result["triton_saves_per_byte"] = {
        "kernels": round(sdpa["per_byte_with_patches"] - triton["per_byte_with_patches"], 1),
        "mb_written": round(sdpa["mb_written_per_byte_with_patches"] - triton["mb_written_per_byte_with_patches"], 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
