"""POST /invocations (server/invocations.py, vLLM's route for SageMaker): the body says which generation it is,
and the answer is that route's own, whole or streamed."""

from __future__ import annotations

import httpx
import pytest
from scripted import ScriptedEngine
from serverkit import sse_events

TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}> "


@pytest.fixture
def url(serve):
    scripts = {b"user: Hi\n> ": b"Hello!", b"Once": b" upon a time"}
    url, _ = serve(ScriptedEngine(scripts, default=b"ok"), chat_template=TEMPLATE)
    return url


def test_the_body_says_which_route_answers(url):
    with httpx.Client(timeout=60) as c:
        chat = c.post(f"{url}/invocations", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
        assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["content"] == "Hello!"
        completion = c.post(f"{url}/invocations", json={"prompt": "Once", "max_tokens": 50}).json()
        assert completion["object"] == "text_completion" and completion["choices"][0]["text"] == " upon a time"
        response = c.post(f"{url}/invocations", json={"input": "Hi"}).json()
        assert response["object"] == "response" and response["output"][0]["content"][0]["text"] == "Hello!"
        # messages before prompt, as vLLM tries them
        both = c.post(f"{url}/invocations", json={"messages": [{"role": "user", "content": "Hi"}], "prompt": "x"})
        assert both.json()["object"] == "chat.completion"
        with c.stream("POST", f"{url}/invocations", json={"prompt": "Once", "stream": True}) as r:
            events = sse_events(r.read().decode())
        assert events[-1] == "[DONE]" and "".join(e["choices"][0]["text"] for e in events[:-1]) == " upon a time"


@pytest.mark.parametrize("body, param, words", [
    ({}, None, "messages (a chat completion), prompt (a completion) or input"),
    ([1, 2], None, "a JSON object"),
    ({"prompt": 5}, "prompt", "prompt"),
    ({"messages": [], "max_tokens": 3}, "messages", "at least 1"),
    ({"input": "Hi", "background": True}, "background", "--enable-responses-api-store"),
])
def test_a_body_no_route_takes_is_a_400(url, body, param, words):
    r = httpx.post(f"{url}/invocations", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param and words in r.json()["error"]["message"], \
        r.text
