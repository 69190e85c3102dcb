"""A burst of requests with short prompts arriving together: time to each one's first byte, with the
prompts prefilled together (as the rows of one padded batch, the default) and one per step; with
`--behind`, while a long prompt is prefilled, with the short ones going first and in order.

    python bench/burst.py [--model DIR] [--device cpu|cuda] [--requests 16] [--prompt-bytes 50,200]
                          [--bytes 32] [--rounds 3] [--behind BYTES]

For each prompt length, `--requests` greedy requests of that many bytes (cut from the training text)
join an idle engine at once and generate `--bytes` each. Reports the first byte of the first, median
and last request and the time until all are done (medians over `--rounds`, the two ways interleaved),
and the steps taken. With `--behind`, a request with a prompt of that many bytes is added a step
before them, and the time to its own first byte is reported too. Needs only torch. The last line
printed is JSON.
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

TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def text() -> bytes:
    return TEXT.read_bytes() if TEXT.exists() else (ROOT / "README.md").read_bytes()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def burst(engine: Engine, prompts: list[bytes], n_bytes: int, device: torch.device, behind: bytes = b"") -> dict:
    params = SamplingParams(max_bytes=n_bytes, temperature=0.0, ignore_eos=True)
    sync(device)
    first, steps = {}, 0
    if behind:  # its first chunk is on its way when the burst comes
        begun = time.perf_counter()
        engine.add_request("long", behind, params)
        engine.step()
        steps += 1
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    while engine.has_work():
        outputs = engine.step()
        steps += 1
        now = time.perf_counter()
        for o in outputs:
            if o.new_bytes and o.request_id not in first:
                first[o.request_id] = now - (begun if o.request_id == "long" else start)
    done = time.perf_counter() - start
    long_first = first.pop("long", None)
    times = sorted(first.values())
    result = {"first_ms": times[0] * 1000, "median_ms": statistics.median(times) * 1000, "last_ms": times[-1] * 1000,
              "all_done_ms": done * 1000, "steps": steps}
    return result if long_first is None else {**result, "long_first_ms": long_first * 1000}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "weights" / "blt-shakespeare"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-bytes", default="50,200")
    p.add_argument("--bytes", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--behind", type=int, default=0, help="bytes of a prompt added a step before each burst")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = load_model(args.model, device=device)
    data = text()
    # the same prompts every round: without shared prompts, or from the second round on each would keep a
    # copy of its own state (sharing.py), and from the third start from it
    engine = Engine(model, max_batch_size=args.requests + bool(args.behind), share_prompts=False)
    batch_prompt = engine.scheduler.batch_prompt
    result: dict = {"requests": args.requests, "bytes": args.bytes, "device": str(device), "behind": args.behind}
    behind = (data * (args.behind // len(data) + 1))[-args.behind:] if args.behind else b""
    # (name, prompts prefilled together, short ones before a long one's next chunk)
    ways = ([("short_first", batch_prompt, True), ("in_order", batch_prompt, False)] if behind else
            [("together", batch_prompt, True), ("one_per_step", None, True)])
    for n in (int(v) for v in args.prompt_bytes.split(",")):
        prompts = [data[1000 * i:1000 * i + n] for i in range(args.requests)]
        runs: dict[str, list[dict]] = {way: [] for way, _, _ in ways}
        burst(engine, prompts[:2], 2, device, behind[:600])  # warm-up
        for _ in range(args.rounds):
            for way, limit, short_first in ways:
                engine.scheduler.batch_prompt, engine.scheduler.short_first = limit, short_first
                runs[way].append(burst(engine, prompts, args.bytes, device, behind))
        for way, figures in runs.items():
            medians = {k: round(statistics.median(f[k] for f in figures), 1) for k in figures[0]}
            result[f"{way}_{n}"] = medians
            print(f"{n:>5} bytes, {way:>12}: first byte {medians['first_ms']:.0f} / {medians['median_ms']:.0f} / "
                  f"{medians['last_ms']:.0f} ms (first / median / last), all done {medians['all_done_ms']:.0f} ms, "
                  f"{medians['steps']:.0f} steps" + (f"; the long prompt's first byte {medians['long_first_ms']:.0f} ms"
                                                      if behind else ""), flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
