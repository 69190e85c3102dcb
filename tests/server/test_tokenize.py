"""vLLM's /tokenize and /detokenize (server/tokenizing.py): a prompt's tokens are its bytes, BOS neither
listed nor counted; a conversation is rendered by the chat template first. And /version."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
from scripted import ScriptedEngine

TEMPLATE = ("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}>{% endif %}")


def test_tokenize_counts_the_bytes_a_completion_would(serve):
    url, _ = serve(ScriptedEngine({}, default=b"ok", max_model_len=300), chat_template=TEMPLATE)
    r = httpx.post(f"{url}/tokenize", json={"prompt": "né!", "return_token_strs": True})
    assert r.json() == {"count": 4, "max_model_len": 300, "tokens": [110, 0xC3, 0xA9, 33],
                        "token_strs": ["n", "bytes:\\xc3", "bytes:\\xa9", "!"]}
    body = {"prompt": [110, 0xC3, 0xA9, 33], "max_tokens": 2}  # the tokens as a completion's prompt: the same count
    assert httpx.post(f"{url}/v1/completions", json=body).json()["usage"]["prompt_tokens"] == 4
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert bytes(httpx.post(f"{url}/tokenize", json=chat).json()["tokens"]) == b"[user] hi\n>"
    r = httpx.post(f"{url}/tokenize", json={**chat, "add_generation_prompt": False})
    assert r.json()["count"] == len(b"[user] hi\n") and r.json()["token_strs"] is None
    r = httpx.post(f"{url}/detokenize", json={"tokens": [104, 0xC3, 0xA9, 0xFF]})
    assert r.json() == {"prompt": "hé\ufffd"}


def test_what_tokenize_refuses(serve):
    url, _ = serve(ScriptedEngine({}, default=b"ok"))  # no chat template
    for body, param in (({"messages": [{"role": "user", "content": "hi"}]}, "messages"),
                        ({"prompt": "a", "messages": []}, None), ({}, None), ({"messages": []}, "messages"),
                        ({"prompt": "x", "model": "other"}, "model")):
        r = httpx.post(f"{url}/tokenize", json=body)
        assert r.status_code in (400, 404) and (param is None or r.json()["error"]["param"] == param), r.text
    r = httpx.post(f"{url}/detokenize", json={"tokens": [256]})
    assert r.status_code == 400 and "tokens" in r.json()["error"]["param"]


def test_version_is_the_package_version(serve):
    url, _ = serve(ScriptedEngine({}, default=b"ok"), api_key=("k",))
    assert httpx.get(f"{url}/version").status_code == 401
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    r = httpx.get(f"{url}/version", headers={"Authorization": "Bearer k"})
    assert r.json() == {"version": re.search(r'^version = "(.*)"$', pyproject, re.M).group(1)}
