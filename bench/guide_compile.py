"""How long guides take to build, how many automaton states they have, and how long following a text through one
takes a byte: patterns, JSON schemas, grammars.

    python bench/guide_compile.py [--repeats 3]

Each guide is built `--repeats` times (the fastest is reported); blt-serve builds one off the event loop
on a request's first use and keeps the last 8. A guide's bias rows take 1 KB per state on the device.
The schemas are what pydantic writes for common fields (its output, kept here as JSON: this needs only
torch). The grammars are GBNF: JSON (llama.cpp's json.gbnf, its recursion followed with a stack: a
PushdownGuide, whose bias rows are per distinct set of allowed bytes met), vLLM's SQL example, and arithmetic;
and JSON in Lark's syntax (vLLM's docs). The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from blt_runtime.guide import ByteGuide  # noqa: E402
from blt_runtime.json_guide import schema_guide  # noqa: E402

# pydantic's model_json_schema() of a model with str (max_length 10), datetime, date, UUID, HttpUrl, int
# (1..500), float (> 0), tuple[int, bool], Decimal and SecretStr (max_length 8) fields
EVENT = {"properties": {
    "name": {"maxLength": 10, "title": "Name", "type": "string"},
    "when": {"format": "date-time", "title": "When", "type": "string"},
    "day": {"format": "date", "title": "Day", "type": "string"},
    "id": {"format": "uuid", "title": "Id", "type": "string"},
    "url": {"format": "uri", "maxLength": 2083, "minLength": 1, "title": "Url", "type": "string"},
    "attendees": {"maximum": 500, "minimum": 1, "title": "Attendees", "type": "integer"},
    "price": {"exclusiveMinimum": 0, "title": "Price", "type": "number"},
    "seat": {"maxItems": 2, "minItems": 2, "prefixItems": [{"type": "integer"}, {"type": "boolean"}],
             "title": "Seat", "type": "array"},
    "amount": {"anyOf": [{"type": "number"}, {"pattern": "^(?!^[-+.]*$)[+-]?0*\\d*\\.?\\d*$", "type": "string"}],
               "title": "Amount"},
    "code": {"format": "password", "maxLength": 8, "title": "Code", "type": "string", "writeOnly": True}},
    "required": ["name", "when", "day", "id", "url", "attendees", "price", "seat", "amount", "code"],
    "title": "Event", "type": "object"}
GUIDES = {
    "regex .{0,600}": ".{0,600}",
    "regex words": r"(\w+\s?){1,50}",
}
SCHEMAS = {  # (schema, whitespace pattern)
    "json any value (json_object)": ({}, None),
    "json pydantic model, 10 fields": (EVENT, None),
    "json the same, whitespace [ \\n]* (pretty-printed)": (EVENT, "[ \n]*"),
    "json HttpUrl": (EVENT["properties"]["url"], None),
    "json date-time": (EVENT["properties"]["when"], None),
    "json number > 0": (EVENT["properties"]["price"], None),
}

# GBNF (ByteGuide.grammar): JSON as llama.cpp's grammars/json.gbnf writes it (value and object in each other: a
# PushdownGuide), a SQL query as vLLM's example, arithmetic with brackets (a PushdownGuide)
JSON_GBNF = r"""
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
ws ::= | " " | "\n" [ \t]{0,20}
"""
SQL_GBNF = """
root ::= select_statement
select_statement ::= "SELECT " column " from " table " where " condition
column ::= "col_1 " | "col_2 "
table ::= "table_1 " | "table_2 "
condition ::= column "= " number
number ::= "1 " | "2 "
"""
ARITHMETIC_GBNF = r"""
root  ::= expr
expr  ::= term ([-+*/] term)*
term  ::= num | "(" space expr ")" space
num   ::= [0-9]+ space
space ::= [ \t\n]*
"""
# Lark's syntax: the JSON grammar of vLLM's grammar docs, with %ignore WS
JSON_LARK = r"""
?start: value
?value: dict | list | string | SIGNED_NUMBER -> number | "true" -> true | "false" -> false | "null" -> null
list : "[" [value ("," value)*] "]"
dict : "{" [pair ("," pair)*] "}"
pair : string ":" value
string : ESCAPED_STRING
%import common.ESCAPED_STRING
%import common.SIGNED_NUMBER
%import common.WS
%ignore WS
"""
GRAMMARS = {"grammar JSON (json.gbnf)": JSON_GBNF, "grammar SQL (vLLM's example)": SQL_GBNF,
            "grammar arithmetic": ARITHMETIC_GBNF, "grammar JSON (Lark, vLLM's docs)": JSON_LARK}


# a guide whose rules nest, with bad words: a ProductGuide (its build includes the nested guide's)
PRODUCTS = {"json any value without null and true": ("json", [b"null", b"true"]),
            'grammar JSON (json.gbnf) without \'"a\' and "}}"': ("gbnf", [b'"a', b"}}"])}


def build_product(kind: str, words: list[bytes]):
    nested = schema_guide({}) if kind == "json" else ByteGuide.grammar(JSON_GBNF)
    return nested.intersect(ByteGuide.avoiding(words))


def follow_us_per_byte(guide, n_bytes: int = 4000, seed: int = 0) -> float:
    """Host time to follow a random text through the guide, per byte, as the engine does at every sampled byte
    (the state after it, its allowed bytes and its row of biases), on a guide just built (nothing remembered):
    bytes chosen at random among those allowed, from the start again where nothing may follow."""
    import random

    rng, state = random.Random(seed), guide.start
    start = time.perf_counter()
    for _ in range(n_bytes):
        allowed = guide.allowed_bytes(state)
        if not allowed:
            state = guide.start
            continue
        state = guide.step(state, rng.choice(allowed))
        guide.mask(state)
    return (time.perf_counter() - start) / n_bytes * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = {}
    builds = [(name, ByteGuide.regex, pattern) for name, pattern in GUIDES.items()]
    builds += [(name, lambda pair: schema_guide(*pair), pair) for name, pair in SCHEMAS.items()]
    builds += [(name, ByteGuide.grammar, text) for name, text in GRAMMARS.items()]
    builds += [(name, lambda pair: build_product(*pair), pair) for name, pair in PRODUCTS.items()]
    for name, build, source in builds:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            guide = build(source)
            times.append(time.perf_counter() - start)
        kind, follow = type(guide).__name__, follow_us_per_byte(guide)
        results[name] = {"states": guide.num_states, "seconds": round(min(times), 3), "kind": kind,
                         "follow_us_per_byte": round(follow, 2)}
        print(f"{name}: {kind}, {guide.num_states:,} states in {min(times):.3f} s; following a random text "
              f"{follow:.2f} us a byte", flush=True)
    print(json.dumps({"guides": results}))


if __name__ == "__main__":
    main()
