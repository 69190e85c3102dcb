"""What the global model's cache of pages takes under mixed requests, against a cache of rows.

    python bench/paged_memory.py [--model DIR] [--device cpu|cuda] [--dtype float32|bfloat16]
                                 [--slots 16] [--short 15] [--short-bytes 200] [--long-bytes 6000]
                                 [--new-bytes 64] [--n 4] [--turns 16] [--turns-prompt 1000]
                                 [--turns-new 256] [--turns-contexts 1]

Four workloads through one engine each (`--slots` slots), run to the end while the global cache's pages
are counted after every step:
- `mixed`: `--short` requests of `--short-bytes` prompt bytes and one of `--long-bytes`, each generating
  `--new-bytes` (English text, each prompt from another place in it);
- `choices`: `--n` choices of one `--long-bytes` prompt (a completion's `n`), sampled;
- `conversations`: `--short` requests with the same `--long-bytes` instructions, each with a question of
  its own after them (kept prefixes, forks);
- `turns`: `--turns` requests of `--turns-prompt` bytes generating `--turns-new` (greedy), first with the
  pool left to grow (`grown`), then with a pool given the size of `--turns-contexts` full contexts at a
  patch a byte (`fixed`: `Engine(global_cache_bytes=)`, vLLM's --kv-cache-memory-bytes; max_model_len is
  a request's bytes): fewer fit at once, the others wait their turn (preempted, then recomputed), and the
  outputs must be the same. For it also `seconds`, `bytes_per_s` and `preemptions`, each run timed once.
For each: the most pages held at once (`peak_pages_held`, `peak_mib_held`), the pool the cache grew to
(`pool_mib`), the patches of each request alone added up (`patches`: what the pages hold without sharing,
`unshared_mib`), and what a cache of rows would have taken: every slot, kept prefix and the scratch row as
long as the longest sequence, doubling from 64 patches as the cache before the pages did (`rows_mib`).
JSON line last. Needs only torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.generate import DEFAULT_MODEL, prompt_text  # noqa: E402
from blt_runtime import load_model  # noqa: E402
from blt_runtime.engine import Engine  # noqa: E402
from blt_runtime.sampling import SamplingParams  # noqa: E402

MIB = 2**20


def run(engine: Engine, requests: dict[str, tuple[bytes, SamplingParams]]) -> dict:
    kv = engine.runner.global_kv
    per_patch = engine.runner.global_bytes_per_patch()
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    peak, patches, preemptions, outputs = 0, {}, 0, {rid: bytearray() for rid in requests}
    start = time.perf_counter()
    while engine.has_work():
        for o in engine.step():
            outputs[o.request_id] += o.new_bytes
            if o.finished:
                patches[o.request_id] = o.usage.global_steps
        peak = max(peak, kv.pages_held())
        preemptions += len(engine.last_preempted)
    seconds = time.perf_counter() - start
    rows = len(kv.held)  # slots, kept prefixes, the scratch row
    longest, capacity = max(patches.values()), 64
    while capacity < longest:
        capacity *= 2
    return {"requests": len(requests), "patches": sum(patches.values()), "longest_patches": longest,
            "peak_pages_held": peak, "peak_mib_held": round(peak * kv.page * per_patch / MIB, 2),
            "pool_mib": round(kv.kv.nbytes / MIB, 2),
            "unshared_mib": round(sum(-(-n // kv.page) for n in patches.values()) * kv.page * per_patch / MIB, 2),
            "rows_mib": round(rows * capacity * per_patch / MIB, 2), "seconds": round(seconds, 2),
            "bytes_per_s": round(sum(map(len, outputs.values())) / seconds, 1), "preemptions": preemptions,
            "outputs": outputs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--short", type=int, default=15)
    ap.add_argument("--short-bytes", type=int, default=200)
    ap.add_argument("--long-bytes", type=int, default=6000)
    ap.add_argument("--new-bytes", type=int, default=64)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--turns", type=int, default=16)
    ap.add_argument("--turns-prompt", type=int, default=1000)
    ap.add_argument("--turns-new", type=int, default=256)
    ap.add_argument("--turns-contexts", type=int, default=1)
    args = ap.parse_args()
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    text = prompt_text(args.long_bytes + args.short * args.short_bytes + 1024)
    greedy = SamplingParams(max_bytes=args.new_bytes, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_bytes=args.new_bytes, temperature=0.8, seed=7, ignore_eos=True)
    long_prompt = text[:args.long_bytes]
    mixed = {"long": (long_prompt, greedy)}
    mixed |= {f"short{i}": (text[args.long_bytes + i * args.short_bytes:][:args.short_bytes], greedy)
              for i in range(args.short)}
    choices = {f"choice{i}": (long_prompt, dataclasses.replace(sampled, seed=i)) for i in range(args.n)}
    questions = {f"question{i}": (long_prompt + b"\n\nQuestion %d: " % i + text[i * 97:][:args.short_bytes], greedy)
                 for i in range(args.short)}
    result = {"slots": args.slots, "device": args.device, "dtype": args.dtype}
    for name, requests in (("mixed", mixed), ("choices", choices), ("conversations", questions)):
        engine = Engine(model, max_batch_size=args.slots)
        result[name] = run(engine, requests)
        del result[name]["outputs"]
        print(name, result[name], flush=True)
    turns = {f"turn{i}": (text[i * 211:][:args.turns_prompt], dataclasses.replace(greedy, max_bytes=args.turns_new))
             for i in range(args.turns)}
    length = args.turns_prompt + args.turns_new + 8  # (a character finished past max_bytes)
    engine = Engine(model, max_batch_size=args.slots, max_model_len=length)
    grown = run(engine, turns)
    kv = engine.runner.global_kv
    budget = (args.turns_contexts * kv.pages_for(kv.max_len) + 1) * kv.page_bytes
    fixed = run(Engine(model, max_batch_size=args.slots, max_model_len=length, global_cache_bytes=budget), turns)
    if fixed.pop("outputs") != grown.pop("outputs"):
        raise SystemExit("turns: the outputs of a fixed pool differ from those of a pool left to grow")
    result["turns"] = {"grown": grown, "fixed": fixed, "fixed_mib": round(budget / MIB, 2),
                       "fixed_vs_grown_bytes_per_s": round(fixed["bytes_per_s"] / grown["bytes_per_s"], 3)}
    print("turns", result["turns"], flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
