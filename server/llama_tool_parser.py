"""Tool calls read out of free text in Llama 3's JSON format, for tool_choice "auto": vLLM's
`--tool-call-parser llama3_json` (and `llama4_json`, the same format).

Owns the format: a text that begins with `{` (or with `<|python_tag|>`, which is dropped) is calls, JSON objects
{"name": ..., "arguments": ...} (or "parameters") separated by `;` and whitespace; a text that begins otherwise is
all content, as vLLM reads it. Read as it comes (`Llama3JsonCalls`), with the pieces hermes uses (tools.py):
- A call that begins {"name": "...", "arguments": streams its id and name, then its arguments' text as generated;
  the rest of its object is skipped.
- An object in another form (arguments first) is read whole at its closing brace (or at the end of the text):
  a call if it has a string "name", its arguments the JSON of their value; otherwise it is content, and so is
  the rest of the text.
- The separators between calls are the format's. Text after the calls that begins no object is content.
There is no end tag, so `parallel_tool_calls: false` cannot stop the text after one call (chat.py refuses it).
"""

from __future__ import annotations

import json
from typing import Any

from .tools import FREE_HEAD, SPACE, Call, TextCalls, ValueScan, open_call, take_argument

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonCalls(TextCalls):
    """Llama 3's JSON calls, as the text comes (see the module's docstring; no end tag: END stays None)."""

    def __init__(self):
        self.calls: list[Call] = []
        self._state = "start"  # "start" (is it calls?), "text" (content from here on), "between" (calls), "head"
        # (an object up to its arguments), "value" (the arguments), "object" (the rest of the object)
        self._held = ""  # "start": what may begin the python tag; "head": the object so far
        self._scan = ValueScan()  # "head": of the whole object; "value": of the arguments; "object": of the rest

    def _end(self, content: list[str], deltas: dict[int, dict[str, Any]]) -> None:
        if self._state == "start":
            content.append(self._held)
        elif self._state == "head":
            self._whole(content, deltas)
        self._state, self._held = "text", ""

    def _take(self, c: str, content: list[str], deltas: dict[int, dict[str, Any]]) -> None:
        state = self._state
        if state == "text":
            content.append(c)
        elif state == "start":
            self._held += c
            if self._held == "{":
                self._open()
            elif self._held == PYTHON_TAG:
                self._state, self._held = "between", ""
            elif not PYTHON_TAG.startswith(self._held):
                content.append(self._held)
                self._state, self._held = "text", ""
        elif state == "between":
            if c == "{":
                self._open()
            elif c not in SPACE and c != ";":
                self._state = "text"
                content.append(c)
        elif state == "head":
            self._held += c
            self._scan.take(c)
            if c == ":" and (match := FREE_HEAD.match(self._held)):  # (it ends at a colon: tried there only)
                self._scan = open_call(self.calls, json.loads(match.group(1)), deltas)
                self._state, self._held = "value", ""
            elif self._scan.done:
                self._whole(content, deltas)
        elif state == "value":
            part = take_argument(self.calls, self._scan, c, deltas)
            if self._scan.done:  # on to the rest of the object, from inside it
                self._state, self._scan = "object", ValueScan.inside_object()
                if not part:
                    self._take(c, content, deltas)
        else:  # "object"
            self._scan.take(c)
            if self._scan.done:
                self._state = "between"

    def _open(self) -> None:
        """A `{` where a call may begin."""
        self._state, self._held, self._scan = "head", "{", ValueScan()
        self._scan.take("{")

    def _whole(self, content: list[str], deltas: dict[int, dict[str, Any]]) -> None:
        """An object in another form, read whole: a call, or else content (and the rest of the text too)."""
        called = self._read_whole(self._held, deltas)
        if not called:
            content.append(self._held)
        self._state, self._held = "between" if called else "text", ""
