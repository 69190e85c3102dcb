"""Priority scheduling: how soon an urgent request gets its first byte when every slot is taken.

    python bench/priority.py [--model DIR] [--device cpu|cuda] [--dtype float32|bfloat16] [--slots 4]
                             [--prompt-bytes 256] [--bytes 400] [--urgent-bytes 32] [--after 20] [--rounds 3]

`--slots` long requests (a prompt of `--prompt-bytes`, `--bytes` greedy bytes each) fill every slot;
`--after` steps later one urgent request arrives (a short prompt, `--urgent-bytes` bytes). Without
priorities (as under --scheduling-policy fcfs) it waits for a slot to free; with a lower priority value
than theirs (--scheduling-policy priority) it preempts one of them, which prefills its prompt and the
bytes it had generated again when a slot frees, and goes on. Reported, medians over the rounds: the
urgent request's time to first byte and to its last (`urgent_first_ms_*`, `urgent_done_ms_*`), and the
time until every request is done (`all_done_ms_*`: what the preemption costs the others), for `fcfs`
and `priority`; and whether every long request generated the same bytes both ways (`outputs_equal`).
JSON line last. Needs only torch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.generate import DEFAULT_MODEL, prompt_text, sync  # noqa: E402
from blt_runtime import load_model  # noqa: E402
from blt_runtime.engine import Engine  # noqa: E402
from blt_runtime.sampling import SamplingParams  # noqa: E402


def run(model, args, urgent_priority: int, device: str) -> dict:
    engine = Engine(model, max_batch_size=args.slots)
    text = prompt_text(args.prompt_bytes * (args.slots + 1))
    long = SamplingParams(max_bytes=args.bytes, temperature=0.0, ignore_eos=True)
    for i in range(args.slots):
        engine.add_request(f"long{i}", text[i * args.prompt_bytes:(i + 1) * args.prompt_bytes], long, priority=1)
    out = {f"long{i}": bytearray() for i in range(args.slots)}
    times: dict[str, float] = {}
    start, step = time.perf_counter(), 0
    while engine.has_work():
        if step == args.after:
            arrived = time.perf_counter()
            engine.add_request("urgent", b"Now, quickly: ", SamplingParams(max_bytes=args.urgent_bytes,
                                                                           temperature=0.0, ignore_eos=True),
                               priority=urgent_priority)
        for o in engine.step():
            if o.request_id == "urgent":
                if o.new_bytes:
                    times.setdefault("urgent_first", time.perf_counter() - arrived)
                if o.finished:
                    times["urgent_done"] = time.perf_counter() - arrived
            else:
                out[o.request_id] += o.new_bytes
        step += 1
    sync(device)
    times["all_done"] = time.perf_counter() - start
    return {"times": times, "outputs": {k: bytes(v) for k, v in out.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--prompt-bytes", type=int, default=256)
    parser.add_argument("--bytes", type=int, default=400)
    parser.add_argument("--urgent-bytes", type=int, default=32)
    parser.add_argument("--after", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = load_model(args.model, args.device, args.dtype)
    samples: dict[str, list[float]] = {}
    outputs = {}
    for r in range(args.rounds):
        for policy, urgent_priority in (("fcfs", 1), ("priority", 0)):  # interleaved
            result = run(model, args, urgent_priority, args.device)
            for name, seconds in result["times"].items():
                samples.setdefault(f"{name}_ms_{policy}", []).append(1000 * seconds)
            outputs.setdefault(policy, result["outputs"])
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in samples.items()), flush=True)
    figures = {name: round(statistics.median(values), 1) for name, values in samples.items()}
    print(json.dumps({"model": Path(args.model).name, "device": args.device, "slots": args.slots,
                      "prompt_bytes": args.prompt_bytes, "bytes": args.bytes, "urgent_bytes": args.urgent_bytes,
                      "rounds": args.rounds, **figures, "outputs_equal": outputs["fcfs"] == outputs["priority"]}))


if __name__ == "__main__":
    main()
