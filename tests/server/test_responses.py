"""POST /v1/responses (server/responses.py, response_items.py, response_store.py): OpenAI's Responses API. Its
input becomes the conversation a chat completion would render, so the same model gives the same bytes; the
official client reads the answer, whole and streamed (its stream helper rebuilds the response from the events);
tools, text formats, logprobs, the store and truncation; a 400 naming the field for what it cannot ask."""

from __future__ import annotations

import json

import httpx
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field
from scripted import ScriptedEngine
from serverkit import wait_until

from blt_runtime import Engine, load_model
from server.errors import ApiError
from server.response_items import DELTAS, OutputItems, merged
from server.response_store import ResponseStore
from server.responses import input_messages
from server.tool_parser import HermesCalls

TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}"
            "{% for c in m.tool_calls or [] %}[call {{ c.id }} {{ c.function.name }} {{ c.function.arguments }}]"
            "{% endfor %}{% if m.tool_call_id %}[for {{ m.tool_call_id }}]{% endif %}</{{ m.role }}>\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, who are you?"}]
TOOLS = [{"type": "function", "name": "get_weather", "description": "the weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


def sse(text: str) -> list[dict]:
    """A Responses stream's events: each an `event:` line naming its type, then its data."""
    events = []
    for block in text.split("\n\n"):
        if block:
            head, data = block.split("\n", 1)
            event = json.loads(data.removeprefix("data: "))
            assert head == f"event: {event['type']}"
            events.append(event)
    return events


def built(events: list[dict]) -> list[dict]:
    """The output items the events build, as a client that reads only the deltas would."""
    items: dict[int, dict] = {}
    for e in events:
        if e["type"] == "response.output_item.added":
            items[e["output_index"]] = {**e["item"], "text": "", "arguments": e["item"].get("arguments", "")}
        elif e["type"] == "response.output_text.delta":
            items[e["output_index"]]["text"] += e["delta"]
        elif e["type"] == "response.function_call_arguments.delta":
            items[e["output_index"]]["arguments"] += e["delta"]
    return [items[i] for i in sorted(items)]


# ------------------------------------------------------------------------------------------- input
def test_input_items_become_chat_messages():
    assert input_messages("Hi") == [{"role": "user", "content": "Hi"}]
    items = [{"role": "developer", "content": "Be brief."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"},
                                                             {"type": "input_text", "text": "b"}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Looking."}]},
             {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
             {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "[]"},
             {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
             {"type": "function_call", "call_id": "c3", "name": "f", "arguments": "{}"}]
    assert input_messages(items) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": "Looking.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "[]"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c3", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]


@pytest.mark.parametrize("items, param, words", [
    ([{"role": "robot", "content": "x"}], "input[0].role", "none of"),
    ([{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}], "input[0].content", "text parts"),
    ([{"role": "user", "content": 7}], "input[0].content", "a string or a list"),
    ([{"type": "function_call", "name": "f", "arguments": "{}"}], "input[0].call_id", "a string"),
    ([{"role": "user", "content": "x"}, {"type": "reasoning", "summary": []}], "input[1].type", "'reasoning'"),
])
def test_input_items_this_server_cannot_read(items, param, words):
    with pytest.raises(ApiError) as e:
        input_messages(items)
    assert e.value.param == param and words in e.value.message and e.value.status == 400


def test_the_store_forgets_the_oldest_past_its_budget():
    store = ResponseStore(budget=3000)
    for i in range(10):
        store.put({"id": f"r{i}", "text": "x" * 500}, [{"role": "user", "content": "y" * 100}])
    assert 3 <= len(store) < 10 and store.get("r9") is not None and store.get("r0") is None
    assert store.delete("r9") and store.get("r9") is None and not store.delete("r9")


def test_deltas_that_come_together_are_one_event():
    """Pieces released together (a client that fell behind) make one delta per run of the same item: the same
    items, fewer events."""
    text = HERMES.decode()
    one_by_one, together = OutputItems(HermesCalls()), OutputItems(HermesCalls())
    singly = [e for c in text for e in one_by_one.feed(c)] + one_by_one.finish("stop")
    at_once = merged([e for c in text for e in together.feed(c)]) + together.finish("stop")

    def without_ids(events):
        return [{k: v for k, v in i.items() if k not in ("id", "call_id")} for i in built(events)]

    assert without_ids(at_once) == without_ids(singly) and len(built(singly)) == 3
    kinds = [e["type"] for e in at_once if e["type"] in DELTAS]
    # the message's text before the first call, the calls' arguments, then "Then " (the message again)
    assert kinds == [DELTAS[0], DELTAS[1], DELTAS[0], DELTAS[1]] and len(singly) > 3 * len(at_once)


# ------------------------------------------------------------------------------------------- over HTTP
@pytest.fixture(scope="module")
def model(tiny):
    return load_model(tiny)


@pytest.fixture
def url(serve, model):
    url, _ = serve(Engine(model, max_batch_size=4, max_model_len=400), chat_template=TEMPLATE,
                   enable_responses_api_store=True)
    return url


def test_a_response_is_the_chat_completion_of_its_conversation(url):
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    chat = client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=60, temperature=0,
                                          logprobs=True, top_logprobs=2)
    kw = dict(model="tiny", instructions="Be brief.", input="Hello, who are you?", max_output_tokens=60,
              temperature=0, top_logprobs=2, include=["message.output_text.logprobs"])
    r = client.responses.create(**kw)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == "tiny"
    assert r.output_text == chat.choices[0].message.content and len(r.output) == 1
    message = r.output[0]
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    length = chat.choices[0].finish_reason == "length"
    assert r.status == ("incomplete" if length else "completed") == message.status
    assert (r.incomplete_details.reason if length else r.incomplete_details) == ("max_output_tokens" if length
                                                                                else None)
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    entries = message.content[0].logprobs
    assert [e.token for e in entries] == [e.token for e in chat.choices[0].logprobs.content]
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in chat.choices[0].logprobs.content],
                                                         abs=1e-4)
    assert all(len(e.top_logprobs) == 2 for e in entries)
    assert r.instructions == "Be brief." and r.max_output_tokens == 60 and r.temperature == 0 and r.store

    with httpx.Client(timeout=120) as c:  # the stream: numbered events that build the same output
        body = {**kw, "stream": True}
        with c.stream("POST", f"{url}/v1/responses", json=body) as s:
            assert s.headers["content-type"].startswith("text/event-stream")
            events = sse(s.read().decode())
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events[:4]] == ["response.created", "response.in_progress",
                                               "response.output_item.added", "response.content_part.added"]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    assert [e["type"] for e in events[-4:]] == ["response.output_text.done", "response.content_part.done",
                                                "response.output_item.done", f"response.{r.status}"]
    (item,) = built(events)
    final = events[-1]["response"]
    assert item["text"] == r.output_text == final["output"][0]["content"][0]["text"] == events[-4]["text"]
    assert [e["token"] for e in final["output"][0]["content"][0]["logprobs"]] == [e.token for e in entries]
    assert final["usage"]["output_tokens"] == r.usage.output_tokens and final["id"] != r.id


def test_the_client_stream_helper_and_parse(url):
    """The official client's helpers: stream() rebuilds the response from the events (it checks their
    indices), parse() reads text.format's JSON into a pydantic model."""
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    kw = dict(model="tiny", input="Yes or no?", max_output_tokens=40, extra_body={"guided_choice": ["yes", "no"]})
    with client.responses.stream(**kw) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text in ("yes", "no") and "".join(deltas) == final.output_text

    class City(BaseModel):  # short: a random model's string runs on as long as it may
        name: str = Field(max_length=8)
        population: int = Field(ge=0, le=10**6)

    out = client.responses.parse(model="tiny", input="A city?", text_format=City, max_output_tokens=200,
                                  extra_body={"seed": 3})
    assert isinstance(out.output_parsed, City), out.output_text
    assert out.text.format.type == "json_schema"


def test_function_calls(url):
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    for choice in ("required", {"type": "function", "name": "get_weather"}):
        r = client.responses.create(model="tiny", input="Weather in Köln?", tools=TOOLS, tool_choice=choice,
                                    max_output_tokens=200, extra_body={"seed": 1})
        calls = [o for o in r.output if o.type == "function_call"]
        assert calls and calls[0].name == "get_weather" and calls[0].id.startswith("fc_") and calls[0].call_id
        if r.status == "completed":
            assert isinstance(json.loads(calls[0].arguments)["city"], str)
        assert r.tool_choice in ("required", choice) or r.tool_choice.name == "get_weather"
    with httpx.Client(timeout=120) as c:
        body = {"input": "Weather in Köln?", "tools": TOOLS, "tool_choice": "required", "max_output_tokens": 200,
                "seed": 1, "stream": True}
        with c.stream("POST", f"{url}/v1/responses", json=body) as s:
            events = sse(s.read().decode())
        whole = c.post(f"{url}/v1/responses", json={**body, "stream": False}).json()
    items = built(events)
    assert [(i["name"], i["arguments"]) for i in items] == [(o["name"], o["arguments"]) for o in whole["output"]]
    assert [e["arguments"] for e in events if e["type"] == "response.function_call_arguments.done"] == [
        o["arguments"] for o in whole["output"]]


def test_the_store_and_previous_response_id(url):
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    first = client.responses.create(model="tiny", instructions="Be brief.", input="Hello", max_output_tokens=20,
                                    temperature=0)
    assert client.responses.retrieve(first.id).model_dump() == first.model_dump()
    second = client.responses.create(model="tiny", input="And then?", previous_response_id=first.id,
                                     max_output_tokens=20, temperature=0)
    assert second.previous_response_id == first.id
    # the same bytes as the chat completion of the whole conversation (the first instructions not carried over)
    history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first.output_text},
               {"role": "user", "content": "And then?"}]
    chat = client.chat.completions.create(model="tiny", messages=history, max_tokens=20, temperature=0)
    assert second.output_text == chat.choices[0].message.content
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    unstored = client.responses.create(model="tiny", input="Hello", max_output_tokens=5, store=False)
    assert not unstored.store
    with httpx.Client(timeout=60) as c:
        assert c.get(f"{url}/v1/responses/{unstored.id}").status_code == 404
        cancel = c.post(f"{url}/v1/responses/{first.id}/cancel")
        assert cancel.status_code == 400 and "background" in cancel.json()["error"]["message"]
        gone = c.delete(f"{url}/v1/responses/{first.id}")
        assert gone.json() == {"id": first.id, "object": "response", "deleted": True}
        assert c.get(f"{url}/v1/responses/{first.id}").status_code == 404
        r = c.post(f"{url}/v1/responses", json={"input": "x", "previous_response_id": first.id})
        assert r.status_code == 400 and r.json()["error"]["code"] == "previous_response_not_found"


def test_input_items_are_listed_a_page_at_a_time(url):
    """GET /v1/responses/{id}/input_items, through the official client's pages: the request's own input (not
    the conversation it continues), newest first by default, each item with an id (the client's own, kept)."""
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    first = client.responses.create(model="tiny", input="Hello", max_output_tokens=5, temperature=0)
    (hello,) = client.responses.input_items.list(first.id).data
    assert hello.type == "message" and hello.role == "user" and hello.id.startswith("msg_")
    assert hello.content[0].type == "input_text" and hello.content[0].text == "Hello"
    given = [{"type": "message", "role": "developer", "content": "Be brief."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Köln"}',
              "id": "fc_mine"},
             {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"},
             {"type": "message", "role": "assistant", "content": "It is sunny."},
             {"type": "message", "role": "user", "content": "Thanks"}]
    second = client.responses.create(model="tiny", input=given, previous_response_id=first.id, max_output_tokens=5,
                                     temperature=0, tools=TOOLS, tool_choice="none")
    listed = list(client.responses.input_items.list(second.id, order="asc", limit=2))  # three pages, followed
    assert [i.type for i in listed] == [g["type"] for g in given] and listed[2].id == "fc_mine"
    assert listed[2].arguments == '{"city": "Köln"}' and listed[3].output == "Sunny"
    assert listed[4].role == "assistant" and listed[4].content[0].type == "output_text"
    assert listed[4].content[0].text == "It is sunny."
    newest = client.responses.input_items.list(second.id, limit=4)
    assert [i.id for i in newest.data] == [i.id for i in listed[::-1][:4]] and newest.has_more
    assert [i.id for i in client.responses.input_items.list(second.id, after=newest.data[-1].id).data] == [
        i.id for i in listed[:2][::-1]]
    with httpx.Client(timeout=60) as c:
        for query, param in (("limit=0", "limit"), ("after=msg_nothing", "after")):
            r = c.get(f"{url}/v1/responses/{second.id}/input_items?{query}")
            assert r.status_code == 400 and r.json()["error"]["param"] == param
        assert c.get(f"{url}/v1/responses/resp_nothing/input_items").status_code == 404


def test_tool_outputs_reach_the_template(url):
    """A function_call and its output, sent back as input, are the assistant's call and a tool message."""
    with httpx.Client(timeout=60) as c:
        items = [{"role": "user", "content": "Weather?"},
                 {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
                 {"type": "function_call_output", "call_id": "c1", "output": "sunny"}]
        r = c.post(f"{url}/v1/responses", json={"input": items, "tools": TOOLS, "tool_choice": "none",
                                                "max_output_tokens": 1, "top_logprobs": 1, "ignore_eos": True})
        rendered = ('<user>Weather?</user>\n<assistant>[call c1 get_weather {"city": "Oslo"}]</assistant>\n'
                    '<tool>sunny[for c1]</tool>\n<assistant>')
        assert r.status_code == 200 and r.json()["usage"]["input_tokens"] == len(rendered.encode())
        # tool_choice none: no calls to read, so logprobs are given (a byte each; up to 3 more end a character)
        assert len(r.json()["output"][0]["content"][0]["logprobs"]) == r.json()["usage"]["output_tokens"]
        tokenized = c.post(f"{url}/tokenize", json={"prompt": rendered}).json()
        assert tokenized["count"] == len(rendered.encode())


def test_truncation_auto_leaves_out_the_oldest_messages(url):
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "x" * 40} for i in range(9)]
    with httpx.Client(timeout=60) as c:
        body = {"input": turns, "instructions": "Be brief.", "max_output_tokens": 30, "temperature": 0}
        refused = c.post(f"{url}/v1/responses", json=body)
        assert refused.status_code == 400 and "context" in refused.json()["error"]["message"]
        r = c.post(f"{url}/v1/responses", json={**body, "truncation": "auto"}).json()
        assert r["truncation"] == "auto" and r["usage"]["input_tokens"] + 30 <= 400 - 1
        # as few as needed left out: the instructions and the newest turns whose rendering fits
        kept = next(k for k in range(len(turns), 0, -1)
                    if len(render(turns[-k:])) + 30 <= 400 - 1)
        assert r["usage"]["input_tokens"] == len(render(turns[-kept:]))


def test_truncation_renders_few_prompts_for_long_conversations(monkeypatch):
    """With thousands of messages, the cut is found by bisection (a prompt rendered per step, not one per
    message left out), and it is the cut that leaving out the oldest one at a time finds: the fewest
    left out, a tool message going with the call before it, the last message always kept."""
    from types import SimpleNamespace

    from server import responses
    from server.schemas import ChatCompletionRequest, ResponsesRequest

    renders = []

    def prompt(chat, state):  # every message's content, one after another
        renders.append(len(chat.messages))
        return "".join(m.content for m in chat.messages).encode()

    monkeypatch.setattr(responses, "conversation_prompt", prompt)
    roles = ["user", "assistant", "tool", "tool"]
    messages = [{"role": "system", "content": "s" * 7}] + [
        {"role": roles[i % 4], "content": "m" * (1 + i % 5), **({"tool_call_id": "c"} if i % 4 > 1 else {})}
        for i in range(3000)]
    chat = ChatCompletionRequest(model="m", messages=messages)
    req = ResponsesRequest(input="x", truncation="auto", max_output_tokens=10)

    def one_at_a_time(limit: int) -> int:  # how many messages the old loop kept
        kept = list(chat.messages)
        while len(kept) - 1 > 1:
            if len("".join(m.content for m in kept)) + 10 <= limit - 1:
                break
            del kept[1]
            while len(kept) - 1 > 1 and kept[1].role == "tool":
                del kept[1]
        return len(kept)

    for limit in (30, 400, 4000, 9000, 20000):
        renders.clear()
        got = responses.fitted(chat, req, SimpleNamespace(max_model_len=limit), 1)
        assert len(got.messages) == one_at_a_time(limit), limit
        assert got.messages[0].content == "s" * 7 and got.messages[-1] == chat.messages[-1]
        assert len(renders) <= 13, (limit, len(renders))  # about log2 of the 1,501 places a cut may be


def render(turns: list[dict]) -> bytes:
    messages = [{"role": "system", "content": "Be brief."}] + turns
    return ("".join(f"<{m['role']}>{m['content']}</{m['role']}>\n" for m in messages) + "<assistant>").encode()


@pytest.mark.parametrize("body, param, words", [
    ({"background": True, "store": False}, "background", "needs store true"),
    ({"n": 2}, "n", "one output"),
    ({"return_patches": True}, "return_patches", "/v1/completions"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type", "functions only"),
    ({"tools": TOOLS}, "tool_choice", "--enable-auto-tool-choice"),
    ({"tools": TOOLS, "tool_choice": "required", "include": ["message.output_text.logprobs"]}, "include",
     "where tools may be called"),
    ({"text": {"format": {"type": "xml"}}}, "text.format.type", "none of"),
    ({"text": {"format": "json"}}, "text.format", "an object"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema", "is needed"),
    ({"text": {"format": {"type": "json_object"}}, "response_format": {"type": "json_object"}}, "response_format",
     "not both"),
    ({"previous_response_id": "resp_nothing"}, "previous_response_id", "no response"),
    ({"max_output_tokens": 400}, "max_output_tokens", "prompt (27 bytes) + max_output_tokens (400) exceeds"),
    ({"input": "x" * 500}, "input", "context"),
    ({"input": []}, "input", "at least one item"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "integer", "multipleOf": 3}}}},
     "text.format", "multipleOf"),
    ({"top_logprobs": 21}, "top_logprobs", "less than or equal"),
    ({"model": "other"}, "model", "does not exist"),
])
def test_what_a_response_request_cannot_ask(url, body, param, words):
    r = httpx.post(f"{url}/v1/responses", json={"input": "Hi", **body}, timeout=60)
    error = r.json()["error"]
    assert r.status_code == (404 if param == "model" else 400), r.text
    assert error["param"] == param and words in error["message"], error


def test_llama3_json_calls_and_held_text(serve):
    """With --tool-call-parser llama3_json: calls as function_call items; a text that ends in what could have begun
    the python tag gives it back at the end."""
    scripts = {b"<user>Weather?</user>\n<assistant>": b'{"name": "get_weather", "arguments": {"city": "Oslo"}}',
               b"<user>Hi</user>\n<assistant>": b"<|python"}
    url, _ = serve(ScriptedEngine(scripts, default=b"x"), chat_template=TEMPLATE, enable_auto_tool_choice=True,
                   tool_call_parser="llama3_json")
    with httpx.Client(timeout=60) as c:
        calls = c.post(f"{url}/v1/responses", json={"input": "Weather?", "tools": TOOLS}).json()
        held = c.post(f"{url}/v1/responses", json={"input": "Hi", "tools": TOOLS}).json()
        with c.stream("POST", f"{url}/v1/responses", json={"input": "Hi", "tools": TOOLS, "stream": True}) as s:
            events = sse(s.read().decode())
    assert [(o["type"], o["name"], o["arguments"]) for o in calls["output"]] == [
        ("function_call", "get_weather", '{"city": "Oslo"}')]
    assert held["output"][0]["content"][0]["text"] == "<|python" == built(events)[0]["text"]


def test_background_responses(serve):
    """Answered at once (queued), generated with no client waiting; GET finds them in progress, then finished;
    cancel stops one where it is; DELETE of a running one cancels it first."""
    engine = ScriptedEngine({b"<user>Hi</user>\n<assistant>": b"Hello there."}, default=b"x" * 5000,
                            step_delay=0.002)
    url, state = serve(engine, chat_template=TEMPLATE, enable_responses_api_store=True)
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    queued = client.responses.create(model="tiny", input="Hi", background=True)
    assert queued.status == "queued" and queued.background and queued.output == []
    assert wait_until_done(client, queued.id).output_text == "Hello there."
    assert client.responses.create(model="tiny", input="Hi").output_text == "Hello there."  # as in the foreground

    engine.paused.set()  # the long one holds still: queued until its first byte
    long = client.responses.create(model="tiny", input="Go on", background=True, max_output_tokens=4000)
    assert client.responses.retrieve(long.id).status == "queued"
    with httpx.Client(timeout=60) as c:
        r = c.post(f"{url}/v1/responses", json={"input": "x", "previous_response_id": long.id})
        assert r.status_code == 400 and "still generating" in r.json()["error"]["message"]
    engine.paused.clear()
    wait_until(lambda: client.responses.retrieve(long.id).status == "in_progress", what="in progress")
    so_far = wait_until(lambda: client.responses.retrieve(long.id).output_text, what="some text")
    assert set(so_far) == {"x"}  # its output so far
    cancelled = client.responses.cancel(long.id)
    assert cancelled.status == "cancelled" and 0 < cancelled.usage.output_tokens < 4000
    assert cancelled.output_text == "x" * cancelled.usage.output_tokens
    assert client.responses.retrieve(long.id).status == "cancelled" and not state.responses.running
    with httpx.Client(timeout=60) as c:
        again = c.post(f"{url}/v1/responses/{long.id}/cancel")
        assert again.status_code == 400 and "has finished" in again.json()["error"]["message"]
        running = client.responses.create(model="tiny", input="more", background=True, max_output_tokens=4000)
        assert c.delete(f"{url}/v1/responses/{running.id}").json()["deleted"]
        assert c.get(f"{url}/v1/responses/{running.id}").status_code == 404 and not state.responses.running
    assert not engine.running and not engine.waiting  # nothing left generating


def test_a_background_stream_is_read_again_from_where_a_reader_left(serve):
    """background and stream: the events go on without a reader; GET ?stream=true&starting_after=N gives them
    again from N on (while it runs, and after), numbered as first sent; a response not streamed is a 400 there."""
    engine = ScriptedEngine({}, default=b"ab" * 300, step_delay=0.002)
    url, _ = serve(engine, chat_template=TEMPLATE, enable_responses_api_store=True)
    body = {"input": "Hi", "background": True, "stream": True, "max_output_tokens": 400}
    with httpx.Client(timeout=60) as c:
        first = []
        with c.stream("POST", f"{url}/v1/responses", json=body) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():  # the reader leaves after a few deltas
                if line.startswith("data: "):
                    first.append(json.loads(line[len("data: "):]))
                if len(first) == 8:
                    break
        rid, last = first[0]["response"]["id"], first[-1]["sequence_number"]
        with c.stream("GET", f"{url}/v1/responses/{rid}", params={"stream": "true", "starting_after": last}) as r:
            rest = sse(r.read().decode())
        events = first + rest
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        assert events[-1]["type"] == "response.incomplete" and built(events)[0]["text"] == "ab" * 200
        again = c.get(f"{url}/v1/responses/{rid}", params={"stream": "true", "starting_after": 3}).text
        assert sse(again) == events[4:]  # after it ended: the same events
        plain = c.post(f"{url}/v1/responses", json={"input": "Hi", "background": True}).json()
        refused = c.get(f"{url}/v1/responses/{plain['id']}", params={"stream": "true"})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "stream"
        engine.paused.set()  # cancelled while a reader waits: its stream ends with the cancelled response
        with c.stream("POST", f"{url}/v1/responses", json={**body, "max_output_tokens": 4000}) as r:
            lines = r.iter_lines()
            created = json.loads(next(line for line in lines if line.startswith("data: "))[len("data: "):])
            c.post(f"{url}/v1/responses/{created['response']['id']}/cancel")
            tail = [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ")]
    engine.paused.clear()
    assert tail[-1]["type"] == "response.incomplete" and tail[-1]["response"]["status"] == "cancelled"


def wait_until_done(client: OpenAI, response_id: str):
    wait_until(lambda: client.responses.retrieve(response_id).status not in ("queued", "in_progress"),
               what="the background response")
    return client.responses.retrieve(response_id)


def test_without_the_store_nothing_is_kept(serve):
    url, _ = serve(ScriptedEngine({}, default=b"ok"), chat_template=TEMPLATE)
    with httpx.Client(timeout=60) as c:
        r = c.post(f"{url}/v1/responses", json={"input": "Hi"}).json()
        assert r["store"] is False and r["output"][0]["content"][0]["text"] == "ok" and r["status"] == "completed"
        missing = c.get(f"{url}/v1/responses/{r['id']}")
        assert missing.status_code == 404 and "--enable-responses-api-store" in missing.json()["error"]["message"]
        again = c.post(f"{url}/v1/responses", json={"input": "Hi", "previous_response_id": r["id"]})
        assert again.status_code == 400 and "--enable-responses-api-store" in again.json()["error"]["message"]


HERMES = ('I will look it up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Köln"}}\n</tool_call>\n'
          'Then <tool_call>\n{"arguments": {"city": "Oslo"}, "name": "get_weather"}\n</tool_call>\n').encode()


def test_auto_calls_after_text_and_a_stream_that_fails(serve):
    """The model's own text and calls (--tool-call-parser hermes): a message item, then the calls, whole and
    streamed; an engine step that raises ends a stream with response.failed."""
    prompt = b"<user>Weather?</user>\n<assistant>"
    engine = ScriptedEngine({prompt: HERMES}, default=b"x" * 500)
    url, _ = serve(engine, chat_template=TEMPLATE, enable_auto_tool_choice=True, tool_call_parser="hermes",
                   enable_responses_api_store=True)
    with httpx.Client(timeout=60) as c:
        body = {"input": "Weather?", "tools": TOOLS, "max_output_tokens": 500}
        whole = c.post(f"{url}/v1/responses", json=body).json()
        with c.stream("POST", f"{url}/v1/responses", json={**body, "stream": True}) as s:
            events = sse(s.read().decode())
    assert [o["type"] for o in whole["output"]] == ["message", "function_call", "function_call"]
    # the whitespace after a call is the message's where text follows it
    assert whole["output"][0]["content"][0]["text"] == "I will look it up.\n\nThen "
    assert [(o["name"], o["arguments"]) for o in whole["output"][1:]] == [
        ("get_weather", '{"city": "Köln"}'), ("get_weather", '{"city": "Oslo"}')]
    items = built(events)
    assert [i["type"] for i in items] == ["message", "function_call", "function_call"]
    assert items[0]["text"] == whole["output"][0]["content"][0]["text"]
    assert [i["arguments"] for i in items[1:]] == [o["arguments"] for o in whole["output"][1:]]
    assert events[-1]["type"] == "response.completed"

    engine.fail_at(5)
    with httpx.Client(timeout=60) as c, c.stream("POST", f"{url}/v1/responses",
                                                 json={"input": "other", "stream": True}) as s:
        events = sse(s.read().decode())
    assert events[-1]["type"] == "response.failed"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "internal_error"
    assert "Traceback" not in failed["error"]["message"]
    assert httpx.get(f"{url}/v1/responses/{failed['id']}").json() == failed  # kept as it ended
