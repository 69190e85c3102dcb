"""Requests the server accepted and then could not finish: each gets an error that says why, the rest
go on, and blt_requests_failed_total{reason} counts them.

- A request whose patches the global model's cache cannot hold even alone (its growth runs out of memory)
  fails, with a 500 that names the cause (code "out_of_memory"), while the others are served
  (blt_runtime/engine.py, Engine._plan). The cache's pool of pages is made to start small and fail to
  grow (cache._allocate), as CUDA's would past the free memory; the real engine runs behind the app.
- An engine step that raises fails every request in flight (500, "internal_error"), and the server
  serves the next ones.
- A byte the sampler could not have chosen (a guide forbids it: the logits were NaN) fails its request
  alone (500, "not_finite").
"""

from __future__ import annotations

import httpx
import pytest
import torch
from scripted import ScriptedEngine
from serverkit import metric_value, metrics_text, sse_events, wait_until

from blt_runtime import Engine, cache, load_model, paged_cache
from blt_runtime.paged_cache import PAGE


@pytest.fixture
def limited(monkeypatch):
    """The global cache's pool starts at a page a slot (9 slots: 144 patches) and cannot grow."""
    real = cache._allocate

    def allocate(like, shape):
        if len(shape) == 6 and shape[4] == PAGE:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return real(like, shape)

    monkeypatch.setattr(cache, "_allocate", allocate)
    monkeypatch.setattr(paged_cache, "FIRST_PATCHES", PAGE)


def test_only_the_request_the_cache_cannot_hold_fails(serve, tiny, limited):
    url, _ = serve(Engine(load_model(tiny), max_batch_size=4))
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(30))
    with httpx.Client(timeout=120) as c:
        whole = c.post(f"{url}/v1/completions", json={"prompt": text[:1500], "max_tokens": 5})
        assert whole.status_code == 500, whole.text
        error = whole.json()["error"]
        assert error["code"] == "out_of_memory" and "global model's cache" in error["message"]
        with c.stream("POST", f"{url}/v1/completions", json={"prompt": text[:100], "max_tokens": 2000,
                                                               "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200
            events = sse_events(r.read().decode())
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "out_of_memory"
        assert sum(len(e["choices"][0]["text"]) for e in events[:-2]) > 0  # it streamed until the cache was full
        short = c.post(f"{url}/v1/completions", json={"prompt": "a short one", "max_tokens": 40, "ignore_eos": True})
        assert short.status_code == 200 and short.json()["choices"][0]["finish_reason"] == "length"
        assert 40 <= short.json()["usage"]["completion_tokens"] <= 43  # up to 3 more to finish a character
    assert httpx.get(f"{url}/health").status_code == 200
    wait_until(lambda: metric_value(metrics_text(url), "blt_num_requests_running") == 0)
    text = metrics_text(url)
    assert metric_value(text, "blt_requests_failed_total", reason="out_of_memory") == 2
    assert metric_value(text, "blt_requests_failed_total", reason="engine_error") == 0


def test_requests_the_pages_cannot_hold_at_once_take_turns(serve, tiny, limited, caplog):
    """Eight requests of 203 positions at most (so that each fits alone, whatever the test model's patches)
    where the pool holds 208 patches (13 slots, a page each): the engine preempts some (a warning in the log,
    blt_num_preemptions_total), and every request is answered in full, none with an error."""
    from concurrent.futures import ThreadPoolExecutor

    from factory import PARITY_TEXT

    caplog.set_level("WARNING", logger="blt.server")
    url, _ = serve(Engine(load_model(tiny), max_batch_size=8))

    def complete(i: int) -> httpx.Response:
        body = {"prompt": list(PARITY_TEXT[40 * i:40 * i + 180]), "max_tokens": 19, "ignore_eos": True,
                "temperature": 0}
        return httpx.post(f"{url}/v1/completions", json=body, timeout=120)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(complete, range(8)))
    assert all(a.status_code == 200 and a.json()["choices"][0]["finish_reason"] == "length" for a in answers)
    text = metrics_text(url)
    assert metric_value(text, "blt_num_preemptions_total") > 0
    assert metric_value(text, "blt_requests_failed_total", reason="out_of_memory") == 0
    assert "ran out of device memory" in caplog.text


def test_a_step_that_raises_fails_the_requests_in_flight_and_no_more(serve):
    engine = ScriptedEngine({}, max_batch_size=4)
    engine.fail_at(5)
    url, _ = serve(engine)
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 500, "stream": True}) as r:
            events = sse_events(r.read().decode())
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "internal_error"
        assert "Traceback" not in events[-2]["error"]["message"]
        after = c.post(f"{url}/v1/completions", json={"prompt": "y", "max_tokens": 10})
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 10
    assert metric_value(metrics_text(url), "blt_requests_failed_total", reason="engine_error") == 1


def test_a_byte_no_sampler_would_choose_fails_its_request_alone(serve):
    """The scripted engine's bytes ignore the guide, as NaN logits would (blt_runtime/scheduler.py, accept)."""
    url, _ = serve(ScriptedEngine({b"Pick: ": b"maybe"}, default=b"ok"))
    with httpx.Client(timeout=60) as c:
        r = c.post(f"{url}/v1/completions", json={"prompt": "Pick: ", "guided_choice": ["yes", "no"]})
        assert r.status_code == 500 and r.json()["error"]["code"] == "not_finite", r.text
        assert "not finite" in r.json()["error"]["message"]
        assert c.post(f"{url}/v1/completions", json={"prompt": "other"}).json()["choices"][0]["text"] == "ok"
    assert metric_value(metrics_text(url), "blt_requests_failed_total", reason="not_finite") == 1
