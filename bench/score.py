"""Scoring a whole prompt in one full forward, timed at several lengths: what `/v1/patches`
(model.byte_patches) costs, on the engine's thread between steps, so every stream waits for it; and
model.prompt_logprobs, the full forward's scores that the engine's (echo with logprobs, computed in
its prefill chunks: bench/echo_scoring.py) are tested against.

    python bench/score.py [--model DIR] [--device cpu|cuda] [--lengths 1000,4000,8000] [--repeats 3]

Prints a table, then one JSON line: seconds per call (median of --repeats) at each length.
Needs only torch.
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

from bench.generate import DEFAULT_MODEL, prompt_text, sync  # noqa: E402
from blt_runtime import load_model  # noqa: E402


def seconds(fn, device: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--lengths", default="1000,4000,8000")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads on a CPU")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    result = {"device": args.device, "threads": args.threads}
    model.prompt_logprobs(prompt_text(300), 5)  # warm-up
    for n in (int(x) for x in args.lengths.split(",")):
        prompt = prompt_text(n)
        for name, fn in (("prompt_logprobs", lambda p=prompt: model.prompt_logprobs(p, 5)),
                         ("byte_patches", lambda p=prompt: model.byte_patches(p))):
            result[f"{name}_s_{n}"] = round(seconds(fn, args.device, args.repeats), 3)
        print(f"{n:>6} bytes: prompt_logprobs {result[f'prompt_logprobs_s_{n}']:.3f} s, "
              f"byte_patches {result[f'byte_patches_s_{n}']:.3f} s", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
