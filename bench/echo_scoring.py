"""Scoring prompts with `echo` and `logprobs` while another client streams: what it costs the stream.

An evaluation harness (lm-eval's loglikelihood requests) sends prompts with echo, logprobs and
max_tokens 0 or 1, and reads the prompt's own logprobs. Launches `python -m server` from this tree
(the shipped model unless arguments say otherwise); one client streams a long greedy completion, and
once it is going another sends `--requests` scoring requests of `--prompt-bytes` bytes each, one after
the other. With `--endings K`, each request holds K prompts, the same text with a different ending of
a few bytes (a multiple-choice question: the choices share the text, and need not prefill it again).
Reports the scoring requests' seconds, and the stream's gaps between events while they ran: the
longest, and the 99th percentile. With `--patches`, the requests go to `/v1/patches` instead (what
the entropy model makes of the text). The last line printed is JSON.

    python bench/echo_scoring.py [--prompt-bytes 8000] [--requests 4] [--endings 1] [--patches] [--port 8198]
                                 [-- blt-serve args]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / ".." / "shared" / "data" / "tinyshakespeare.txt"
sys.path.insert(0, str(ROOT / "bench"))
from startup import healthy  # noqa: E402


def prompt_text(n: int, offset: int) -> str:
    """n bytes of English (the training text, or a sentence repeated where it is absent)."""
    text = TEXT.read_bytes().decode("ascii", "ignore") if TEXT.exists() else "The quick brown fox jumps. " * 2000
    text = text * (1 + (offset + n) // len(text))
    return text[offset:offset + n]


async def stream(client: httpx.AsyncClient, url: str, stamps: list[float], stop: asyncio.Event) -> int:
    """Greedy streams of 2,000 bytes one after the other; the time of every event goes into `stamps`.
    Ends when `stop` is set."""
    body = {"prompt": "First Citizen:\n", "max_tokens": 2000, "temperature": 0, "ignore_eos": True, "stream": True}
    got = 0
    while not stop.is_set():
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    stamps.append(time.perf_counter())
                    got += len(json.loads(line[6:])["choices"][0]["text"])
                if stop.is_set():
                    break
    return got


async def score(client: httpx.AsyncClient, url: str, prompts: list[str], max_tokens: int) -> list[list]:
    body = {"prompt": prompts, "max_tokens": max_tokens, "temperature": 0, "echo": True, "logprobs": 1}
    r = await client.post(f"{url}/v1/completions", json=body)
    r.raise_for_status()
    return [c["logprobs"]["token_logprobs"] for c in r.json()["choices"]]


async def patches(client: httpx.AsyncClient, url: str, text: str) -> list[float]:
    r = await client.post(f"{url}/v1/patches", json={"text": text})
    r.raise_for_status()
    return r.json()["entropies"]


async def measure(url: str, args) -> dict:
    stamps: list[float] = []
    stop = asyncio.Event()
    async with httpx.AsyncClient(timeout=600) as client:
        streaming = asyncio.create_task(stream(client, url, stamps, stop))
        while len(stamps) < 50:  # the stream is going
            if streaming.done():
                streaming.result()  # raises what stopped it
            await asyncio.sleep(0.05)
        start = time.perf_counter()
        seconds = []
        for i in range(args.requests):
            t = time.perf_counter()
            text = prompt_text(args.prompt_bytes, 1000 * i)
            prompts = [text] if args.endings == 1 else [f"{text} (choice {k})" for k in range(args.endings)]
            if args.patches:
                scored = [await patches(client, url, text)]
            else:
                scored = await score(client, url, prompts, args.max_tokens)
            seconds.append(time.perf_counter() - t)
            assert all(len(s) >= args.prompt_bytes for s in scored), "a prompt without all its logprobs"
        end = time.perf_counter()
        await asyncio.sleep(0.5)
        stop.set()
        await streaming
    during = [b - a for a, b in zip(stamps, stamps[1:]) if b >= start and a <= end]
    before = [b - a for a, b in zip(stamps, stamps[1:]) if b < start]
    q = statistics.quantiles(during, n=100, method="inclusive") if len(during) > 1 else during * 99
    return {"endpoint": "/v1/patches" if args.patches else "/v1/completions",
            "prompt_bytes": args.prompt_bytes, "requests": args.requests, "endings": args.endings,
            "max_tokens": args.max_tokens,
            "score_s": [round(s, 3) for s in seconds], "score_s_median": round(statistics.median(seconds), 3),
            "stream_gap_max_s": round(max(during), 3), "stream_gap_p99_s": round(q[98], 3),
            "stream_gap_median_before_s": round(statistics.median(before), 4),
            "stream_events_during": len(during)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompt-bytes", type=int, default=8000)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=0, help="of each scoring request (lm-eval sends 0 or 1)")
    p.add_argument("--endings", type=int, default=1, help="prompts per request: the text with different endings")
    p.add_argument("--patches", action="store_true", help="POST /v1/patches instead of scoring")
    p.add_argument("--port", type=int, default=8198)
    args, extra = p.parse_known_args()
    extra = [a for a in extra if a != "--"]
    proc = subprocess.Popen([sys.executable, "-m", "server", "--port", str(args.port), *extra], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not healthy(args.port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("blt-serve did not start")
            time.sleep(0.05)
        result = asyncio.run(measure(f"http://127.0.0.1:{args.port}", args))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    what = "patches of" if args.patches else "scoring"
    print(f"{what} {args.requests} x {args.prompt_bytes} bytes: {result['score_s_median']} s each (median); "
          f"the stream's longest gap meanwhile {result['stream_gap_max_s']} s, p99 {result['stream_gap_p99_s']} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
