"""JSON Schemas as guides (json_guide.py): every text the automaton allows is JSON the schema validates
(random walks, checked by json.loads and the jsonschema package), texts it should take it takes, and what
it cannot express is refused by name."""

import json
import random

import pytest
from guidewalk import walk

from blt_runtime.guide import ByteGuide, GuideError
from blt_runtime.json_guide import schema_guide, schema_regex
from blt_runtime.pushdown import PushdownGuide

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
    "formats": {"type": "object", "properties": {
        "day": {"type": "string", "format": "date"}, "at": {"type": "string", "format": "time"},
        "when": {"type": "string", "format": "date-time"}, "id": {"type": "string", "format": "uuid"},
        "ip": {"type": "string", "format": "ipv4"}, "mail": {"type": "string", "format": "email"},
        "site": {"type": "string", "format": "uri", "minLength": 1, "maxLength": 2083}},  # pydantic's HttpUrl
        "required": ["day", "at", "when", "id", "ip", "mail", "site"]},
    "patterns": {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{3}-\\d{2,4}$"},
        "inside": {"type": "string", "pattern": "x(yz)+"},  # searched for: anything around it
        "escaped": {"type": "string", "pattern": '^(["\\\\\t]|\\n|é)+$'},  # what JSON writes escaped
        "tail": {"type": "string", "pattern": "^ab"}}, "required": ["code", "inside", "escaped", "tail"]},
    "bounds": {"type": "object", "properties": {
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "level": {"type": "integer", "minimum": -3.5, "exclusiveMaximum": 10},
        "big": {"type": "integer", "exclusiveMinimum": 99999},
        "temperature": {"type": "number", "exclusiveMinimum": -5, "maximum": 40},
        "ratio": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
        "positive": {"type": ["number", "null"], "exclusiveMinimum": 0},
        "debt": {"type": "number", "maximum": -2}},
        "required": ["age", "level", "big", "temperature", "ratio", "positive", "debt"]},
    "tuples": {"type": "object", "properties": {
        "pair": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string", "maxLength": 3}],
                 "minItems": 2, "maxItems": 2},  # pydantic's tuple[int, str]
        "open": {"type": "array", "prefixItems": [{"type": "boolean"}, {"const": "x"}], "items": {"type": "null"},
                 "maxItems": 4},
        "short": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "integer"}], "items": False}},
        "required": ["pair", "open", "short"]},
    "draft7_tuple": {"$schema": "http://json-schema.org/draft-07/schema#", "type": "array",
                     "items": [{"const": 1}, {"enum": ["a", "b"]}], "additionalItems": False, "minItems": 1},
    # pydantic's Decimal: a number, or a string whose pattern looks ahead (refused, so left out of the anyOf)
    "decimal": {"anyOf": [{"type": "number"}, {"type": "string", "pattern": "^(?!^[-+.]*$)[+-]?0*\\d*\\.?\\d*$"}]},
    "secret": {"type": "string", "format": "password", "writeOnly": True},  # pydantic's SecretStr
    # recursive, at any depth (pydantic's Node with children: list[Node]; a binary tree; "#")
    "tree_of_nodes": {"$defs": {"Node": {"properties": {"name": {"maxLength": 4, "type": "string"}, "children": {
        "default": [], "items": {"$ref": "#/$defs/Node"}, "type": "array"}}, "required": ["name"],
        "type": "object"}}, "$ref": "#/$defs/Node"},
    "binary_tree": {"$defs": {"tree": {"type": "object", "properties": {
        "left": {"anyOf": [{"$ref": "#/$defs/tree"}, {"type": "null"}]},
        "right": {"anyOf": [{"$ref": "#/$defs/tree"}, {"type": "null"}]}}, "required": ["left", "right"]}},
        "$ref": "#/$defs/tree"},
    "nested_lists": {"type": "array", "items": {"anyOf": [{"type": "integer"}, {"$ref": "#"}]}, "maxItems": 3},
    # pydantic's dict[str, int] = Field(min_length=1, max_length=3), and a dict of anything, one entry at most
    "dicts": {"type": "object", "properties": {
        "counts": {"additionalProperties": {"type": "integer"}, "maxProperties": 3, "minProperties": 1,
                   "type": "object"},
        "one": {"type": "object", "maxProperties": 1}}, "required": ["counts", "one"]},
}
FORMATS = jsonschema.Draft202012Validator.FORMAT_CHECKER


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_text_a_schema_guide_allows_is_json_it_validates(name):
    schema = SCHEMAS[name]
    guide = schema_guide(schema)
    rng = random.Random(name)
    for _ in range(40):
        text = walk(guide, rng, stop=0.05)
        jsonschema.validate(json.loads(text.decode("utf-8")), schema, format_checker=FORMATS)


def test_the_texts_a_schema_should_take_it_takes():
    guide = schema_guide(PERSON)
    for value in ({"name": "Ann", "age": 3}, {"name": "Bob", "age": -12, "tags": ["é", "a"], "admin": False},
                  {"name": "C", "age": 0, "email": None, "score": 1.5e-3}):
        for separators in ((",", ":"), (", ", ": ")):
            text = json.dumps(value, ensure_ascii=False, separators=separators)
            assert guide.matches(text.encode()), text
    for bad in ('{"age": 3}', '{"name": "", "age": 3}', '{"name": "A", "age": 3.5}', '{"age": 3, "name": "A"}',
                '{"name": "A", "age": 3, "extra": 1}', '{"name": "A", "age": 03}',
                '{"name": "A", "age": 3, "tags": []}'):
        assert not guide.matches(bad.encode()), bad
    dicts = schema_guide(SCHEMAS["dicts"])
    assert dicts.matches(b'{"counts":{"a":1,"b":2},"one":{"x":[{"y":null}]}}')
    for bad in (b'{"counts":{},"one":{}}', b'{"counts":{"a":1,"b":2,"c":3,"d":4},"one":{}}',
                b'{"counts":{"a":1},"one":{"x":1,"y":2}}', b'{"counts":{"a":"1"},"one":{}}'):
        assert not dicts.matches(bad), bad
    strings = schema_guide(SCHEMAS["formats"])
    good = {"day": "2024-02-28", "at": "23:59:59.5+01:00", "when": "1999-12-31T00:00:00Z",
            "id": "123e4567-e89b-12d3-A456-426614174000", "ip": "192.168.0.1", "mail": "a.b+c@mail.example.org",
            "site": "https://example.com/a?b=1"}
    assert strings.matches(json.dumps(good).encode())
    for day in ("2024-02-29", "2000-02-29", "1996-02-29", "1200-02-29", "9996-02-29"):  # leap years
        assert strings.matches(json.dumps({**good, "day": day}).encode()), day
    for key, bad in (("day", "2024-02-30"), ("day", "2024-13-01"), ("day", "2023-02-29"), ("day", "1900-02-29"),
                     ("day", "2100-02-29"), ("day", "1002-02-29"), ("day", "0400-02-29"), ("at", "24:00:00Z"),
                     ("at", "12:00:00"),
                     ("ip", "256.1.1.1"), ("ip", "01.1.1.1"), ("id", "123e4567e89b12d3a456426614174000"),
                     ("mail", "no-at.example.com"), ("site", "ftp://x"), ("site", "https://a/" + "x" * 2074),
                     ("site", "https://a.1"), ("site", "https://a%20b")):
        assert not strings.matches(json.dumps({**good, key: bad}).encode()), (key, bad)
    numbers = schema_guide(SCHEMAS["bounds"])
    good = {"age": 120, "level": -3, "big": 100000, "temperature": -4.99, "ratio": 0, "positive": 0.001, "debt": -2}
    assert numbers.matches(json.dumps(good).encode())
    for key, bad in (("age", -1), ("age", 121), ("level", -4), ("level", 10), ("big", 99999), ("temperature", -5),
                     ("temperature", 40.5), ("ratio", 1), ("positive", 0), ("positive", "0.0"), ("debt", -1.5)):
        text = json.dumps({**good, key: bad}).replace('"0.0"', "0.0")
        assert not numbers.matches(text.encode()), (key, bad)
    patterns = schema_guide(SCHEMAS["patterns"])
    good = {"code": "ABC-123", "inside": 'a "quoted" xyzyz\n', "escaped": '"\\\t\n"é', "tail": "ab\u0000c"}
    assert patterns.matches(json.dumps(good, ensure_ascii=False).encode()), good
    # (a pattern's own characters are written as themselves, é and not \\u00e9; the text around a match as either)
    assert not patterns.matches(json.dumps(good, ensure_ascii=True).encode())
    assert patterns.matches(json.dumps({**good, "inside": "é xyz", "escaped": '"\t'}, ensure_ascii=True).encode())
    for key, bad in (("code", "AB-123"), ("code", "ABC-12345"), ("inside", "xy"), ("escaped", "a"), ("tail", "b")):
        assert not patterns.matches(json.dumps({**good, key: bad}).encode()), (key, bad)
    draft4 = schema_guide({"type": "integer", "minimum": 5, "exclusiveMinimum": True})
    assert draft4.matches(b"6") and not draft4.matches(b"5")
    any_value = schema_guide({})  # response_format json_object
    for text in ('{"a": [1, {"b": null}]}', '"x"', "[]", "-0.5e10", '{"k": "\\u00e9\\n"}', "[" * 500 + "]" * 500,
                 '{"a": ' * 100 + "1" + "}" * 100):
        assert any_value.matches(text.encode()), text
    for text in ("[" * 500 + "]" * 499, '{"a": 1,}', "[1 2]", '{"a" 1}'):
        assert not any_value.matches(text.encode()), text


@pytest.mark.parametrize("schema, words", [
    ({"type": "string", "pattern": "^a", "maxLength": 3}, "pattern with minLength or maxLength"),
    ({"type": "string", "format": "hostname"}, "format 'hostname' not supported"),
    ({"type": "string", "format": "date", "maxLength": 8}, "cut its texts"),
    ({"type": "string", "format": "uri", "maxLength": 100}, "maxLength under"),
    ({"type": "string", "format": "date", "pattern": "^1"}, "together"),
    ({"type": "string", "pattern": "(?=a)"}, "look-around"),
    ({"type": "number", "minimum": 0.5}, "not a whole number"), ({"type": "integer", "minimum": "0"}, "not a number"),
    ({"type": "integer", "minimum": 5, "exclusiveMaximum": 5}, "no integer lies"),
    ({"type": "integer", "multipleOf": 2}, "multipleOf"),
    ({"anyOf": [{"type": "integer", "multipleOf": 2}, {"type": "string", "format": "idn-email"}]}, "multipleOf"),
    ({"type": "array", "prefixItems": [{"type": "integer"}], "items": False, "minItems": 2}, "no array"),
    ({"type": "object", "properties": {"a": {}}, "additionalProperties": {"type": "string"}}, "additionalProperties"),
    ({"allOf": [{"type": "string"}, {"maxLength": 2}]}, "allOf"), ({"enum": []}, "empty enum"),
    ({"$ref": "http://example.com/s"}, "must name a schema under"),
    ({"type": "object", "properties": {}, "required": ["x"]}, "required"),
    ({"type": "object", "unevaluatedProperties": False}, "unevaluatedProperties"),
    ({"type": "object", "minProperties": 2}, "minProperties above 1"),
    ({"type": "object", "properties": {"a": {}}, "maxProperties": 1}, "beside properties"),
    ({"type": "object", "additionalProperties": False, "minProperties": 1}, "leaves no object"),
    ({"type": "tuple"}, "type 'tuple'"), ("{not json", "not valid JSON"), (False, "matches nothing"),
])
def test_what_a_schema_guide_cannot_express_is_refused_by_name(schema, words):
    with pytest.raises(GuideError, match=words):
        schema_regex(schema)


def test_a_recursive_schema_nests_at_any_depth():
    """A $ref inside itself is a rule that names itself (a PushdownGuide): nodes nested any depth are taken, and
    the texts a walk writes validate (above)."""
    def node(depth: int) -> dict:
        return {"name": "n"} if depth == 1 else {"name": "n", "children": [node(depth - 1)]}

    guide = schema_guide(SCHEMAS["tree_of_nodes"])
    assert isinstance(guide, PushdownGuide)
    assert all(guide.matches(json.dumps(node(d), separators=(",", ":")).encode()) for d in (1, 2, 3, 4, 50))
    assert guide.matches(b'{"name":"n","children":[{"name":"m","children":[]},{"name":"o"}]}')
    assert not guide.matches(b'{"name":"n","children":[{"name":"m","children":[{}]}]}')  # a node needs its name
    endless = {"$defs": {"n": {"type": "object", "properties": {"n": {"$ref": "#/$defs/n"}}, "required": ["n"]}},
               "$ref": "#/$defs/n"}  # no way out of the recursion
    with pytest.raises(GuideError, match="matches no text"):
        schema_guide(endless)
    # optional, it is left out: {} and nothing deeper
    optional = {"$defs": {"n": {"type": "object", "properties": {"n": {"$ref": "#/$defs/n"}}}}, "$ref": "#/$defs/n"}
    assert schema_guide(optional).matches(b'{"n":{"n":{"n":{}}}}')
    lists = schema_guide(SCHEMAS["nested_lists"])
    assert [lists.matches(t) for t in (b"[1,[2,[]]]", b"[[[]]]", b"[[[[[[[[]]]]]]]]", b"[1,2,3,4]")] == [
        True, True, True, False]
    with pytest.raises(GuideError, match="no regular expression"):
        schema_regex(SCHEMAS["nested_lists"])


def test_urls_a_uri_guide_allows_parse_as_pydantics_http_urls():
    """jsonschema has no uri check here: pydantic's URL parser (WHATWG's rules, as browsers) is the oracle."""
    pydantic = pytest.importorskip("pydantic", reason="the server's dependencies install pydantic")
    url = pydantic.TypeAdapter(pydantic.HttpUrl)
    guide = schema_guide({"type": "string", "format": "uri", "maxLength": 2083})
    rng = random.Random(7)
    for _ in range(60):
        url.validate_python(json.loads(walk(guide, rng, stop=0.1)))


def test_schemas_that_would_take_long_to_refuse_are_refused_at_once():
    import time

    fan_out = {"$defs": {f"d{i}": {"type": "object", "properties": {"a": {"$ref": f"#/$defs/d{i + 1}"},
                                                                     "b": {"$ref": f"#/$defs/d{i + 1}"}},
                                   "required": ["a", "b"]} for i in range(11)}, "$ref": "#/$defs/d0"}
    fan_out["$defs"]["d11"] = {"enum": [f"{i:030d}" for i in range(40)]}  # 2**11 of them
    deep = {"type": "object", "properties": {"a": {}}}
    for _ in range(30):
        deep = {"type": "object", "properties": {"a": deep}}
    for schema, words in ((fan_out, "too large"), (deep, "nested more than 24 deep")):
        start = time.perf_counter()
        with pytest.raises(GuideError, match=words):
            schema_regex(schema)
        assert time.perf_counter() - start < 5  # not every path of the recursion: the first that fails


def test_a_whitespace_pattern_takes_pretty_printed_json():
    """vLLM's whitespace_pattern: what it matches may follow ":" and "," and pad brackets; compact is default."""
    value = {"name": "Ann", "age": 3, "email": None, "tags": ["a", "é"]}  # in the schema's order
    pretty = schema_guide(PERSON, "[ \\n]*")
    for text in (json.dumps(value, indent=2, ensure_ascii=False), json.dumps(value, ensure_ascii=False),
                 json.dumps(value, separators=(",", ":"), ensure_ascii=False), '{ "name":"A",\n"age":0 }'):
        assert pretty.matches(text.encode()), text
    assert not schema_guide(PERSON).matches(json.dumps(value, indent=2).encode())
    assert not pretty.matches(b'{"name": "A", "age": 0}\n')  # nothing after the value
    rng = random.Random(3)
    for schema in (PERSON, SCHEMAS["tuples"], True):
        guide = schema_guide(schema, "[ \\t\\n]{0,4}")
        for _ in range(20):
            jsonschema.validate(json.loads(walk(guide, rng, stop=0.05).decode("utf-8")), schema,
                                format_checker=FORMATS)
    untyped = schema_guide({"description": "anything"}, "[ \\n]*")  # no type: any value, laid out
    assert untyped.matches(json.dumps({"a": [1, 2]}, indent=1).encode())
    for bad in ("x*", ".", "[ \\u00a0]"):
        with pytest.raises(GuideError, match="only spaces, tabs, newlines and carriage returns"):
            schema_regex(PERSON, bad)


def test_a_date_is_a_day_of_the_calendar():
    """Every year's February 29th, and every day of a leap year and of a common one, against datetime's
    calendar: the `date` format takes exactly the days that are."""
    import datetime

    from blt_runtime.json_strings import DATE

    guide = ByteGuide.regex(DATE)

    def real(y: int, m: int, d: int) -> bool:
        try:
            return bool(datetime.date(y, m, d))
        except ValueError:
            return False
    days = [(y, 2, 29) for y in range(1000, 10000)]
    days += [(y, m, d) for y in (2000, 2023) for m in range(1, 14) for d in range(0, 33)]
    for y, m, d in days:
        assert guide.matches(f"{y:04d}-{m:02d}-{d:02d}".encode()) == real(y, m, d), (y, m, d)
