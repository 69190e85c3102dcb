"""POST /v1/completions: a request becomes engine sequences; their outputs become a body or a stream.

Owns: prompt and parameter translation (each refusal a 400 naming its field), submission through
the worker (429 when the queue is full), the SSE stream (keep-alive comments when keepalive.py's
ticker says so, include_usage, an error event after the stream started) and abort on client
disconnect, streaming or not.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from types import MappingProxyType

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from blt_runtime import PromptTooLong, QueueFull, SamplingParams
from blt_runtime.pushdown import Guide

from .choices import ChoiceState
from .errors import ApiError, error_body, prompt_too_long, queue_full, utf8
from .guided import request_guide
from .keepalive import TICK
from .schemas import CompletionRequest
from .state import AppState
from .textstream import Piece
from .worker import Failure

log = logging.getLogger("blt.server")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def prompt_bytes(prompt) -> list[bytes]:
    """The request's prompts as bytes: a string, a list of byte values, or a list of either."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if isinstance(prompt, list) and not prompt:
        prompt = [""]
    return [utf8(p, "prompt") if isinstance(p, str) else bytes(p) for p in prompt]


API_NAMES = {"max_bytes": "max_tokens", "min_bytes": "min_tokens"}  # the runtime's names -> the request's
DEFAULT_MAX_BYTES = 256  # max_tokens left out (SERVER.md)
NO_DEFAULTS: Mapping[str, float | int] = MappingProxyType({})


def asked_max_bytes(req: CompletionRequest) -> bool:
    """Did the request set max_tokens (not left out, not null)?"""
    return req.max_tokens is not None and "max_tokens" in req.model_fields_set


def sampling_params(req: CompletionRequest, index: int, room: int | None = None, guide: Guide | None = None,
                    defaults: Mapping[str, float | int] = NO_DEFAULTS) -> SamplingParams:
    """The runtime's parameters of choice `index`. max_tokens left out (or null) is 256, or the `room` the
    context leaves after the prompt and BOS where that is less (vLLM gives the whole rest). `guide`: the
    request's (guided.py). `defaults`: the model's own, for fields the request left out
    (generation_defaults.py)."""
    seed = None if req.seed is None else (req.seed + index) % 2**63  # n choices draw differently
    if asked_max_bytes(req):
        max_bytes = req.max_tokens
    else:
        most = defaults.get("max_tokens", DEFAULT_MAX_BYTES)
        max_bytes = most if room is None else max(min(most, room), 0)

    def field(name: str, api_default: float):
        value = getattr(req, name)
        return defaults.get(name, api_default) if value is None or name not in req.model_fields_set else value

    try:
        return SamplingParams(
            max_bytes=max_bytes, min_bytes=req.min_tokens, temperature=field("temperature", 1.0),
            top_p=field("top_p", 1.0), top_k=field("top_k", 0), min_p=field("min_p", 0.0), seed=seed,
            stop=stop_strings(req), presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=field("repetition_penalty", 1.0),
            logprobs=req.logprobs, ignore_eos=req.ignore_eos, logit_bias=logit_bias(req.logit_bias), guide=guide,
            # echo with logprobs: the prompt's first choice scores it, for all of them (Completion._take)
            prompt_logprobs=req.logprobs if req.echo and index == 0 else None)
    except ValueError as e:
        message = str(e)
        for name, api_name in API_NAMES.items():
            message = message.replace(name, api_name)
        raise ApiError(400, message, message.split("=")[0], "invalid_value") from None


def _stop_texts(req: CompletionRequest) -> list[str]:
    return [req.stop] if isinstance(req.stop, str) else list(req.stop or ())


def stop_strings(req: CompletionRequest) -> tuple[str | bytes, ...]:
    """The request's stop strings, and each byte of its stop_token_ids as one more."""
    return tuple(_stop_texts(req)) + tuple(bytes([b]) for b in sorted(set(req.stop_token_ids or ())))


def stop_ids(req: CompletionRequest) -> frozenset[int]:
    """The bytes of stop_token_ids that no stop string is alone: where one of them stops a choice, its stop_reason
    is that byte's value, as vLLM reports a stop token's id."""
    strings = {s.encode("utf-8") for s in _stop_texts(req)}
    return frozenset(b for b in req.stop_token_ids or () if bytes([b]) not in strings)


def logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    """The request's logit_bias with its keys as byte values: decimal digits only ("7", not " 7" or "+7")."""
    bias = bias or {}
    bad = [k for k in bias if not (k.isascii() and k.isdigit())]
    if bad:
        raise ValueError(f"logit_bias={bad[0][:20]!r}: keys must be byte values 0..255 written in decimal")
    return {int(k): v for k, v in bias.items()}


def check_supported(req: CompletionRequest) -> None:
    """OpenAI fields this server knows but does not do: refused when they would change the result
    (clients such as LangChain send best_of 1 and an empty suffix unasked)."""
    if req.best_of is not None and req.best_of > req.n:
        raise ApiError(400, f"best_of={req.best_of} > n={req.n} is not supported (as in vLLM's V1 engine): ask for "
                            f"n={req.best_of} choices with logprobs=0 and keep the best", "best_of", "unsupported")
    if req.suffix:
        raise ApiError(400, "suffix is not supported: this server completes text, it does not fill in the middle",
                       "suffix", "unsupported")


def check_capacity(prompts: list[bytes], n: int, capacity: int) -> None:
    """A request with more sequences than the engine ever holds at once would get a 429 on an idle server,
    and a client that waits and retries would never get through: refused as invalid instead."""
    if len(prompts) * n > capacity:
        raise ApiError(400, f"this request needs {len(prompts) * n} sequences ({len(prompts)} prompts x n={n}); the "
                            f"server holds at most {capacity} at once (max batch size + max queue): send it in parts",
                       "prompt", "too_many_sequences")


def truncated(prompts: list[bytes], keep: int | None, max_bytes: int, max_model_len: int) -> list[bytes]:
    """truncate_prompt_tokens: each prompt's last `keep` bytes (-1: as many as leave room for max_bytes
    and BOS in the context); None or 0 keeps them whole."""
    if keep == -1:
        keep = max(max_model_len - 1 - max_bytes, 0)
    elif not keep:
        return prompts
    return [p[len(p) - keep:] if len(p) > keep else p for p in prompts]


def check_context(prompts: list[bytes], max_bytes: int, max_model_len: int, name: str = "max_tokens",
                  prompt_name: str = "prompt") -> None:
    """Each prompt, BOS and `max_bytes` fit in the context (`name`: the field that asks for them;
    `prompt_name`: the one the prompt comes from)."""
    for p in prompts:
        if len(p) + 1 > max_model_len:
            raise ApiError(400, f"the prompt is {len(p)} bytes; this model's context is {max_model_len} bytes "
                                "(BOS included)", prompt_name, "context_length_exceeded")
        if len(p) + 1 + max_bytes > max_model_len:
            raise ApiError(400, f"prompt ({len(p)} bytes) + {name} ({max_bytes}) exceeds this model's context "
                                f"of {max_model_len} bytes (BOS included)", name, "context_length_exceeded")


MAX_COALESCED = 4096  # engine outputs merged into the events of one write, at most


REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def client_request_id(request: Request) -> str | None:
    """The client's X-Request-Id header, where it is a plain id (128 characters of letters, digits and ._:-)."""
    value = request.headers.get("x-request-id")
    return value if value is not None and REQUEST_ID.fullmatch(value) else None


class Completion:
    """One HTTP request's sequences: choice `prompt_index * n + i` is sequence f"{key}-{index}", where the key is
    the completion's id, with 8 random hex digits after it when the client named the request (X-Request-Id:
    two requests may share a name, never a key)."""

    ID_PREFIX, OBJECT, CHUNK_OBJECT, CHOICE = "cmpl-", "text_completion", "text_completion", ChoiceState
    DONE = "data: [DONE]\n\n"  # a stream's last event

    def __init__(self, req: CompletionRequest, state: AppState, prompts: list[bytes], params: SamplingParams,
                 request_id: str | None = None):
        """`request_id`: the client's name for the request (client_request_id), else one is drawn."""
        self.req, self.state, self.prompts, self.guide = req, state, prompts, params.guide
        self.model = req.model or state.model_name  # the name the client used (admit checked it), as vLLM answers
        self.request_id = request_id or uuid.uuid4().hex
        self.id = f"{self.ID_PREFIX}{self.request_id}"
        key = self.id if request_id is None else f"{self.id}.{uuid.uuid4().hex[:8]}"
        self.created = int(time.time())
        self.queue: asyncio.Queue = asyncio.Queue()
        stops = params.stop
        self.choices: dict[str, ChoiceState] = {}
        for p, prompt in enumerate(prompts):
            prefix = prompt.decode("utf-8", "replace") if req.echo else ""
            for i in range(req.n):
                index = p * req.n + i
                self.choices[f"{key}-{index}"] = self.CHOICE(index, stops, prefix, req.logprobs is not None,
                                                                 req.return_patches, req.stream,
                                                                 req.include_stop_str_in_output, stop_ids(req))
        # streamed choices whose echo waits for their prompt's scores -> pieces held back meanwhile
        self.held = {rid: 0 for rid in self.choices} if req.stream and req.echo and req.logprobs is not None else {}
        opts = req.stream_options
        # vLLM's continuous_usage_stats: every chunk says what the prompts and the bytes so far count
        self.running_usage = bool(req.stream and opts and opts.include_usage and opts.continuous_usage_stats)
        self.prompt_bytes = sum(len(p) for p in prompts)
        self.generated = 0  # bytes the engine delivered so far (a held-back stop string's included)
        self.disconnected = False

    @property
    def unfinished(self) -> list[str]:
        return [rid for rid, c in self.choices.items() if not c.done]

    def _take(self, out) -> tuple[Piece | None, list[str]]:
        """Feed one engine output to its choice -> the piece it releases, and the choices whose echo
        it makes ready: with its prompt's scores (echo with logprobs: on the first output of the
        prompt's first choice), every choice of that prompt gets them."""
        choice = self.choices[out.request_id]
        piece, ready = choice.consume(out), []
        self.generated += len(out.new_bytes)
        if out.prompt_logprobs is not None:
            p = choice.index // self.req.n
            for rid, c in self.choices.items():
                if c.index // self.req.n == p:
                    c.set_prompt_logprobs(self.prompts[p], out.prompt_logprobs)
                    ready += [rid] if rid in self.held else []
        return piece, ready

    async def submit(self) -> None:
        room = [self.state.max_model_len - 1 - len(p) for p in self.prompts]
        items = [(rid, self.prompts[c.index // self.req.n],
                  sampling_params(self.req, c.index % self.req.n, room[c.index // self.req.n], self.guide,
                                  self.state.generation_defaults))
                 for rid, c in self.choices.items()]
        m = self.state.metrics
        try:
            await self.state.worker.submit(items, self.queue, self.req.priority)
        except QueueFull as e:
            m.of(m.rejected, reason="queue_full").inc()
            raise queue_full(str(e)) from None
        except PromptTooLong as e:
            raise prompt_too_long(e) from None  # counted as invalid where a 400 is answered (errors.py)
        except ValueError as e:
            raise ApiError(400, str(e), None, "invalid_value") from None
        except asyncio.CancelledError:  # the client went away while its sequences were being added
            self.state.worker.abort(list(self.choices))
            raise

    def on_disconnect(self) -> None:
        """The client is gone: abort what still runs (once) and count it."""
        if self.disconnected or not self.unfinished:
            return
        self.disconnected = True
        m = self.state.metrics
        m.of(m.disconnects).inc()
        self.state.worker.abort(self.unfinished)
        log.info("client of %s disconnected; aborted %d sequence(s)", self.id, len(self.unfinished))

    async def watch_disconnect(self, request: Request) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                self.on_disconnect()
                return

    def usage(self) -> dict:
        usages = [c.usage for c in self.choices.values() if c.usage is not None]
        first_of_prompt = [c.usage for c in self.choices.values() if c.usage is not None and c.index % self.req.n == 0]
        prompt = sum(u.prompt_bytes for u in first_of_prompt)
        completion = sum(u.generated_bytes for u in usages)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(u.shared_prompt_bytes for u in first_of_prompt)},
                "prompt_patches": sum(u.prompt_patches for u in first_of_prompt),
                "completion_patches": sum(u.completion_patches for u in usages)}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": self.id, "object": self.CHUNK_OBJECT, "created": self.created,
                "model": self.model, "choices": choices}
        if usage is None and self.running_usage and choices:
            usage = {"prompt_tokens": self.prompt_bytes, "completion_tokens": self.generated,
                     "total_tokens": self.prompt_bytes + self.generated}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    # ------------------------------------------------------------------ streaming
    async def events(self, request: Request) -> AsyncIterator[str]:
        watcher = asyncio.create_task(self.watch_disconnect(request))
        quiet = self.state.keepalive.open(self.queue)  # TICK arrives in the queue after a quiet interval
        try:
            for event in self.opening():
                yield event
            while self.unfinished:
                item = await self.queue.get()
                if item is TICK:
                    yield ": keep-alive\n\n"
                    continue
                items = [item]
                while len(items) < MAX_COALESCED and not self.queue.empty():
                    items.append(self.queue.get_nowait())
                events, failure = self._coalesce(items)
                if events and not self.disconnected:
                    quiet.ticks = 0
                    yield events
                if failure is not None:
                    yield self.failed(self._fail(failure))
                    break
            else:
                if self.held:
                    yield self._flush_held()
                closing = self.closing()
                if closing:
                    yield closing
            if self.DONE:
                yield self.DONE
        finally:
            self.state.keepalive.close(quiet)
            watcher.cancel()
            self.on_disconnect()  # a no-op when every choice finished

    def failed(self, error: dict) -> str:
        """The event that ends a stream with an error (SERVER.md: the error body, then [DONE])."""
        return f"data: {json.dumps(error)}\n\n"

    def closing(self) -> str:
        """The events after every choice's last: the usage, where the request asked for it."""
        opts = self.req.stream_options
        return self.chunk([], self.usage()) if opts is not None and opts.include_usage else ""

    def choice_events(self, choice: ChoiceState, new: int) -> str:
        """The event for a choice's `new` latest pieces (and its end, if it ended)."""
        return self.chunk([choice.delta(new)])

    def opening(self) -> list[str]:
        """The events a stream begins with: each choice's echo (unless it waits for its prompt's scores:
        _events sends it then)."""
        if self.req.echo and not self.held:
            return [self.chunk([c.echo_delta()]) for c in self.choices.values()]
        return []

    def _coalesce(self, items: list) -> tuple[str, Failure | None]:
        """The events for outputs that arrived together, one per choice that has new text or finished
        (its text, logprobs and patch starts those of all its new bytes), and a failure among them
        (what follows a failure is dropped: the stream ends there). A client that reads as fast as
        the engine steps gets an event per byte; one that falls behind (a busy event loop, a slow
        reader) gets fewer, larger events instead of a growing backlog: the event loop spends about
        as much per event as per byte."""
        new: dict[str, int] = {}  # choice -> pieces released, in order of first appearance
        for item in items:
            if item is TICK:  # something is being sent anyway
                continue
            if isinstance(item, Failure):
                return self._events(new), item
            piece, ready = self._take(item)
            if piece is not None or self.choices[item.request_id].done:
                new[item.request_id] = new.get(item.request_id, 0) + (piece is not None)
            for rid in ready:
                new.setdefault(rid, 0)
        return self._events(new), None

    def _flush_held(self) -> str:
        """Every choice finished, and some never got their prompt's scores (the prompt's first choice was
        aborted before it had any): their echo without logprobs, and what they held back."""
        return self._events(dict.fromkeys(self.held, 0), unscored=True)

    def _events(self, new: dict[str, int], unscored: bool = False) -> str:
        events = []
        for rid, n in new.items():
            c = self.choices[rid]
            if rid in self.held:  # its echo has not been sent
                if c.prompt_piece is None and not unscored:  # nor can it be yet: its pieces wait
                    self.held[rid] += n
                    continue
                events.append(self.chunk([c.echo_delta()]))
                n += self.held.pop(rid)
                if not (n or c.done):
                    continue
            events.append(self.choice_events(c, n))
        return "".join(events)

    def _fail(self, failure: Failure) -> dict:
        """An error inside a started stream (or a body): abort the siblings, return the error body."""
        self.choices[failure.request_id].done = True
        if self.unfinished:
            self.state.worker.abort(self.unfinished)
            for rid in self.unfinished:
                self.choices[rid].done = True
        return error_body(failure.status, failure.message, None, failure.code)

    # ------------------------------------------------------------------ whole body
    async def body(self, request: Request) -> JSONResponse:
        watcher = asyncio.create_task(self.watch_disconnect(request))
        try:
            while self.unfinished:
                item = await self.queue.get()
                if isinstance(item, Failure):
                    return JSONResponse(self._fail(item), status_code=item.status)
                self._take(item)
        finally:
            watcher.cancel()
            self.on_disconnect()
        if self.disconnected:  # nobody is listening; the sequences were aborted
            return JSONResponse(error_body(400, "client disconnected"), status_code=499)
        return JSONResponse(self.answer(), headers={"X-Request-Id": self.request_id})

    def answer(self) -> dict:
        """The whole body, once every choice finished."""
        return {"id": self.id, "object": self.OBJECT, "created": self.created, "model": self.model,
                "choices": [c.whole() for c in sorted(self.choices.values(), key=lambda c: c.index)],
                "usage": self.usage()}


def admit(req, state: AppState, kind: str) -> None:
    """What every generation request passes first: the model it names, a server that admits, a priority the
    scheduling policy takes, and a log line for the fields it sent that nobody reads."""
    state.check_model(req.model)
    state.check_admitting()
    if req.priority != 0 and state.settings.scheduling_policy != "priority":
        raise ApiError(400, f"priority={req.priority}: the server schedules first come, first served; start it "
                            "with --scheduling-policy priority", "priority", "invalid_value")
    extra = sorted((req.model_extra or {}).keys())
    if extra:
        log.warning("ignored unknown fields in a %s request: %s", kind, ", ".join(extra))


async def create_completion(req: CompletionRequest, request: Request, state: AppState):
    admit(req, state, "completion")
    check_supported(req)
    # a 400 before anything is queued
    params = sampling_params(req, 0, guide=await request_guide(req), defaults=state.generation_defaults)
    prompts = truncated(prompt_bytes(req.prompt), req.truncate_prompt_tokens, params.max_bytes, state.max_model_len)
    if asked_max_bytes(req):
        check_context(prompts, params.max_bytes, state.max_model_len)
    else:  # the default gives way to what the context leaves, down to min_tokens
        check_context(prompts, params.min_bytes, state.max_model_len, "min_tokens")
    check_capacity(prompts, req.n, state.engine.capacity)
    return await respond(Completion(req, state, prompts, params, client_request_id(request)), request)


async def respond(completion: Completion, request: Request):
    """Queue the completion's sequences, then answer with its stream or its whole body; either says the
    request's id in an X-Request-Id header (the client's own, where it sent one)."""
    await completion.submit()
    if completion.req.stream:
        return StreamingResponse(completion.events(request), media_type="text/event-stream",
                                 headers={**SSE_HEADERS, "X-Request-Id": completion.request_id})
    return await completion.body(request)
