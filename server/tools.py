"""Tool calls of a chat completion, made by guided generation: vLLM's named and "required" tool choice.

Owns the request's `tools` and `tool_choice` in the server's terms and the calls read out of the text:
- `tool_choice` {"type": "function", "function": {"name": N}}: the completion is the arguments of N, held
  to its `parameters` schema (blt_runtime/json_guide.py); the answer is one call of N with that text.
- "required": the completion is a JSON list of one or more calls (one with `parallel_tool_calls` false),
  each {"name": ..., "parameters": ...} of one of the tools, held to its schema; the answer lists them,
  with finish_reason "tool_calls".
- "none" (the default without tools): the tools reach the template only. "auto" (the default with
  tools) needs a parser of the model's own tool-call format, which BLT checkpoints do not have: a 400.
A call's `arguments` is the text the model generated for it, as generated: the same in a stream's
deltas (`CallStream`, which reads the calls as the bytes come) as in a whole answer.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from .errors import ApiError

NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}  # OpenAI: no parameters


@dataclass(frozen=True)
class ToolCalling:
    """What a request's tool choice asks the completion to be: `schema` guides it; `name`: the one function
    called (named tool choice), else a list of calls ("required")."""

    schema: dict[str, Any]
    name: str | None


def _functions(tools: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """name -> parameters schema of each tool (a 400 for one that is not a function, or a name sent twice)."""
    functions = {}
    for i, tool in enumerate(tools or []):
        function = tool.get("function")
        if tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise ApiError(400, f"tools[{i}]: a tool must be {{'type': 'function', 'function': {{...}}}}",
                           "tools", "invalid_value")
        name, parameters = function.get("name"), function.get("parameters", NO_PARAMETERS)
        if not isinstance(name, str) or not name:
            raise ApiError(400, f"tools[{i}].function.name: a function needs a name", "tools", "invalid_value")
        if name in functions:
            raise ApiError(400, f"tools[{i}].function.name: {name!r} is named twice", "tools", "invalid_value")
        if not isinstance(parameters, dict):
            raise ApiError(400, f"tools[{i}].function.parameters: must be a JSON schema object", "tools",
                           "invalid_value")
        functions[name] = parameters
    return functions


def _hoisted(schemas: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The tools' schemas without their own `$defs` (or `definitions`), and those gathered for the schema that
    nests them, whose root `$ref`s resolve against (a 400 where two tools define one name otherwise)."""
    defs: dict[str, Any] = {}
    bare = {}
    for name, schema in schemas.items():
        for key in ("$defs", "definitions"):
            for def_name, definition in (schema.get(key) or {}).items():
                if defs.setdefault(key, {}).setdefault(def_name, definition) != definition:
                    raise ApiError(400, f"tools: two functions define {key}/{def_name} differently; a 'required' "
                                        "tool choice takes them into one schema", "tools", "invalid_value")
        bare[name] = {k: v for k, v in schema.items() if k not in ("$defs", "definitions")}
    return bare, defs


def tool_calling(tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None,
                 parallel_tool_calls: bool | None) -> ToolCalling | None:
    """What the request's tool choice asks for, or None (none: the tools are for the template only)."""
    functions = _functions(tools)
    choice = tool_choice if tool_choice is not None else "auto" if functions else "none"
    if choice == "none":
        return None
    if choice == "auto":
        raise ApiError(400, "tool_choice 'auto' (the default with tools) needs a parser of the model's own "
                            "tool-call format, which this server does not have: send tool_choice 'required', "
                            "name a function ({'type': 'function', 'function': {'name': ...}}), or 'none'",
                       "tool_choice", "unsupported")
    if not functions:
        raise ApiError(400, "tool_choice: a tool call needs tools", "tools", "invalid_value")
    if choice == "required":
        bare, defs = _hoisted(functions)
        calls = [{"type": "object", "required": ["name", "parameters"],
                  "properties": {"name": {"const": name}, "parameters": schema}} for name, schema in bare.items()]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}, **defs}
        if parallel_tool_calls is False:
            schema["maxItems"] = 1
        return ToolCalling(schema, None)
    name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type", "function") != "function" or not isinstance(name, str):
        raise ApiError(400, f"tool_choice: {json.dumps(choice)} is none of 'none', 'auto', 'required' or "
                            "{'type': 'function', 'function': {'name': ...}}", "tool_choice", "invalid_value")
    if name not in functions:
        raise ApiError(400, f"tool_choice: no tool is named {name!r}", "tool_choice", "invalid_value")
    return ToolCalling(functions[name], name)


HEAD = re.compile(r'[\s\[,\]]*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"parameters"\s*:')
SPACE = " \t\n\r"
BACKSLASH = "\\"


@dataclass
class Call:
    id: str
    name: str
    arguments: str = ""


@dataclass
class CallStream:
    """The calls in a completion's text as it comes: one call of `name` whose arguments are the whole text, or
    (name None) a JSON list of {"name": ..., "parameters": ...} that the guide made (those members in that
    order, any JSON whitespace between tokens), each call's arguments the text of its parameters' value."""

    name: str | None
    calls: list[Call] = field(default_factory=list)
    _state: str = "head"  # reading a call up to its arguments ("head"), its arguments ("value"), the rest of it
    _head: str = ""  # the text of the call being read, up to its arguments
    _depth: int = 0  # brackets open inside the arguments
    _string: bool = False  # inside a string there
    _escape: bool = False  # after its backslash

    def feed(self, text: str) -> list[dict[str, Any]]:
        """More of the text -> the entries of a stream delta's `tool_calls` it makes: a new call with its id
        and name, then its arguments as they come."""
        if self.name is not None:
            if not self.calls:
                self.calls.append(Call(_call_id(), self.name, text))
                return [self._opening(0)]
            self.calls[0].arguments += text
            return [{"index": 0, "function": {"arguments": text}}] if text else []
        deltas: dict[int, dict[str, Any]] = {}
        for c in text:
            if self._state == "head":
                self._head += c
                match = HEAD.match(self._head)
                if match:
                    self.calls.append(Call(_call_id(), json.loads(match.group(1))))
                    deltas[len(self.calls) - 1] = self._opening(len(self.calls) - 1)
                    self._head, self._state = "", "value"
            elif self._state == "value":
                if self._value(c):
                    index = len(self.calls) - 1
                    deltas.setdefault(index, {"index": index, "function": {"arguments": ""}})["function"][
                        "arguments"] += c
            elif c == "}":  # the end of the call
                self._state = "head"
        return list(deltas.values())

    def _value(self, c: str) -> bool:
        """One character after a call's "parameters": is it part of the arguments' text (else space before it, or
        what ends a number, true, false or null)? Moves on to the rest of the call once the value is whole."""
        call = self.calls[-1]
        if self._string:
            call.arguments += c
            if self._escape:
                self._escape = False
            elif c == BACKSLASH:
                self._escape = True
            elif c == '"':
                self._string = False
                self._state = "rest" if self._depth == 0 else "value"
            return True
        if c in SPACE and (not call.arguments or self._depth == 0) or c == "," and self._depth == 0:
            if call.arguments:  # a scalar ended
                self._state = "rest"
            return False
        if c in "]}" and self._depth == 0:  # the call's own closing brace, right after a scalar
            self._state = "head"
            return False
        if c == '"':
            self._string = True
        self._depth += (c in "[{") - (c in "]}")
        call.arguments += c
        if self._depth == 0 and c in "]}":
            self._state = "rest"
        return True

    def _opening(self, index: int) -> dict[str, Any]:
        call = self.calls[index]
        return {"index": index, "id": call.id, "type": "function",
                "function": {"name": call.name, "arguments": call.arguments}}

    def whole(self) -> list[dict[str, Any]]:
        """Every call read, as a whole answer's `tool_calls` (named: its one call, arguments empty or not)."""
        if self.name is not None and not self.calls:
            self.feed("")
        return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.calls]

    def finish_reason(self, reason: str | None) -> str | None:
        """vLLM's (and OpenAI's): "tool_calls" where a list of calls was finished, the engine's reason else."""
        return "tool_calls" if self.name is None and reason == "stop" else reason


def _call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"
