"""Tool calls read out of free text, for tool_choice "auto": vLLM's `--tool-call-parser hermes`.

Owns the Hermes format (NousResearch's, Qwen's): a call is a JSON object {"name": ..., "arguments": ...} between
`<tool_call>` and `</tool_call>`, after the message's text, if any. The model writes it unguided (a chat template
that lists the tools tells it how), so the text is read as it comes (`HermesCalls`):
- Text outside the calls is the message's content, as it comes, but for a stretch that may begin `<tool_call>`,
  held until it does or does not, and whitespace after a call, held until text follows it (the newlines
  between calls are the format's, not the message's).
- A call that begins {"name": "...", "arguments": (or "parameters":) streams as it comes: its id and name,
  then its arguments' text as generated, the same in a stream's deltas as in a whole answer (as the guided
  calls of tools.py). The rest of its object (its closing brace, members after the arguments) is skipped.
  Text after the object that is not `</tool_call>` is content again (the model did not close the call).
- A call in any other form (arguments first, say) is read whole at `</tool_call>` or at the end of the text:
  its arguments are then the JSON of their value (json.dumps, as vLLM gives them). What is not a JSON
  object with a string "name" is not a call: it stays in the content, tags and all.
A stop string `</tool_call>` (parallel_tool_calls false: one call at most) ends the text inside a call, which is
then whole. Where the model stops (EOS, a stop string) after one call or more, the finish reason is
"tool_calls" (vLLM's).
"""

from __future__ import annotations

import json
from typing import Any

from .llama_tool_parser import Llama3JsonCalls
from .pythonic_tool_parser import PythonicCalls
from .tools import FREE_HEAD, SPACE, Call, TextCalls, ValueScan, open_call, take_argument

START, END = "<tool_call>", "</tool_call>"


class HermesCalls(TextCalls):
    """A completion's text, as it comes, read as content and Hermes tool calls (see the module's docstring)."""

    END = END  # a stop string that ends the text after a call

    def __init__(self):
        self.calls: list[Call] = []
        self._state = "text"  # "text"; in a call: "head" (up to its arguments), "value" (them), "object" (the
        # rest of the call's object), "end" (up to the end tag)
        self._held = ""  # text not given out yet that may begin the start tag (a few characters)
        self._glue = ""  # whitespace right after a call, not given out unless text follows it
        self._after_call = False  # the last of the text was a call (whitespace now is the format's)
        self._body = ""  # the call's text since its start tag (head), or since its object closed (end)
        self._tail = ""  # in "end": what came after the whitespace
        self._scan = ValueScan()  # of the arguments being read

    def _end(self, content: list[str], deltas: dict[int, dict[str, Any]]) -> None:
        if self._state == "text" and self._held:
            content.append(self._glue + self._held)
        elif self._state == "head":
            self._whole_call(self._body, content, deltas, closed=False)
        self._state, self._held, self._glue, self._body = "text", "", "", ""

    # ------------------------------------------------------------------ one character at a time
    def _take(self, c: str, content: list[str], deltas: dict[int, dict[str, Any]]) -> None:
        if self._state == "text":
            self._text(c, content)
        elif self._state == "head":
            self._body += c
            if self._body.endswith(END):
                self._whole_call(self._body[:-len(END)], content, deltas, closed=True)
                self._state, self._body = "text", ""
            elif c == ":" and (match := FREE_HEAD.match(self._body)):  # (it ends at a colon: tried there only)
                self._scan = open_call(self.calls, json.loads(match.group(1)), deltas)
                self._state, self._body = "value", ""
        elif self._state == "value":
            part = take_argument(self.calls, self._scan, c, deltas)
            if self._scan.done:  # on to the rest of the call's object, from inside it
                self._state, self._scan = "object", ValueScan.inside_object()
                if not part:
                    self._take(c, content, deltas)
        elif self._state == "object":
            self._scan.take(c)
            if self._scan.done:
                self._state, self._body, self._tail = "end", "", ""
        else:  # "end": space, then the end tag; else the model did not close the call, and this is content
            self._body += c
            if self._tail or c not in SPACE:
                self._tail += c
            if self._tail == END:
                self._state, self._body, self._after_call = "text", "", True
            elif not END.startswith(self._tail):
                body, self._state, self._body, self._after_call = self._body, "text", "", True
                for t in body:
                    self._text(t, content)

    def _text(self, c: str, content: list[str]) -> None:
        if self._after_call and not self._held and c in SPACE:  # whitespace after a call waits for what follows
            self._glue += c
            return
        self._held += c
        if self._held.endswith(START):  # the glue before it is the format's
            before = self._held[:-len(START)]
            if before:
                content.append(self._glue + before)
                self._after_call = False
            self._state, self._held, self._glue, self._body = "head", "", "", ""
            return
        partial = next((k for k in range(min(len(START) - 1, len(self._held)), 0, -1)
                        if START.startswith(self._held[-k:])), 0)
        given = self._held[:len(self._held) - partial]
        if given:
            content.append(self._glue + given)
            self._held, self._glue, self._after_call = self._held[len(given):], "", False

    def _whole_call(self, body: str, content: list[str], deltas: dict[int, dict[str, Any]], closed: bool) -> None:
        """A call in another form, read whole: a call, or else content, tags and all."""
        self._after_call = self._read_whole(body, deltas)
        if not self._after_call:
            content.append(START + body + (END if closed else ""))


# --tool-call-parser's choices (settings.TOOL_CALL_PARSERS); llama4_json is vLLM's other name for the same format
PARSERS = {"hermes": HermesCalls, "llama3_json": Llama3JsonCalls, "llama4_json": Llama3JsonCalls,
           "pythonic": PythonicCalls}
