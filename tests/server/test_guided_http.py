"""Guided completions over HTTP (server/guided.py): vLLM's guided_regex, guided_choice, guided_json and
structured_outputs, and OpenAI's response_format, streaming or not, through the official OpenAI client
too; what the server does not do is a 400 that says so, never ignored."""

from __future__ import annotations

import re

import httpx
import pytest
from openai import OpenAI
from serverkit import metric_value, metrics_text, sse_events

from blt_runtime import Engine, load_model

DATE = r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"


@pytest.fixture
def url(serve, tiny):
    url, _ = serve(Engine(load_model(tiny), max_batch_size=4))
    return url


def test_guided_completions_match_their_guide(url):
    with httpx.Client(timeout=120) as c:
        r = c.post(f"{url}/v1/completions", json={"prompt": "The date: ", "max_tokens": 40, "n": 3, "seed": 4,
                                                   "guided_regex": DATE})
        assert r.status_code == 200, r.text
        for choice in r.json()["choices"]:
            assert re.fullmatch(DATE, choice["text"]) and choice["finish_reason"] == "stop", choice
        r = c.post(f"{url}/v1/completions", json={"prompt": "Pick: ", "max_tokens": 40, "temperature": 0,
                                                   "structured_outputs": {"choice": ["red", "green", "blue"]}})
        assert r.json()["choices"][0]["text"] in ("red", "green", "blue")
        with c.stream("POST", f"{url}/v1/completions", json={
                "prompt": "Say: ", "max_tokens": 60, "stream": True, "temperature": 1.5, "seed": 1,
                "structured_outputs": {"regex": r"(ab|cd|é){3,8}!"}}) as r:
            events = sse_events(r.read().decode())
        text = "".join(e["choices"][0]["text"] for e in events[:-1])
        assert re.fullmatch(r"(ab|cd|é){3,8}!", text) and events[-2]["choices"][0]["finish_reason"] == "stop"


def test_a_recursive_pydantic_model_guides_and_parses(url):
    """A model with a list of itself (a recursive $ref, a PushdownGuide): what comes back validates as it."""
    from pydantic import BaseModel, Field

    class Node(BaseModel):
        name: str = Field(max_length=6)
        children: list[Node] = Field(default_factory=list, max_length=2)

    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    for seed in range(3):  # nodes nest at any depth: these seeds' trees end within max_tokens (finish_reason)
        out = client.completions.create(model="tiny", prompt="A tree: ", max_tokens=1000, seed=seed, temperature=0.9,
                                        extra_body={"guided_json": Node.model_json_schema()})
        assert out.choices[0].finish_reason == "stop"
        Node.model_validate_json(out.choices[0].text)


SQL = """
root ::= "SELECT " column " FROM " table (" WHERE " condition)? ";"
column ::= "id" | "name" | "age"   # vLLM's example, a little larger
table ::= "users" | "orders"
condition ::= column " = " ([0-9]+ | "'" [a-z]{1,8} "'")
"""
SQL_RE = r"SELECT (id|name|age) FROM (users|orders)( WHERE (id|name|age) = ([0-9]+|'[a-z]{1,8}'))?;"
LARK_SQL = """
start: "SELECT " column " FROM " table [" WHERE " condition] ";"
column: "id" | "name" | "age"  // the same in Lark's syntax
table: "users" | "orders"
condition: column " = " (/[0-9]+/ | "'" /[a-z]{1,8}/ "'")
"""


def test_grammar_completions_are_what_the_grammar_derives(url):
    """vLLM's guided_grammar (and structured_outputs.grammar): a GBNF grammar, or Lark's; whole and streamed,
    through the official client."""
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    for seed in range(3):
        for how in ({"guided_grammar": SQL}, {"structured_outputs": {"grammar": SQL}}, {"guided_grammar": LARK_SQL}):
            out = client.completions.create(model="tiny", prompt="Query: ", max_tokens=100, seed=seed,
                                            temperature=1.2, extra_body=how)
            assert re.fullmatch(SQL_RE, out.choices[0].text) and out.choices[0].finish_reason == "stop", out
    stream = client.completions.create(model="tiny", prompt="Query: ", max_tokens=100, seed=7, stream=True,
                                       extra_body={"guided_grammar": SQL})
    assert re.fullmatch(SQL_RE, "".join(chunk.choices[0].text for chunk in stream))


def test_json_completions_parse_and_validate(url):
    import json

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer"}}, "required": ["name", "age"]}
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    for how in ({"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}},
                {"guided_json": schema}, {"structured_outputs": {"json": schema}}):
        out = client.completions.create(model="tiny", prompt="A person: ", max_tokens=200, seed=3, extra_body=how)
        assert out.choices[0].finish_reason == "stop", out  # at its "}" nothing may follow: well within 200 bytes
        value = json.loads(out.choices[0].text)
        assert list(value) == ["name", "age"]  # in the schema's order, not sorted
        assert isinstance(value["age"], int) and len(value["name"]) <= 8
    out = client.completions.create(model="tiny", prompt="JSON: ", max_tokens=300, seed=1, temperature=0.3,
                                    extra_body={"response_format": {"type": "json_object"}})
    if out.choices[0].finish_reason == "stop":
        json.loads(out.choices[0].text)


def test_a_pydantic_models_schema_gives_text_the_model_validates(url):
    """What pydantic writes for datetime, date, UUID, HttpUrl, tuples, Decimal, SecretStr and bounded fields:
    formats, lengths, bounds, prefixItems, an anyOf with a pattern that looks ahead."""
    from datetime import date, datetime
    from decimal import Decimal
    from uuid import UUID

    from pydantic import BaseModel, Field, HttpUrl, SecretStr

    class Event(BaseModel):
        name: str = Field(max_length=10)
        when: datetime
        day: date
        id: UUID
        url: HttpUrl
        attendees: int = Field(ge=1, le=500)
        price: float = Field(gt=0)
        seat: tuple[int, bool]
        amount: Decimal
        code: SecretStr = Field(max_length=8)

    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    for seed in range(3):
        out = client.completions.create(model="tiny", prompt="An event: ", max_tokens=1500, seed=seed, extra_body={
            "response_format": {"type": "json_schema", "json_schema": {"name": "event",
                                                                       "schema": Event.model_json_schema()}}})
        assert out.choices[0].finish_reason == "stop", out
        event = Event.model_validate_json(out.choices[0].text)
        assert 1 <= event.attendees <= 500 and event.price > 0


def test_a_whitespace_pattern_lets_json_breathe(url):
    import json

    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
                                               "b": {"type": "boolean"}}, "required": ["a", "b"]}
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    for how in ({"guided_json": schema, "guided_whitespace_pattern": "[ \n]{0,3}"},
                {"structured_outputs": {"json": schema, "whitespace_pattern": "[ \n]{0,3}"}},
                {"response_format": {"type": "json_object"}, "guided_whitespace_pattern": "[\n]?"}):
        out = client.completions.create(model="tiny", prompt="JSON:", max_tokens=400, seed=5, extra_body=how)
        if "guided_json" in how or "structured_outputs" in how:
            assert out.choices[0].finish_reason == "stop", out
        if out.choices[0].finish_reason == "stop":
            json.loads(out.choices[0].text)


def test_the_openai_client_sends_a_guide_in_extra_body(url):
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    out = client.completions.create(model="tiny", prompt="Answer: ", max_tokens=20,
                                    extra_body={"guided_choice": ["yes", "no"]})
    assert out.choices[0].text in ("yes", "no") and out.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body, param, words", [
    ({"guided_regex": "(?=a)b"}, "guided_regex", "look-around"),
    ({"guided_regex": "a{3,2}"}, "guided_regex", "min repeat"),
    ({"guided_choice": []}, "guided_choice", "non-empty"),
    ({"guided_regex": "(a{0})?"}, "guided_regex", "only the empty text"),
    ({"structured_outputs": {"regex": "[^\\s\\S]"}}, "structured_outputs", "matches no text"),
    ({"guided_json": {"type": "string", "format": "hostname"}}, "guided_json", "format 'hostname' not supported"),
    ({"structured_outputs": {"json": "{oops"}}, "structured_outputs", "not valid JSON"),
    ({"guided_grammar": "root ::= 'a'"}, "guided_grammar", "unexpected \"'\" (line 1, column 10)"),
    ({"structured_outputs": {"grammar": 'root ::= "a" x'}}, "structured_outputs", "no rule named 'x'"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "response_format", "must be text, json_object or json_schema"),
    ({"guided_json": {"type": "integer"}, "response_format": {"type": "json_object"}}, "response_format",
     "one guide at a time"),
    ({"structured_outputs": {}}, "structured_outputs", "asks for nothing"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "one guide at a time"),
    ({"guided_regex": "a", "guided_whitespace_pattern": " *"}, "guided_whitespace_pattern", "JSON guides only"),
    ({"guided_whitespace_pattern": " *"}, "guided_whitespace_pattern", "asks for none"),
    ({"guided_json": {"type": "integer"}, "guided_whitespace_pattern": "x*"}, "guided_whitespace_pattern",
     "only spaces, tabs"),
    ({"structured_outputs": {"json_object": True, "whitespace_pattern": "(?=x)"}}, "structured_outputs",
     "look-around"),
    ({"allowed_token_ids": []}, "allowed_token_ids", "only the empty text"),
    ({"allowed_token_ids": [256]}, "allowed_token_ids", "less than or equal to 255"),
    ({"guided_regex": "ab+", "bad_words": ["b"]}, "guided_regex", "matches no text"),
    ({"bad_words": [""]}, "bad_words", "at least 1 character"),
    ({"guided_choice": ["yes", "no"], "allowed_token_ids": [121, 101]}, "guided_choice", "matches no text"),
    ({"guided_grammar": 'root ::= a\na ::= b "x" | "y"\nb ::= a "z"'}, "guided_grammar", "can come first in itself"),
])
def test_what_cannot_guide_is_a_400_naming_the_field(url, body, param, words):
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 5} | body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_allowed_bytes_and_bad_words_hold_with_a_guide_or_alone(url):
    """vLLM's allowed_token_ids (here bytes) and bad_words: alone, or with a guide (the texts both allow)."""
    lower = list(range(ord("a"), ord("z") + 1)) + [ord(" ")]
    with httpx.Client(timeout=120) as c:
        for seed in range(3):
            body = {"prompt": "The ", "max_tokens": 60, "temperature": 1.5, "seed": seed, "ignore_eos": True}
            text = c.post(f"{url}/v1/completions", json={**body, "allowed_token_ids": lower}).json()["choices"][0]
            assert re.fullmatch("[a-z ]{60}", text["text"]), text
            bad = ["e", "th", "in ", "é"]
            r = c.post(f"{url}/v1/completions", json={**body, "bad_words": bad, "stream": seed == 1})
            events = sse_events(r.text) if seed == 1 else [r.json()]
            raw = "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict) and e["choices"])
            assert len(raw.encode()) >= 60 and not any(w in raw for w in bad), raw
            guided = c.post(f"{url}/v1/completions", json={**body, "guided_regex": r"[a-z]+( [a-z]+)*\.",
                                                            "bad_words": ["e"], "allowed_token_ids": lower + [46]})
            choice = guided.json()["choices"][0]
            whole = choice["finish_reason"] == "stop"  # else out of bytes: a prefix of a match
            assert re.fullmatch(r"[a-z]+( [a-z]+)*\." if whole else r"[a-z]+( [a-z]+)* ?", choice["text"]), choice
            assert "e" not in choice["text"]


def test_a_text_response_format_is_plain_completion(url):
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 5, "ignore_eos": True,
                                                   "response_format": {"type": "text"}}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 5


def test_bytes_a_guide_forces_stream_as_sampled_ones_would(serve, tiny):
    """Guided jump-forward changes no text and no logprob: streamed, each choice's text is the same as with
    --jump-forward 0, in fewer chunks (the bytes forced together come in one); the bytes forced are counted
    (blt_guided_forced_bytes_total)."""
    schema = {"type": "object", "properties": {"mood": {"enum": ["angry", "merry", "sorrowful"]},
                                               "line": {"type": "string", "maxLength": 20}},
              "required": ["mood", "line"]}
    body = {"prompt": "A line: ", "max_tokens": 120, "stream": True, "seed": 7, "n": 2, "guided_json": schema,
            "logprobs": 1}
    texts, chunks, scores = {}, {}, {}
    for least in (0, 2):
        url, _ = serve(Engine(load_model(tiny), max_batch_size=4, jump_forward=least))
        with httpx.Client(timeout=120) as c, c.stream("POST", f"{url}/v1/completions", json=body) as r:
            events = [e for e in sse_events(r.read().decode()) if isinstance(e, dict) and e["choices"]]
        texts[least] = ["".join(e["choices"][0]["text"] for e in events if e["choices"][0]["index"] == i)
                        for i in (0, 1)]
        scores[least] = [v for i in (0, 1) for e in events if e["choices"][0]["index"] == i
                         for v in e["choices"][0]["logprobs"]["token_logprobs"]]
        chunks[least] = len(events)
        forced = metric_value(metrics_text(url), "blt_guided_forced_bytes_total")
        assert forced == 0 if least == 0 else forced >= 2 * len('{"mood":'), forced
    assert texts[0] == texts[2] and chunks[2] < chunks[0]
    assert scores[2] == pytest.approx(scores[0], abs=1e-4) and len(scores[0]) == sum(len(t.encode()) for t in texts[0])
    assert all(text.startswith('{"mood":') for text in texts[2])
