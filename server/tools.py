"""Tool calls of a chat completion, made by guided generation: vLLM's named and "required" tool choice.

Owns the request's `tools` and `tool_choice` in the server's terms and the calls read out of the text:
- `tool_choice` {"type": "function", "function": {"name": N}}: the completion is the arguments of N, held
  to its `parameters` schema (blt_runtime/json_guide.py); the answer is one call of N with that text.
- "required": the completion is a JSON list of one or more calls (one with `parallel_tool_calls` false),
  each {"name": ..., "parameters": ...} of one of the tools, held to its schema; the answer lists them,
  with finish_reason "tool_calls".
- "none" (the default without tools): the tools reach the template only.
- "auto" (the default with tools): the model writes text, calls or both, unguided, in the format of the
  server's tool-call parser (tool_parser.py; --enable-auto-tool-choice --tool-call-parser, as vLLM's); a
  400 without one.
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
    called (named tool choice), else a list of calls ("required"). Or, with `parser` ("auto"), no guide: the
    text is read as content and calls in that parser's format (tool_parser.py), one at most with `one_call`
    (parallel_tool_calls false)."""

    schema: dict[str, Any] | None
    name: str | None
    parser: str | None = None
    one_call: bool = False


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
                 parallel_tool_calls: bool | None, parser: str | None = None) -> ToolCalling | None:
    """What the request's tool choice asks for, or None (none: the tools are for the template only).
    `parser`: the server's tool-call parser for "auto" (--enable-auto-tool-choice), if any."""
    functions = _functions(tools)
    choice = tool_choice if tool_choice is not None else "auto" if functions else "none"
    if choice == "none" or choice == "auto" and parser is not None and not functions:
        return None
    if choice == "auto":
        if parser is None:
            raise ApiError(400, "tool_choice 'auto' (the default with tools) reads calls out of the model's text "
                                "in its own format: start the server with --enable-auto-tool-choice and "
                                "--tool-call-parser (hermes), or send tool_choice 'required', name a function "
                                "({'type': 'function', 'function': {'name': ...}}), or 'none'",
                           "tool_choice", "unsupported")
        return ToolCalling(None, None, parser, parallel_tool_calls is False)
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
# the head of a call a model wrote itself (tool_parser.py, llama_tool_parser.py): its name, then its arguments
FREE_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:')
SPACE = " \t\n\r"
BACKSLASH = "\\"


@dataclass
class Call:
    id: str
    name: str
    arguments: str = ""


@dataclass
class ValueScan:
    """The text of one JSON value as its characters come, after a member's colon: which belong to it. `done` once
    the value is whole: at its last character, or (a number, true, false, null) at the first one past it."""

    done: bool = False
    _began: bool = False
    _depth: int = 0  # brackets open inside the value
    _string: bool = False  # inside a string there
    _escape: bool = False  # after its backslash

    @classmethod
    def inside_object(cls) -> ValueScan:
        """A scan of the rest of an object, from after one of its members: done at its closing brace."""
        return cls(_began=True, _depth=1)

    def take(self, c: str) -> bool:
        """Is `c` part of the value (else space before it, or what ends a scalar)?"""
        if self._string:
            if self._escape:
                self._escape = False
            elif c == BACKSLASH:
                self._escape = True
            elif c == '"':
                self._string = False
                self.done = self._depth == 0
            return True
        if c in SPACE and (not self._began or self._depth == 0) or c in ",]}" and self._began and self._depth == 0:
            self.done = self._began  # a scalar ended
            return False
        if c == '"':
            self._string = True
        self._depth += (c in "[{") - (c in "]}")
        self._began = True
        self.done = self._depth == 0 and c in "]}"
        return True


@dataclass
class CallStream:
    """The calls in a completion's text as it comes: one call of `name` whose arguments are the whole text, or
    (name None) a JSON list of {"name": ..., "parameters": ...} that the guide made (those members in that
    order, any JSON whitespace between tokens), each call's arguments the text of its parameters' value."""

    name: str | None
    calls: list[Call] = field(default_factory=list)
    _state: str = "head"  # reading a call up to its arguments ("head"), its arguments ("value"), the rest of it
    _head: str = ""  # the text of the call being read, up to its arguments
    _scan: ValueScan = field(default_factory=ValueScan)  # of the arguments being read

    def feed(self, text: str) -> list[dict[str, Any]]:
        """More of the text -> the entries of a stream delta's `tool_calls` it makes: a new call with its id
        and name, then its arguments as they come."""
        if self.name is not None:
            if not self.calls:
                self.calls.append(Call(call_id(), self.name, text))
                return [call_opening(self.calls, 0)]
            self.calls[0].arguments += text
            return [{"index": 0, "function": {"arguments": text}}] if text else []
        deltas: dict[int, dict[str, Any]] = {}
        for c in text:
            if self._state == "head":
                self._head += c
                match = HEAD.match(self._head) if c == ":" else None  # it ends at a colon: tried there only
                if match:
                    self._scan = open_call(self.calls, json.loads(match.group(1)), deltas)
                    self._head, self._state = "", "value"
            elif self._state == "value":
                part = take_argument(self.calls, self._scan, c, deltas)
                if self._scan.done:  # the call's own closing brace, right after a scalar, ends the call too
                    self._state = "head" if not part and c in "]}" else "rest"
            elif c == "}":  # the end of the call
                self._state = "head"
        return list(deltas.values())

    def whole(self) -> list[dict[str, Any]]:
        """Every call read, as a whole answer's `tool_calls` (named: its one call, arguments empty or not)."""
        if self.name is not None and not self.calls:
            self.feed("")
        return answer_calls(self.calls)

    def finish_reason(self, reason: str | None) -> str | None:
        """vLLM's (and OpenAI's): "tool_calls" where a list of calls was finished, the engine's reason else."""
        return "tool_calls" if self.name is None and reason == "stop" else reason


class TextCalls:
    """A reader of the calls a model writes in its own format (tool_parser.py, llama_tool_parser.py): the text as it
    comes, a character at a time (`_take`), into content and tool-call entries; `_end` says what the end of the
    text makes of what was held."""

    END: str | None = None  # a stop string that ends the text after a call, where the format has one
    calls: list[Call]

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """More of the text -> (the content it adds, the entries of a stream delta's `tool_calls`)."""
        content: list[str] = []
        deltas: dict[int, dict[str, Any]] = {}
        for c in text:
            self._take(c, content, deltas)
        return "".join(content), list(deltas.values())

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """The end of the text -> what was held: content, or a call read whole."""
        content: list[str] = []
        deltas: dict[int, dict[str, Any]] = {}
        self._end(content, deltas)
        return "".join(content), list(deltas.values())

    def whole(self) -> list[dict[str, Any]]:
        """Every call read, as a whole answer's `tool_calls`."""
        return answer_calls(self.calls)

    def finish_reason(self, reason: str | None) -> str | None:
        """The finish reason: "tool_calls" where the model stopped after a call (vLLM's), the engine's else."""
        return "tool_calls" if self.calls and reason == "stop" else reason

    def _read_whole(self, text: str, deltas: dict[int, dict[str, Any]]) -> bool:
        """A call in another form than the one streamed (arguments first, say), read whole: a JSON object with a
        string "name" is a call (in `deltas` too), its arguments the JSON of their value (as vLLM gives them)."""
        try:
            call = json.loads(text)
        except ValueError:
            return False
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return False
        arguments = call.get("arguments", call.get("parameters", {}))
        self.calls.append(Call(call_id(), call["name"], json.dumps(arguments, ensure_ascii=False)))
        deltas[len(self.calls) - 1] = call_opening(self.calls, len(self.calls) - 1)
        return True

    def _take(self, c: str, content: list[str], deltas: dict[int, dict[str, Any]]) -> None:
        raise NotImplementedError

    def _end(self, content: list[str], deltas: dict[int, dict[str, Any]]) -> None:
        raise NotImplementedError


def answer_calls(calls: list[Call]) -> list[dict[str, Any]]:
    """Calls as a whole answer's `tool_calls`."""
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def open_call(calls: list[Call], name: str, deltas: dict[int, dict[str, Any]]) -> ValueScan:
    """A new call of `name`, read from its arguments on: its entry in `deltas`; the scan of its arguments."""
    calls.append(Call(call_id(), name))
    deltas[len(calls) - 1] = call_opening(calls, len(calls) - 1)
    return ValueScan()


def take_argument(calls: list[Call], scan: ValueScan, c: str, deltas: dict[int, dict[str, Any]]) -> bool:
    """One more character after the last call's arguments began: is it theirs (then in `deltas` too)?"""
    part = scan.take(c)
    if part:
        index = len(calls) - 1
        calls[index].arguments += c
        deltas.setdefault(index, {"index": index, "function": {"arguments": ""}})["function"]["arguments"] += c
    return part


def call_opening(calls: list[Call], index: int) -> dict[str, Any]:
    """A stream delta's entry that opens a call: its id, type, name and the arguments read so far."""
    call = calls[index]
    return {"index": index, "id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}
