"""The real `blt-serve` process with a tiny random model, driven by httpx and the official openai client."""

from __future__ import annotations

import re
import signal
import threading
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from openai import OpenAI
from schemathesis.checks import not_a_server_error
from serverkit import Process, metric_value, sse_events

from blt_runtime import encode_tensor, generate, load_model

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SPEC_METRICS = [  # every metric ../shared/spec/SERVER.md names
    "blt_num_requests_running", "blt_num_requests_waiting", "blt_cache_usage_ratio", "blt_prompt_bytes_total",
    "blt_generation_bytes_total", "blt_patches_total", "blt_global_steps_total", "blt_request_success_total",
    "blt_requests_rejected_total", "blt_client_disconnects_total", "blt_time_to_first_byte_seconds",
    "blt_inter_byte_latency_seconds", "blt_e2e_request_latency_seconds", "blt_request_queue_time_seconds",
    "blt_request_prompt_bytes", "blt_request_generation_bytes", "blt_patch_length_bytes", "blt_batch_size",
]


@pytest.fixture(scope="module")
def server(tiny):
    proc = Process(tiny, "--api-key", KEY, "--max-model-len", "512", "--max-batch-size", "4")
    yield proc
    proc.stop()


def test_greedy_completions_equal_the_runtime(server, tiny):
    model = load_model(tiny)
    expected = generate(model, "Hello, BLT", max_bytes=120, temperature=0.0, ignore_eos=True)
    body = {"model": "tiny", "prompt": "Hello, BLT", "max_tokens": 120, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "text_completion" and data["model"] == "tiny"
    choice = data["choices"][0]
    assert choice["text"] == expected.text and choice["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == len(expected.bytes) and data["usage"]["prompt_tokens"] == 10
    assert data["usage"]["completion_patches"] == len(expected.completion_patch_lengths)
    streamed = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": True, "return_patches": True},
                          headers=AUTH, timeout=60)
    events = sse_events(streamed)
    assert events[-1] == "[DONE]"
    assert "".join(c["text"] for e in events[:-1] for c in e["choices"]) == expected.text
    starts = [s for e in events[:-1] for c in e["choices"] for s in c["patch_starts"]]
    assert len(starts) == len(expected.completion_patch_lengths)


def test_openai_client_streaming_and_not(server):
    client = OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    whole = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=40, temperature=0, seed=3)
    assert whole.choices[0].finish_reason in ("stop", "length") and whole.usage.prompt_tokens == 6
    chunks = list(client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=40, temperature=0, seed=3,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    sampled = [client.completions.create(model="tiny", prompt="x", max_tokens=30, temperature=0.9, seed=7, n=2,
                                         logprobs=2) for _ in range(2)]
    assert [c.text for c in sampled[0].choices] == [c.text for c in sampled[1].choices]  # seeded: reproducible
    assert sum(len(c.logprobs.tokens) for c in sampled[0].choices) == sampled[0].usage.completion_tokens
    assert all(len(top) <= 2 for c in sampled[0].choices for top in c.logprobs.top_logprobs)
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_logit_bias_best_of_and_suffix(server, tiny):
    """logit_bias is the runtime's (keys are byte values); best_of up to n and an empty suffix, which
    clients send unasked, change nothing; more best_of, a suffix, or a bad bias is a 400 naming it."""
    client = OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    plain = generate(load_model(tiny), "ROMEO:", max_bytes=60, ignore_eos=True).bytes
    banned = max(set(plain), key=plain.count)
    bias = {str(banned): -100, str(32 if banned != 32 else 65): 5}
    expected = generate(load_model(tiny), "ROMEO:", max_bytes=60, ignore_eos=True, logit_bias=bias)
    got = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=60, temperature=0, logit_bias=bias,
                                    n=2, best_of=1, suffix="", extra_body={"ignore_eos": True})
    assert [c.text for c in got.choices] == [expected.text] * 2 and expected.bytes != plain
    refused = [(dict(best_of=3), "best_of"), (dict(suffix="\n"), "suffix")] + [
        (dict(logit_bias=bias), "logit_bias") for bias in ({"256": 1}, {"a": 1}, {" 7": 1}, {"65": 101})]
    for extra, param in refused:
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 2, **extra}, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)


def test_min_tokens_and_include_stop_str_in_output(server, tiny):
    """vLLM's min_tokens (no stop string or EOS before it) and include_stop_str_in_output, streamed and
    not: the runtime's bytes, the stop string kept; min_tokens above max_tokens is a 400 naming it."""
    model = load_model(tiny)
    plain = generate(model, "ROMEO:", max_bytes=250, ignore_eos=True).bytes
    stop = next(chr(b) for b in plain[:18] if b < 0x80 and b in plain[21:])  # one early, one after min_tokens
    expected = generate(model, "ROMEO:", max_bytes=250, min_bytes=20, stop=[stop], ignore_eos=True)
    assert expected.stop_reason == stop.encode() and len(expected.bytes) >= 19
    body = {"prompt": "ROMEO:", "max_tokens": 250, "temperature": 0, "stop": stop, "min_tokens": 20,
            "include_stop_str_in_output": True, "ignore_eos": True}
    whole = httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60).json()["choices"][0]
    assert whole["text"] == expected.text + stop and whole["stop_reason"] == stop
    events = sse_events(httpx.post(f"{server.url}/v1/completions", json={**body, "stream": True}, headers=AUTH,
                                   timeout=60))
    assert "".join(c["text"] for e in events[:-1] for c in e["choices"]) == expected.text + stop
    without = httpx.post(f"{server.url}/v1/completions", json={**body, "include_stop_str_in_output": False},
                         headers=AUTH, timeout=60).json()["choices"][0]
    assert without["text"] == expected.text
    r = httpx.post(f"{server.url}/v1/completions", json={**body, "max_tokens": 10}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens", r.text


def test_truncate_prompt_tokens(server, tiny):
    """vLLM's truncate_prompt_tokens keeps a prompt's last bytes (-1: all that fit with max_tokens in
    the server's 512-byte context); the completion is the runtime's for what is kept."""
    prompt = "The quick brown fox jumps over the lazy dog. " * 14  # 630 bytes: too long for the context
    kept = prompt[-20:]
    expected = generate(load_model(tiny), kept, max_bytes=10, ignore_eos=True)
    body = {"prompt": prompt, "max_tokens": 10, "temperature": 0, "echo": True, "ignore_eos": True}
    r = httpx.post(f"{server.url}/v1/completions", json={**body, "truncate_prompt_tokens": 20}, headers=AUTH)
    assert r.json()["choices"][0]["text"] == kept + expected.text and r.json()["usage"]["prompt_tokens"] == 20
    r = httpx.post(f"{server.url}/v1/completions", json={**body, "truncate_prompt_tokens": -1}, headers=AUTH)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 512 - 1 - 10
    r = httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_max_tokens_left_out_gives_way_to_the_context(server):
    """max_tokens left out (or null) is 256, or what the 512-byte context leaves after a long prompt (vLLM gives
    the whole rest); asked for, it must fit, and so must min_tokens."""
    prompt = "The quick brown fox jumps over the lazy dog. " * 11  # 495 bytes: room for 16 more
    body = {"prompt": prompt, "temperature": 0, "ignore_eos": True}
    for extra in ({}, {"max_tokens": None}):
        r = httpx.post(f"{server.url}/v1/completions", json={**body, **extra}, headers=AUTH)
        assert r.status_code == 200, r.text
        choice, usage = r.json()["choices"][0], r.json()["usage"]
        assert usage["completion_tokens"] == 512 - 1 - 495 and choice["finish_reason"] == "length"
    short = httpx.post(f"{server.url}/v1/completions", json={**body, "prompt": "fox"}, headers=AUTH).json()
    assert 256 <= short["usage"]["completion_tokens"] <= 256 + 3  # up to 3 more finish a character
    r = httpx.post(f"{server.url}/v1/completions", json={**body, "max_tokens": 17}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(f"{server.url}/v1/completions", json={**body, "min_tokens": 17}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens"


def test_models_patches_and_health(server, tiny):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}  # open without a key
    assert httpx.get(f"{server.url}/ping").json() == httpx.post(f"{server.url}/ping").json() == {"status": "ok"}
    card = httpx.get(f"{server.url}/v1/models", headers=AUTH).json()["data"][0]
    assert card["id"] == "tiny" and card["object"] == "model" and card["max_model_len"] == 512
    assert card["blt"]["parameters"] > 0 and card["blt"]["global_layers"] == 2
    text = "Patches: 한국어 and 😀."
    r = httpx.post(f"{server.url}/v1/patches", json={"text": text}, headers=AUTH)
    body = r.json()
    assert r.status_code == 200 and body["num_bytes"] == len(text.encode()) == len(body["entropies"])
    model = load_model(tiny)
    lengths = [n for n in model.patch_lengths(encode_tensor(text)).tolist()[0] if n]
    assert lengths[0] == 1 and [p["length"] for p in body["patches"]] == lengths[1:]  # BOS is a patch of its own
    data, at = text.encode(), 0
    for p in body["patches"]:  # contiguous; a patch that ends inside a character shows U+FFFD
        assert p["start"] == at and p["text"] == data[at:at + p["length"]].decode("utf-8", "replace")
        at += p["length"]
    same = httpx.post(f"{server.url}/v1/patches", json={"bytes": list(text.encode())}, headers=AUTH).json()
    assert same["patches"] == body["patches"]


def test_metrics_exist_and_move(server):
    before = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    for name in SPEC_METRICS:
        assert re.search(rf"^{name}(_bucket|_count|_sum)?{{", before, re.M), name
    body = {"prompt": "metrics", "max_tokens": 20, "stream": True, "ignore_eos": True}
    httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60)
    after = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    for name in ("blt_generation_bytes_total", "blt_prompt_bytes_total", "blt_global_steps_total",
                 "blt_time_to_first_byte_seconds_count", "blt_e2e_request_latency_seconds_count",
                 "blt_batch_size_count", "blt_request_queue_time_seconds_count",
                 "blt_request_prefill_time_seconds_count", "blt_request_decode_time_seconds_count",
                 "blt_request_inference_time_seconds_count"):
        assert metric_value(after, name) > metric_value(before, name), name
    phases = [metric_value(after, f"blt_request_{p}_time_seconds_sum") - metric_value(before, f"blt_request_{p}_time_"
                                                                                       "seconds_sum")
              for p in ("prefill", "decode", "inference")]
    assert phases[0] + phases[1] == pytest.approx(phases[2]) and min(phases) >= 0
    assert metric_value(after, "blt_generation_bytes_total") - metric_value(before, "blt_generation_bytes_total") >= 20
    assert 'model="tiny"' in after
    assert all(metric_value(after, "blt_cache_memory_bytes", part=part) > 0 for part in ("local", "global"))
    # the pages held now (nothing runs; states of 64 bytes or more are kept for later prompts)
    assert 0 <= metric_value(after, "blt_cache_memory_bytes", part="global_held") < metric_value(
        after, "blt_cache_memory_bytes", part="global")
    # the n choices of a completion prefill their prompt once: the others copy it
    body = {"prompt": "one prompt, three choices", "max_tokens": 5, "n": 3, "ignore_eos": True}
    response = httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60).json()
    assert len(response["choices"]) == 3 and response["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    shared = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    name = "blt_prompt_bytes_shared_total"
    assert metric_value(shared, name) - metric_value(after, name) == 2 * len(body["prompt"])
    # a prompt that begins with another of the same request copies that one's prefill (usage counts each once)
    body = {"prompt": ["a first prompt", "a first prompt, and a second"], "max_tokens": 5, "ignore_eos": True}
    usage = httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60).json()["usage"]
    assert usage["prompt_tokens"] == 14 + 28 and usage["prompt_tokens_details"] == {"cached_tokens": 14}
    # a refused request counts as invalid, whichever check refused it: the schema's, a parameter's, the context's
    refused = [{"prompt": "x", "temperature": -1}, {"prompt": "x", "best_of": 5}, {"prompt": "x" * 600},
               {"prompt": "x", "logit_bias": {"300": 1}}, {"prompt": "x", "repetition_penalty": 5e-324}]
    for body in refused:
        assert httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH).status_code == 400
    invalid = [metric_value(text, "blt_requests_rejected_total", reason="invalid")
               for text in (shared, httpx.get(f"{server.url}/metrics", headers=AUTH).text)]
    assert invalid[1] - invalid[0] == len(refused)


def test_the_next_turn_resumes_where_the_last_one_ended(server):
    """A prompt that begins with a finished request's prompt and completion resumes in its slot."""
    turn1 = list(b"A conversation long enough to be worth resuming: first the user speaks, then the model, ")
    body = {"prompt": turn1, "max_tokens": 12, "ignore_eos": True, "logprobs": 0}
    first = httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60).json()
    generated = [b for entry in first["choices"][0]["logprobs"]["bytes"] for b in entry]  # raw, as generated
    turn2 = turn1 + generated + list(b" and then the user again.")
    body = {"prompt": turn2, "max_tokens": 5, "ignore_eos": True}
    usage = httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60).json()["usage"]
    # every position the first turn ran through the model: all but its last byte (sampled, never fed)
    assert usage["prompt_tokens_details"] == {"cached_tokens": len(turn1) + len(generated) - 1}


def test_new_conversations_after_the_same_instructions_start_from_a_kept_copy(server):
    """The second conversation keeps a copy of the state after the instructions it shares with the
    first; the third starts from it."""
    instructions = "You answer in verse, briefly, and never in prose; every answer rhymes. The user asks: "
    cached = []
    for question in ("Why is the sky blue?", "How do birds fly?", "Where does the sun go at night?"):
        body = {"prompt": instructions + question, "max_tokens": 5, "ignore_eos": True}
        usage = httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60).json()["usage"]
        cached.append(usage["prompt_tokens_details"]["cached_tokens"])
    assert cached == [0, 0, len(instructions)]


def test_sigterm_drains_running_streams(tiny):
    # SIGTERM goes only once both streams are producing bytes, so neither can be refused or unstarted.
    # The drain is long enough for the short one on a loaded machine, the endless one can't finish in it.
    proc = Process(tiny, "--max-model-len", "24576", "--shutdown-timeout", "6")
    results = {}
    producing = {name: threading.Event() for name in ("short", "endless")}

    def stream(name, max_tokens):
        text = ""
        with httpx.stream("POST", f"{proc.url}/v1/completions", timeout=60, json={
                "prompt": name, "max_tokens": max_tokens, "stream": True, "ignore_eos": True}) as r:
            for chunk in r.iter_text():
                text += chunk
                if '"text"' in text:
                    producing[name].set()
        results[name] = sse_events(text)

    threads = [threading.Thread(target=stream, args=a) for a in (("short", 200), ("endless", 24000))]
    for t in threads:
        t.start()
    for name, event in producing.items():
        assert event.wait(60), f"{name} produced nothing:\n" + "".join(proc.lines)
    proc.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    refused = httpx.post(f"{proc.url}/v1/completions", json={"prompt": "late"}, timeout=10)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    assert httpx.get(f"{proc.url}/health").status_code == 503 == httpx.get(f"{proc.url}/ping").status_code
    for t in threads:
        t.join(60)
    assert proc.proc.wait(30) == 0, "".join(proc.lines)
    short, endless = results["short"], results["endless"]
    assert short[-1] == "[DONE]" and short[-2]["choices"][0]["finish_reason"] == "length"
    assert endless[-1] == "[DONE]" and endless[-2]["error"]["code"] == "shutting_down"


@pytest.fixture(scope="module")
def fuzzed(tiny):
    """A server with a short context, so that fuzzed requests stay small (bounded run time), a chat template,
    so that fuzzed conversations are rendered, and the responses' store."""
    proc = Process(tiny, "--api-key", KEY, "--max-model-len", "48", "--max-batch-size", "16", "--chat-template",
                   "{% for m in messages %}{{ m.role }}: {{ m.content }}{{ m.name or '' }}\n{% endfor %}> ",
                   "--enable-responses-api-store")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def api_schema(fuzzed):
    return schemathesis.openapi.from_url(f"{fuzzed.url}/openapi.json", headers=AUTH)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_schemathesis_finds_no_server_error(case):
    response = case.call(headers=AUTH, timeout=60)
    case.validate_response(response, checks=[not_a_server_error])


def test_echo_logprobs_score_the_prompt_like_the_engine_scores_its_bytes(server):
    def complete(prompt, max_tokens):
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "echo": True, "logprobs": 3,
                "ignore_eos": True}
        r = httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["logprobs"]

    first = complete("Echo me", 40)
    assert first["tokens"][:7] == list("Echo me") and 47 <= len(first["tokens"]) <= 50  # 3 more finish a character
    assert first["text_offset"][:3] == [0, 1, 2] and all(v is not None for v in first["token_logprobs"])
    generated = [b for entry in first["bytes"][7:] for b in entry]
    again = complete(list(b"Echo me") + generated, 0)  # the same bytes, all scored by the prefill
    assert again["bytes"] == first["bytes"]
    for engine_lp, forward_lp in zip(first["token_logprobs"][7:], again["token_logprobs"][7:]):
        assert abs(engine_lp - forward_lp) < 1e-4
    assert again["top_logprobs"][10].keys() == first["top_logprobs"][10].keys()
