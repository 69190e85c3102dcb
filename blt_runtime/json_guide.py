"""JSON Schemas as regular expressions, for guided generation (guide.py): a completion held to one is JSON
that the schema validates.

Owns `schema_regex` (a schema -> a pattern ByteGuide.regex compiles) and `JSON_VALUE` (any JSON value,
objects and arrays nested up to ANY_DEPTH deep: `response_format` "json_object").

The text is compact JSON, with at most one space after a ":" or a ",". Objects list their properties in
the schema's order, the required ones always and the others where the model chooses; no others.
Supported: `type` (one or a list), `enum`, `const`, `properties` with `required`, `items` with
`minItems` and `maxItems`, `minLength` and `maxLength` of strings, `anyOf` and `oneOf` (as a choice
among the schemas: oneOf's "exactly one" is not checked), `allOf` of one schema, `$ref` to `#/$defs`
or `#/definitions` (not recursive), and annotations (`title`, `description`, `default`, ...). An object
with no `properties` has any keys, their values any JSON or what its `additionalProperties` says (a
dict of one type). Other constraints (`pattern`, `format`, `minimum`, `multipleOf`, `prefixItems`,
`additionalProperties` that is a schema beside `properties`, ...) are refused with a GuideError that
names them, rather than left unchecked.
"""

from __future__ import annotations

import json
import re

from .guide import GuideError

WS = "[ ]?"
STRING_CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'
STRING = f'"{STRING_CHAR}*"'
INTEGER = r"-?(?:0|[1-9][0-9]{0,17})"
NUMBER = INTEGER + r"(?:\.[0-9]{1,17})?(?:[eE][+-]?[0-9]{1,3})?"
SCALARS = {"string": STRING, "integer": INTEGER, "number": NUMBER, "boolean": "(?:true|false)", "null": "null"}
ANY_DEPTH = 3  # objects and arrays inside "any JSON value", nested this deep at most (8,590 states)
MAX_DEPTH = 24  # schemas nested (or $ref followed) deeper are refused: recursive schemas have no regex
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
               "readOnly", "writeOnly", "$defs", "definitions", "additionalProperties"}
HANDLED = {"type", "enum", "const", "properties", "required", "items", "minItems", "maxItems", "minLength",
           "maxLength", "anyOf", "oneOf", "allOf", "$ref"}


def _any_value(depth: int) -> str:
    options = list(SCALARS.values())
    if depth > 0:
        inner = _any_value(depth - 1)
        options.append(rf"\[{WS}(?:{inner}(?:,{WS}{inner})*)?\]")
        options.append(rf"\{{(?:{STRING}:{WS}{inner}(?:,{WS}{STRING}:{WS}{inner})*)?\}}")
    return "(?:" + "|".join(options) + ")"


JSON_VALUE = _any_value(ANY_DEPTH)


def _literal(value) -> str:
    return re.escape(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


class _Builder:
    def __init__(self, root):
        self.root = root

    def fail(self, why: str):
        raise GuideError(f"JSON schema: {why}")

    def resolve(self, ref: str):
        for prefix in ("#/$defs/", "#/definitions/"):
            if ref.startswith(prefix) and isinstance(self.root, dict):
                found = self.root.get(prefix[2:-1], {}).get(ref[len(prefix):])
                if found is not None:
                    return found
        self.fail(f"$ref {ref!r} must name a schema under #/$defs or #/definitions")

    def regex(self, schema, depth: int = 0) -> str:
        if depth > MAX_DEPTH:
            self.fail("nested too deeply (a recursive $ref has no regular expression)")
        if schema is True or schema == {}:
            return JSON_VALUE
        if schema is False:
            self.fail("false matches nothing")
        if not isinstance(schema, dict):
            self.fail(f"a schema must be an object, not {type(schema).__name__}")
        unknown = sorted(set(schema) - HANDLED - ANNOTATIONS)
        if unknown:
            self.fail(f"{', '.join(unknown)} not supported")
        if "$ref" in schema:
            rest = {k: v for k, v in schema.items() if k not in ANNOTATIONS | {"$ref"}}
            if rest:
                self.fail(f"$ref beside {', '.join(sorted(rest))} not supported")
            return self.regex(self.resolve(schema["$ref"]), depth + 1)
        if "const" in schema:
            return _literal(schema["const"])
        if "enum" in schema:
            if not schema["enum"]:
                self.fail("an empty enum matches nothing")
            return "(?:" + "|".join(_literal(v) for v in schema["enum"]) + ")"
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return "(?:" + "|".join(self.regex(s, depth + 1) for s in schema[key]) + ")"
        if "allOf" in schema:
            if len(schema["allOf"]) != 1:
                self.fail("allOf of more than one schema not supported")
            return self.regex(schema["allOf"][0], depth + 1)
        types = schema.get("type")
        if types is None:
            types = ["object"] if "properties" in schema else ["array"] if "items" in schema else None
            if types is None:
                return JSON_VALUE
        types = [types] if isinstance(types, str) else list(types)
        return "(?:" + "|".join(self.typed(t, schema, depth) for t in types) + ")"

    def typed(self, kind: str, schema: dict, depth: int) -> str:
        if kind == "string":
            least, most = schema.get("minLength", 0), schema.get("maxLength")
            if least == 0 and most is None:
                return STRING
            return f'"{STRING_CHAR}{{{least},{"" if most is None else most}}}"'
        if kind in SCALARS:
            return SCALARS[kind]
        if kind == "array":
            least, most = schema.get("minItems", 0), schema.get("maxItems")
            if most == 0:
                return r"\[\]"
            item = self.regex(schema.get("items", True), depth + 1)
            body = item + f"(?:,{WS}{item}){{{max(least - 1, 0)},{'' if most is None else most - 1}}}"
            return rf"\[{body}\]" if least > 0 else rf"\[(?:{body})?\]"
        if kind == "object":
            properties = schema.get("properties") or {}
            required = set(schema.get("required", []))
            missing = required - set(properties)
            if missing:
                self.fail(f"required {sorted(missing)} not among the properties")
            extra = schema.get("additionalProperties", True)
            if not properties:  # any keys: their values any JSON, or what additionalProperties says
                if extra is False:
                    return r"\{\}"
                value = JSON_VALUE if extra is True else self.regex(extra, depth + 1)
                return rf"\{{(?:{STRING}:{WS}{value}(?:,{WS}{STRING}:{WS}{value})*)?\}}"
            if extra not in (True, False):
                self.fail("additionalProperties that is a schema beside properties not supported")
            items = [(f"{_literal(name)}:{WS}{self.regex(sub, depth + 1)}", name in required)
                     for name, sub in properties.items()]
            return rf"\{{{_members(items)}\}}"
        self.fail(f"type {kind!r} not supported")


def _members(items: list[tuple[str, bool]]) -> str:
    """The object's members in order, comma-separated: required ones always, optional ones or not."""
    after = [""] * (len(items) + 1)  # after[k]: members k.. once one has been written (each after a comma)
    for k in range(len(items) - 1, -1, -1):
        member, required = items[k]
        after[k] = (f",{WS}{member}" if required else f"(?:,{WS}{member})?") + after[k + 1]
    first = ""  # members k.. when none has been written yet
    for k in range(len(items) - 1, -1, -1):
        member, required = items[k]
        first = member + after[k + 1] if required else f"(?:{member}{after[k + 1]}|{first})"
    return first


def schema_regex(schema) -> str:
    """A regular expression (guide.py's syntax) whose matches are the compact JSON texts `schema` validates
    (module docstring); a GuideError names what it cannot express."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise GuideError(f"JSON schema: not valid JSON ({e})") from None
    return _Builder(schema).regex(schema)
