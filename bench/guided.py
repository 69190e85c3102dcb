"""What guided generation costs: aggregate bytes/s of streams held to a guide against free ones.

    python bench/guided.py [--model DIR] [--device cpu|cuda] [--streams 8] [--bytes 200] [--rounds 3]

`--streams` greedy requests generate `--bytes` each (ignore_eos) in one engine, three ways, interleaved
over `--rounds`: free; guided by a pattern that allows any text (`(?:.|\\n){0,N}`: its guide's bias
rows and per-byte state, with no constraint on the bytes); and guided by a pattern of words and
punctuation. Reports the medians and how many automaton states each guide has. Needs only torch. The
last line printed is JSON.
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
from blt_runtime import Engine, SamplingParams, load_model  # noqa: E402
from blt_runtime.guide import ByteGuide  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bytes_per_s(model, guide: ByteGuide | None, streams: int, n: int) -> float:
    """Aggregate bytes/s once every stream is prefilled and running."""
    engine = Engine(model, max_batch_size=streams)
    for i in range(streams):
        engine.add_request(str(i), f"ROMEO {i}:\n".encode(), SamplingParams(max_bytes=n, temperature=0.0,
                                                                             ignore_eos=True, guide=guide))
    while engine.num_running < streams or engine.num_waiting:
        engine.step()
    sync(model.device)
    start, total = time.perf_counter(), 0
    while engine.has_work():
        total += sum(len(o.new_bytes) for o in engine.step())
    sync(model.device)
    return total / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "weights" / "blt-shakespeare"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--bytes", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    guides = {"free": None, "any_text": ByteGuide.regex(rf"(?:.|\n){{0,{args.bytes}}}"),
              "words": ByteGuide.regex(r"([A-Za-z]+[ ,.;:!?'\n]{1,3}){1," + str(args.bytes) + "}")}
    runs: dict[str, list[float]] = {name: [] for name in guides}
    for _ in range(args.rounds):
        for name, guide in guides.items():
            runs[name].append(bytes_per_s(model, guide, args.streams, args.bytes))
    result = {"streams": args.streams, "bytes": args.bytes, "device": str(model.device)}
    for name, values in runs.items():
        result[f"bytes_per_s_{name}"] = round(statistics.median(values), 1)
        print(f"{name:>9}: " + " / ".join(f"{v:.1f}" for v in values) + " bytes/s")
    result["states"] = {name: g.num_states for name, g in guides.items() if g is not None}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
