"""The HTTP layer over a scripted engine: events, stops, usage, disconnects, overload, errors."""

from __future__ import annotations

import threading

import httpx
import pytest
from scripted import ScriptedEngine
from serverkit import metric_value, metrics_text, sse_events, wait_until

from blt_runtime.tokenizer import OFFSET

KOREAN = "안녕하세요 😀 𝔘𝔫𝔦 naïve".encode()


def stream(url: str, body: dict, **kw) -> list:
    with httpx.Client(timeout=30) as client:
        r = client.post(f"{url}/v1/completions", json={"stream": True, **body}, **kw)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
        return sse_events(r)


def texts(events: list) -> list[str]:
    return [c["text"] for e in events if isinstance(e, dict) and "choices" in e for c in e["choices"]]


def test_multibyte_characters_are_never_split_across_events(serve):
    url, _ = serve(ScriptedEngine({b"k": KOREAN}))
    events = stream(url, {"prompt": "k", "max_tokens": 200})
    assert events[-1] == "[DONE]"
    parts = texts(events)
    assert "".join(parts) == KOREAN.decode()
    assert all("\ufffd" not in p for p in parts)
    assert events[-2]["choices"][0]["finish_reason"] == "stop"  # the script ran out, as at EOS


def test_stop_string_across_steps_never_leaks(serve):
    url, _ = serve(ScriptedEngine({b"s": b"Once upon <END> a time"}))
    events = stream(url, {"prompt": "s", "stop": ["<END>", "never"], "max_tokens": 100})
    parts = texts(events)
    assert "".join(parts) == "Once upon "
    assert not any(ch in "".join(parts) for ch in "<>")
    last = events[-2]["choices"][0]
    assert last["finish_reason"] == "stop" and last["stop_reason"] == "<END>"
    with httpx.Client(timeout=30) as client:
        body = client.post(f"{url}/v1/completions", json={"prompt": "s", "stop": "<END>"}).json()
    assert body["choices"][0]["text"] == "Once upon " and body["choices"][0]["stop_reason"] == "<END>"


def test_stop_token_ids_are_bytes_that_stop(serve):
    """vLLM's stop_token_ids, the ids being bytes: a one-byte stop string each, whose stop_reason is the byte's
    value (a stop string that is the same byte says the string)."""
    url, _ = serve(ScriptedEngine({b"s": b"Once upon <END> a time"}))
    with httpx.Client(timeout=30) as client:
        def choice(**body):
            return client.post(f"{url}/v1/completions", json={"prompt": "s", **body}).json()["choices"][0]
        got = choice(stop_token_ids=[ord("<"), ord("p")])
        assert got["text"] == "Once u" and got["stop_reason"] == ord("p") and got["finish_reason"] == "stop"
        got = choice(stop_token_ids=[ord("p")], include_stop_str_in_output=True)
        assert got["text"] == "Once up" and got["stop_reason"] == ord("p")
        assert choice(stop_token_ids=[ord("p")], stop="p")["stop_reason"] == "p"
        assert choice(stop_token_ids=[ord("<")], stop=["n "])["stop_reason"] == "n "  # what comes first
    events = stream(url, {"prompt": "s", "stop_token_ids": [ord("<")], "max_tokens": 100})
    assert "".join(texts(events)) == "Once upon " and events[-2]["choices"][0]["stop_reason"] == ord("<")


def test_invalid_bytes_become_replacement_only_at_the_end(serve):
    url, _ = serve(ScriptedEngine({b"bad": b"ok \xe4\xb8"}))
    parts = texts(stream(url, {"prompt": "bad"}))
    assert "".join(parts) == "ok \ufffd"
    assert all("\ufffd" not in p for p in parts[:-1])


def test_usage_counts_bytes_and_patches(serve):
    url, _ = serve(ScriptedEngine({"日本".encode(): "語です".encode()}))
    events = stream(url, {"prompt": "日本", "stream_options": {"include_usage": True}, "return_patches": True})
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 6, "completion_tokens": 9, "total_tokens": 15, "prompt_tokens_details": {"cached_tokens": 0},
        "prompt_patches": 1, "completion_patches": 3}
    starts = [s for e in events[:-2] for c in e["choices"] for s in c["patch_starts"]]
    assert starts == [0, 4, 8]  # the scripted engine starts a patch every 4 bytes


def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(serve):
    url, _ = serve(ScriptedEngine({"日本".encode(): "語です".encode()}))
    options = {"include_usage": True, "continuous_usage_stats": True}
    body = {"prompt": ["日本", "日本"], "n": 2, "stream_options": options}
    events = stream(url, body)
    chunks, final = [e for e in events[:-2] if e["choices"]], events[-2]
    counts = [e["usage"]["completion_tokens"] for e in chunks]
    assert counts == sorted(counts) and counts[-1] == final["usage"]["completion_tokens"] == 4 * 9
    assert all(e["usage"]["prompt_tokens"] == 12 and e["usage"]["total_tokens"] == 12 + e["usage"]["completion_tokens"]
               for e in chunks)
    plain = stream(url, {**body, "stream_options": {"include_usage": True}})
    assert all("usage" not in e for e in plain[:-2]) and plain[-2]["usage"] == final["usage"]


def test_max_tokens_finishes_the_character_and_logprobs_per_byte(serve):
    url, _ = serve(ScriptedEngine({b"e": "a😀b".encode()}))
    with httpx.Client(timeout=30) as client:
        body = client.post(f"{url}/v1/completions", json={"prompt": "e", "max_tokens": 2, "logprobs": 1,
                                                             "echo": True}).json()
    choice = body["choices"][0]
    assert choice["text"] == "ea😀" and choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5
    lp = choice["logprobs"]  # the echoed prompt's byte first (the scripted engine scores id b at -b/100)
    assert lp["tokens"] == ["e", "a", "bytes:\\xf0", "bytes:\\x9f", "bytes:\\x98", "bytes:\\x80"]
    assert lp["bytes"] == [[0x65], [0x61], [0xF0], [0x9F], [0x98], [0x80]]
    assert lp["text_offset"] == [0, 1, 2, 2, 2, 2]
    assert lp["token_logprobs"][0] == -(0x65 + OFFSET) / 100 and lp["top_logprobs"][0] == {"e": -(0x65 + OFFSET) / 100}
    assert lp["top_logprobs"][1] == {"a": -0.5, "<eos>": -1.5}


def test_an_echo_with_logprobs_streams_its_prompts_scores_first(serve):
    url, _ = serve(ScriptedEngine({b"p": b"one", b"qr": b"two"}))
    body = {"prompt": ["p", "qr"], "n": 2, "echo": True, "logprobs": 2, "max_tokens": 3}
    with httpx.Client(timeout=30) as client:
        whole = client.post(f"{url}/v1/completions", json=body).json()["choices"]
    events = stream(url, body)
    for choice in whole:
        mine = [c for e in events[:-1] for c in e["choices"] if c["index"] == choice["index"]]
        prompt = ["p", "qr"][choice["index"] // 2]
        assert mine[0]["text"] == prompt and len(mine[0]["logprobs"]["tokens"]) == len(prompt)
        assert "".join(c["text"] for c in mine) == choice["text"] == prompt + ["one", "two"][choice["index"] // 2]
        streamed = {key: [v for c in mine for v in c["logprobs"][key]] for key in choice["logprobs"]}
        assert streamed == choice["logprobs"]
        assert choice["logprobs"]["token_logprobs"][:len(prompt)] == [-(ord(ch) + OFFSET) / 100 for ch in prompt]
        assert choice["logprobs"]["top_logprobs"][0] == {prompt[0]: -(ord(prompt[0]) + OFFSET) / 100, "<eos>": -3.0}


def test_n_choices_and_prompt_lists(serve):
    url, _ = serve(ScriptedEngine({b"p": b"one", b"q": b"two"}))
    with httpx.Client(timeout=30) as client:
        body = client.post(f"{url}/v1/completions", json={"prompt": ["p", "q"], "n": 2}).json()
        events = stream(url, {"prompt": [[0x70]], "n": 3})
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(0, "one"), (1, "one"), (2, "two"), (3, "two")]
    assert body["usage"]["prompt_tokens"] == 2 and body["usage"]["completion_tokens"] == 12
    finished = sorted(c["index"] for e in events[:-1] for c in e["choices"] if c["finish_reason"])
    assert finished == [0, 1, 2]


def metrics(url: str) -> str:
    return metrics_text(url)


def disconnect_after(url: str, body: dict, n_events: int) -> None:
    """Open a stream, read `n_events` events (0: none), then drop the connection."""
    with httpx.Client(timeout=30) as client, client.stream("POST", f"{url}/v1/completions", json=body) as r:
        assert r.status_code == 200
        if n_events:
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: ")
                if seen >= n_events:
                    break


@pytest.mark.parametrize("stream_mode", [True, False])
def test_disconnect_mid_stream_and_while_queued_aborts(serve, stream_mode):
    engine = ScriptedEngine({}, max_batch_size=1, max_queue=4, step_delay=0.01)
    url, state = serve(engine)
    running = {"prompt": "long", "max_tokens": 3000, "stream": stream_mode}
    if stream_mode:
        disconnect_after(url, running, 3)
    else:  # a non-streaming client that gives up after a short wait
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=running, timeout=0.5)
    wait_until(lambda: metric_value(metrics(url), "blt_client_disconnects_total") == 1)
    wait_until(lambda: metric_value(metrics(url), "blt_num_requests_running") == 0 and not state.worker.open)

    queued = {"prompt": "queued", "max_tokens": 10, "stream": True}
    with httpx.Client(timeout=30) as holder, holder.stream("POST", f"{url}/v1/completions",
                                                           json={**running, "stream": True}) as held:
        assert held.status_code == 200  # holds the only slot
        wait_until(lambda: engine.num_running == 1)
        with httpx.Client(timeout=30) as client, client.stream("POST", f"{url}/v1/completions", json=queued) as r:
            assert r.status_code == 200
            wait_until(lambda: engine.num_waiting == 1)
        # the queued client is gone: its request leaves the queue while the other still runs
        wait_until(lambda: metric_value(metrics(url), "blt_client_disconnects_total") == 2)
        wait_until(lambda: engine.num_waiting == 0 and metric_value(metrics(url), "blt_num_requests_waiting") == 0)
        assert engine.num_running == 1
    wait_until(lambda: metric_value(metrics(url), "blt_client_disconnects_total") == 3)
    wait_until(lambda: not state.worker.open and engine.num_running == 0 and engine.num_waiting == 0)
    text = metrics(url)
    assert metric_value(text, "blt_num_requests_running") == 0 and metric_value(text, "blt_num_requests_waiting") == 0


def test_keep_alive_comments_while_queued(serve):
    engine = ScriptedEngine({b"short": b"done"}, max_batch_size=1, step_delay=0.01)
    url, _ = serve(engine, keepalive_interval=0.1)
    engine.paused.set()
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{url}/v1/completions", json={"prompt": "short", "stream": True}) as r:
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                if line == ": keep-alive":
                    engine.paused.clear()
        assert ": keep-alive" in lines and [x for x in lines if x][-1] == "data: [DONE]"


def test_overload_gets_429_and_nothing_is_lost(serve):
    engine = ScriptedEngine({}, max_batch_size=2, max_queue=2, step_delay=0.01, default=b"y" * 30)
    url, state = serve(engine, max_queue=2)
    results = []

    def client(i):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": f"c{i}", "max_tokens": 30, "stream": i % 2 == 0},
                       timeout=60)
        results.append(r)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    engine.paused.set()  # nothing finishes until every request has arrived
    for t in threads:
        t.start()
    wait_until(lambda: sum(r.status_code == 429 for r in results) >= 8)
    engine.paused.clear()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results)
    assert codes == [200] * 4 + [429] * 8
    for r in results:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error" and r.json()["error"]["code"] == "queue_full"
        elif r.headers["content-type"].startswith("text/event-stream"):
            assert sse_events(r)[-1] == "[DONE]" and texts(sse_events(r))
        else:
            assert r.json()["choices"][0]["finish_reason"] == "length"
    text = metrics(url)
    assert metric_value(text, "blt_requests_rejected_total", reason="queue_full") == 8
    assert metric_value(text, "blt_request_success_total", finish_reason="length") == 4
    assert not state.worker.open


def test_a_request_larger_than_the_server_ever_holds_is_a_400_not_a_429(serve):
    """2 running + 2 waiting: 5 sequences could never be accepted, however long a client waits and retries;
    4 are, on an idle server."""
    url, _ = serve(ScriptedEngine({}, max_batch_size=2, max_queue=2, default=b"y" * 3), max_queue=2)
    with httpx.Client(timeout=30) as client:
        r = client.post(f"{url}/v1/completions", json={"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 3})
        assert r.status_code == 400 and "retry-after" not in r.headers
        error = r.json()["error"]
        assert error["code"] == "too_many_sequences" and error["param"] == "prompt"
        assert "6 sequences" in error["message"]
        ok = client.post(f"{url}/v1/completions", json={"prompt": ["a", "b"], "n": 2, "max_tokens": 3})
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 4
    assert metric_value(metrics(url), "blt_requests_rejected_total", reason="invalid") == 1


BAD = [
    ({"content": b"{not json"}, 400, None),
    ({"json": {"prompt": 5}}, 400, "prompt"),
    ({"json": {"prompt": "x", "max_tokens": -1}}, 400, "max_tokens"),
    ({"json": {"prompt": "x", "max_tokens": 10**12}}, 400, "max_tokens"),
    ({"json": {"prompt": "x", "temperature": -0.5}}, 400, "temperature"),
    ({"json": {"prompt": "x", "top_p": 0}}, 400, "top_p"),
    ({"json": {"prompt": "x", "n": "two"}}, 400, "n"),
    ({"json": {"prompt": [1, 2, 300]}}, 400, "prompt"),
    ({"json": {"prompt": "x", "stop": [""]}}, 400, "stop"),
    ({"json": {"prompt": "x", "stream_options": {"include_usage": True}}}, 400, None),
    ({"json": {"prompt": "x", "model": "gpt-4"}}, 404, "model"),
    ({"json": {"prompt": "x", "logprobs": 21}}, 400, "logprobs"),
    ({"json": {"prompt": "x", "seed": 2**70}}, 400, "seed"),
    ({"content": b'{"prompt": "\\ud800 lone"}', "headers": {"content-type": "application/json"}}, 400, "prompt"),
    ({"content": b"x" * (2 << 20), "headers": {"content-type": "application/json"}}, 413, None),
]


@pytest.mark.parametrize("kwargs, status, param", BAD)
def test_bad_input_gets_an_openai_error(serve, kwargs, status, param):
    url, _ = serve(ScriptedEngine({}, default=b"ok"))
    r = httpx.post(f"{url}/v1/completions", timeout=30, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param:
        assert error["param"] == param, error
    assert len(r.text) < 2000  # echoed input is truncated


def test_unknown_route_and_fields(serve, caplog):
    url, _ = serve(ScriptedEngine({}, default=b"ok"))
    r = httpx.get(f"{url}/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    error = r.json()["error"]  # the shipped model has no chat template
    assert r.status_code == 400 and error["code"] == "no_chat_template" and "/v1/completions" in error["message"]
    with caplog.at_level("WARNING", logger="blt.server"):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "suffix": "", "best_of": 1, "top_a": 0.2,
                                                      "mirostat": 2})
    assert r.status_code == 200
    assert any("mirostat, top_a" in m for m in caplog.messages)


def test_api_keys(serve):
    url, _ = serve(ScriptedEngine({}, default=b"ok"), api_key=("k1", "secret-2"))
    assert httpx.get(f"{url}/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k1"}, {"Authorization": "Basic k1"}):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{url}/metrics", headers=headers).status_code == 401
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer secret-2"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "ok"


def test_a_model_served_under_several_names(serve):
    """vLLM's --served-model-name with aliases: each is listed and taken, and an answer says the name it was
    sent (the first where none was); another name is a 404 that lists them."""
    url, _ = serve(ScriptedEngine({}, default=b"ok"), served_model_name="blt-1b,blt")
    with httpx.Client(timeout=30) as c:
        assert [m["id"] for m in c.get(f"{url}/v1/models").json()["data"]] == ["blt-1b", "blt"]
        assert c.get(f"{url}/v1/models/blt").json()["id"] == "blt"
        for sent, said in (("blt", "blt"), ("blt-1b", "blt-1b"), (None, "blt-1b")):
            body = {"prompt": "x", "max_tokens": 2} | ({"model": sent} if sent else {})
            assert c.post(f"{url}/v1/completions", json=body).json()["model"] == said
        events = sse_events(c.post(f"{url}/v1/completions", json={"prompt": "x", "model": "blt", "stream": True}))
        assert {e["model"] for e in events[:-1]} == {"blt"}
        r = c.post(f"{url}/v1/completions", json={"prompt": "x", "model": "other"})
        assert r.status_code == 404 and "'blt-1b' or 'blt'" in r.json()["error"]["message"]
    assert 'model="blt-1b"' in metrics_text(url)


def test_metrics_open_flag_and_cors(serve):
    url, _ = serve(ScriptedEngine({}, default=b"ok"), api_key=("k",), metrics_without_key=True,
                   allowed_origins=("http://example.test",))
    assert httpx.get(f"{url}/metrics").status_code == 200
    r = httpx.options(f"{url}/v1/completions", headers={
        "Origin": "http://example.test", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://example.test"
    assert "authorization" in r.headers["access-control-allow-headers"].lower()


def test_cors_is_off_by_default(serve):
    url, _ = serve(ScriptedEngine({}, default=b"ok"))
    r = httpx.get(f"{url}/v1/models", headers={"Origin": "http://example.test"})
    assert "access-control-allow-origin" not in r.headers


def test_requests_that_end_at_once_leave_nothing_open(serve):
    url, state = serve(ScriptedEngine({}, default=b"ok"))
    with httpx.Client(timeout=30) as client:
        for stream_mode in (False, True, False):
            r = client.post(f"{url}/v1/completions", json={"prompt": "z", "max_tokens": 0, "stream": stream_mode})
            assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == "" and r.json()["choices"][0]["finish_reason"] == "length"
    wait_until(lambda: not state.worker.open)


def test_priority_orders_the_waiting_queue_when_the_server_is_asked_to(serve):
    """--scheduling-policy priority: lower values leave the waiting queue first (vLLM's); under the default
    fcfs a priority other than 0 is a 400."""
    engine = ScriptedEngine({b"long": b"x" * 40}, default=b"ok", max_batch_size=1)
    url, _ = serve(engine, scheduling_policy="priority")
    results = {}

    def send(name, priority):
        body = {"prompt": name, "priority": priority, "max_tokens": 50}
        results[name] = httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code

    engine.paused.set()  # the long one holds the only slot meanwhile
    threads = [threading.Thread(target=send, args=("long", 0))]
    threads[0].start()
    wait_until(lambda: engine.num_running == 1)
    for waiting, (name, priority) in enumerate((("late", 5), ("later", 5), ("urgent", -3), ("normal", 0)), 1):
        threads.append(threading.Thread(target=send, args=(name, priority)))
        threads[-1].start()
        wait_until(lambda waiting=waiting: engine.num_waiting == waiting)
    engine.paused.clear()
    for t in threads:
        t.join(30)
    assert set(results.values()) == {200}
    assert [engine.prompt_of[i] for i in engine.admitted] == [b"long", b"urgent", b"normal", b"late", b"later"]
    fcfs_url, _ = serve(ScriptedEngine({}, default=b"ok"))
    r = httpx.post(f"{fcfs_url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                            "priority": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority"
