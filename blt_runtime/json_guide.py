"""JSON Schemas as guides (guide.py, pushdown.py): a completion held to one is JSON that the schema validates.

Owns `schema_guide` (a schema -> the guide of its texts) and `schema_regex` (a schema without recursion -> a
pattern ByteGuide.regex compiles). Any JSON value (`response_format` "json_object", `{}`, an object with no
properties) nests at any depth, as do recursive schemas: they are rules that name themselves, `(?&value)`
and `(?&refN)` in their patterns, and their guide a PushdownGuide (pushdown.py); a schema without either is
one pattern, one automaton (ByteGuide).

The text is compact JSON, with at most one space after a ":" or a ","; or, with a whitespace pattern
(vLLM's whitespace_pattern), what it matches there and inside brackets, so that "[ \\n]*" takes
pretty-printed JSON. Objects list their properties in the schema's order, the required ones always and
the others where the model chooses; no others.
Supported: `type` (one or a list), `enum`, `const`, `properties` with `required`, `prefixItems` (a
tuple's elements; draft 7's list of `items` with `additionalItems` too) and `items` with `minItems` and
`maxItems`, `minLength` and `maxLength` of strings, `anyOf` and `oneOf` (as a choice among the schemas:
oneOf's "exactly one" is not checked; a schema among them that cannot be expressed is left out, where
another can), `allOf` of one schema, `$ref` to `#/$defs`, `#/definitions` or `#` (a recursive one, a tree of
nodes, at any depth; one that cannot end, a required property that needs itself, matches no text and is
refused, and an optional property or an anyOf's option that would need such a schema is left out), and
annotations (`title`, `description`, `default`, ...). Strings
take `format` and `pattern` (json_strings.py); integers and numbers `minimum`, `maximum` and their
exclusive forms (number_range.py; a number's bounds whole numbers). An object with no `properties`
has any keys, their values any JSON or what its `additionalProperties` says (a dict of one type), as many as
its `maxProperties` allows and at least its `minProperties` if that is 1 (pydantic's dict with min_length=1;
more is refused: keys may repeat in JSON, and a reader keeps the last).
Other constraints (`multipleOf`, `uniqueItems`, `additionalProperties` that is a schema beside
`properties`, a format beside a pattern, ...) are refused with a GuideError that names them, rather
than left unchecked.
"""

from __future__ import annotations

import json
import math
import re

from .guide import ByteGuide, GuideError
from .json_strings import ANNOTATION_FORMATS, STRING_CHAR, format_content, pattern_content
from .number_range import integer_range, number_range
from .pushdown import Guide, PushdownGuide
from .regex_syntax import Alt, Cat, Chars, parse

WS = "[ ]?"
STRING = f'"{STRING_CHAR}*"'
INTEGER = r"-?(?:0|[1-9][0-9]{0,17})"
# exponents of two digits at most: a reader's double stays finite (1e999 would be read as infinity, which
# pydantic refuses, among others)
NUMBER = INTEGER + r"(?:\.[0-9]{1,17})?(?:[eE][+-]?[0-9]{1,2})?"
SCALARS = {"string": STRING, "integer": INTEGER, "number": NUMBER, "boolean": "(?:true|false)", "null": "null"}
MAX_DEPTH = 24  # schemas nested (or $ref followed) deeper are refused
ANY_VALUE = "(?&value)"  # any JSON value: the rule `value` (value_rule)
MAX_PATTERN = 1_000_000  # characters of pattern: a schema whose $refs fan out (each definition using the next
# twice) would double it at every level; ByteGuide would refuse it anyway, after much longer
JSON_SPACE = {0x09, 0x0A, 0x0D, 0x20}  # the characters JSON allows between its tokens
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
               "readOnly", "writeOnly", "$defs", "definitions", "additionalProperties"}
HANDLED = {"type", "enum", "const", "properties", "required", "items", "minItems", "maxItems", "minProperties",
           "maxProperties", "minLength",
           "maxLength", "anyOf", "oneOf", "allOf", "$ref", "format", "pattern", "minimum", "maximum",
           "exclusiveMinimum", "exclusiveMaximum", "prefixItems", "additionalItems"}


class _Refused(GuideError):
    """A schema refused as a whole, never left out of an anyOf: too deep (recursive), or too large."""


def layout(whitespace: str | None = None) -> tuple[str, str]:
    """(what may follow a ":" or a ",", what may follow a "{" or "[" and come before a "}" or "]"): compact
    JSON's ("[ ]?", nothing), or a pattern of JSON's whitespace for both (vLLM's whitespace_pattern:
    "[ \\n]*" takes pretty-printed JSON)."""
    if whitespace is None:
        return WS, ""
    chars, stack = [], [parse(whitespace)]
    while stack:
        node = stack.pop()
        if isinstance(node, Chars):
            chars += node.ranges
        else:
            stack += node.parts if isinstance(node, Cat) else node.options if isinstance(node, Alt) else [node.node]
    if any(hi - lo > 3 or not JSON_SPACE.issuperset(range(lo, hi + 1)) for lo, hi in chars):
        raise GuideError(f"whitespace pattern {whitespace!r}: may match only spaces, tabs, newlines and carriage "
                         "returns")
    return f"(?:{whitespace})", f"(?:{whitespace})"


def value_rule(sep: str = WS, pad: str = "") -> str:
    """The pattern of the rule `value`, any JSON value laid out by `sep` and `pad` (layout): objects and arrays
    of values, `(?&value)`, at any depth."""
    options = list(SCALARS.values())
    options.append(rf"\[{pad}(?:{ANY_VALUE}(?:,{sep}{ANY_VALUE})*{pad})?\]")
    options.append(rf"\{{{pad}(?:{STRING}:{sep}{ANY_VALUE}(?:,{sep}{STRING}:{sep}{ANY_VALUE})*{pad})?\}}")
    return "(?:" + "|".join(options) + ")"


def _literal(value) -> str:
    return re.escape(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


class _Builder:
    def __init__(self, root, whitespace: str | None = None):
        self.root = root
        self.sep, self.pad = layout(whitespace)
        self.any_value = False  # whether the rule `value` is named
        # the $refs whose schema is being built (the root's, "#", always): named inside themselves, their rules
        self.following: set[str] = {"#"}
        self.names: dict[str, str] = {}  # $ref -> the name of its rule, where one is named inside itself

    def value(self) -> str:
        self.any_value = True
        return ANY_VALUE

    def rules(self, root: str) -> dict[str, str]:
        """Every rule named in `root` (the whole schema's pattern) or in another rule: "root" itself, `value`,
        and each recursive $ref's, built with the $ref and the root being followed (so named inside)."""
        rules, built = {"root": root}, set()
        while pending := [ref for ref in self.names if ref not in built]:
            for ref in pending:
                built.add(ref)
                self.following = {"#", ref}
                rules[self.names[ref]] = root if ref == "#" else self.regex(self.resolve(ref), 1)
        if self.any_value:
            rules["value"] = value_rule(self.sep, self.pad)
        return rules

    def fail(self, why: str):
        raise GuideError(f"JSON schema: {why}")

    def resolve(self, ref: str):
        if ref == "#":
            return self.root
        for prefix in ("#/$defs/", "#/definitions/"):
            if ref.startswith(prefix) and isinstance(self.root, dict):
                found = self.root.get(prefix[2:-1], {}).get(ref[len(prefix):])
                if found is not None:
                    return found
        self.fail(f"$ref {ref!r} must name a schema under #/$defs or #/definitions, or be #")

    def regex(self, schema, depth: int = 0) -> str:
        if depth > MAX_DEPTH:
            raise _Refused(f"JSON schema: nested more than {MAX_DEPTH} deep")
        pattern = self._regex(schema, depth)
        if len(pattern) > MAX_PATTERN:
            raise _Refused(f"JSON schema: too large (its pattern passes {MAX_PATTERN:,} characters: $refs that "
                           "fan out?)")
        return pattern

    def _regex(self, schema, depth: int) -> str:
        if schema is True or schema == {}:
            return self.value()
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
            ref = schema["$ref"]
            target = self.resolve(ref)
            if ref in self.following:  # inside itself: its rule, named
                return f"(?&{self.names.setdefault(ref, f'ref{len(self.names)}')})"
            self.following.add(ref)
            try:
                return self.regex(target, depth + 1)
            finally:
                self.following.discard(ref)
        if "const" in schema:
            return _literal(schema["const"])
        if "enum" in schema:
            if not schema["enum"]:
                self.fail("an empty enum matches nothing")
            return "(?:" + "|".join(_literal(v) for v in schema["enum"]) + ")"
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return self.any_of(key, schema[key], depth)
        if "allOf" in schema:
            if len(schema["allOf"]) != 1:
                self.fail("allOf of more than one schema not supported")
            return self.regex(schema["allOf"][0], depth + 1)
        types = schema.get("type")
        if types is None:
            types = ["object"] if "properties" in schema else ["array"] if "items" in schema else None
            if types is None:
                return self.value()
        types = [types] if isinstance(types, str) else list(types)
        return "(?:" + "|".join(self.typed(t, schema, depth) for t in types) + ")"

    def typed(self, kind: str, schema: dict, depth: int) -> str:
        if kind == "string":
            return self.string(schema)
        if kind in ("integer", "number"):
            return self.number(kind, schema)
        if kind in SCALARS:
            return SCALARS[kind]
        if kind == "array":
            return self.array(schema, depth)
        if kind == "object":
            properties = schema.get("properties") or {}
            required = set(schema.get("required", []))
            missing = required - set(properties)
            if missing:
                self.fail(f"required {sorted(missing)} not among the properties")
            extra = schema.get("additionalProperties", True)
            least, most = schema.get("minProperties", 0), schema.get("maxProperties")
            if not properties:  # any keys: their values any JSON, or what additionalProperties says
                return self.members(extra, least, most, depth)
            if least or most is not None:
                self.fail("minProperties or maxProperties beside properties not supported")
            if extra not in (True, False):
                self.fail("additionalProperties that is a schema beside properties not supported")
            items = [(f"{_literal(name)}:{self.sep}{self.regex(sub, depth + 1)}", name in required)
                     for name, sub in properties.items()]
            return rf"\{{{self.pad}{_members(items, self.sep)}{self.pad}\}}"
        self.fail(f"type {kind!r} not supported")

    def members(self, extra, least: int, most: int | None, depth: int) -> str:
        """An object of any keys (a dict), `least` (0 or 1) to `most` of them, their values any JSON or what
        additionalProperties (`extra`) says. Its keys may repeat (JSON does not forbid it; a reader keeps the
        last), so `most` holds, and a least of 2 or more would not: refused."""
        if not (isinstance(least, int) and least >= 0 and (most is None or isinstance(most, int) and most >= least)):
            self.fail("minProperties and maxProperties must be whole numbers, the least first")
        if least > 1:
            self.fail("minProperties above 1 not supported (keys that repeat would count twice)")
        if extra is False or most == 0:
            if least:
                self.fail("minProperties leaves no object")
            return rf"\{{{self.pad}\}}"
        value = self.value() if extra is True else self.regex(extra, depth + 1)
        sep, pad = self.sep, self.pad
        member = f"{STRING}:{sep}{value}"
        more = f"(?:,{sep}{member}){{{max(least - 1, 0)},{'' if most is None else most - 1}}}"
        body = f"{member}{more}"
        return rf"\{{{pad}{body}{pad}\}}" if least else rf"\{{{pad}(?:{body}{pad})?\}}"

    def any_of(self, key: str, options: list, depth: int) -> str:
        """A choice among the schemas; one this cannot express is left out (fewer texts, each still valid: a
        pydantic Decimal's string with a look-ahead pattern, beside its number), unless all are."""
        if not isinstance(options, list) or not options:
            self.fail(f"{key} must be a non-empty list of schemas")
        patterns, refused = [], []
        for option in options:
            try:
                patterns.append(self.regex(option, depth + 1))
            except _Refused:
                raise
            except GuideError as e:
                refused.append(e)
        if not patterns:
            raise refused[0]
        return "(?:" + "|".join(patterns) + ")"

    def array(self, schema: dict, depth: int) -> str:
        """`prefixItems` (a tuple's elements, in order), then `items` for the rest (none if false), between
        minItems and maxItems elements."""
        least, most = schema.get("minItems", 0), schema.get("maxItems")
        prefix, items = schema.get("prefixItems", []), schema.get("items", True)
        if isinstance(items, list):  # draft 7's tuple: items as a list, then additionalItems
            prefix, items = items, schema.get("additionalItems", True)
        if not isinstance(prefix, list):
            self.fail("prefixItems must be a list of schemas")
        if items is False:
            most = len(prefix) if most is None else min(most, len(prefix))
        if (most is not None and most < least) or least > len(prefix) and items is False:
            self.fail("minItems leaves no array")
        if most == 0:
            return rf"\[{self.pad}\]"
        parts = [self.regex(s, depth + 1) for s in prefix[:most]]
        rest = None if most is None else most - len(parts)
        after = ""  # the elements from i on, once one has been written
        if items is not False and (rest is None or rest > 0):
            item = self.regex(items, depth + 1)
            first = not parts  # no tuple: the first element is an item, and the repeats follow it
            low, high = max(least - len(parts) - first, 0), "" if rest is None else rest - first
            after = f"(?:,{self.sep}{item}){{{low},{high}}}"
            if first:
                parts = [item]
        for i in range(len(parts) - 1, 0, -1):
            element = f",{self.sep}{parts[i]}{after}"
            after = element if i < least else f"(?:{element})?"
        body, pad = parts[0] + after, self.pad
        return rf"\[{pad}{body}{pad}\]" if least > 0 else rf"\[{pad}(?:{body}{pad})?\]"

    def string(self, schema: dict) -> str:
        least, most = schema.get("minLength", 0), schema.get("maxLength")
        fmt, pattern = schema.get("format"), schema.get("pattern")
        if fmt in ANNOTATION_FORMATS:
            fmt = None
        if fmt is not None and pattern is not None:
            self.fail("format and pattern together not supported")
        if fmt is not None:
            return f'"{format_content(fmt, least, most)}"'
        if pattern is not None:
            if least or most is not None:
                self.fail("pattern with minLength or maxLength not supported")
            return f'"{pattern_content(pattern)}"'
        if least == 0 and most is None:
            return STRING
        return f'"{STRING_CHAR}{{{least},{"" if most is None else most}}}"'

    def number(self, kind: str, schema: dict) -> str:
        """An integer or a number, between its minimum and maximum (inclusive or exclusive) if it has them."""
        (lo, lo_open), (hi, hi_open) = self.bound(schema, "minimum", max), self.bound(schema, "maximum", min)
        if lo is None and hi is None:
            return SCALARS[kind]
        if kind == "integer":  # the whole numbers inside
            lo = None if lo is None else math.floor(lo) + 1 if lo_open and lo == int(lo) else math.ceil(lo)
            hi = None if hi is None else math.ceil(hi) - 1 if hi_open and hi == int(hi) else math.floor(hi)
            pattern = integer_range(lo, hi)
        else:
            if any(b is not None and b != int(b) for b in (lo, hi)):
                self.fail("minimum or maximum of a number that is not a whole number not supported")
            pattern = number_range(None if lo is None else int(lo), None if hi is None else int(hi), lo_open, hi_open)
        if pattern is None:
            self.fail(f"no {kind} lies between minimum and maximum")
        return pattern

    def bound(self, schema: dict, name: str, tighter) -> tuple[float | None, bool]:
        """(value, exclusive) of the tighter of `name` and its exclusive form (a number, or draft 4's boolean)."""
        exclusive_name = "exclusive" + name[0].upper() + name[1:]
        plain, exclusive = schema.get(name), schema.get(exclusive_name)
        for key, value in ((name, plain), (exclusive_name, exclusive)):
            if value is None or (key == exclusive_name and isinstance(value, bool)):  # (draft 4's boolean)
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                self.fail(f"{key}={value!r} is not a number")
        if isinstance(exclusive, bool):  # draft 4: makes minimum (maximum) exclusive
            return plain, exclusive and plain is not None
        candidates = [(v, open_) for v, open_ in ((plain, False), (exclusive, True)) if v is not None]
        if not candidates:
            return None, False
        best = tighter(v for v, _ in candidates)
        return best, any(v == best and open_ for v, open_ in candidates)


def _members(items: list[tuple[str, bool]], sep: str) -> str:
    """The object's members in order, comma-separated (`sep` after each comma): required ones always,
    optional ones or not."""
    after = [""] * (len(items) + 1)  # after[k]: members k.. once one has been written (each after a comma)
    for k in range(len(items) - 1, -1, -1):
        member, required = items[k]
        after[k] = (f",{sep}{member}" if required else f"(?:,{sep}{member})?") + after[k + 1]
    first = ""  # members k.. when none has been written yet
    for k in range(len(items) - 1, -1, -1):
        member, required = items[k]
        first = member + after[k + 1] if required else f"(?:{member}{after[k + 1]}|{first})"
    return first


def schema_rules(schema, whitespace: str | None = None) -> dict[str, str]:
    """The patterns (guide.py's syntax, `(?&name)` for a rule) of the rules whose "root" matches the JSON texts
    `schema` validates, compact or laid out with `whitespace` (layout; module docstring); "root" alone for a
    schema without recursion or any JSON value. A GuideError names what it cannot express."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise GuideError(f"JSON schema: not valid JSON ({e})") from None
    builder = _Builder(schema, whitespace)
    return builder.rules(builder.regex(schema))


def schema_regex(schema, whitespace: str | None = None) -> str:
    """A regular expression whose matches are the JSON texts `schema` validates (schema_rules); a GuideError for
    a schema with recursion or any JSON value inside, which no regular expression holds (schema_guide)."""
    rules = schema_rules(schema, whitespace)
    if len(rules) > 1:
        raise GuideError("JSON schema: its texts nest without a bound (any JSON value, or a recursive $ref): it has "
                         "no regular expression")
    return rules["root"]


def schema_guide(schema, whitespace: str | None = None) -> Guide:
    """The guide of the JSON texts `schema` (a dict, or its JSON text) validates (schema_rules): one automaton,
    or a PushdownGuide of its rules."""
    rules = schema_rules(schema, whitespace)
    if len(rules) == 1:
        return ByteGuide.regex(rules["root"])
    try:
        trees = {name: parse(pattern, refs=True) for name, pattern in rules.items()}
        return PushdownGuide(trees, "root", "JSON schema")
    except RecursionError:
        raise GuideError("JSON schema: nested too deeply") from None
