"""tool_choice "auto" (server/tool_parser.py, --enable-auto-tool-choice --tool-call-parser hermes): the model's
own text is read as content and Hermes calls, <tool_call>{"name": ..., "arguments": ...}</tool_call>; or
(llama_tool_parser.py, llama3_json) as Llama 3's JSON calls, {"name": ..., "arguments": ...} objects separated by
';'; or (pythonic_tool_parser.py) as a Python list of calls, [f(a=1), g(b="x")]. However the text comes, a
stream's deltas add up to the whole answer; over HTTP a scripted engine writes the calls, and the official OpenAI
client reads them, whole and streamed."""

from __future__ import annotations

import json
import keyword

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai import OpenAI
from scripted import ScriptedEngine

from blt_runtime import Engine, load_model
from server.errors import ApiError
from server.llama_tool_parser import PYTHON_TAG, Llama3JsonCalls
from server.pythonic_tool_parser import PythonicCalls
from server.settings import TOOL_CALL_PARSERS
from server.tool_parser import END, PARSERS, START, HermesCalls
from server.tools import tool_calling

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


def read(text: str, cuts: list[int] = (), kind=HermesCalls) -> tuple[str, list[tuple[str, str, str]], dict]:
    """The text fed in pieces to a parser of `kind` -> (content, [(id, name, arguments)] the deltas add up to, the
    parser)."""
    parser, content, added, pieces, at = kind(), "", {}, [], 0
    for cut in list(cuts) + [len(text)]:
        pieces.append(text[at:at + cut])
        at += cut
    for piece in pieces:
        more, entries = parser.feed(piece)
        content += more
        for d in entries:
            call = added.setdefault(d["index"], [d.get("id"), d["function"].get("name"), ""])
            call[2] += d["function"]["arguments"]
    more, entries = parser.finish()
    content += more
    for d in entries:
        added.setdefault(d["index"], [d.get("id"), d["function"].get("name"), ""])[2] += d["function"]["arguments"]
    return content, [tuple(added[i]) for i in sorted(added)], parser


def call_text(name: str, arguments, order: str, indent: int | None) -> str:
    members = {"name": name, "arguments": arguments}
    if order == "arguments first":
        members = {"arguments": arguments, "name": name}
    elif order == "extra member":
        members = {**members, "id": 7}
    return json.dumps(members, indent=indent, ensure_ascii=False)


TEXT = st.text(alphabet=st.sampled_from(list("ab <>/{}\"_tolc\n:é")), max_size=30).filter(lambda t: START not in t)
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=6),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                        max_size=3), max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(before=TEXT, calls=st.lists(st.tuples(st.text(min_size=1, max_size=6), JSON_VALUES,
                                             st.sampled_from(["name first", "arguments first", "extra member"]),
                                             st.sampled_from([None, 2])), max_size=3),
       glue=st.sampled_from(["", "\n", " \n "]), after=TEXT, cuts=st.lists(st.integers(1, 9), max_size=50))
def test_content_and_calls_are_read_however_the_text_comes(before, calls, glue, after, cuts):
    text = before + "".join(f"{START}{glue}{call_text(*c)}{glue}{END}{glue}" for c in calls) + after
    content, streamed, parser = read(text, cuts)
    whole = parser.whole()
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in whole] == streamed
    assert len(streamed) == len(calls)
    for (_, name, arguments), (n, a, order, _) in zip(streamed, calls):
        assert name == n and json.loads(arguments) == a
        # as generated, where the call begins with its name; else its value's JSON
        assert arguments == json.dumps(a, ensure_ascii=False) if order == "arguments first" else arguments in text
    # the content: the text before the first call, and after the last unless it is whitespace
    trailing = glue + after if calls and after.strip() else "" if calls else after
    assert content == before + trailing
    assert parser.finish_reason("stop") == ("tool_calls" if calls else "stop")
    assert parser.finish_reason("length") == "length"
    assert read(text)[0] == content  # whole, in one piece


def test_a_call_streams_its_arguments_as_they_come():
    parser = HermesCalls()
    assert parser.feed("Let me look.\n<tool_") == ("Let me look.\n", [])
    assert parser.feed('call>\n{"name": "get_weather"') == ("", [])
    _, [opening] = parser.feed(', "arguments": {"ci')
    assert opening["function"] == {"name": "get_weather", "arguments": '{"ci'} and opening["index"] == 0
    rest = parser.feed('ty": "Paris"}}\n</tool_call>')
    assert rest == ("", [{"index": 0, "function": {"arguments": 'ty": "Paris"}'}}])
    assert parser.finish() == ("", [])
    assert parser.whole()[0]["function"]["arguments"] == '{"city": "Paris"}'


@pytest.mark.parametrize("text, content, calls", [
    ("no calls at all", "no calls at all", []),
    ("a <tool_call> is a tag", "a <tool_call> is a tag", []),  # not JSON: content, tags and all
    ("<tool_call>[1, 2]</tool_call>", "<tool_call>[1, 2]</tool_call>", []),
    ("ends in <tool_c", "ends in <tool_c", []),
    ('<tool_call>{"name": "f", "arguments": {"a": [1, 2', "", [("f", '{"a": [1, 2')]),  # cut by max_tokens
    ('<tool_call>{"arguments": {"a": 1}, "name": "f"}', "", [("f", '{"a": 1}')]),  # no end tag: read at the end
    ('<tool_call>{"name": "f"}</tool_call>', "", [("f", "{}")]),  # no arguments
    ('<tool_call>{"name": "f", "parameters": 3}</tool_call>', "", [("f", "3")]),
    ('<tool_call>{"name": "f", "arguments": {}}\nDone.', "\nDone.", [("f", "{}")]),  # never closed: text again
    ('<tool_call>{"name": "f", "arguments": "</tool_call>"}</tool_call>', "", [("f", '"</tool_call>"')]),
    ('x<tool_call>{"name": "f", "arguments": 1}</tool_call>\n\n<tool_call>{"name": "g", "arguments": 2}',
     "x", [("f", "1"), ("g", "2")]),
    ('<tool_call>{"name": "f", "arguments": null, "why": "{"}</tool_call> then <b>', " then <b>", [("f", "null")]),
])
def test_the_forms_a_model_may_write(text, content, calls):
    for cuts in ([], [1] * len(text), [3, 5] * len(text)):
        got, streamed, _ = read(text, cuts)
        assert (got, [(n, a) for _, n, a in streamed]) == (content, calls), cuts


LLAMA_AFTER = TEXT.filter(lambda t: t[:1] not in tuple(" \t\n\r;{"))  # begins no object, no separator


@settings(max_examples=300, deadline=None)
@given(tag=st.booleans(), calls=st.lists(st.tuples(st.text(min_size=1, max_size=6), JSON_VALUES,
                                                   st.sampled_from(["name first", "arguments first", "extra member"]),
                                                   st.sampled_from([None, 2])), min_size=1, max_size=3),
       glue=st.sampled_from(["; ", ";", " ;\n", "\n"]), after=LLAMA_AFTER,
       cuts=st.lists(st.integers(1, 9), max_size=50))
def test_llama3_json_calls_are_read_however_the_text_comes(tag, calls, glue, after, cuts):
    text = (PYTHON_TAG if tag else "") + glue.join(call_text(*c) for c in calls) + (glue + after if after else "")
    content, streamed, parser = read(text, cuts, Llama3JsonCalls)
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in parser.whole()] == streamed
    assert len(streamed) == len(calls) and content == after
    for (_, name, arguments), (n, a, order, _) in zip(streamed, calls):
        assert name == n and json.loads(arguments) == a
        assert arguments == json.dumps(a, ensure_ascii=False) if order == "arguments first" else arguments in text
    assert parser.finish_reason("stop") == "tool_calls" and read(text, [], Llama3JsonCalls)[0] == content


@pytest.mark.parametrize("text, content, calls", [
    ("no calls at all", "no calls at all", []),
    ('Sure: {"name": "f", "arguments": {}}', 'Sure: {"name": "f", "arguments": {}}', []),  # not at the start
    (' {"name": "f", "arguments": {}}', ' {"name": "f", "arguments": {}}', []),
    ("<|python", "<|python", []),
    ("<|python_tag|>", "", []),
    ('{"name": "f", "arguments": {"a": [1, 2', "", [("f", '{"a": [1, 2')]),  # cut by max_tokens
    ('{"arguments": {"a": 1}, "name": "f"', '{"arguments": {"a": 1}, "name": "f"', []),  # cut before it is
    # whole: no call can be read, so the text stays content
    ('{"answer": 42} and more', '{"answer": 42} and more', []),  # JSON, but no call
    ('{"name": "f"}; {"name": "g", "parameters": [1]};', "", [("f", "{}"), ("g", "[1]")]),
    ('{"name": "f", "arguments": {"s": "};{"}}\nDone.', "Done.", [("f", '{"s": "};{"}')]),
    ('{"name": "f", "arguments": 1}; {"x": 1} tail', '{"x": 1} tail', [("f", "1")]),
])
def test_the_llama3_json_forms_a_model_may_write(text, content, calls):
    for cuts in ([], [1] * len(text), [3, 5] * len(text)):
        got, streamed, _ = read(text, cuts, Llama3JsonCalls)
        assert (got, [(n, a) for _, n, a in streamed]) == (content, calls), cuts


IDENTIFIERS = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True).filter(lambda n: not keyword.iskeyword(n))


@settings(max_examples=300, deadline=None)
@given(calls=st.lists(st.tuples(IDENTIFIERS, st.dictionaries(IDENTIFIERS, JSON_VALUES, max_size=3)), min_size=1,
                      max_size=3),
       glue=st.sampled_from([", ", ",", ",\n  "]), after=TEXT, cuts=st.lists(st.integers(1, 9), max_size=50))
def test_pythonic_calls_are_read_however_the_text_comes(calls, glue, after, cuts):
    text = "[" + glue.join(f"{name}({', '.join(f'{k}={v!r}' for k, v in kw.items())})" for name, kw in calls) + \
        "]" + after
    content, streamed, parser = read(text, cuts, PythonicCalls)
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in parser.whole()] == streamed
    assert content == after and [(n, json.loads(a)) for _, n, a in streamed] == calls
    assert parser.finish_reason("stop") == "tool_calls" and read(text, [], PythonicCalls)[0] == content


@pytest.mark.parametrize("text, content, calls", [
    ("no calls at all", "no calls at all", []),
    ('Sure: [f(a=1)]', 'Sure: [f(a=1)]', []),  # not at the start
    ("[f()]", "", [("f", "{}")]),
    ('[f(s="a)b", t=\'c"\', u=[1, (2, 3)], v={"k": None}, w=True)]', "",
     [("f", '{"s": "a)b", "t": "c\\"", "u": [1, [2, 3]], "v": {"k": null}, "w": true}')]),
    ('[f(a=1), g(b="x")] done', " done", [("f", '{"a": 1}'), ("g", '{"b": "x"}')]),
    ("[f(a=1), g(b=2", ", g(b=2", [("f", '{"a": 1}')]),  # cut by max_tokens: what is not a whole call is text
    ("[f(a=x)] then", "[f(a=x)] then", []),  # not a literal: no call, the text from there on
    ("[f(1)]", "[f(1)]", []),  # positional: no call
    ("[f(a=1e999)]", "[f(a=1e999)]", []),  # no JSON for it
    ("[print(open('x').read())]", "[print(open('x').read())]", []),  # nothing is run: no literal, no call
    ("[f(a=1), 7]", ", 7]", [("f", '{"a": 1}')]),
    ("[]", "[]", []),
    ("[link text](https://x.org) and more", "[link text](https://x.org) and more", []),  # content at the space
    ("[f(a=1)] [x]", " [x]", [("f", '{"a": 1}')]),
    ("[f(a=1), x]", ", x]", [("f", '{"a": 1}')]),
    ("[f(a=[1, 2)]", "[f(a=[1, 2)]", []),
    ("[ ", "[ ", []),
])
def test_the_pythonic_forms_a_model_may_write(text, content, calls):
    for cuts in ([], [1] * len(text), [3, 5] * len(text)):
        got, streamed, _ = read(text, cuts, PythonicCalls)
        assert (got, [(n, a) for _, n, a in streamed]) == (content, calls), cuts


def test_what_tool_choice_auto_asks_for():
    assert tuple(PARSERS) == TOOL_CALL_PARSERS
    with pytest.raises(ApiError, match="--enable-auto-tool-choice"):
        tool_calling(TOOLS, None, None)
    auto = tool_calling(TOOLS, None, None, "hermes")
    assert auto.schema is None and auto.parser == "hermes" and not auto.one_call
    assert tool_calling(TOOLS, "auto", False, "hermes").one_call
    assert tool_calling(None, "auto", None, "hermes") is None  # no tools: plain text
    assert tool_calling(TOOLS, "required", None, "hermes").schema is not None  # the others as before


# ------------------------------------------------------------------------------------------- over HTTP
TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
            "{% if tools %}<tools>{{ tools | tojson }}\n{% endif %}<assistant>")
CHAT = [{"role": "user", "content": "Weather?"}]
PROMPT = ('<user>Weather?\n<tools>' + json.dumps(TOOLS, ensure_ascii=False) + '\n<assistant>').encode()
SCRIPT = ('I will look it up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Köln"}}\n</tool_call>\n'
          '<tool_call>\n{"arguments": {"city": "Oslo"}, "name": "get_weather"}\n</tool_call>\n').encode()


@pytest.fixture
def scripted(serve):
    url, _ = serve(ScriptedEngine({PROMPT: SCRIPT}, default=b"plain"), chat_template=TEMPLATE,
                   enable_auto_tool_choice=True, tool_call_parser="hermes")
    return url, OpenAI(base_url=f"{url}/v1", api_key="unused")


def streamed(client: OpenAI, **kw) -> tuple[str, list[tuple[str, str, str]], str]:
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, [d.id, d.function.name, ""])
                call[2] += d.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, [tuple(calls[i]) for i in sorted(calls)], finish


def test_auto_reads_the_models_calls_whole_and_streamed(scripted):
    _, client = scripted
    kw = dict(model="tiny", messages=CHAT, tools=TOOLS, max_tokens=500)
    out = client.chat.completions.create(**kw)
    message, finish = out.choices[0].message, out.choices[0].finish_reason
    assert message.content == "I will look it up.\n" and finish == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == [
        ("get_weather", '{"city": "Köln"}'), ("get_weather", '{"city": "Oslo"}')]
    assert len({c.id for c in message.tool_calls}) == 2 and out.usage.completion_tokens == len(SCRIPT)
    content, calls, finish = streamed(client, **kw)
    assert content == message.content and finish == "tool_calls"
    assert [(n, a) for _, n, a in calls] == [(c.function.name, c.function.arguments) for c in message.tool_calls]
    # each of n choices is read on its own
    two = client.chat.completions.create(**kw, n=2)
    assert [[c.function.arguments for c in choice.message.tool_calls] for choice in two.choices] == [
        ['{"city": "Köln"}', '{"city": "Oslo"}']] * 2
    assert len({c.id for choice in two.choices for c in choice.message.tool_calls}) == 4
    # cut by max_tokens inside the first call's arguments: the call as far as it was written
    cut = client.chat.completions.create(**{**kw, "max_tokens": SCRIPT.index(b"ln")})
    assert cut.choices[0].finish_reason == "length"
    assert [(c.function.name, c.function.arguments) for c in cut.choices[0].message.tool_calls] == [
        ("get_weather", '{"city": "Kö')]


def test_parallel_tool_calls_false_stops_after_the_first_call(scripted):
    _, client = scripted
    kw = dict(model="tiny", messages=CHAT, tools=TOOLS, max_tokens=500, parallel_tool_calls=False)
    out = client.chat.completions.create(**kw)
    assert [c.function.arguments for c in out.choices[0].message.tool_calls] == ['{"city": "Köln"}']
    assert out.choices[0].finish_reason == "tool_calls"
    assert out.usage.completion_tokens == SCRIPT.index(END.encode()) + len(END)
    assert streamed(client, **kw)[1][0][2] == '{"city": "Köln"}'


LLAMA_SCRIPT = ('<|python_tag|>{"name": "get_weather", "arguments": {"city": "Köln"}}; '
                '{"parameters": {"city": "Oslo"}, "name": "get_weather"}').encode()


@pytest.mark.parametrize("parser, script", [
    ("llama3_json", LLAMA_SCRIPT), ("pythonic", '[get_weather(city="Köln"), get_weather(city=\'Oslo\')]'.encode())])
def test_llama3_json_and_pythonic_calls_over_http(serve, parser, script):
    url, _ = serve(ScriptedEngine({PROMPT: script}, default=b"plain"), chat_template=TEMPLATE,
                   enable_auto_tool_choice=True, tool_call_parser=parser)
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    kw = dict(model="tiny", messages=CHAT, tools=TOOLS, max_tokens=500)
    out = client.chat.completions.create(**kw).choices[0]
    assert out.message.content == "" and out.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in out.message.tool_calls] == [
        ("get_weather", '{"city": "Köln"}'), ("get_weather", '{"city": "Oslo"}')]
    content, calls, finish = streamed(client, **kw)
    assert content == "" and finish == "tool_calls"
    assert [(n, a) for _, n, a in calls] == [(c.function.name, c.function.arguments) for c in out.message.tool_calls]
    plain = client.chat.completions.create(**{**kw, "messages": [{"role": "user", "content": "Hi"}]}).choices[0]
    assert plain.message.content == "plain" and not plain.message.tool_calls and plain.finish_reason == "stop"
    r = httpx.post(f"{url}/v1/chat/completions", json={**kw, "parallel_tool_calls": False}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "parallel_tool_calls", r.text


def test_text_without_calls_is_content_and_none_reads_nothing(scripted):
    url, client = scripted
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], tools=TOOLS,
                                         max_tokens=50)
    assert out.choices[0].message.content == "plain" and not out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "stop"
    none = client.chat.completions.create(model="tiny", messages=CHAT, tools=TOOLS, tool_choice="none", max_tokens=500)
    assert none.choices[0].message.content == SCRIPT.decode() and not none.choices[0].message.tool_calls


def test_auto_is_a_400_without_the_flags(serve):
    url, _ = serve(ScriptedEngine({}, default=b"x"), chat_template=TEMPLATE)
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": CHAT, "tools": TOOLS}, timeout=60)
    assert r.status_code == 400 and "--enable-auto-tool-choice" in r.text and r.json()["error"]["param"] == \
        "tool_choice"


def test_a_models_text_is_the_same_content_with_auto(serve, tiny):
    """On a real engine: a random model's text, read by the parser (no calls in it), is the content that
    tool_choice "none" gives for the same seed."""
    url, _ = serve(Engine(load_model(tiny), max_batch_size=2), chat_template=TEMPLATE, enable_auto_tool_choice=True,
                   tool_call_parser="hermes")
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    kw = dict(model="tiny", messages=CHAT, tools=TOOLS, max_tokens=60, seed=5, temperature=1.0)
    none = client.chat.completions.create(tool_choice="none", **kw).choices[0].message.content
    auto = client.chat.completions.create(**kw).choices[0]
    assert START not in none and auto.message.content == none and not auto.message.tool_calls
    assert streamed(client, **kw)[0] == none


def test_long_runs_of_whitespace_are_read_in_one_pass():
    """Whitespace before a call's name, after its object and between calls, 200,000 characters of each: read
    in time linear in the text (a quadratic reading took minutes), and as the short forms are."""
    import time

    spaces = " \n" * 100_000
    text = f'{START}{{{spaces}"name": "f", "arguments": 1}}{spaces}{END}{spaces}{START}{{"name": "g"}}{END}{spaces}x'
    start = time.perf_counter()
    content, calls, _ = read(text, [4096] * 200)
    assert time.perf_counter() - start < 10
    assert content == spaces + "x" and [(n, a) for _, n, a in calls] == [("f", "1"), ("g", "{}")]
