"""A long prefill chunk's attention a block of queries at a time (attention.ChunkBand) on a CPU, against one mask.

    python bench/band_prefill.py [--model DIR] [--threads 1] [--rounds 5]

With the local models' chunks attended in blocks of 64 queries (attention.BAND_BLOCK_CPU, the default) and
in blocks of a window (so a chunk of up to two windows under one (T, entries + T) mask, and a first chunk
inside the window as SDPA's is_causal: the engine before blocks of 64), interleaved over `--rounds`: the
time to prefill prompts of 200 B, 500 B, 1 KB and 8 KB (to the first byte), and the share of it spent in
SDPA. Reports medians and whether the bytes agree (the sums differ in the last bits). Needs only torch.
The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import blt_runtime.positions as positions  # noqa: E402
from blt_runtime import Engine, SamplingParams, load_model  # noqa: E402

TEXT = (ROOT / "README.md").read_bytes() * 8
SIZES = (200, 500, 1024, 8000)


def prefill_ms(engine: Engine, size: int, block: int) -> tuple[float, bytes]:
    positions.BAND_BLOCK_CPU = block
    start = time.perf_counter()
    engine.add_request("p", TEXT[:size], SamplingParams(max_bytes=1, temperature=0.0, ignore_eos=True))
    out = b""
    while engine.has_work():
        out += b"".join(o.new_bytes for o in engine.step())
    return (time.perf_counter() - start) * 1e3, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "weights" / "blt-shakespeare"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu", dtype=torch.float32)
    window = model.config.encoder.window
    blocks = {"window": window, "block_64": positions.BAND_BLOCK_CPU}
    engine = Engine(model, max_batch_size=1, share_prompts=False)  # each prompt prefilled whole, every time
    runs: dict[str, dict[str, list[float]]] = {}
    outputs: dict[str, set[bytes]] = {}
    for size in SIZES:  # warm-up
        for block in blocks.values():
            prefill_ms(engine, size, block)
    for _ in range(args.rounds):
        for size in SIZES:
            for name, block in blocks.items():
                ms, out = prefill_ms(engine, size, block)
                runs.setdefault(f"prefill_{size}_ms", {}).setdefault(name, []).append(ms)
                outputs.setdefault(f"{size}", set()).add(out)
    attention_share = {}
    for name, block in blocks.items():
        with torch.profiler.profile() as prof:
            prefill_ms(engine, 1024, block)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        sdpa = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key)
        attention_share[name] = round(sdpa / total, 3)
    positions.BAND_BLOCK_CPU = blocks["block_64"]
    result: dict = {"threads": args.threads, "window": window, "same_bytes": all(len(o) == 1 for o in outputs.values()),
                    "sdpa_share_of_1024": attention_share}
    for key, by in runs.items():
        result[key] = {name: round(statistics.median(v), 1) for name, v in by.items()}
        result[key]["ratio"] = round(result[key]["window"] / result[key]["block_64"], 3)
        print(f"{key:>18}: " + "; ".join(f"{name} " + " / ".join(f"{t:.1f}" for t in v) for name, v in by.items()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
