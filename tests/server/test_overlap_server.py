"""blt-serve around an engine whose steps overlap (the CUDA default; off on a CPU unless asked): the
worker's metrics and deliveries then run while a step is queued, and nothing a client sees changes."""

from __future__ import annotations

import threading

import httpx
from serverkit import metric_value, metrics_text, sse_events, wait_until

from blt_runtime import Engine, generate, load_model


def test_streams_disconnects_and_metrics_with_overlapped_steps(serve, tiny):
    model = load_model(tiny)
    engine = Engine(model, max_batch_size=3, overlap=True)
    url, _ = serve(engine)
    prompts = [f"stream {i}: " for i in range(4)]  # one more than the slots: one waits for a slot
    texts: dict[int, str] = {}

    def stream(i: int) -> None:
        body = {"prompt": prompts[i], "max_tokens": 40 + 9 * i, "temperature": 0, "ignore_eos": True, "stream": True}
        events = sse_events(httpx.post(f"{url}/v1/completions", json=body, timeout=120))
        assert events[-1] == "[DONE]"
        texts[i] = "".join(c["text"] for e in events[:-1] for c in e["choices"])

    def leave() -> None:  # a client gone after a few events: its request is aborted mid-generation
        body = {"prompt": "leaving", "max_tokens": 3000, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60) as c, c.stream("POST", f"{url}/v1/completions", json=body) as r:
            for n, _ in enumerate(r.iter_lines()):
                if n >= 6:
                    break

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)] + [threading.Thread(target=leave)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, prompt in enumerate(prompts):
        assert texts[i] == generate(model, prompt, max_bytes=40 + 9 * i, temperature=0.0, ignore_eos=True).text
    wait_until(lambda: metric_value(metrics_text(url), "blt_client_disconnects_total") == 1)
    wait_until(lambda: metric_value(metrics_text(url), "blt_num_requests_running") == 0)
    text = metrics_text(url)
    assert metric_value(text, "blt_generation_bytes_total") >= sum(40 + 9 * i for i in range(4))
    assert metric_value(text, "blt_request_success_total", finish_reason="length") == 4
    wait_until(lambda: not engine.has_work())
