"""Guided generation's request fields -> the runtime's guide (blt_runtime/guide.py, pushdown.py).

Owns which fields ask for a guide: vLLM's `guided_regex`, `guided_choice`, `guided_json` and `guided_grammar`
(GBNF or Lark's syntax, blt_runtime/grammar.py), its newer `structured_outputs` (`regex`, `choice`, `json`, `grammar`,
`json_object`), and OpenAI's `response_format`
(`json_object`: any JSON value; `json_schema`: a schema, blt_runtime/json_guide.py), and the whitespace a
JSON guide allows (`guided_whitespace_pattern`, `structured_outputs.whitespace_pattern`; compact JSON
without one); and vLLM's `allowed_token_ids` (bytes) and `bad_words`, which hold the completion with
its guide, if any, or alone (the guides intersect). It refuses with a 400 what this server does not do
(two guides at once, a schema or grammar it cannot express) rather than ignoring it, and compiles the
guide off the event loop (a large one takes a while), keeping the last ones compiled for the next
requests that ask for them.
"""

from __future__ import annotations

import asyncio
import functools
import json

from blt_runtime.guide import ByteGuide, GuideError
from blt_runtime.json_guide import layout, schema_guide
from blt_runtime.pushdown import Guide

from .errors import ApiError, utf8
from .schemas import CompletionRequest

UNSUPPORTED = ("this server guides completions by a regular expression, a list of choices, a JSON schema or a "
               "grammar (guided_regex, guided_choice, guided_json, guided_grammar, structured_outputs, "
               "response_format)")


def schema_text(value) -> str:
    """A schema as the cache's key: its JSON text (a client may send either), its keys in the order sent:
    the properties of an object come in that order."""
    return value if isinstance(value, str) else json.dumps(value)


def _asked(fields: tuple[str, ...], regex, choice, schema, grammar) -> list[tuple[str, str, str | tuple[str, ...]]]:
    """(field, kind, source) of each of a regex, choices, a JSON schema and a grammar that is given."""
    sources = (regex, None if choice is None else tuple(choice), None if schema is None else schema_text(schema),
               grammar)
    kinds = ("regex", "choice", "json", "grammar")
    return [(field, kind, source) for field, kind, source in zip(fields, kinds, sources) if source is not None]


def asked_guide(req: CompletionRequest) -> tuple[str, str, str | tuple[str, ...]] | None:
    """(field, kind, pattern or choices) of the guide the request asks for, or None; a 400 for what is not
    supported, or for more than one."""
    asked = _asked(("guided_regex", "guided_choice", "guided_json", "guided_grammar"), req.guided_regex,
                   req.guided_choice, req.guided_json, req.guided_grammar)
    so = req.structured_outputs
    if so is not None:
        asked += _asked(("structured_outputs",) * 4, so.regex, so.choice, so.json_schema, so.grammar)
        if so.json_object:
            asked.append(("structured_outputs", "json", "{}"))
        if not any(field == "structured_outputs" for field, _, _ in asked):
            raise ApiError(400, f"structured_outputs asks for nothing this server does; {UNSUPPORTED}",
                           "structured_outputs", "unsupported")
    rf = req.response_format
    if rf is not None and rf.type != "text":
        if rf.type == "json_object":
            asked.append(("response_format", "json", "{}"))
        elif rf.type == "json_schema" and isinstance(rf.json_schema, dict) and "schema" in rf.json_schema:
            asked.append(("response_format", "json", schema_text(rf.json_schema["schema"])))
        else:
            raise ApiError(400, "response_format: the type must be text, json_object or json_schema (with "
                                "json_schema.schema)", "response_format", "invalid_value")
    if len(asked) > 1:
        raise ApiError(400, f"{' and '.join(a[0] for a in asked)}: one guide at a time", asked[1][0], "invalid_value")
    return asked[0] if asked else None


Limits = tuple[tuple[int, ...] | None, tuple[bytes, ...] | None]  # allowed bytes, bad words
NO_LIMITS: Limits = (None, None)


@functools.lru_cache(maxsize=8)  # each guide keeps its bias rows on the device while it is cached
def compiled(kind: str | None, source: str | tuple[str, ...] | None, whitespace: str | None = None,
             limits: Limits = NO_LIMITS) -> Guide:
    """A guide of `kind` ("json", "regex", "choice", "grammar"; None: none), within the bytes and without the
    words of `limits`."""
    guide = None
    if kind == "json":
        guide = schema_guide(source, whitespace)
    elif kind == "grammar":
        guide = ByteGuide.grammar(source)
    elif kind is not None:
        guide = ByteGuide.regex(source) if kind == "regex" else ByteGuide.choice(list(source))
    allowed, bad = limits
    for limit in (None if allowed is None else ByteGuide.of_bytes(set(allowed)),
                  None if bad is None else ByteGuide.avoiding(list(bad))):
        if limit is not None:
            guide = limit if guide is None else guide.intersect(limit)
    return guide


def asked_limits(req: CompletionRequest) -> Limits:
    """The bytes a request allows (allowed_token_ids) and the words it bans (bad_words), or None for each."""
    allowed = None if req.allowed_token_ids is None else tuple(sorted(set(req.allowed_token_ids)))
    bad = None if not req.bad_words else tuple(sorted({utf8(w, "bad_words") for w in req.bad_words}))
    return allowed, bad


def asked_whitespace(req: CompletionRequest) -> tuple[str, str | None]:
    """(field, pattern) of the whitespace a JSON guide allows: vLLM's guided_whitespace_pattern, or
    structured_outputs' whitespace_pattern; None: compact JSON."""
    so = req.structured_outputs
    if so is not None and so.whitespace_pattern is not None:
        return "structured_outputs", so.whitespace_pattern
    return "guided_whitespace_pattern", req.guided_whitespace_pattern


async def request_guide(req: CompletionRequest) -> Guide | None:
    """The request's guide, compiled (in a thread), or None; a 400 naming the field for one that cannot
    guide (GuideError's reason)."""
    asked = asked_guide(req)
    ws_field, whitespace = asked_whitespace(req)
    limits = asked_limits(req)
    if asked is None:
        if whitespace is not None:
            raise ApiError(400, f"{ws_field}: a whitespace pattern applies to JSON guides only, and the request "
                                "asks for none", ws_field, "invalid_value")
        if limits == NO_LIMITS:
            return None
        return await compile_guide("allowed_token_ids" if limits[0] is not None else "bad_words", None, None,
                                   limits=limits)
    field, kind, source = asked
    if whitespace is not None and kind != "json":
        raise ApiError(400, f"{ws_field}: a whitespace pattern applies to JSON guides only", ws_field,
                       "invalid_value")
    return await compile_guide(field, kind, source, (ws_field, whitespace), limits)


async def compile_guide(field: str, kind: str | None, source: str | tuple[str, ...] | None,
                        whitespace: tuple[str, str | None] = ("", None), limits: Limits = NO_LIMITS) -> Guide:
    """A guide compiled (in a thread; the last ones kept), `field` named in a 400 for one that cannot guide;
    `whitespace`: (field, pattern) of what a JSON guide allows between its tokens (asked_whitespace);
    `limits`: the request's allowed bytes and bad words (asked_limits), which hold the completion too."""
    ws_field, whitespace = whitespace
    if whitespace is not None:
        try:
            layout(whitespace)
        except GuideError as e:
            raise ApiError(400, f"{ws_field}: {e}", ws_field, "invalid_value") from None
    try:
        guide = await asyncio.to_thread(compiled, kind, source, whitespace, limits)
    except GuideError as e:
        raise ApiError(400, f"{field}: {e}", field, "invalid_value") from None
    if guide.ends(guide.start):
        raise ApiError(400, f"{field}: it allows only the empty text", field, "invalid_value")
    return guide
