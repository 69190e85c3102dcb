"""Helpers for server tests: uvicorn in a thread or blt-serve in a process on a free loopback port, SSE
parsing, metric samples."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

ROOT = Path(__file__).resolve().parents[2]


LISTEN_PORTS = range(20000, 32000)  # below Linux's ephemeral range (32768-60999), where connections get theirs


def free_port() -> int:
    """A loopback port nothing listens on, for a server to bind soon after. Not one the kernel hands out
    itself (bind to port 0): those are ephemeral ports, which a client connection of another test can be
    given before the server binds (seen in CI: "address already in use")."""
    rng = random.Random()
    for _ in range(100):
        port = rng.choice(LISTEN_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app):
    """Serve `app` with uvicorn in a thread; yield its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_until(predicate, timeout: float = 60.0, what: str = "condition"):
    """Poll `predicate` until it returns something true (returned), or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.03)


def metrics_text(url: str, key: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{url}/metrics", headers=headers).text


def sse_events(response: httpx.Response | str) -> list:
    """The data of each SSE event of a streamed response (or its text): dicts, "[DONE]", or comments as ": ..."."""
    events = []
    text = response if isinstance(response, str) else response.text
    for block in text.split("\n\n"):
        if not block:
            continue
        if block.startswith(":"):
            events.append(block)
        else:
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def metric_value(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric != name:
            continue
        found = dict(kv.split("=", 1) for kv in rest.rstrip("}").split(",") if kv) if rest else {}
        if all(found.get(k) == f'"{v}"' for k, v in labels.items()):
            return float(value)
    return 0.0


class Process:
    def __init__(self, model_dir, *flags, wait=True, env=None, name="tiny", scheme="http"):
        """`env`: more environment variables; `name`: the served model's name (None: blt-serve's default);
        `scheme`: "https" where the flags give a key and certificate (self-signed: not verified)."""
        self.port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        env = {**os.environ, "BLT_LOG_INTERVAL": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        named = ("--served-model-name", name) if name else ()
        self.proc = subprocess.Popen([sys.executable, "-m", "server", str(model_dir), "--port", str(self.port),
                                      *named, *flags], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)  # joined: the process ended, its output read
        self.reader.start()
        if wait:
            self.wait_ready()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_ready(self, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "".join(self.lines)
            try:
                if httpx.get(f"{self.url}/health", timeout=1, verify=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("server did not become ready:\n" + "".join(self.lines))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
