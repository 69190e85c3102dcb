"""Chat completions (server/chat.py, server/chat_template.py): where the template comes from, what it makes
of a conversation, and /v1/chat/completions through httpx and the official OpenAI client against a tiny
random model: the same bytes as the completion of the rendered prompt, streamed or not; a 400 naming
the field for what a chat request cannot ask."""

from __future__ import annotations

import json

import httpx
import pytest
from openai import BadRequestError, OpenAI
from serverkit import sse_events

from blt_runtime import Engine, load_model
from server.__main__ import main
from server.chat_template import ChatTemplate, ChatTemplateError, Conversation, find_chat_template

TEMPLATE = ("{% if messages[0].role == 'assistant' %}{{ raise_exception('the first message must not be the "
            "assistant\\'s') }}{% endif %}{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>\n"
            "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, who are you?"}]
RENDERED = "<system>Be brief.</system>\n<user>Hello, who are you?</user>\n<assistant>"


# ---------------------------------------------------------------------------------------- templates
def test_a_template_renders_as_transformers_does():
    t = ChatTemplate(TEMPLATE, "test")
    assert t.render(Conversation(CHAT)) == RENDERED
    assert t.render(Conversation(CHAT, add_generation_prompt=False)) == RENDERED.removesuffix("<assistant>")
    cont = CHAT + [{"role": "assistant", "content": "I am "}]
    assert t.render(Conversation(cont, False, True)) == RENDERED + "I am "  # its closing tag cut
    empty = CHAT + [{"role": "assistant", "content": ""}]  # nothing to find: cut where the content would be
    assert t.render(Conversation(empty, False, True)) == RENDERED
    with pytest.raises(ChatTemplateError, match="must not be the assistant's"):
        t.render(Conversation([{"role": "assistant", "content": "hi"}]))
    tools = ChatTemplate("{{ tools | tojson }}|{{ bos_token }}|{{ greeting }}|{{ messages | length }}", "test")
    text = tools.render(Conversation(CHAT, tools=[{"name": "é<"}], kwargs={"greeting": "hi", "messages": []}))
    assert text == '[{"name": "é<"}]||hi|2'  # no HTML escaping; kwargs do not replace the conversation
    with pytest.raises(ChatTemplateError, match="failed on the conversation"):
        ChatTemplate("{{ messages[0].content + 1 }}", "test").render(Conversation(CHAT))
    with pytest.raises(ChatTemplateError, match="refused"):  # the sandbox
        ChatTemplate("{{ messages.__class__.__mro__ }}", "test").render(Conversation(CHAT))


def test_where_the_template_comes_from(tmp_path):
    assert find_chat_template(None, str(tmp_path)) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "tools"}, {"name": "default", "template": "{{ 'from the config' }}"}]}))
    assert find_chat_template(None, str(tmp_path)).render(Conversation(CHAT)) == "from the config"
    (tmp_path / "chat_template.jinja").write_text("{{ 'from the file' }}")
    found = find_chat_template(None, str(tmp_path))
    assert found.render(Conversation(CHAT)) == "from the file" and found.origin.endswith("chat_template.jinja")
    flag = tmp_path / "mine.jinja"
    flag.write_text("{{ 'from the flag' }}")
    assert find_chat_template(str(flag), str(tmp_path)).render(Conversation(CHAT)) == "from the flag"
    assert find_chat_template("{{ 'inline' }}", str(tmp_path)).render(Conversation(CHAT)) == "inline"
    with pytest.raises(ChatTemplateError, match="no-such.jinja"):
        find_chat_template(str(tmp_path / "no-such.jinja"), str(tmp_path))
    with pytest.raises(ChatTemplateError, match=r"does not compile: .*\(line 2\)"):
        find_chat_template("{% for m in messages %}\n{{ m.content }", str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": 7}))
    (tmp_path / "chat_template.jinja").unlink()
    with pytest.raises(ChatTemplateError, match="not a string"):
        find_chat_template(None, str(tmp_path))


def test_blt_serve_refuses_a_bad_template_before_loading_the_model(tmp_path, capsys):
    assert main(["--chat-template", str(tmp_path / "missing.jinja"), str(tmp_path / "no-model")]) == 2
    err = capsys.readouterr().err
    assert "missing.jinja" in err and "cannot load the model" not in err


# ---------------------------------------------------------------------------------------- over HTTP
@pytest.fixture(scope="module")
def model(tiny):
    return load_model(tiny)


@pytest.fixture
def url(serve, model):
    url, _ = serve(Engine(model, max_batch_size=4, max_model_len=400), chat_template=TEMPLATE)
    return url


def test_chat_completions_are_the_completion_of_the_rendered_prompt(url):
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    plain = client.completions.create(model="tiny", prompt=RENDERED, max_tokens=60, temperature=0, logprobs=3)
    chat = client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=60, temperature=0,
                                          logprobs=True, top_logprobs=3)
    choice = chat.choices[0]
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content == plain.choices[0].text
    assert choice.finish_reason == plain.choices[0].finish_reason
    assert chat.usage.prompt_tokens == len(RENDERED.encode()) == plain.usage.prompt_tokens
    assert chat.usage.completion_tokens == plain.usage.completion_tokens
    entries = choice.logprobs.content
    assert [e.token for e in entries] == plain.choices[0].logprobs.tokens
    # (the chat's prompt state is the completion's, left in its slot: computed by other kernels, to within 1e-4)
    assert [e.logprob for e in entries] == pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=1e-4)
    for e, top in zip(entries, plain.choices[0].logprobs.top_logprobs):
        assert len(e.bytes) == 1 and len(e.top_logprobs) == 3
        assert {t.token: t.logprob for t in e.top_logprobs} == pytest.approx(top, abs=1e-4)
        for t in e.top_logprobs:  # EOS and the other special ids (the random model gives them weight) are no byte
            assert t.bytes is None if t.token == "<eos>" or t.token.startswith("<special:") else len(t.bytes) == 1

    stream = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=60, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_sampled_chat_choices_stops_and_patches(url):
    with httpx.Client(timeout=120) as c:
        body = {"messages": CHAT, "max_tokens": 40, "n": 3, "seed": 5, "temperature": 1.0, "stop": ["e"],
                "return_patches": True}
        whole = c.post(f"{url}/v1/chat/completions", json=body).json()
        with c.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}) as r:
            events = sse_events(r.read().decode())
    assert [ch["index"] for ch in whole["choices"]] == [0, 1, 2]
    texts = {ch["index"]: "" for ch in whole["choices"]}
    starts: dict[int, list[int]] = {ch["index"]: [] for ch in whole["choices"]}
    roles = [e["choices"][0]["index"] for e in events[:3]]
    assert roles == [0, 1, 2] and all(e["choices"][0]["delta"]["role"] == "assistant" for e in events[:3])
    assert events[-1] == "[DONE]" and any(ch["patch_starts"] for ch in whole["choices"])
    for e in events[3:-1]:
        for ch in e["choices"]:
            texts[ch["index"]] += ch["delta"].get("content", "")
            starts[ch["index"]] += ch["patch_starts"]
    for ch in whole["choices"]:
        assert texts[ch["index"]] == ch["message"]["content"] and "e" not in ch["message"]["content"]
        # stopped by "e", or by EOS (stop_reason None), or out of bytes
        assert (ch["finish_reason"], ch["stop_reason"]) in (("stop", "e"), ("stop", None), ("length", None))
        assert ch["patch_starts"] == starts[ch["index"]]


def test_continue_final_message_and_the_default_length(url):
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    prefix = "I am the"
    out = client.chat.completions.create(model="tiny", messages=CHAT + [{"role": "assistant", "content": prefix}],
                                         temperature=0, max_tokens=30,
                                         extra_body={"add_generation_prompt": False, "continue_final_message": True})
    plain = client.completions.create(model="tiny", prompt=RENDERED + prefix, max_tokens=30, temperature=0)
    assert out.choices[0].message.content == plain.choices[0].text
    # vLLM's echo: the answer begins with the message it continues, streamed or not
    echo = {"add_generation_prompt": False, "continue_final_message": True, "echo": True}
    kw = dict(model="tiny", messages=CHAT + [{"role": "assistant", "content": prefix}], temperature=0, max_tokens=30,
              extra_body=echo)
    assert client.chat.completions.create(**kw).choices[0].message.content == prefix + plain.choices[0].text
    chunks = [c.choices[0].delta for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    assert chunks[0].role == "assistant" and chunks[1].content == prefix
    assert "".join(d.content or "" for d in chunks) == prefix + plain.choices[0].text
    kw = dict(model="tiny", messages=CHAT, temperature=0, max_tokens=30)  # the last message is the user's: no echo
    assert client.chat.completions.create(**kw, extra_body={"echo": True}).choices[0].message.content == \
        client.chat.completions.create(**kw).choices[0].message.content
    long = client.chat.completions.create(model="tiny", messages=CHAT, temperature=0,
                                          extra_body={"ignore_eos": True})  # no max_tokens: what the context leaves
    assert long.usage.completion_tokens >= 400 - 1 - len(RENDERED.encode())
    assert long.choices[0].finish_reason == "length"


def test_guided_chat(url):
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    out = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=40,
                                         extra_body={"guided_choice": ["yes", "no"]})
    assert out.choices[0].message.content in ("yes", "no") and out.choices[0].finish_reason == "stop"
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    out = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=100, seed=2, response_format={
        "type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    assert isinstance(json.loads(out.choices[0].message.content)["n"], int)


@pytest.mark.parametrize("body, param, words", [
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages", "must not be the assistant's"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content", "text parts only"),
    ({"messages": []}, "messages", "at least 1"),
    ({"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice", "'auto'"),
    ({"messages": CHAT, "top_logprobs": 2}, "top_logprobs", "logprobs=true"),
    ({"messages": CHAT, "continue_final_message": True}, "continue_final_message", "cannot both"),
    ({"messages": CHAT, "max_completion_tokens": 400}, "max_completion_tokens", "exceeds"),
    ({"messages": [{"role": "user", "content": "x" * 500}]}, "messages", "context"),
    ({"messages": CHAT, "top_logprobs": 21, "logprobs": True}, "top_logprobs", "less than or equal"),
    ({"messages": CHAT, "guided_regex": "(?=a)"}, "guided_regex", "look-around"),
    ({"messages": CHAT, "model": "other"}, "model", "does not exist"),
])
def test_what_a_chat_request_cannot_ask(url, body, param, words):
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    error = r.json()["error"]
    assert r.status_code == (404 if param == "model" else 400), r.text
    assert error["param"] == param and words in error["message"], error


def test_tools_described_by_the_template_with_tool_choice_none(serve, model):
    template = "{{ tools | length }} tools:{{ messages[-1].content }}"
    url, _ = serve(Engine(model, max_batch_size=2), chat_template=template)
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    out = client.chat.completions.create(model="tiny", messages=CHAT, tools=tools, tool_choice="none", max_tokens=5,
                                         temperature=0)
    assert out.usage.prompt_tokens == len("1 tools:Hello, who are you?")
    with pytest.raises(BadRequestError, match="--enable-auto-tool-choice and --tool-call-parser"):
        client.chat.completions.create(model="tiny", messages=CHAT, tools=tools, max_tokens=5)


def test_the_next_turn_resumes_from_the_last_one(url):
    """A conversation's next prompt begins with the last prompt and its answer, as the template renders them:
    its state is taken over from the finished request's slot, not prefilled again (shared prompts)."""
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    # (ASCII: the random model's bytes are seldom valid UTF-8, and the answer sent back is text)
    first = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=20, temperature=0,
                                           extra_body={"guided_regex": "[a-z ]{20}"})
    turn = CHAT + [{"role": "assistant", "content": first.choices[0].message.content},
                   {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model="tiny", messages=turn, max_tokens=20, temperature=0)
    shared = second.usage.prompt_tokens_details.cached_tokens
    assert shared >= len(RENDERED.encode()) + len(first.choices[0].message.content.encode()) - 1
    plain = client.completions.create(model="tiny", prompt=RENDERED + first.choices[0].message.content
                                      + "</assistant>\n<user>And then?</user>\n<assistant>", max_tokens=20,
                                      temperature=0)
    assert second.choices[0].message.content == plain.choices[0].text


def test_the_openai_clients_parse_helper_gets_its_pydantic_model(url):
    """client.chat.completions.parse(response_format=Model): the strict JSON schema the client sends is the
    guide, and the answer parses into the model."""
    from datetime import datetime

    from pydantic import BaseModel, Field

    class Meeting(BaseModel):
        topic: str = Field(max_length=12)
        start: datetime
        seats: int = Field(ge=1, le=40)

    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    out = client.chat.completions.parse(model="tiny", messages=CHAT, response_format=Meeting, max_tokens=200, seed=1)
    meeting = out.choices[0].message.parsed
    assert isinstance(meeting, Meeting) and 1 <= meeting.seats <= 40
