"""Tool calls read out of free text written as a Python list of calls, for tool_choice "auto": vLLM's
`--tool-call-parser pythonic` (Llama 3.2's and 4's other format).

Owns the format: a text that begins with `[` is calls, `[get_weather(city="Oslo"), get_time()]`: each a function
name with keyword arguments whose values are Python literals (strings, numbers, True, False, None, lists, dicts),
given as their JSON; a text that begins otherwise is all content, as vLLM reads it. Read as it comes
(`PythonicCalls`), a call at a time: its id, name and arguments when its closing parenthesis comes (a call's
arguments are only JSON once whole). What is not such a call, from there on, is content, and so is the text after
the list's closing bracket. There is no end tag, so `parallel_tool_calls: false` cannot stop the text after one
call (chat.py refuses it).
"""

from __future__ import annotations

import ast
import json
from typing import Any

from .tools import SPACE, Call, TextCalls, call_id, call_opening

QUOTES = "'\""


class PythonicCalls(TextCalls):
    """A Python list of calls, as the text comes (see the module's docstring; no end tag: END stays None)."""

    def __init__(self):
        self.calls: list[Call] = []
        self._state = "start"  # "start" (is it calls?), "text" (content from here on), "list" (between calls),
        # "call" (inside one)
        self._call = ""  # the call being read
        self._glue = ""  # the list's text since the last call (its bracket, separators): content if no call follows
        self._depth = 0  # brackets open inside it
        self._quote = ""  # the quote of the string it is inside, if any
        self._escape = False  # after a backslash in that string

    def _end(self, content: list[str], deltas: dict[int, dict[str, Any]]) -> None:
        if self._state == "call":  # cut before its closing parenthesis: no call to read
            content.append(self._glue + self._call)
        elif self._state == "list" and not self.calls:
            content.append(self._glue)
        self._state, self._call, self._glue = "text", "", ""

    def _take(self, c: str, content: list[str], deltas: dict[int, dict[str, Any]]) -> None:
        if self._state == "text":
            content.append(c)
        elif self._state == "start":
            self._state, self._glue = ("list", c) if c == "[" else ("text", "")
            if c != "[":
                content.append(c)
        elif self._state == "list":
            if c == "]":  # the list's end (a list with no call in it is content)
                content.append("" if self.calls else self._glue + c)
                self._state, self._glue = "text", ""
            elif c in SPACE or c == ",":
                self._glue += c
            else:
                self._state, self._call, self._depth = "call", "", 0
                self._take(c, content, deltas)
        elif self._quote:  # in a string of the call
            self._call += c
            if self._escape:
                self._escape = False
            elif c == "\\":
                self._escape = True
            elif c == self._quote:
                self._quote = ""
        elif self._depth == 0 and c != "(":  # the name: a call or, at the first character that cannot be, content
            self._call += c
            if not self._call.isidentifier():
                self._not_a_call(content)
        else:
            self._call += c
            if c in QUOTES:
                self._quote = c
            elif c in "([{":
                self._depth += 1
            elif c in ")]}":
                self._depth -= 1
                if self._depth < 0:
                    self._not_a_call(content)
                elif self._depth == 0:
                    self._read_call(content, deltas)

    def _read_call(self, content: list[str], deltas: dict[int, dict[str, Any]]) -> None:
        """A call's text up to its closing parenthesis: a call, or else content (and the rest of the text too)."""
        read = call_of(self._call) if self._call.endswith(")") else None
        if read is None:
            self._not_a_call(content)
            return
        self.calls.append(Call(call_id(), *read))
        deltas[len(self.calls) - 1] = call_opening(self.calls, len(self.calls) - 1)
        self._state, self._call, self._glue = "list", "", ""

    def _not_a_call(self, content: list[str]) -> None:
        """What was read as a call is none: it is content, and so is the rest of the text."""
        content.append(self._glue + self._call)
        self._state, self._call, self._glue = "text", "", ""


def call_of(text: str) -> tuple[str, str] | None:
    """`name(key=literal, ...)` -> (name, the arguments' JSON), or None where the text is no such call."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args or \
                any(k.arg is None for k in node.keywords):
            return None
        arguments = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        return node.func.id, json.dumps(arguments, ensure_ascii=False, allow_nan=False)
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return None
