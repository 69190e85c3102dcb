"""Guided generation's request fields -> the runtime's ByteGuide (blt_runtime/guide.py).

Owns which fields ask for a guide (vLLM's `guided_regex` and `guided_choice`, and its newer
`structured_outputs` with `regex` or `choice`), refusing with a 400 what this server does not do
(JSON schemas, grammars, a `response_format` other than text) rather than ignoring it, and compiling
the guide off the event loop (a large pattern takes a while), keeping the last ones compiled for the
next requests that ask for them.
"""

from __future__ import annotations

import asyncio
import functools

from blt_runtime.guide import ByteGuide, GuideError

from .errors import ApiError
from .schemas import CompletionRequest

UNSUPPORTED = "this server guides completions by a regular expression or a list of choices"


def _refuse(field: str, what: str) -> ApiError:
    return ApiError(400, f"{field}: {what} are not supported; {UNSUPPORTED} (guided_regex, guided_choice, or "
                         f"structured_outputs with regex or choice)", field, "unsupported")


def asked_guide(req: CompletionRequest) -> tuple[str, str, str | tuple[str, ...]] | None:
    """(field, kind, pattern or choices) of the guide the request asks for, or None; a 400 for what is not
    supported, or for more than one."""
    if req.guided_json is not None:
        raise _refuse("guided_json", "JSON schemas")
    if req.guided_grammar is not None:
        raise _refuse("guided_grammar", "grammars")
    if req.response_format is not None and req.response_format.type != "text":
        raise _refuse("response_format", f"response formats of type {req.response_format.type!r}")
    asked = []
    if req.guided_regex is not None:
        asked.append(("guided_regex", "regex", req.guided_regex))
    if req.guided_choice is not None:
        asked.append(("guided_choice", "choice", tuple(req.guided_choice)))
    so = req.structured_outputs
    if so is not None:
        if so.json_schema is not None or so.json_object:
            raise _refuse("structured_outputs", "JSON schemas")
        if so.grammar is not None:
            raise _refuse("structured_outputs", "grammars")
        if so.regex is not None:
            asked.append(("structured_outputs", "regex", so.regex))
        if so.choice is not None:
            asked.append(("structured_outputs", "choice", tuple(so.choice)))
        if not asked:
            raise ApiError(400, f"structured_outputs asks for nothing this server does; {UNSUPPORTED}",
                           "structured_outputs", "unsupported")
    if len(asked) > 1:
        raise ApiError(400, f"{' and '.join(a[0] for a in asked)}: one guide at a time", asked[1][0], "invalid_value")
    return asked[0] if asked else None


@functools.lru_cache(maxsize=8)  # each guide keeps its bias rows on the device while it is cached
def compiled(kind: str, source: str | tuple[str, ...]) -> ByteGuide:
    return ByteGuide.regex(source) if kind == "regex" else ByteGuide.choice(list(source))


async def request_guide(req: CompletionRequest) -> ByteGuide | None:
    """The request's guide, compiled (in a thread), or None; a 400 naming the field for one that cannot
    guide (GuideError's reason)."""
    asked = asked_guide(req)
    if asked is None:
        return None
    field, kind, source = asked
    try:
        guide = await asyncio.to_thread(compiled, kind, source)
    except GuideError as e:
        raise ApiError(400, f"{field}: {e}", field, "invalid_value") from None
    if guide.ends(0):
        raise ApiError(400, f"{field}: it allows only the empty text", field, "invalid_value")
    return guide
