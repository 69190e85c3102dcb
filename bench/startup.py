"""blt-serve's start-up: seconds from launching it to the first 200 from /health, a few times.

    python bench/startup.py [--runs 3] [--port 8199] [-- extra blt-serve arguments]

Launches `python -m server` from this tree (the shipped model unless arguments say otherwise),
polls /health every 20 ms, stops it; prints each run, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def start_once(port: int, extra: list[str], limit_s: float = 120.0) -> float:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), *extra], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not healthy(port):
            if proc.poll() is not None:
                raise SystemExit(f"blt-serve exited with {proc.returncode} before /health answered")
            if time.perf_counter() - start > limit_s:
                raise SystemExit(f"/health did not answer within {limit_s} s")
            time.sleep(0.02)
        return time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--port", type=int, default=8199)
    args, extra = p.parse_known_args()
    extra = [a for a in extra if a != "--"]
    runs = []
    for i in range(args.runs):
        runs.append(round(start_once(args.port, extra), 2))
        print(f"run {i + 1}: {runs[-1]} s", flush=True)
    print(json.dumps({"startup_s": runs, "median_s": round(statistics.median(runs), 2)}))


if __name__ == "__main__":
    main()
