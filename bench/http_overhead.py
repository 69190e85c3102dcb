"""What blt-serve's HTTP side costs per streamed byte, without a model: the server around a scripted
engine that emits a byte per stream per step (tests/server/scripted.py), N streaming clients.

The engine worker, the event loop and the SSE writes share one interpreter (one GIL), so the
server's CPU time per delivered byte bounds what it can stream whatever the device does: at 50 us
per byte, 20,000 bytes/s. Reports the bytes/s delivered, the server process's CPU time per byte
(user + system, from /proc: Linux), and the SSE events per byte (below 1 when events carry several
bytes: outputs that wait in a stream's queue together go out as one event). The clients run in this
process; on a small machine they compete with the server for cores, so compare figures from one run.
`--api` streams completions (the default), chat completions or responses (/v1/responses' typed events).
`--loop` and `--http` choose uvicorn's event loop and HTTP parser (blt-serve pins asyncio's loop:
with uvloop the engine's thread waits longer for the GIL), `--switch` the server's GIL switch
interval.

    .venv/bin/python bench/http_overhead.py --streams 64 --bytes 500     # JSON line last
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def serve(port: int, step_ms: float, streams: int, loop: str, http: str, switch: float | None) -> None:
    """The server process: blt-serve's app around the scripted engine."""
    if switch:
        sys.setswitchinterval(switch)
    sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "server")]
    import uvicorn
    from scripted import ScriptedEngine

    from server import Settings, create_app

    engine = ScriptedEngine({}, max_batch_size=streams, max_queue=streams, step_delay=step_ms / 1000,
                            default=b"abcdefgh" * 100_000)
    app = create_app(Settings(served_model_name="scripted", chat_template="{{ messages[0].content }}"), engine)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", loop=loop, http=http)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


ROUTES = {"completions": "/v1/completions", "chat": "/v1/chat/completions", "responses": "/v1/responses"}


def text_of(api: str, event: dict) -> str:
    """The generated text an event carries."""
    if api == "completions":
        return "".join(c["text"] for c in event["choices"])
    if api == "chat":
        return "".join(c["delta"].get("content") or "" for c in event["choices"])
    return event["delta"] if event["type"] == "response.output_text.delta" else ""


async def stream(client: httpx.AsyncClient, url: str, api: str, i: int, n_bytes: int) -> tuple[int, int]:
    """(bytes of text received, events that carried text)."""
    body = {"completions": {"prompt": f"client {i}", "max_tokens": n_bytes},
            "chat": {"messages": [{"role": "user", "content": f"client {i}"}], "max_tokens": n_bytes},
            "responses": {"input": f"client {i}", "max_output_tokens": n_bytes}}[api]
    got = events = 0
    async with client.stream("POST", f"{url}{ROUTES[api]}", json={**body, "stream": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                text = text_of(api, json.loads(line[6:]))
                events += bool(text)
                got += len(text.encode())
    return got, events


async def measure(url: str, pid: int, api: str, streams: int, n_bytes: int) -> dict:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=streams + 8)) as client:
        await stream(client, url, api, -1, 8)  # warm-up
        cpu, start = cpu_seconds(pid), time.perf_counter()
        results = await asyncio.gather(*[stream(client, url, api, i, n_bytes) for i in range(streams)])
        elapsed, cpu = time.perf_counter() - start, cpu_seconds(pid) - cpu
    got, events = sum(r[0] for r in results), sum(r[1] for r in results)
    assert got == streams * n_bytes, f"received {got} bytes of {streams * n_bytes}"
    return {"bytes_per_s": round(got / elapsed, 1), "server_cpu_us_per_byte": round(cpu / got * 1e6, 1),
            "events_per_byte": round(events / got, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--bytes", type=int, default=500, help="bytes per stream")
    p.add_argument("--step-ms", type=float, default=1.0, help="the scripted engine's time per step")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--api", choices=sorted(ROUTES), default="completions", help="the route streamed")
    p.add_argument("--loop", default="asyncio", help="uvicorn's event loop: asyncio (blt-serve's), uvloop, auto")
    p.add_argument("--http", default="auto", help="uvicorn's HTTP parser: auto, h11, httptools")
    p.add_argument("--switch", type=float, help="the server's sys.setswitchinterval, in seconds (default 0.005)")
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # internal: run the server on this port
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.step_ms, args.streams, args.loop, args.http, args.switch)
        return
    sys.path.insert(0, str(ROOT / "tests" / "server"))
    from serverkit import free_port, wait_until

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--step-ms", str(args.step_ms),
                             "--streams", str(args.streams), "--loop", args.loop, "--http", args.http]
                            + (["--switch", str(args.switch)] if args.switch else []))

    def up() -> bool:
        assert proc.poll() is None, "the server exited"
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(up, what="the server")
        result = {"api": args.api, "streams": args.streams, "bytes_per_stream": args.bytes, "step_ms": args.step_ms,
                  "loop": args.loop, "http": args.http, "rounds": []}
        for r in range(args.rounds):
            figures = asyncio.run(measure(url, proc.pid, args.api, args.streams, args.bytes))
            result["rounds"].append(figures)
            print(f"round {r + 1}: {figures['bytes_per_s']:,.0f} bytes/s delivered, server CPU "
                  f"{figures['server_cpu_us_per_byte']} us per byte, {figures['events_per_byte']} events per byte")
    finally:
        proc.terminate()
        proc.wait(30)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
