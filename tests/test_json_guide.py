"""JSON Schemas as guides (json_guide.py): every text the automaton allows is JSON the schema validates
(random walks, checked by json.loads and the jsonschema package), texts it should take it takes, and what
it cannot express is refused by name."""

import json
import random

import pytest

from blt_runtime.guide import ByteGuide, GuideError
from blt_runtime.json_guide import JSON_VALUE, schema_regex

jsonschema = pytest.importorskip("jsonschema", reason="the test extra installs jsonschema")

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 12},
    "age": {"type": "integer"},
    "email": {"type": ["string", "null"]},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "é"]}, "minItems": 1, "maxItems": 3},
    "score": {"type": "number"},
    "admin": {"type": "boolean"}}, "required": ["name", "age"]}
SCHEMAS = {
    "person": PERSON,
    "refs": {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                                 "required": ["x", "y"]}},
             "type": "object", "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"},
                                              "label": {"const": "line"}}, "required": ["from", "to"]},
    "choices": {"anyOf": [{"type": "integer"}, {"enum": [True, None]}, {"type": "array", "maxItems": 2}]},
    "optional_only": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"},
                                                       "c": {"type": "null"}}},
    "any_object": {"type": "object"},
    "dict_of_integers": {"type": "object", "additionalProperties": {"type": "integer"}},
    "empty_object": {"type": "object", "additionalProperties": False},
    "anything": True,
}


def walk(guide: ByteGuide, rng: random.Random, stop: float = 0.3) -> bytes:
    """A random text the guide allows, ending at a whole match (the shortest way there after 200 bytes)."""
    back = [[] for _ in guide.next]  # the shortest way to a match: breadth first from the accepting states
    for s, row in enumerate(guide.next):
        for t in set(row) - {-1}:
            back[t].append(s)
    distance = [0 if a else None for a in guide.accepting]
    queue = [s for s, a in enumerate(guide.accepting) if a]
    for s in queue:
        for p in back[s]:
            if distance[p] is None:
                distance[p] = distance[s] + 1
                queue.append(p)
    state, out = 0, bytearray()
    while not (guide.accepting[state] and (not guide.allowed[state] or len(out) > 200 or rng.random() < stop)):
        choices = guide.allowed[state]
        if len(out) > 200:
            choices = [b for b in choices if distance[guide.next[state][b]] < distance[state]]
        b = rng.choice(choices)
        out.append(b)
        state = guide.next[state][b]
    return bytes(out)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_text_a_schema_guide_allows_is_json_it_validates(name):
    schema = SCHEMAS[name]
    guide = ByteGuide.regex(schema_regex(schema))
    rng = random.Random(name)
    for _ in range(40):
        text = walk(guide, rng, stop=0.05)
        jsonschema.validate(json.loads(text.decode("utf-8")), schema)


def test_the_texts_a_schema_should_take_it_takes():
    guide = ByteGuide.regex(schema_regex(PERSON))
    for value in ({"name": "Ann", "age": 3}, {"name": "Bob", "age": -12, "tags": ["é", "a"], "admin": False},
                  {"name": "C", "age": 0, "email": None, "score": 1.5e-3}):
        for separators in ((",", ":"), (", ", ": ")):
            text = json.dumps(value, ensure_ascii=False, separators=separators)
            assert guide.matches(text.encode()), text
    for bad in ('{"age": 3}', '{"name": "", "age": 3}', '{"name": "A", "age": 3.5}', '{"age": 3, "name": "A"}',
                '{"name": "A", "age": 3, "extra": 1}', '{"name": "A", "age": 03}',
                '{"name": "A", "age": 3, "tags": []}'):
        assert not guide.matches(bad.encode()), bad
    any_value = ByteGuide.regex(JSON_VALUE)
    for text in ('{"a": [1, {"b": null}]}', '"x"', "[]", "-0.5e10", '{"k": "\\u00e9\\n"}'):
        assert any_value.matches(text.encode()), text


@pytest.mark.parametrize("schema, words", [
    ({"type": "string", "pattern": "^a"}, "pattern"), ({"type": "string", "format": "date"}, "format"),
    ({"type": "integer", "minimum": 0}, "minimum"), ({"$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}}},
                                                     "$ref": "#/$defs/n"}, "recursive"),
    ({"type": "object", "properties": {"a": {}}, "additionalProperties": {"type": "string"}}, "additionalProperties"),
    ({"allOf": [{"type": "string"}, {"maxLength": 2}]}, "allOf"), ({"enum": []}, "empty enum"),
    ({"$ref": "http://example.com/s"}, "must name a schema under"),
    ({"type": "object", "properties": {}, "required": ["x"]}, "required"),
    ({"type": "object", "unevaluatedProperties": False}, "unevaluatedProperties"),
    ({"type": "tuple"}, "type 'tuple'"), ("{not json", "not valid JSON"), (False, "matches nothing"),
])
def test_what_a_schema_guide_cannot_express_is_refused_by_name(schema, words):
    with pytest.raises(GuideError, match=words):
        schema_regex(schema)
