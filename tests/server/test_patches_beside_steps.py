"""On a CPU, POST /v1/patches runs the entropy model's full forward beside the engine's steps, not
between them: a stream goes on while it runs (server/patches.py)."""

from __future__ import annotations

import threading
import time

import httpx

from blt_runtime import Engine, load_model


def test_a_stream_goes_on_while_patches_are_computed(serve, tiny):
    model = load_model(tiny)
    url, _ = serve(Engine(model, max_batch_size=2))
    events: list[str] = []
    done = threading.Event()

    def stream() -> None:
        body = {"prompt": "a long stream", "max_tokens": 3000, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60) as c, c.stream("POST", f"{url}/v1/completions", json=body) as r:
            for line in r.iter_lines():
                events.append(line)
                if done.is_set():
                    break

    real, seen = model.byte_patches, {}

    def patches_that_wait_for_the_stream(data: bytes):
        """Returns once the stream has had 5 more events (at most 20 s): between steps it could have none."""
        start, deadline = len(events), time.monotonic() + 20
        while len(events) < start + 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        seen["events"] = len(events) - start
        return real(data)

    model.byte_patches = patches_that_wait_for_the_stream
    streaming = threading.Thread(target=stream)
    streaming.start()
    try:
        deadline = time.monotonic() + 30
        while len(events) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = httpx.post(f"{url}/v1/patches", json={"text": "some bytes"}, timeout=60)
        assert r.status_code == 200 and len(r.json()["entropies"]) == len("some bytes")
        assert seen["events"] >= 5, "the stream stood still while the patches were computed"
    finally:
        done.set()
        streaming.join(60)


def test_patches_are_computed_one_at_a_time(serve, tiny):
    """However many requests come at once, one forward runs beside the engine: the steps compete with
    one of them for the cores."""
    model = load_model(tiny)
    url, _ = serve(Engine(model, max_batch_size=2))
    real, running, most, lock = model.byte_patches, [0], [0], threading.Lock()

    def counted(data: bytes):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        try:
            return real(data)
        finally:
            with lock:
                running[0] -= 1

    model.byte_patches = counted
    codes = []
    threads = [threading.Thread(target=lambda i=i: codes.append(
        httpx.post(f"{url}/v1/patches", json={"text": f"text {i}"}, timeout=60).status_code)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert codes == [200] * 4 and most[0] == 1
