"""What the global model's cache of pages takes under mixed requests, against a cache of rows.

    python bench/paged_memory.py [--model DIR] [--device cpu|cuda] [--dtype float32|bfloat16]
                                 [--slots 16] [--short 15] [--short-bytes 200] [--long-bytes 6000]
                                 [--new-bytes 64] [--n 4]

Three workloads through one engine each (`--slots` slots), run to the end while the global cache's pages
are counted after every step:
- `mixed`: `--short` requests of `--short-bytes` prompt bytes and one of `--long-bytes`, each generating
  `--new-bytes` (English text, each prompt from another place in it);
- `choices`: `--n` choices of one `--long-bytes` prompt (a completion's `n`), sampled;
- `conversations`: `--short` requests with the same `--long-bytes` instructions, each with a question of
  its own after them (kept prefixes, forks).
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
    peak, patches = 0, {}
    while engine.has_work():
        for o in engine.step():
            if o.finished:
                patches[o.request_id] = o.usage.global_steps
        peak = max(peak, kv.pages_held())
    rows = len(kv.held)  # slots, kept prefixes, the scratch row
    longest, capacity = max(patches.values()), 64
    while capacity < longest:
        capacity *= 2
    return {"requests": len(requests), "patches": sum(patches.values()), "longest_patches": longest,
            "peak_pages_held": peak, "peak_mib_held": round(peak * kv.page * per_patch / MIB, 2),
            "pool_mib": round(kv.kv.nbytes / MIB, 2),
            "unshared_mib": round(sum(-(-n // kv.page) for n in patches.values()) * kv.page * per_patch / MIB, 2),
            "rows_mib": round(rows * capacity * per_patch / MIB, 2)}


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
        print(name, result[name], flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
