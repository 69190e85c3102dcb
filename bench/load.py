"""Load test: N concurrent streaming clients against a running blt-serve for T seconds.

Each client loops until the deadline: a prompt of random length (from a text file, or synthetic),
a random max_tokens, streaming; a fraction disconnect at a random point; after a 429 a client
waits the Retry-After seconds, as a well-behaved client does. With `--shared-rate`, that share of the
prompts begin with the same 512 bytes (a system prompt: shared prompts at work); with `--long-rate`, that
share are `--long-bytes` long (documents among chat turns), and the time to first byte is reported
for them and for the others apart too. Every request ends as
completed (a finish_reason and [DONE]), rejected (429), disconnected (on purpose), or failed
(anything else: a 5xx, a stream without a finish, a transport error). Reports bytes/s, time to
first byte and inter-byte latency percentiles, the server's RSS (from /metrics) at the start and
end of each round, its prompt bytes and how many of them were shared (not prefilled again), and
whether its running/waiting gauges return to 0. Loopback only; bounded in clients and time. The
last line printed is JSON.

    .venv/bin/python bench/load.py --url http://127.0.0.1:8000 --clients 64 --duration 60 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

DEFAULT_TEXT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"
MAX_CLIENTS, MAX_DURATION = 512, 3600


@dataclass
class Tally:
    completed: int = 0
    rejected: int = 0
    disconnected: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    status_5xx: int = 0
    bytes: int = 0
    ttfb: list[float] = field(default_factory=list)
    ttfb_by_length: dict[str, list[float]] = field(default_factory=lambda: {"long": [], "other": []})  # --long-rate
    inter_byte: list[float] = field(default_factory=list)


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {"p50": round(q[49], 5), "p90": round(q[89], 5), "p99": round(q[98], 5), "n": len(values)}


def metric(text: str, name: str) -> float | None:
    match = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


async def one_request(client: httpx.AsyncClient, url: str, body: dict, drop_after: int | None, t: Tally,
                      long: bool = False) -> None:
    start = time.perf_counter()
    last, events, finished = None, 0, False
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code == 429:  # a well-behaved client waits as told before its next request
                t.rejected += 1
                await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                return
            if r.status_code != 200:
                t.failed += 1
                t.status_5xx += r.status_code >= 500
                t.failures.append(f"HTTP {r.status_code}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    t.failed += 1
                    t.failures.append(data["error"].get("message", "error event"))
                    return
                for choice in data["choices"]:
                    n = len(choice["text"].encode())
                    now = time.perf_counter()
                    if n:
                        if last is None:
                            t.ttfb.append(now - start)
                            t.ttfb_by_length["long" if long else "other"].append(now - start)
                        else:
                            t.inter_byte.append((now - last) / n)
                        last = now
                        t.bytes += n
                    finished = finished or choice["finish_reason"] is not None
                events += 1
                if drop_after is not None and events >= drop_after:
                    t.disconnected += 1
                    return  # leaving the block closes the connection mid-stream
    except httpx.HTTPError as e:
        t.failed += 1
        t.failures.append(f"{type(e).__name__}: {e}")
        return
    if finished:
        t.completed += 1
    else:
        t.failed += 1
        t.failures.append("stream ended without a finish_reason")


async def client_loop(i: int, args, text: bytes, deadline: float, t: Tally) -> None:
    rng = random.Random(args.seed * 1000 + i)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0, connect=10.0), headers=headers) as client:
        while time.monotonic() < deadline:
            long = rng.random() < args.long_rate
            length = args.long_bytes if long else rng.choice([1, 16, 64, 256, 1024])
            at = rng.randrange(max(1, len(text) - length))
            prompt = text[at:at + length].decode("utf-8", "ignore") or "A"
            if rng.random() < args.shared_rate:
                prompt = text[:512].decode("utf-8", "ignore") + prompt
            body = {"prompt": prompt, "max_tokens": rng.choice([8, 32, 128, 512]), "stream": True,
                    "temperature": rng.choice([0.0, 0.8]), "seed": rng.randrange(2**31)}
            drop = rng.randrange(1, 40) if rng.random() < args.disconnect_rate else None
            await one_request(client, args.url, body, drop, t, long)


async def server_state(url: str, api_key: str | None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=10, headers=headers) as client:
        text = (await client.get(f"{url}/metrics")).text
    return {"rss_mb": round((metric(text, "process_resident_memory_bytes") or 0) / 2**20, 1),
            "running": metric(text, "blt_num_requests_running"), "waiting": metric(text, "blt_num_requests_waiting"),
            "prompt_bytes_shared": metric(text, "blt_prompt_bytes_shared_total"),
            "prompt_bytes": metric(text, "blt_prompt_bytes_total")}


async def settle(url: str, api_key: str | None, timeout: float = 60.0) -> dict:
    """Wait until the server reports nothing running or waiting (or the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        state = await server_state(url, api_key)
        if (state["running"] == 0 and state["waiting"] == 0) or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.2)


async def run_round(args, text: bytes) -> dict:
    before = await settle(args.url, args.api_key)
    t, start = Tally(), time.monotonic()
    await asyncio.gather(*(client_loop(i, args, text, start + args.duration, t) for i in range(args.clients)))
    elapsed = time.monotonic() - start
    after = await settle(args.url, args.api_key)
    return {"clients": args.clients, "duration_s": round(elapsed, 1), "completed": t.completed,
            "rejected_429": t.rejected, "disconnected_on_purpose": t.disconnected, "failed": t.failed,
            "status_5xx": t.status_5xx, "failure_examples": sorted(set(t.failures))[:5],
            "bytes_per_s": round(t.bytes / elapsed, 1), "ttfb_s": percentiles(t.ttfb),
            **({f"ttfb_s_{kind}_prompts": percentiles(v) for kind, v in t.ttfb_by_length.items()}
               if args.long_rate else {}),
            "inter_byte_s": percentiles(t.inter_byte), "rss_mb_start": before["rss_mb"], "rss_mb_end": after["rss_mb"],
            "running_after": after["running"], "waiting_after": after["waiting"],
            "prompt_bytes": (after["prompt_bytes"] or 0) - (before["prompt_bytes"] or 0),
            "prompt_bytes_shared": (after["prompt_bytes_shared"] or 0) - (before["prompt_bytes_shared"] or 0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=60.0, help="seconds per round")
    p.add_argument("--rounds", type=int, default=2, help="identical rounds; the first is the warm-up")
    p.add_argument("--disconnect-rate", type=float, default=0.1)
    p.add_argument("--shared-rate", type=float, default=0.0, help="share of prompts that begin with the same 512 bytes")
    p.add_argument("--long-rate", type=float, default=0.0, help="share of prompts of --long-bytes bytes")
    p.add_argument("--long-bytes", type=int, default=6000)
    p.add_argument("--api-key", default=None)
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="prompts are cut from this file")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        p.error("load tests run against loopback only")
    if not (1 <= args.clients <= MAX_CLIENTS and 0 < args.duration <= MAX_DURATION and 1 <= args.rounds <= 10):
        p.error(f"bounds: 1..{MAX_CLIENTS} clients, up to {MAX_DURATION} s, 1..10 rounds")
    fallback = ("To be, or not to be: that is the question. " * 400).encode()
    text = args.text.read_bytes() if args.text.exists() else fallback
    rounds = []
    for r in range(args.rounds):
        rounds.append(asyncio.run(run_round(args, text)))
        print(f"round {r + 1}: " + json.dumps(rounds[-1]), flush=True)
    first, last = rounds[0], rounds[-1]
    growth = (last["rss_mb_end"] - first["rss_mb_end"]) / first["rss_mb_end"] if first["rss_mb_end"] else None
    summary = {"rounds": rounds, "rss_growth_after_warmup": None if growth is None else round(growth, 4),
               "zero_5xx": all(r["status_5xx"] == 0 for r in rounds),
               "nothing_lost": all(r["failed"] == 0 for r in rounds),
               "gauges_back_to_zero": all(r["running_after"] == 0 and r["waiting_after"] == 0 for r in rounds)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
