"""Guided jump-forward: bytes a guide forces, prefilled as one chunk, against sampling them one step each.

    python bench/jump_forward.py [--model DIR] [--device cpu|cuda] [--streams 1 8] [--rounds 3] [--least 2]

For each stream count, that many sampled requests (different prompts and seeds) are held to each of three guides:
a JSON schema (a record of four fields, one of them an enum: the keys and punctuation are forced), a
tool call's JSON (the call's name and the keys forced), and a choice among four names (all but their first
byte forced). Each runs to its end in an engine with `jump_forward=0` and in one with `--least`,
interleaved over `--rounds`. Reports each run's bytes/s (the completions' bytes over the time from adding
the requests to their last output, prefills included) and engine steps, the medians, and whether the
two engines' outputs (bytes, patch starts, finish reasons) were the same: they must be. Needs only
torch. The last line printed is JSON.
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
from blt_runtime.json_guide import schema_regex  # noqa: E402

RECORD = {"type": "object", "required": ["speaker", "mood", "line", "act"], "properties": {
    "speaker": {"type": "string", "maxLength": 20}, "mood": {"enum": ["angry", "merry", "sorrowful"]},
    "line": {"type": "string", "maxLength": 80}, "act": {"type": "integer", "minimum": 1, "maximum": 5}}}
TOOL_CALL = {"type": "object", "required": ["name", "arguments"], "properties": {
    "name": {"const": "send_letter"}, "arguments": {"type": "object", "required": ["recipient", "body"], "properties": {
        "recipient": {"enum": ["Romeo", "Juliet", "Friar Laurence"]}, "body": {"type": "string", "maxLength": 60}}}}}
NAMES = ["ROMEO", "JULIET", "FRIAR LAURENCE", "MERCUTIO"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(model, guide: ByteGuide, streams: int, least: int) -> tuple[float, int, dict]:
    """-> (bytes/s, engine steps, each request's outputs' fields in order) of `streams` requests held to `guide`."""
    engine = Engine(model, max_batch_size=streams, jump_forward=least)
    sync(model.device)
    start, steps, outputs = time.perf_counter(), 0, {}
    for i in range(streams):
        engine.add_request(str(i), f"SCENE {i + 1}.\n".encode(), SamplingParams(max_bytes=400, temperature=0.8, seed=i,
                                                                                 guide=guide))
    while engine.has_work():
        for o in engine.step():
            outputs.setdefault(o.request_id, []).append((o.new_bytes, o.patch_start, o.finished, o.finish_reason))
        steps += 1
    sync(model.device)
    elapsed = time.perf_counter() - start
    return sum(len(o[0]) for outs in outputs.values() for o in outs) / elapsed, steps, outputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "weights" / "blt-shakespeare"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--least", type=int, default=2, help="the engine's jump_forward in the runs that jump")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    guides = {"record": ByteGuide.regex(schema_regex(RECORD)), "tool_call": ByteGuide.regex(schema_regex(TOOL_CALL)),
              "choice": ByteGuide.choice(NAMES)}
    result: dict = {"device": str(model.device), "least": args.least, "same_outputs": True}
    for streams in args.streams:
        for name, guide in guides.items():
            rates: dict[int, list[float]] = {0: [], args.least: []}
            steps, outputs = {}, {}
            for _ in range(args.rounds):
                for least in rates:
                    rate, steps[least], outputs[least] = run(model, guide, streams, least)
                    rates[least].append(rate)
            same = outputs[0] == outputs[args.least]
            result["same_outputs"] &= same
            key = f"{name}_{streams}"
            result[key] = {"bytes": sum(len(o[0]) for outs in outputs[0].values() for o in outs),
                           "steps": [steps[0], steps[args.least]],
                           "bytes_per_s": [round(statistics.median(rates[k]), 1) for k in rates]}
            print(f"{key:>14}: off " + " / ".join(f"{v:.0f}" for v in rates[0]) + f" bytes/s ({steps[0]} steps); on "
                  + " / ".join(f"{v:.0f}" for v in rates[args.least]) + f" bytes/s ({steps[args.least]} steps); "
                  f"same outputs: {same}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
