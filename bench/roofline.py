"""The bandwidth floor of generation: what a decode step must read, and the most bytes/s that allows.

Every byte step reads the weights of the entropy model, the local encoder and the local decoder, and
each row's keys and values of their attention windows; a step in which some row's patch closes also
reads the global transformer's weights (and the closing rows' global caches). Whatever an engine does
about launches, a GPU cannot generate faster than its memory bandwidth moves those bytes: this script
works that floor out for the released 1B shapes (bf16) and the GPU check's scenarios (batch 1 after a
1 KB prompt; 8, 32 and 64 streams after 200-byte prompts; 256 bytes each), beside the issue's targets.

Which weights a byte step reads and which a patch step reads is measured, not assumed: the engine's
static steps run on this CPU (a model with the released layer counts, narrow widths), and a dispatch
mode records the parameters each piece's operators take as inputs (whole, or the rows an embedding
gathers); the 1B model's parameters of the same names are then summed. The caches' part is worked
out from the shapes: each row reads the entries its new position sees (min(position + 1, window) of
a local stack's ring, every patch so far of the global cache), K and V, every layer. Activations,
logits and the step's small tensors are left out, so the floor is a little low.

    .venv/bin/python bench/roofline.py                 # JSON line last
    .venv/bin/python bench/roofline.py --bandwidth-tb-s 4.0 --bytes-per-patch 3.91
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_check import set_threshold  # noqa: E402
from bench.step_kernels import NARROW  # noqa: E402
from blt_runtime import BltConfig, BltModel, Engine, SamplingParams  # noqa: E402

H200_TB_S = 4.8  # the H200's HBM3e bandwidth as NVIDIA states it (TB/s); what kernels reach is less
# The GPU check's scenarios: (rows, bytes cached before the first generated one (BOS + prompt), bytes
# generated) and the target for each, bytes/s (None: no target)
SCENARIOS = {"batch_1": (1, 1025, 256, 1500), "streams_8": (8, 201, 256, None),
             "streams_32": (32, 201, 256, None), "streams_64": (64, 201, 256, 50000)}


def _extent(t: torch.Tensor) -> tuple[int, int, int]:
    """(storage, first byte, end byte) of the memory a tensor view spans."""
    size = t.element_size()
    start = t.storage_offset() * size
    span = (1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))) * size if t.numel() else 0
    return t.untyped_storage().data_ptr(), start, start + span


class ParameterReads(TorchDispatchMode):
    """Which parameters the operators run under it take as inputs: read whole, or (a gather's table)
    some of their rows. Parameters are found by the memory their views span: the engine reads fused
    weights (q, k and v side by side) whose parts are the modules' parameters."""

    def __init__(self, named: dict[str, torch.Tensor]):
        super().__init__()
        self.where = [(_extent(t), name, t.element_size()) for name, t in named.items()]
        self.whole: dict[str, int] = {}  # parameter name -> bytes per value of the tensor read
        self.gathered: dict[str, int] = {}  # parameter name -> rows gathered per op call, largest seen

    def _names(self, t: torch.Tensor) -> list[tuple[str, int]]:
        storage, start, end = _extent(t)
        return [(name, size) for (s, a, b), name, size in self.where if s == storage and a < end and start < b]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        rows = _gathered_rows(func.__name__.split(".")[0], args)
        for i, a in enumerate(args):
            if not isinstance(a, torch.Tensor):
                continue
            names = self._names(a)
            for name, size in names:
                if i == 0 and rows is not None:
                    self.gathered[name] = max(self.gathered.get(name, 0), rows)
                else:
                    self.whole[name] = size
        return func(*args, **(kwargs or {}))


def _gathered_rows(op: str, args: tuple) -> int | None:
    """How many rows of its first input a gathering operator reads (None: not a gather)."""
    if op == "embedding":  # (weight, indices)
        return args[1].numel()
    if op in ("index_select", "gather"):  # (input, dim, index)
        return args[2].numel()
    if op == "index":  # (input, [index, ...])
        return max((i.numel() for i in args[1] if i is not None), default=0)
    return None


def measured_reads(rows: int = 2, steps: int = 24) -> dict[str, dict]:
    """For each piece of a static decode step (encode, patch, finish), the parameters it reads whole
    (with the bytes per value of what it reads: the model's dtype, or fp32) and those it gathers rows
    of (rows per byte), from a narrow model of the released layer counts."""
    cfg = BltConfig.from_dict({"model_type": "blt", **NARROW})
    torch.manual_seed(0)
    model = BltModel(cfg).to(torch.bfloat16).eval().requires_grad_(False)
    set_threshold(model)
    engine = Engine(model, max_batch_size=rows, static=True, cuda_graphs=False, kernels="torch",
                    first_byte_at_once=False)
    text = (ROOT / "README.md").read_bytes()
    for i in range(rows):
        engine.add_request(str(i), text[100 * i:100 * i + 200], SamplingParams(max_bytes=steps + 50, temperature=0.0,
                                                                                ignore_eos=True))
    with torch.inference_mode():
        while any(s.status.name != "RUNNING" for s in engine.sequences.values()):
            engine.step()
        pieces: dict[str, ParameterReads] = {}
        run = engine.static._run
        # the parameters, and the one the engine reads as a copy: the entropy model's head in fp32
        named = dict(model.named_parameters()) | {"patcher.lm_head.weight": engine.runner.entropy_head}

        def recorded(key, piece):
            reads = pieces.setdefault(key[0], ParameterReads(named))
            with reads:
                run(key, piece)

        engine.static._run = recorded
        for _ in range(steps):
            engine.step()
    missing = {"encode", "patch", "finish"} - set(pieces)
    if missing:
        raise RuntimeError(f"no {sorted(missing)} piece ran in {steps} steps")
    return {name: {"whole": dict(sorted(r.whole.items())), "gathered": {n: k // rows for n, k in r.gathered.items()}}
            for name, r in pieces.items()}


def layerless(name: str) -> str:
    """A parameter's name with its layer index left out: the same for every layer of a stack, and for
    models of other layer counts (the GPU check's tiny shapes)."""
    return re.sub(r"\.\d+\.", ".N.", name)


def stack_entry_bytes(stack, dtype_bytes: int) -> int:
    """Bytes of one cache entry (a key and a value) of one layer of a stack."""
    return 2 * stack.num_kv_heads * stack.head_dim * dtype_bytes


def floor(cfg: BltConfig, reads: dict[str, dict], rows: int, cached: int, generated: int, bytes_per_patch: float,
          bandwidth: float, dtype_bytes: int = 2) -> dict:
    """The bytes an average decode step reads over `generated` bytes of `rows` rows that start with
    `cached` positions, and the time and bytes/s the bandwidth (bytes/s) allows."""
    with torch.device("meta"):
        params = dict(BltModel(cfg).named_parameters())
    byte_pieces = [p for p in ("encode", "finish") if p in reads]

    def size(piece_names: list[str]) -> int:  # bf16 weights read whole; a copy in fp32 twice as large
        whole = {layerless(n): s for p in piece_names for n, s in reads[p]["whole"].items()}
        return sum(p.numel() * dtype_bytes * whole[layerless(n)] // 2 for n, p in params.items()
                   if layerless(n) in whole)

    rows_of = {layerless(n): k for p in byte_pieces for n, k in reads[p]["gathered"].items()}
    gathered = sum(rows_of[layerless(n)] * p.shape[-1] * dtype_bytes for n, p in params.items()
                   if layerless(n) in rows_of)
    closing = 1.0 / bytes_per_patch  # the chance that a row's byte closes its patch at a step
    patch_chance = 1.0 - (1.0 - closing) ** rows  # that some row's does: the step reads the global weights
    local = [(cfg.patcher, cfg.patcher.window), (cfg.encoder, cfg.encoder.window), (cfg.decoder, cfg.decoder.window)]
    cache = 0.0
    for position in range(cached, cached + generated):
        cache += sum(s.num_layers * stack_entry_bytes(s, dtype_bytes) * min(position + 1, w or position + 1)
                     for s, w in local)
        patches = position / bytes_per_patch + 1
        cache += closing * cfg.global_model.num_layers * stack_entry_bytes(cfg.global_model, dtype_bytes) * patches
    # the decoder's cross-attention reads its patch's k slots in every layer at every byte
    n_cross = cfg.decoder.num_layers if cfg.decoder_cross_attn_all_layers else 1
    slots = n_cross * cfg.cross_attn_k * stack_entry_bytes(cfg.decoder, dtype_bytes)
    per_row = cache / generated + slots + gathered
    byte_weights, patch_weights = size(byte_pieces), size(["patch"])
    step = byte_weights + patch_chance * patch_weights + rows * per_row
    seconds = step / bandwidth
    return {"rows": rows, "mb_per_step": round(step / 1e6, 1),
            "weights_mb": {"byte_step": round(byte_weights / 1e6, 1),
                           "patch_step": round(patch_weights / 1e6, 1),
                           "patch_step_chance": round(patch_chance, 3)},
            "caches_mb_per_row": round(per_row / 1e6, 2), "floor_us_per_step": round(seconds * 1e6, 1),
            "floor_bytes_per_s": round(rows / seconds)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bandwidth-tb-s", type=float, default=H200_TB_S)
    p.add_argument("--bytes-per-patch", type=float, default=4.5, help="the GPU check's threshold aims at 4.5")
    args = p.parse_args()
    reads = measured_reads()
    cfg = BltConfig.from_dict({"model_type": "blt"})
    with torch.device("meta"):
        every = {n for n, _ in BltModel(cfg).named_parameters()}
    read = set().union(*(set(r["whole"]) | set(r["gathered"]) for r in reads.values()))
    result = {"bandwidth_tb_s": args.bandwidth_tb_s, "bytes_per_patch": args.bytes_per_patch,
              "parameters_never_read": sorted(every - read),
              "gathered_rows_per_byte": {n: k for r in reads.values() for n, k in r["gathered"].items()}}
    for name, (rows, cached, generated, target) in SCENARIOS.items():
        f = floor(cfg, reads, rows, cached, generated, args.bytes_per_patch, args.bandwidth_tb_s * 1e12)
        if target:
            f["target_bytes_per_s"] = target
            f["target_share_of_floor"] = round(target / f["floor_bytes_per_s"], 3)
        result[name] = f
        print(f"{name:>10}: {f['mb_per_step']:8.1f} MB a step ({f['weights_mb']}, caches {f['caches_mb_per_row']} MB "
              f"a row): at least {f['floor_us_per_step']} us, at most {f['floor_bytes_per_s']:,} bytes/s"
              + (f"; target {target:,} = {f['target_share_of_floor']:.0%} of that" if target else ""))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
