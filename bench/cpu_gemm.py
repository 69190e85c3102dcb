"""A CPU's matrix products by oneDNN (blt_runtime/cpu_gemm.py) against F.linear's BLAS, in the engine.

    python bench/cpu_gemm.py [--model DIR] [--threads 1] [--rounds 3]

With the engine's products on a CPU (`runner.ops.linear`) as cpu_gemm chooses them and as F.linear
alone, interleaved over `--rounds`: the time to prefill a 1 KB and an 8 KB prompt (to the first byte),
and bytes/s of 1 and 16 greedy streams once running; and each of the shipped model's product shapes
at 1, 16 and 512 rows, both ways. Reports medians and whether the two engines' bytes agree (their sums
differ in the last bits: greedy bytes may part at a near-tie, which this model's text rarely has).
Needs only torch. The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from blt_runtime import Engine, SamplingParams, load_model  # noqa: E402
from blt_runtime.cpu_gemm import linear_for  # noqa: E402

TEXT = (ROOT / "README.md").read_bytes() * 8


def engine(model, onednn: bool, slots: int) -> Engine:
    e = Engine(model, max_batch_size=slots)
    if not onednn:
        e.runner.ops.linear = F.linear
    return e


def prefill_s(model, onednn: bool, size: int) -> tuple[float, bytes]:
    e = engine(model, onednn, 1)
    start = time.perf_counter()
    e.add_request("p", TEXT[:size], SamplingParams(max_bytes=1, temperature=0.0, ignore_eos=True))
    out = b""
    while e.has_work():
        out += b"".join(o.new_bytes for o in e.step())
    return time.perf_counter() - start, out


def decode_rate(model, onednn: bool, streams: int, n: int = 200) -> tuple[float, bytes]:
    e = engine(model, onednn, streams)
    for i in range(streams):
        e.add_request(str(i), TEXT[300 * i:300 * i + 64], SamplingParams(max_bytes=n, temperature=0.0,
                                                                         ignore_eos=True))
    while e.num_waiting or any(s.status.value != "running" for s in e.scheduler.active):
        e.step()
    start, total, out = time.perf_counter(), 0, b""
    while e.has_work():
        for o in e.step():
            total += len(o.new_bytes)
            out += o.new_bytes
    return total / (time.perf_counter() - start), out


def product_us(linear, x: torch.Tensor, w: torch.Tensor, repeats: int = 200) -> float:
    for _ in range(20):
        linear(x, w)
    start = time.perf_counter()
    for _ in range(repeats):
        linear(x, w)
    return (time.perf_counter() - start) / repeats * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "weights" / "blt-shakespeare"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu", dtype=torch.float32)
    chosen = linear_for(model.device, model.dtype)
    result: dict = {"onednn": chosen is not F.linear, "threads": args.threads, "same_bytes": True}
    if chosen is F.linear:
        print("oneDNN's linear is not available in this torch: nothing to compare")
        print(json.dumps(result))
        return
    runs: dict[str, dict[bool, list[float]]] = {}
    for _ in range(args.rounds):
        outputs = {}
        for onednn in (False, True):
            outs = outputs[onednn] = []
            for size in (1024, 8000):
                t, out = prefill_s(model, onednn, size)
                runs.setdefault(f"prefill_{size}_ms", {False: [], True: []})[onednn].append(t * 1e3)
                outs.append(out)
            for streams in (1, 16):
                rate, out = decode_rate(model, onednn, streams)
                runs.setdefault(f"decode_{streams}_bytes_per_s", {False: [], True: []})[onednn].append(rate)
                outs.append(out)
        result["same_bytes"] &= outputs[False] == outputs[True]
    for name, by in runs.items():
        off, on = statistics.median(by[False]), statistics.median(by[True])
        result[name] = [round(off, 1), round(on, 1)]
        print(f"{name:>26}: F.linear " + " / ".join(f"{v:.1f}" for v in by[False]) + "; cpu_gemm "
              + " / ".join(f"{v:.1f}" for v in by[True]))
    shapes = sorted({tuple(w.shape) for name, w in model.named_parameters() if w.dim() == 2 and "embed" not in name})
    result["products_us"] = {}
    for n, k in shapes:
        w = torch.randn(n, k)
        for rows in (1, 16, 512):
            x = torch.randn(rows, k)
            mkl, dnn = product_us(F.linear, x, w), product_us(chosen, x, w)
            result["products_us"][f"{rows}x{k}->{n}"] = [round(mkl, 1), round(dnn, 1)]
    for name, (mkl, dnn) in result["products_us"].items():
        print(f"{name:>16}: F.linear {mkl:.1f} us, chosen {dnn:.1f} us")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
