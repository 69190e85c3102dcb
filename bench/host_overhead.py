"""Host time per engine step: the Python work around a decode step's kernels, on any machine.

With CUDA graphs a step's device work is a few graph replays, and the host waits for it once (the
step's transfer). What the host does between the step's results arriving and the next step's first
launch (reading the results, stops, outputs, what the caller does with them, scheduling, staging
the inputs) is time the device sits idle, so it adds to every byte's latency. This script runs
static-shaped decode steps of a tiny model with the pieces' device work skipped (and the caches
grown beforehand), so what is timed is that host work alone, at several batch sizes:
- `host_us_per_step_B`: all of it, per step;
- `critical_us_per_step_B`: the part the device would wait for, from the step's transfer to the next
  step's first piece, with overlapped steps (Engine(overlap=True), the CUDA default: the next step
  is queued before the outputs go back) and without (`..._no_overlap`).
`--caller worker` hands each step's outputs to the HTTP server's engine worker (its metrics and
deliveries, server/worker.py, on an event loop that is not running), as `blt-serve` does; by default
the caller only collects the bytes. (The sampled bytes are then stale, which changes no host path
but stop strings; greedy requests without stops are used.)

    .venv/bin/python bench/host_overhead.py            # JSON line last
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from unittest.mock import patch

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_check import build, english, set_threshold  # noqa: E402
from blt_runtime import Engine, SamplingParams  # noqa: E402
from blt_runtime.transfer import HostTransfer  # noqa: E402


def host_us_per_step(model, batch: int, steps: int, overlap: bool = False, caller: str = "none") -> tuple[float, float]:
    """(all host work, the part on the device's critical path), in us per step."""
    engine = Engine(model, max_batch_size=64, static=True, cuda_graphs=False, overlap=overlap,
                    first_byte_at_once=False)  # as on CUDA
    for i in range(batch):
        engine.add_request(str(i), english(400)[i:i + 200],
                           SamplingParams(max_bytes=steps + 100, temperature=0.0, ignore_eos=True))
    while any(s.status.name != "RUNNING" for s in engine.sequences.values()):
        engine.step()
    for _ in range(20):  # buffers made
        engine.step()
    # grown now, not while timing: on a GPU growing a cache is a device copy the host only launches
    kv = engine.runner.global_kv  # pages for every sequence's patches to come (handed out while timed, as they are)
    kv.grow(kv.num_pages + batch * -(-(steps + 100) // kv.page))
    engine.runner.open_patch.reserve(2 * (steps + 400))
    marks = {"results": None, "critical": 0.0}

    def launch(key, piece):  # host work only; the first piece after a transfer ends a wait of the device
        engine.static.keys_seen.add(key)
        if marks["results"] is not None:
            marks["critical"] += time.perf_counter() - marks["results"]
            marks["results"] = None

    real_fetch = HostTransfer.fetch

    def fetch(transfer):
        real_fetch(transfer)
        marks["results"] = time.perf_counter()

    engine.static._run = launch
    step = worker_step(engine) if caller == "worker" else engine.step
    with torch.inference_mode(), patch.object(HostTransfer, "fetch", fetch):
        step()  # untimed: the caller's first call sets up its own state (a worker: its metrics' children)
        marks["critical"] = 0.0
        start = time.perf_counter()
        if marks["results"] is not None:  # the wait in progress is counted from here
            marks["results"] = start
        for _ in range(steps):
            step()
        elapsed = time.perf_counter() - start
    return elapsed / steps * 1e6, marks["critical"] / steps * 1e6


def worker_step(engine: Engine):
    """The HTTP server's engine worker around `engine` (imported only here: the runtime needs no web stack)."""
    import asyncio

    from server.metrics import Metrics
    from server.worker import EngineWorker, Tracked

    class Loop:  # deliveries are built and handed over, then dropped
        def call_soon_threadsafe(self, *args):
            pass

    worker = EngineWorker(engine, Metrics("bench"))
    worker._loop = Loop()
    for rid in engine.sequences:
        worker._tracked[rid] = Tracked(asyncio.Queue(), time.monotonic(), 200)
    return worker._step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--caller", default="none", choices=["none", "worker"])
    args = p.parse_args()
    torch.manual_seed(0)
    model = build(True, torch.device("cpu"), torch.float32)
    set_threshold(model)
    result = {}
    for batch in (int(b) for b in args.batches.split(",")):
        for overlap in (True, False):
            runs = [host_us_per_step(model, batch, args.steps, overlap, args.caller) for _ in range(args.repeats)]
            total, critical = min(r[0] for r in runs), min(r[1] for r in runs)
            suffix = "" if overlap else "_no_overlap"
            result[f"host_us_per_step_{batch}{suffix}"] = round(total, 1)
            result[f"critical_us_per_step_{batch}{suffix}"] = round(critical, 1)
            print(f"batch {batch:3d}, {'overlapped' if overlap else 'not overlapped'}: {total:8.1f} us of host work "
                  f"per step, {critical:8.1f} us of it while the device waits (best of {args.repeats})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
