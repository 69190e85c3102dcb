"""A response's output items as they are read from the generated text, and the stream events that build them;
and its input items as they are listed.

Owns the shape of the Responses API's items: the text outside tool calls is one message item (an output_text
part), each call a function_call item, in the order they first appear. The text is read a piece at a time
(a piece: what the choice releases at once, usually one character), the same way whether the pieces are
streamed or answered whole, so a stream's items are the whole answer's. Events carry no sequence numbers
(responses.py numbers them as it sends them).
"""

from __future__ import annotations

import copy
import uuid

from .choices import ChatChoiceState, chat_logprobs
from .tools import CallStream, TextCalls

ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}


def input_items(given: str | list[dict]) -> list[dict]:
    """A request's input as GET /v1/responses/{id}/input_items lists it, in the order given: text is a user
    message; a message's text content becomes a list of parts (input_text, or output_text for an assistant's);
    every item has a type, a status and an id (its own, or a new one). The items were read already
    (responses.input_messages): only their kinds appear here."""
    if isinstance(given, str):
        given = [{"type": "message", "role": "user", "content": given}]
    items = []
    for item in given:
        item = {"type": "message", **item, "status": item.get("status") or "completed"}
        if item["type"] == "message" and isinstance(item.get("content"), str):
            part = "output_text" if item.get("role") == "assistant" else "input_text"
            item["content"] = [{"type": part, "text": item["content"]}
                               | ({"annotations": []} if part == "output_text" else {})]
        item["id"] = item.get("id") or f"{ID_PREFIXES[item['type']]}_{uuid.uuid4().hex}"
        items.append(item)
    return items


class OutputItems:
    def __init__(self, calls: CallStream | TextCalls | None):
        """`calls`: how the text is read as tool calls (None: it is all the message's)."""
        self.calls = calls
        self.items: list[dict] = []
        self._message: dict | None = None  # the message item, once the text has content
        self._by_call: dict[int, dict] = {}  # a call's index -> its function_call item
        self._index: dict[str, int] = {}  # an item's id -> its output_index

    def feed(self, text: str, logprobs: list[dict] | None = None) -> list[dict]:
        """One piece of the text (and its bytes' logprobs) -> the events it makes."""
        if self.calls is None:
            content, entries = text, []
        elif isinstance(self.calls, CallStream):
            content, entries = "", self.calls.feed(text)
        else:
            content, entries = self.calls.feed(text)
        return self._content(content, logprobs) + [e for entry in entries for e in self._call(entry)]

    def finish(self, finish_reason: str | None) -> list[dict]:
        """The end of the text -> the events of what the tool-call parser held, then each item's last events."""
        events = []
        if isinstance(self.calls, CallStream) and self.calls.name is not None and not self.calls.calls:
            events += [e for entry in self.calls.feed("") for e in self._call(entry)]  # a call with no arguments
        if isinstance(self.calls, TextCalls):
            content, entries = self.calls.finish()
            events += self._content(content, None) + [e for entry in entries for e in self._call(entry)]
        status = "incomplete" if finish_reason in ("length", "abort") else "completed"
        for index, item in enumerate(self.items):
            item["status"] = status
            if item["type"] == "message":
                part = item["content"][0]
                where = {"item_id": item["id"], "output_index": index, "content_index": 0}
                events += [{"type": "response.output_text.done", **where, "text": part["text"],
                            "logprobs": part["logprobs"]},
                           {"type": "response.content_part.done", **where, "part": copy.deepcopy(part)}]
            else:
                events.append({"type": "response.function_call_arguments.done", "item_id": item["id"],
                               "output_index": index, "name": item["name"], "arguments": item["arguments"]})
            events.append({"type": "response.output_item.done", "output_index": index, "item": copy.deepcopy(item)})
        return events

    def _content(self, content: str, logprobs: list[dict] | None) -> list[dict]:
        if not content and not logprobs:
            return []
        events = []
        if self._message is None:
            self._message = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "status": "in_progress",
                             "role": "assistant", "content": []}
            events += self._added(self._message)
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            self._message["content"].append(part)
            events.append({"type": "response.content_part.added", "item_id": self._message["id"],
                           "output_index": self._index[self._message["id"]], "content_index": 0,
                           "part": copy.deepcopy(part)})
        part = self._message["content"][0]
        part["text"] += content
        part["logprobs"] += logprobs or []
        events.append({"type": "response.output_text.delta", "item_id": self._message["id"],
                       "output_index": self._index[self._message["id"]], "content_index": 0, "delta": content,
                       "logprobs": logprobs or []})
        return events

    def _call(self, entry: dict) -> list[dict]:
        """A tool-call entry of a chat stream's delta (tools.py, tool_parser.py) -> events."""
        events = []
        if entry["index"] not in self._by_call:  # its first entry: the call's id and name
            item = {"id": f"fc_{uuid.uuid4().hex}", "type": "function_call", "status": "in_progress",
                    "call_id": entry["id"], "name": entry["function"]["name"], "arguments": ""}
            self._by_call[entry["index"]] = item
            events += self._added(item)
        item = self._by_call[entry["index"]]
        more = entry["function"].get("arguments") or ""
        if more:
            item["arguments"] += more
            events.append({"type": "response.function_call_arguments.delta", "item_id": item["id"],
                           "output_index": self._index[item["id"]], "delta": more})
        return events

    def _added(self, item: dict) -> list[dict]:
        self._index[item["id"]] = len(self.items)
        self.items.append(item)
        return [{"type": "response.output_item.added", "output_index": len(self.items) - 1,
                 "item": copy.deepcopy(item)}]

    def message(self) -> dict:
        """The output as a chat message (the assistant's turn of a stored conversation)."""
        text = self._message["content"][0]["text"] if self._message is not None else ""
        calls = [{"id": c["call_id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                 for c in self.items if c["type"] == "function_call"]
        return {"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}


class ResponseChoiceState(ChatChoiceState):
    """The one choice of a response: its pieces become output items (`items`, set once `calls` is)."""

    items: OutputItems

    def delta(self, new: int) -> list[dict]:  # type: ignore[override]
        """The events of the `new` latest pieces (one delta where pieces that came together add to one item),
        and at the end, the items' last events."""
        events = merged([e for piece, _ in (self.pieces[-new:] if new else []) for e in self._feed(piece)])
        if self.done:
            events += self.items.finish(self.finish_reason)
        if self.streamed:
            self.pieces.clear()
        return events

    def whole(self) -> list[dict]:  # type: ignore[override]
        """Every piece read (the events dropped) -> the output items."""
        for piece, _ in self.pieces:
            self._feed(piece)
        self.items.finish(self.finish_reason)
        return self.items.items

    def _feed(self, piece) -> list[dict]:
        return self.items.feed(piece.text, chat_logprobs([(piece, 0)])["content"] if self.want_logprobs else None)


DELTAS = ("response.output_text.delta", "response.function_call_arguments.delta")


def merged(events: list[dict]) -> list[dict]:
    """Events with each run of deltas to the same item as one (a client that falls behind gets fewer, larger
    events, as a completion's stream gives them)."""
    out: list[dict] = []
    for event in events:
        last = out[-1] if out else None
        if last is not None and event["type"] in DELTAS and last["type"] == event["type"] and \
                last["item_id"] == event["item_id"]:
            last["delta"] += event["delta"]
            if "logprobs" in event:
                last["logprobs"] = last["logprobs"] + event["logprobs"]
        else:
            out.append(event)
    return out
