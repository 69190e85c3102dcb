"""Responses kept in memory (--enable-responses-api-store): for GET /v1/responses/{id} (and its input_items)
and a later request's previous_response_id; and the background responses still generating (`running`), which
GET reads as they stand.

Owns the budget: the responses, their conversations and input items are kept up to BUDGET bytes of JSON text
in all; beyond it the oldest are forgotten first (an id then answers 404, as a deleted one does). A response
named again (the client's X-Request-Id makes its id) replaces the one kept under that id. Nothing outlives the
process.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

BUDGET = 64 << 20


@dataclass(frozen=True)
class Stored:
    response: dict  # the response object, as it was answered
    conversation: list[dict]  # the chat messages it continues, its own output last (its instructions not included)
    size: int
    events: list[str] | None = None  # a background stream's events, for a reader who comes back for them
    inputs: list[dict] | None = None  # the request's input items (response_items.input_items)


class ResponseStore:
    def __init__(self, budget: int = BUDGET):
        self.budget = budget
        self._kept: OrderedDict[str, Stored] = OrderedDict()
        self._size = 0
        self.running: dict[str, Any] = {}  # background responses still generating: id -> their completion

    def put(self, response: dict, conversation: list[dict], events: list[str] | None = None,
            inputs: list[dict] | None = None) -> None:
        size = sum(len(json.dumps(part, ensure_ascii=False)) for part in (response, conversation, inputs or [])) + \
            sum(len(e) for e in events or ())
        self.delete(response["id"])
        self._kept[response["id"]] = Stored(response, conversation, size, events, inputs)
        self._size += size
        while self._size > self.budget and len(self._kept) > 1:
            _, oldest = self._kept.popitem(last=False)
            self._size -= oldest.size

    def get(self, response_id: str) -> Stored | None:
        return self._kept.get(response_id)

    def delete(self, response_id: str) -> bool:
        gone = self._kept.pop(response_id, None)
        if gone is not None:
            self._size -= gone.size
        return gone is not None

    def __len__(self) -> int:
        return len(self._kept)
