"""Host time per engine step: the Python work around a decode step's kernels, on any machine.

With CUDA graphs a step's device work is a few graph replays, and the host waits for it once (the
step's transfer). What the host does before and after (scheduling, staging the step's inputs,
choosing and replaying graphs, reading the results, stops, outputs) is time the device sits idle
at batch 1, so it adds to every byte's latency. This script runs static-shaped decode steps of a
tiny model with the pieces' device work skipped (and the caches grown beforehand), so what is timed
is that host work alone, at several batch sizes. (The sampled bytes are then stale, which changes no host path but stop
strings; greedy requests without stops are used.)

    .venv/bin/python bench/host_overhead.py            # JSON line last
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_check import build, english, set_threshold  # noqa: E402
from blt_runtime import Engine, SamplingParams  # noqa: E402


def host_us_per_step(model, batch: int, steps: int) -> float:
    engine = Engine(model, max_batch_size=64, static=True, cuda_graphs=False)
    for i in range(batch):
        engine.add_request(str(i), english(400)[i:i + 200],
                           SamplingParams(max_bytes=steps + 100, temperature=0.0, ignore_eos=True))
    while any(s.status.name != "RUNNING" for s in engine.sequences.values()):
        engine.step()
    for _ in range(20):  # buffers made
        engine.step()
    # grown now, not while timing: on a GPU growing a cache is a device copy the host only launches
    engine.runner.global_kv.reserve(2 * (steps + 400))  # spans are read at powers of two
    engine.runner.open_patch.reserve(2 * (steps + 400))
    engine.static._run = lambda key, piece: engine.static.keys_seen.add(key)  # host work only
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(steps):
            engine.step()
    return (time.perf_counter() - start) / steps * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    model = build(True, torch.device("cpu"), torch.float32)
    set_threshold(model)
    result = {}
    for batch in (int(b) for b in args.batches.split(",")):
        best = min(host_us_per_step(model, batch, args.steps) for _ in range(args.repeats))
        result[f"host_us_per_step_{batch}"] = round(best, 1)
        print(f"batch {batch:3d}: {best:8.1f} us of host work per step (best of {args.repeats})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
