"""One choice of a completion as it is built from engine outputs: text, logprobs, patch starts.

Turns StepOutputs into OpenAI choice objects (whole, or as stream deltas) through a ChoiceStream,
so the non-streaming body and the concatenated stream carry the same text: a completion's (`text`)
or, with ChatChoiceState, a chat completion's (an assistant `message`, or `delta`s of it). Logprob
entries name a byte by its text when it is a whole character (ASCII), else as "bytes:\\xNN"; EOS as
"<eos>".
"""

from __future__ import annotations

from blt_runtime import EOS_ID, StepOutput
from blt_runtime.tokenizer import OFFSET

from .textstream import ChoiceStream, Piece
from .tool_parser import HermesCalls
from .tools import CallStream


def byte_name(byte: int) -> str:
    return chr(byte) if byte < 0x80 else f"bytes:\\x{byte:02x}"


def id_name(model_id: int) -> str:
    if model_id >= OFFSET:
        return byte_name(model_id - OFFSET)
    return "<eos>" if model_id == EOS_ID else f"<special:{model_id}>"


class ChoiceState:
    def __init__(self, index: int, stops: tuple[bytes, ...], prefix: str = "", logprobs: bool = False,
                 patches: bool = False, streamed: bool = False, keep_stop: bool = False,
                 stop_ids: frozenset[int] = frozenset()):
        """`streamed`: the pieces are sent as deltas and then dropped (a whole body keeps them all).
        `keep_stop`: a matched stop string stays in the text (nothing is held back for it). `stop_ids`: bytes
        that stop it as stop_token_ids (the stop_reason is then the byte's value)."""
        self.stop_ids = stop_ids
        self.index, self.prefix, self.want_logprobs, self.want_patches = index, prefix, logprobs, patches
        self.streamed, self.keep_stop = streamed, keep_stop
        self.stream = ChoiceStream(() if keep_stop else stops)
        self.prompt_piece: tuple[Piece, int] | None = None  # echoed prompt bytes with their logprobs
        self.pieces: list[tuple[Piece, int]] = []  # with the character offset of each piece's text
        self.chars = len(prefix)  # characters of text produced so far, echo included
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.usage = None
        self.done = False

    def set_prompt_logprobs(self, prompt: bytes, logprobs: list) -> None:
        self.prompt_piece = (Piece(self.prefix, 0, [(b, lp, False) for b, lp in zip(prompt, logprobs)]), 0)

    def consume(self, out: StepOutput) -> Piece | None:
        """Feed one engine output; return the piece that may be sent now, if any."""
        extra = (out.new_bytes[0] if out.new_bytes else None, out.logprobs, out.patch_start)
        if out.finished:
            self.done, self.usage = True, out.usage
            self.finish_reason = out.finish_reason
            stop = out.stop_reason
            self.stop_reason = None if not stop else stop[0] if len(stop) == 1 and stop[0] in self.stop_ids else \
                stop.decode("utf-8", "replace")
            piece = self.stream.finish(out.new_bytes, extra, None if self.keep_stop else out.stop_reason)
        else:
            piece = self.stream.feed(out.new_bytes, extra)
        if piece is not None:
            self.pieces.append((piece, self.chars))
            self.chars += len(piece.text)
        return piece

    # ------------------------------------------------------------------ rendering
    def echo_delta(self) -> dict:
        """The first chunk of an echoing stream: the prompt's text."""
        return {"index": self.index, "text": self.prefix, "finish_reason": None, "stop_reason": None,
                "logprobs": _logprobs([self.prompt_piece]) if self.want_logprobs and self.prompt_piece else None}

    def delta(self, new: int) -> dict:
        """A stream chunk's choice for the `new` latest pieces, whose text follows the last chunk's (the
        last chunk carries the finish reason). A streamed choice then forgets its pieces."""
        pieces = self.pieces[-new:] if new else []
        text = "".join(p.text for p, _ in pieces)
        choice = {"index": self.index, "text": text, "logprobs": None, "finish_reason": None, "stop_reason": None}
        if self.want_logprobs:
            choice["logprobs"] = _logprobs(pieces)
        if self.want_patches:
            choice["patch_starts"] = _patch_starts(pieces)
        if self.done:
            choice["finish_reason"], choice["stop_reason"] = self.finish_reason, self.stop_reason
        if self.streamed:  # sent: keeping them would only give the garbage collector more to scan
            self.pieces.clear()
        return choice

    def whole(self) -> dict:
        choice = {"index": self.index, "text": self.prefix + "".join(p.text for p, _ in self.pieces),
                  "logprobs": _logprobs(([self.prompt_piece] if self.prompt_piece else []) + self.pieces)
                  if self.want_logprobs else None,
                  "finish_reason": self.finish_reason, "stop_reason": self.stop_reason}
        if self.want_patches:
            choice["patch_starts"] = _patch_starts(self.pieces)
        return choice


class ChatChoiceState(ChoiceState):
    """A choice of a chat completion: the same text as an assistant message, with logprobs in the chat
    API's shape (an entry per byte, with its top alternatives as a list); or, with `calls`, the text read as
    tool calls (tools.py), or as content and calls ("auto", tool_parser.py)."""

    calls: CallStream | HermesCalls | None = None

    def opening(self) -> list[dict]:
        """A stream's first chunks for this choice: the assistant's role with no content (as OpenAI and vLLM
        send it), then the echoed text, if any."""
        role = {"index": self.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}
        return [role] + ([{**role, "delta": {"content": self.prefix}}] if self.prefix else [])

    def delta(self, new: int) -> dict:
        pieces = self.pieces[-new:] if new else []
        text = "".join(p.text for p, _ in pieces)
        if isinstance(self.calls, CallStream):
            entries = self.calls.feed(text) if pieces else []
            delta = {"tool_calls": entries} if entries else {}
        elif self.calls is not None:
            text, entries = self._parsed(text, self.done)
            delta = {**({"content": text} if text else {}), **({"tool_calls": entries} if entries else {})}
        else:
            delta = {"content": text} if pieces else {}
        choice = {"index": self.index, "delta": delta,
                  "logprobs": chat_logprobs(pieces) if self.want_logprobs else None,
                  "finish_reason": None, "stop_reason": None}
        if self.want_patches:
            choice["patch_starts"] = _patch_starts(pieces)
        if self.done:
            choice["finish_reason"], choice["stop_reason"] = self._finish_reason(), self.stop_reason
        if self.streamed:
            self.pieces.clear()
        return choice

    def whole(self) -> dict:
        text = "".join(p.text for p, _ in self.pieces)
        message = {"role": "assistant", "content": self.prefix + text}
        if isinstance(self.calls, CallStream):  # the text is the calls' (vLLM's content is empty then)
            self.calls.feed(text)
            message = {"role": "assistant", "content": "", "tool_calls": self.calls.whole()}
        elif self.calls is not None:
            message["content"] = self.prefix + self._parsed(text, True)[0]
            if self.calls.calls:
                message["tool_calls"] = self.calls.whole()
        choice = {"index": self.index, "message": message,
                  "logprobs": chat_logprobs(self.pieces) if self.want_logprobs else None,
                  "finish_reason": self._finish_reason(), "stop_reason": self.stop_reason}
        if self.want_patches:
            choice["patch_starts"] = _patch_starts(self.pieces)
        return choice

    def _parsed(self, text: str, end: bool) -> tuple[str, list[dict]]:
        """More text, read by the tool-call parser -> (content, tool-call entries); at the `end`, with what the
        parser held."""
        content, entries = self.calls.feed(text)
        if end:
            rest, more = self.calls.finish()
            content, entries = content + rest, entries + more
        return content, entries

    def _finish_reason(self) -> str | None:
        return self.finish_reason if self.calls is None else self.calls.finish_reason(self.finish_reason)


def _id_bytes(model_id: int) -> list[int] | None:
    return [model_id - OFFSET] if model_id >= OFFSET else None


def chat_logprobs(pieces: list[tuple[Piece, int]]) -> dict:
    content = []
    for piece, _ in pieces:
        for byte, logprobs, _ in piece.entries:
            chosen, top = logprobs if logprobs else (None, [])
            content.append({"token": byte_name(byte), "logprob": chosen, "bytes": [byte],
                            "top_logprobs": [{"token": id_name(i), "logprob": v, "bytes": _id_bytes(i)}
                                             for i, v in top]})
    return {"content": content}


def _logprobs(pieces: list[tuple[Piece, int]]) -> dict:
    lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": [], "bytes": []}
    for piece, char_start in pieces:
        chars = char_start - 1
        for byte, logprobs, _ in piece.entries:
            if byte & 0xC0 != 0x80:  # a byte that begins a character; continuation bytes share its offset
                chars += 1
            lp["tokens"].append(byte_name(byte))
            lp["bytes"].append([byte])
            lp["token_logprobs"].append(logprobs[0] if logprobs else None)
            lp["top_logprobs"].append({id_name(i): v for i, v in logprobs[1]} if logprobs else None)
            lp["text_offset"].append(max(chars, char_start))
    return lp


def _patch_starts(pieces: list[tuple[Piece, int]]) -> list[int]:
    return [p.offset + i for p, _ in pieces for i, (_, _, start) in enumerate(p.entries) if start]
