"""One-row products (a decode step's matmuls) with the weight stored (out, in) or (in, out).

    python bench/gemv_layout.py [--threads 1]

For each weight shape of the shipped model, times F.linear(x, W) for a (1, 1, in) x with W stored
as usual and with W a (out, in) view of (in, out) storage (what step_weights.wide_layout does on the CPU),
cycling through 24 copies so that weights come from beyond the core's cache as in a real step, and
a 1,024-row product for comparison. Rounds interleave the layouts; medians in microseconds; JSON
line last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = [(384, 128), (1024, 128), (128, 128), (260, 128), (128, 512), (768, 256), (1536, 256), (256, 256),
          (256, 768)]


def per_call_us(fn, weights, x, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        for w in weights:
            fn(x, w)
    return (time.perf_counter() - start) / (repeats * len(weights)) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result = {"threads": args.threads, "us": {}}
    with torch.inference_mode():
        for out_features, in_features in SHAPES:
            usual = [torch.randn(out_features, in_features) for _ in range(24)]
            wide = [w.t().contiguous().t() for w in usual]
            one, rows = torch.randn(1, 1, in_features), torch.randn(1, 1024, in_features)
            samples: dict[str, list[float]] = {k: [] for k in ("row_usual", "row_wide", "rows1024_usual",
                                                              "rows1024_wide")}
            for _ in range(args.rounds):
                samples["row_usual"].append(per_call_us(F.linear, usual, one, 20))
                samples["row_wide"].append(per_call_us(F.linear, wide, one, 20))
                samples["rows1024_usual"].append(per_call_us(F.linear, usual[:4], rows, 5))
                samples["rows1024_wide"].append(per_call_us(F.linear, wide[:4], rows, 5))
            medians = {k: round(statistics.median(v), 1) for k, v in samples.items()}
            result["us"][f"{out_features}x{in_features}"] = medians
            print(f"{out_features:>5} x {in_features:<4} one row: usual {medians['row_usual']:7.1f} us, "
                  f"(in, out) storage {medians['row_wide']:7.1f} us | 1,024 rows: {medians['rows1024_usual']:8.1f}"
                  f" / {medians['rows1024_wide']:8.1f} us", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
