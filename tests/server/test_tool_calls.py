"""Tool calls (server/tools.py): named and "required" tool choice guide a chat completion to the calls' JSON,
and the answer lists the calls, whole or streamed, as the official OpenAI client reads them. The arguments
validate against their function's schema (jsonschema), and a stream's deltas add up to the whole answer's
calls. A random tiny model writes them: what it writes means nothing, but its form is the guide's."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai import OpenAI
from pydantic import BaseModel, Field

from blt_runtime import Engine, load_model
from server.errors import ApiError
from server.tools import CallStream, tool_calling

TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ m.tool_calls | tojson if m.tool_calls }}\n"
            "{% endfor %}<tools>{{ tools | tojson }}\n<assistant>")
CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"]}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}, "day": {"type": "integer"}},
        "required": ["zone"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}


# ------------------------------------------------------------------------------------------- reading calls
JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | \
    st.text(alphabet=st.characters(codec="utf-8"), max_size=8)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(calls=st.lists(st.tuples(st.text(min_size=1, max_size=6), JSON_VALUES), min_size=1, max_size=3),
       indent=st.sampled_from([None, 0, 2]), compact=st.booleans(), cuts=st.lists(st.integers(1, 9), max_size=40))
def test_a_list_of_calls_is_read_however_its_text_comes(calls, indent, compact, cuts):
    text = json.dumps([{"name": n, "parameters": p} for n, p in calls], indent=indent, ensure_ascii=False,
                      separators=(",", ":") if compact else None)
    stream, deltas, at = CallStream(None), [], 0
    for cut in cuts + [len(text)]:
        deltas += stream.feed(text[at:at + cut])
        at += cut
    whole = stream.whole()
    assert [c["function"]["name"] for c in whole] == [n for n, _ in calls]
    assert [json.loads(c["function"]["arguments"]) for c in whole] == [p for _, p in calls]
    assert stream.finish_reason("stop") == "tool_calls" and stream.finish_reason("length") == "length"
    added: dict[int, dict] = {}  # the deltas, as a client adds them up
    for d in deltas:
        call = added.setdefault(d["index"], {"id": d.get("id"), "name": d["function"].get("name"), "arguments": ""})
        call["arguments"] += d["function"]["arguments"]
    assert [(added[i]["id"], added[i]["name"], added[i]["arguments"]) for i in sorted(added)] == \
        [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in whole]


def test_a_named_call_is_the_whole_text():
    stream = CallStream("f")
    first, second = stream.feed('{"a": '), stream.feed("1}")
    assert first[0]["function"] == {"name": "f", "arguments": '{"a": '} and first[0]["id"].startswith("chatcmpl-tool-")
    assert second == [{"index": 0, "function": {"arguments": "1}"}}]
    assert stream.whole()[0]["function"]["arguments"] == '{"a": 1}' and stream.finish_reason("stop") == "stop"
    assert CallStream("g").whole()[0]["function"] == {"name": "g", "arguments": ""}  # nothing generated


def test_what_tool_choice_asks_for():
    assert tool_calling(None, None, None) is None and tool_calling(TOOLS, "none", None) is None
    named = tool_calling(TOOLS, {"type": "function", "function": {"name": "get_time"}}, None)
    assert named.name == "get_time" and named.schema == TIME
    required = tool_calling(TOOLS, "required", False)
    assert required.name is None and required.schema["maxItems"] == 1 and required.schema["minItems"] == 1
    assert "maxItems" not in tool_calling(TOOLS, "required", None).schema
    options = required.schema["items"]["anyOf"]
    assert [o["properties"]["name"] for o in options] == [{"const": "get_weather"}, {"const": "get_time"}]
    # a tool's $defs move to the schema that nests them, where its $refs resolve
    tool = {"type": "function", "function": {"name": "m", "parameters": {
        "type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "$defs": {"P": {"type": "integer"}}}}}
    nested = tool_calling([tool], "required", None).schema
    assert nested["$defs"] == {"P": {"type": "integer"}} and "$defs" not in nested["items"]["anyOf"][0]
    bare = tool_calling([{"type": "function", "function": {"name": "x"}}], "required", None).schema
    jsonschema.validate([{"name": "x", "parameters": {}}], bare)  # no parameters: an empty object
    for tools, choice, words in [
            (TOOLS, None, "'auto'"), (TOOLS, "auto", "'auto'"), (None, "required", "needs tools"),
            (TOOLS, {"type": "function", "function": {"name": "nope"}}, "no tool is named 'nope'"),
            (TOOLS, {"function": {}}, "none of"), (TOOLS, "sometimes", "none of"),
            (TOOLS + TOOLS[:1], "required", "named twice"), ([{"type": "retrieval"}], "required", "must be"),
            ([tool, {**tool, "function": {**tool["function"], "name": "n", "parameters": {
                "$defs": {"P": {"type": "string"}}}}}], "required", "differently")]:
        with pytest.raises(ApiError, match=words):
            tool_calling(tools, choice, None)


# ------------------------------------------------------------------------------------------- over HTTP
@pytest.fixture(scope="module")
def model(tiny):
    return load_model(tiny)


@pytest.fixture
def client(serve, model):
    url, _ = serve(Engine(model, max_batch_size=4), chat_template=TEMPLATE)
    return OpenAI(base_url=f"{url}/v1", api_key="unused")


def streamed_calls(client: OpenAI, **kw) -> tuple[list[tuple[str, str, str]], str]:
    """The calls a stream's deltas add up to -> ([(id, name, arguments)], finish_reason)."""
    calls: dict[int, list[str]] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            assert not choice.delta.content
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, [d.id, d.function.name, ""])
                call[2] += d.function.arguments or ""
            finish = choice.finish_reason or finish
    return [tuple(calls[i]) for i in sorted(calls)], finish


@pytest.mark.parametrize("seed", [1, 2])
def test_a_named_tool_choice_calls_that_function(client, seed):
    kw = dict(model="tiny", messages=CHAT, tools=TOOLS, max_tokens=300, seed=seed, temperature=1.0,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    out = client.chat.completions.create(**kw)
    message = out.choices[0].message
    assert message.content == "" and out.choices[0].finish_reason == "stop" and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("chatcmpl-tool-")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    calls, finish = streamed_calls(client, **kw)
    assert [(name, arguments) for _, name, arguments in calls] == [("get_weather", call.function.arguments)]
    assert finish == "stop" and calls[0][0].startswith("chatcmpl-tool-")
    # the conversation goes on with the call and its result, which the template renders
    result = {"role": "tool", "tool_call_id": call.id, "content": "21 C"}
    conversation = CHAT + [message.model_dump(exclude_none=True), result]
    follow = client.chat.completions.create(model="tiny", messages=conversation, tools=TOOLS, tool_choice="none",
                                            max_tokens=4, temperature=0)
    assert follow.usage.prompt_tokens > out.usage.prompt_tokens + len(call.function.arguments)


CLOSE, KEEP_OPEN = {"93": 100}, {"44": 100}  # logit_bias on "]" and on ",": the list of calls ends, or goes on


@pytest.mark.parametrize("parallel, bias", [(False, None), (None, CLOSE), (None, KEEP_OPEN), (None, None)])
def test_required_calls_one_or_more_of_the_tools(client, parallel, bias):
    """A list of one call with parallel_tool_calls false; else of one or more, as many as the model writes (a
    random model may go on until max_tokens, so logit_bias steers it): closed, finish_reason "tool_calls" and
    every call valid; cut by max_tokens, "length", every call valid but the last, whose arguments are what was
    written. Streamed, the deltas add up to the same calls."""
    for seed in range(3):
        kw = dict(model="tiny", messages=CHAT, tools=TOOLS, tool_choice="required", max_tokens=300, seed=seed,
                  temperature=1.0, **({"parallel_tool_calls": parallel} if parallel is not None else {}),
                  **({"logit_bias": bias} if bias else {}))
        out = client.chat.completions.create(**kw)
        calls, reason = out.choices[0].message.tool_calls, out.choices[0].finish_reason
        assert out.choices[0].message.content == "" and reason in ("tool_calls", "length")
        if parallel is False or bias is CLOSE:
            assert reason == "tool_calls" and len(calls) == 1
        if bias is KEEP_OPEN:
            assert reason == "length" and len(calls) >= 2
        for call in calls if reason == "tool_calls" else calls[:-1]:
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        assert len({c.id for c in calls}) == len(calls)
        streamed, finish = streamed_calls(client, **kw)
        assert [(n, a) for _, n, a in streamed] == [(c.function.name, c.function.arguments) for c in calls]
        assert finish == reason


def test_the_openai_clients_parse_helper_gets_the_arguments_as_its_model(client):
    import openai

    class Lookup(BaseModel):
        city: str = Field(max_length=10)
        days: int = Field(ge=1, le=7)

    out = client.chat.completions.parse(model="tiny", messages=CHAT, tools=[openai.pydantic_function_tool(Lookup)],
                                        tool_choice={"type": "function", "function": {"name": "Lookup"}},
                                        max_tokens=200, seed=3)
    parsed = out.choices[0].message.tool_calls[0].function.parsed_arguments
    assert isinstance(parsed, Lookup) and 1 <= parsed.days <= 7


def test_a_tool_call_and_another_guide_are_refused(client):
    url = str(client.base_url).removesuffix("/v1/")
    body = {"messages": CHAT, "tools": TOOLS, "tool_choice": "required", "guided_regex": "a+"}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_regex", r.text
    body = {"messages": CHAT, "tool_choice": {"type": "function", "function": {"name": "u"}},
            "tools": [{"type": "function", "function": {"name": "u", "parameters": {"type": "object", "properties": {
                "x": {"type": "number", "multipleOf": 3}}}}}]}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice" and "multipleOf" in r.text
