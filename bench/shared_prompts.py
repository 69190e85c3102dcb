"""Shared prompts: the n choices of one prompt prefilled once, against each choice prefilling its own.

    python bench/shared_prompts.py [--model DIR] [--device cpu|cuda] [--dtype float32|bfloat16]
                                   [--prompt-bytes 1024] [--n 1,4,8] [--bytes 32] [--repeats 3]
                                   [--suffix-bytes 0] [--conversations 4]

For each n, n requests with one English prompt, each sampling with its own seed (as /v1/completions
adds the n choices of a completion; with `--suffix-bytes K`, each prompt followed by K bytes of its
own, as questions after the same few-shot examples), run through an engine with `share_prompts` on
and one with it off, in interleaved rounds. Reported, medians over the rounds: the time until every choice has its
first byte (`first_bytes_ms_*`), the time until all are done (`all_done_ms_*`), and the ratio of
the two engines' first-byte times (`first_bytes_speedup_*`, off over on). Then a conversation's
next turn: one request with the prompt, and when it is done, one with the prompt, its completion and
`--suffix-bytes` (at least 64) more bytes, which resumes in the slot the first left
(`next_turn_first_byte_ms`, `_unshared`: until its first byte). Then `--conversations` new
conversations one after another, each the prompt as instructions and a question of its own: the
second keeps a copy of the instructions' state, and the later ones start from it
(`conversations_first_byte_ms`, `_unshared`: until the first byte of the third and later ones).
Every run's prompt is the text turned round to start elsewhere, so that nothing one run leaves
serves the next. `outputs_equal` says whether both engines gave every request the same bytes. JSON
line last. Needs only torch.
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


def run(engine: Engine, prompt: bytes, n: int, n_bytes: int, device: str, round_: int | str,
        suffixes: list[bytes] | None = None) -> tuple[float, float, list]:
    """-> (ms until every choice has a byte, ms until all are done, each choice's bytes). `suffixes`:
    request i's prompt is `prompt` + suffixes[i]."""
    out = [bytearray() for _ in range(n)]
    ids = {f"r{round_}-{i}": i for i in range(n)}
    sync(device)
    start = time.perf_counter()
    for rid, i in ids.items():
        params = SamplingParams(max_bytes=n_bytes, temperature=0.8, seed=1000 + i, ignore_eos=True)
        engine.add_request(rid, prompt + (suffixes[i] if suffixes else b""), params)
    first = None
    while engine.has_work():
        for o in engine.step():
            out[ids[o.request_id]] += o.new_bytes
        if first is None and all(out):
            first = time.perf_counter() - start
    sync(device)
    return 1000 * first, 1000 * (time.perf_counter() - start), [bytes(b) for b in out]


def turned(text: bytes, i: int) -> bytes:
    """`text` turned round to start at a point of its own for each i (same length)."""
    at = (i * 97) % len(text)
    return text[at:] + text[:at]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--prompt-bytes", type=int, default=1024)
    ap.add_argument("--n", default="1,4,8")
    ap.add_argument("--bytes", type=int, default=32, help="bytes each choice generates")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--suffix-bytes", type=int, default=0, help="bytes of its own after each request's prompt")
    ap.add_argument("--conversations", type=int, default=4, help="new conversations after the same instructions")
    args = ap.parse_args()
    model = load_model(args.model, args.device, args.dtype)
    ns = [int(x) for x in args.n.split(",")]
    k = args.suffix_bytes
    text = prompt_text(args.prompt_bytes + max(k * max(ns), 64 * args.conversations, 64))
    prompt, rest = text[:args.prompt_bytes], text[args.prompt_bytes:]
    suffixes = [rest[i * k:(i + 1) * k] for i in range(max(ns))] if k else None
    engines = {share: Engine(model, max_batch_size=max(ns), share_prompts=share) for share in (True, False)}
    for engine in engines.values():  # warm-up: every step kind once
        run(engine, prompt[:64], max(ns), 4, args.device, -1)
    times = {(share, n): ([], []) for share in engines for n in ns}
    next_turn: dict[bool, list[float]] = {True: [], False: []}
    conversations: dict[bool, list[float]] = {True: [], False: []}
    questions = [f"{i}. ".encode() + rest[i * 64:(i + 1) * 64] for i in range(args.conversations)]
    equal, runs = True, 0
    for r in range(args.repeats):
        for n in ns:
            outputs, runs = {}, runs + 1
            for share, engine in engines.items():
                first, done, outputs[share] = run(engine, turned(prompt, runs), n, args.bytes, args.device, r,
                                                  suffixes)
                times[share, n][0].append(first)
                times[share, n][1].append(done)
            equal &= outputs[True] == outputs[False]
        turns, runs = {}, runs + 1
        for share, engine in engines.items():
            _, _, (answer,) = run(engine, turned(prompt, runs), 1, args.bytes, args.device, f"{r}-turn-1")
            first, _, turns[share] = run(engine, turned(prompt, runs) + answer + rest[:max(k, 64)], 1, args.bytes,
                                         args.device, f"{r}-turn-2")
            next_turn[share].append(first)
        equal &= turns[True] == turns[False]
        runs += 1
        for i, question in enumerate(questions):
            answers = {}
            for share, engine in engines.items():
                first, _, answers[share] = run(engine, turned(prompt, runs) + question, 1, args.bytes, args.device,
                                               f"{r}-conversation-{i}")
                if i >= 2:
                    conversations[share].append(first)
            equal &= answers[True] == answers[False]
    result = {}
    print(f"{'n':>3} {'sharing':>8} {'first bytes ms':>15} {'all done ms':>12}")
    for n in ns:
        for share in (True, False):
            first, done = (statistics.median(t) for t in times[share, n])
            print(f"{n:>3} {'on' if share else 'off':>8} {first:>15.1f} {done:>12.1f}")
            suffix = f"{n}" if share else f"{n}_unshared"
            result[f"first_bytes_ms_{suffix}"] = round(first, 2)
            result[f"all_done_ms_{suffix}"] = round(done, 2)
        unshared, shared = result[f"first_bytes_ms_{n}_unshared"], result[f"first_bytes_ms_{n}"]
        result[f"first_bytes_speedup_{n}"] = round(unshared / shared, 2)
    for share in (True, False):
        key = "next_turn_first_byte_ms" + ("" if share else "_unshared")
        result[key] = round(statistics.median(next_turn[share]), 2)
    print(f"next turn, first byte: {result['next_turn_first_byte_ms']:.1f} ms shared, "
          f"{result['next_turn_first_byte_ms_unshared']:.1f} ms each its own")
    if args.conversations > 2:
        for share in (True, False):
            key = "conversations_first_byte_ms" + ("" if share else "_unshared")
            result[key] = round(statistics.median(conversations[share]), 2)
        print(f"a new conversation after the same instructions, first byte: "
              f"{result['conversations_first_byte_ms']:.1f} ms shared, "
              f"{result['conversations_first_byte_ms_unshared']:.1f} ms each its own")
    result["outputs_equal"] = equal
    print(json.dumps(result))


if __name__ == "__main__":
    main()
