"""The model's own sampling defaults (server/generation_defaults.py): its generation_config.json gives the
fields a request leaves out, as vLLM's --generation-config auto does; a field sent is the request's."""

from __future__ import annotations

import json

import httpx
import pytest
from scripted import ScriptedEngine

from server.__main__ import main
from server.generation_defaults import GenerationConfigError, load_generation_defaults


class RecordingEngine(ScriptedEngine):
    """A scripted engine that keeps the SamplingParams each request came with."""

    def __init__(self, **kwargs):
        super().__init__({}, default=b"ok", **kwargs)
        self.params = []

    def add_request(self, request_id, prompt, params=None, priority=0):
        self.params.append(params)
        super().add_request(request_id, prompt, params, priority)


def test_what_a_generation_config_gives(tmp_path):
    assert load_generation_defaults("auto", str(tmp_path)) == ({}, None)
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_new_tokens": 64, "do_sample": True, "eos_token_id": 2}))
    defaults, path = load_generation_defaults("auto", str(tmp_path))
    assert defaults == {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_tokens": 64}
    assert path.endswith("generation_config.json") and isinstance(defaults["top_k"], int)
    assert load_generation_defaults("none", str(tmp_path)) == ({}, None)
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(GenerationConfigError, match="no generation_config.json there"):
        load_generation_defaults(str(other), str(tmp_path))
    (other / "generation_config.json").write_text(json.dumps({"repetition_penalty": 1.1, "min_p": None}))
    assert load_generation_defaults(str(other), "/nowhere")[0] == {"repetition_penalty": 1.1}
    for bad in ({"temperature": "hot"}, {"top_p": 0}, {"max_new_tokens": 1.5}, {"top_k": True}, {"min_p": 2}):
        (other / "generation_config.json").write_text(json.dumps(bad))
        with pytest.raises(GenerationConfigError, match=list(bad)[0]):
            load_generation_defaults(str(other), "/nowhere")
    (other / "generation_config.json").write_text("{not json")
    with pytest.raises(GenerationConfigError, match="generation_config.json"):
        load_generation_defaults(str(other), "/nowhere")
    assert main(["--generation-config", str(other), str(tmp_path / "no-model")]) == 2  # before any loading


def test_override_generation_config(tmp_path):
    """vLLM's --override-generation-config: its keys over the model's file (or over nothing, with none)."""
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_k": 20}))
    defaults, source = load_generation_defaults("auto", str(tmp_path), '{"temperature": 0.5, "max_new_tokens": 9}')
    assert defaults == {"temperature": 0.5, "top_k": 20, "max_tokens": 9}
    assert source.endswith("generation_config.json and --override-generation-config")
    assert load_generation_defaults("none", str(tmp_path), '{"top_p": 0.9}') == (
        {"top_p": 0.9}, "--override-generation-config")
    for bad, words in (("{temperature: 1}", "not JSON"), ('{"temp": 1}', "temp not read; the keys are"),
                       ('{"top_p": 2}', "top_p=2"), ("[1]", "expected a JSON object")):
        with pytest.raises(GenerationConfigError, match=words):
            load_generation_defaults("auto", str(tmp_path), bad)
    assert main(["--override-generation-config", "{", str(tmp_path / "no-model")]) == 2  # before any loading


def test_requests_that_leave_a_field_out_get_the_models_default(serve, tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.25, "top_k": 7, "repetition_penalty": 1.2, "max_new_tokens": 12}))
    engine = RecordingEngine(max_model_len=200)
    url, _ = serve(engine, model_dir=str(tmp_path), chat_template="{{ messages[0].content }}")
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "a"}).status_code == 200
    sent = {"prompt": "a", "temperature": 1.0, "top_k": 0, "max_tokens": 30, "repetition_penalty": None}
    assert httpx.post(f"{url}/v1/completions", json=sent).status_code == 200
    chat = {"messages": [{"role": "user", "content": "x" * 190}]}  # 9 bytes of room: less than 12
    assert httpx.post(f"{url}/v1/chat/completions", json=chat).status_code == 200
    chat_given = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 40, "top_k": 3}
    assert httpx.post(f"{url}/v1/chat/completions", json=chat_given).status_code == 200
    response = httpx.post(f"{url}/v1/responses", json={"input": "hi", "top_p": 0.5}).json()
    assert (response["temperature"], response["top_p"]) == (0.25, 0.5)  # as it was sampled
    got = [(p.temperature, p.top_k, p.repetition_penalty, p.max_bytes) for p in engine.params]
    assert got == [(0.25, 7, 1.2, 12), (1.0, 0, 1.2, 30), (0.25, 7, 1.2, 9), (0.25, 3, 1.2, 40), (0.25, 7, 1.2, 12)]


def test_generation_config_none_keeps_the_apis_defaults(serve, tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.25, "max_new_tokens": 12}))
    engine = RecordingEngine()
    url, _ = serve(engine, model_dir=str(tmp_path), generation_config="none")
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "a"}).status_code == 200
    assert (engine.params[0].temperature, engine.params[0].max_bytes) == (1.0, 256)
