"""--scheduling-policy priority with the real engine: an urgent request that finds the only slot taken
preempts the streaming one, which is answered in full afterwards with the text it would have had; the
preemption is counted (blt_num_preemptions_total)."""

from __future__ import annotations

import threading
import time

import httpx
from serverkit import metric_value, metrics_text, sse_events, wait_until

from blt_runtime import Engine, load_model


def test_an_urgent_request_preempts_a_stream_that_then_goes_on(serve, tiny):
    url, _ = serve(Engine(load_model(tiny), max_batch_size=1), scheduling_policy="priority")
    long = {"prompt": "Once upon a time", "max_tokens": 600, "temperature": 0, "ignore_eos": True}
    streamed, ended = [], {}

    def stream():
        with httpx.stream("POST", f"{url}/v1/completions", json={**long, "stream": True, "priority": 5},
                          timeout=120) as r:
            for part in r.iter_text():
                streamed.append(part)
        ended["long"] = time.monotonic()

    thread = threading.Thread(target=stream)
    thread.start()
    wait_until(lambda: sum(map(len, streamed)) > 2000, what="the long stream's first bytes")
    urgent = httpx.post(f"{url}/v1/completions", json={"prompt": "Now", "max_tokens": 5, "temperature": 0,
                                                       "ignore_eos": True, "priority": 0}, timeout=60)
    answered = time.monotonic()
    thread.join(120)
    assert urgent.status_code == 200 and len(urgent.json()["choices"][0]["text"].encode()) >= 5
    assert answered < ended["long"], "the urgent request waited for the stream to end"
    assert metric_value(metrics_text(url), "blt_num_preemptions_total") == 1
    text = "".join(e["choices"][0]["text"] for e in sse_events("".join(streamed)) if isinstance(e, dict))
    alone = httpx.post(f"{url}/v1/completions", json=long, timeout=60).json()["choices"][0]["text"]
    assert text == alone and len(alone.encode()) >= 600
