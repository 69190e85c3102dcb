"""POST /v1/responses (OpenAI's Responses API, as vLLM serves it), and the stored responses' routes.

Owns the translation both ways. A request's input items (messages, function_call and function_call_output
items), its instructions and the conversation of its previous_response_id become a chat request (chat.py
renders, checks and guides it: the same prompt and bytes as the chat completion of those messages); its
functions, tool_choice and text.format become the chat request's tools, tool_choice and response_format. The
answer is a response object whose output items (response_items.py) are read from the text; a stream is the
Responses API's typed events (`event:` and `data:` lines, numbered), from response.created to
response.completed, response.incomplete (max_output_tokens) or response.failed. With
--enable-responses-api-store, finished responses are kept (response_store.py), and a background response is
answered at once (queued) and generated with no client waiting, until GET finds it finished or cancel stops it
(with stream true, its events are logged: the POST streams them, and GET ?stream=true&starting_after=N streams them
again from N on, however often a reader goes away); without the store, `store` is false in every answer and
nothing is kept, as vLLM does. Not served: reasoning, built-in tools (web search, files, MCP), input other than
text.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from .chat import ChatCompletion, chat_job, conversation_prompt
from .completions import SSE_HEADERS, admit, client_request_id, respond
from .errors import ApiError
from .response_items import OutputItems, ResponseChoiceState, input_items
from .response_store import Stored
from .schemas import ChatCompletionRequest, ResponsesRequest, SamplingFields
from .state import AppState
from .worker import Failure

log = logging.getLogger("blt.server")
ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text", "text")
LOGPROBS = "message.output_text.logprobs"
NOT_COPIED = {"n", "return_patches", "response_format"}  # SamplingFields this module checks or sets itself
CANCEL_WAIT = 30.0  # seconds a cancel waits for the engine to stop a background response


class ResponseCompletion(ChatCompletion):
    ID_PREFIX, OBJECT, CHOICE = "resp_", "response", ResponseChoiceState
    DONE = ""  # the stream ends with response.completed (or .incomplete, .failed)

    def __init__(self, *args, asked: ResponsesRequest, conversation: list[dict], **kw):
        """`asked`: the request, echoed in the response; `conversation`: the messages it answers, instructions
        left out (kept with the response for a later previous_response_id)."""
        super().__init__(*args, **kw)
        (self.choice,) = self.choices.values()
        self.choice.items = OutputItems(self.choice.calls)
        self.asked, self.conversation, self.sequence = asked, conversation, 0
        self.inputs = input_items(asked.input)  # kept with it, for GET .../input_items
        self.started = self.cancelled = False  # (background: the first output came; cancel was asked)
        self.task: asyncio.Task | None = None  # background: the task that reads the outputs
        self.final: dict | None = None  # the response as it ended
        # a background stream: every event sent, in order (index = sequence number), for readers that come and go
        self.log: list[str] | None = None
        self.grew = asyncio.Event()  # set (and replaced) whenever the log grows or the response ends
        self.ended = False

    def event(self, event: dict) -> str:
        event = {"type": event["type"], "sequence_number": self.sequence, **event}
        self.sequence += 1
        text = f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"
        if self.log is not None:
            self.log.append(text)
        return text

    def opening(self) -> list[str]:
        started = self.response("in_progress")
        return [self.event({"type": "response.created", "response": started}),
                self.event({"type": "response.in_progress", "response": started})]

    def choice_events(self, choice, new: int) -> str:
        return "".join(self.event(e) for e in choice.delta(new))

    def closing(self) -> str:
        response = self.finished()
        ended = "incomplete" if response["status"] == "cancelled" else response["status"]  # (the SDK's event types)
        return self.event({"type": f"response.{ended}", "response": response})

    def failed(self, error: dict) -> str:
        detail = error["error"]
        failed = self.keep(self.response("failed", {"code": detail.get("code") or "server_error",
                                                    "message": detail["message"]}))
        return self.event({"type": "response.failed", "response": failed})

    def answer(self) -> dict:
        self.choice.whole()
        return self.finished()

    def finished(self) -> dict:
        """The response once its text ended."""
        reason = self.choice.finish_reason
        return self.keep(self.response("cancelled" if self.cancelled else "incomplete" if reason == "length"
                                       else "completed"))

    def keep(self, response: dict) -> dict:
        """The response, kept where the store is on and the request asked (once it ended, with its output as the
        conversation's last message)."""
        store = self.state.responses
        ended = response["status"] not in ("queued", "in_progress")
        if store is not None and self.asked.store:
            store.put(response, self.conversation + ([self.choice.items.message()] if ended else []), self.log,
                      self.inputs)
        if ended:
            self.final = response
        return response

    # ------------------------------------------------------------------ background
    async def detached(self) -> None:
        """A background response: its outputs read with no client waiting, the store saying how it stands
        (queued, in_progress, then completed, incomplete, cancelled or failed)."""
        try:
            if self.log is not None:
                self.opening()
                self._grown()
            while self.unfinished:
                item = await self.queue.get()  # (no keep-alive ticks: nobody listens)
                if isinstance(item, Failure):
                    self.failed(self._fail(item))
                    return
                if not self.started:
                    self.started = True
                    self.keep(self.response("in_progress"))
                self._coalesce([item])  # its items grow as a stream's do (the events logged where it streams)
                self._grown()
            self.closing()
        except Exception:  # nobody waits to be told: logged, and kept as failed
            log.exception("background response %s failed", self.id)
            failure = self.response("failed", {"code": "server_error", "message": "internal server error"})
            self.keep(failure)
            if self.log is not None:
                self.event({"type": "response.failed", "response": failure})
        finally:
            self.state.responses.running.pop(self.id, None)
            self.ended = True
            self._grown()

    def _grown(self) -> None:
        self.grew.set()
        self.grew = asyncio.Event()

    async def replay(self, after: int) -> AsyncIterator[str]:
        """A background stream's events after sequence number `after`, then each as it comes until the response
        ends (a reader that goes away stops nothing); a keep-alive comment after a quiet interval."""
        at = max(after + 1, 0)
        while True:
            while at < len(self.log):
                yield self.log[at]
                at += 1
            if self.ended:
                return
            grew = self.grew
            try:
                await asyncio.wait_for(grew.wait(), self.state.settings.keepalive_interval)
            except asyncio.TimeoutError:
                yield ": keep-alive\n\n"

    async def cancel(self) -> dict:
        """Stop a background response where it is: its text so far, status cancelled (or how it stands after
        CANCEL_WAIT seconds, where the engine has not stopped it by then)."""
        self.cancelled = True
        if self.unfinished:
            self.state.worker.abort(self.unfinished)
        try:
            await asyncio.wait_for(asyncio.shield(self.task), CANCEL_WAIT)
        except asyncio.TimeoutError:
            return self.response("in_progress")
        return self.final

    def sampled(self, name: str) -> float | None:
        """The value a sampling field had: the request's, else the model's default, else the API's."""
        asked = self.asked
        if name in asked.model_fields_set:
            return getattr(asked, name)
        return self.state.generation_defaults.get(name, getattr(asked, name))

    def response(self, status: str, error: dict | None = None) -> dict:
        asked = self.asked
        usage = self.usage() if status in ("completed", "incomplete", "cancelled") else None
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status, "model": self.model,
            "output": list(self.choice.items.items), "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": asked.instructions, "max_output_tokens": asked.max_output_tokens,
            "metadata": asked.metadata or {}, "parallel_tool_calls": asked.parallel_tool_calls is not False,
            "previous_response_id": asked.previous_response_id, "temperature": self.sampled("temperature"),
            "top_p": self.sampled("top_p"), "top_logprobs": asked.top_logprobs, "tools": asked.tools or [],
            "tool_choice": asked.tool_choice if asked.tool_choice is not None else "auto" if asked.tools else "none",
            "text": asked.text or {"format": {"type": "text"}}, "truncation": asked.truncation or "disabled",
            "store": self.state.responses is not None and asked.store, "background": asked.background,
            "reasoning": None,
            "user": asked.user, "usage": usage and {
                "input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
                "total_tokens": usage["total_tokens"], "input_tokens_details": usage["prompt_tokens_details"],
                "output_tokens_details": {"reasoning_tokens": 0}, "input_patches": usage["prompt_patches"],
                "output_patches": usage["completion_patches"]},
        }


async def create_response(req: ResponsesRequest, request: Request, state: AppState):
    admit(req, state, "responses")
    check_asked(req, state)
    earlier = previous_conversation(req, state)
    conversation = earlier + input_messages(req.input)
    first = int(req.instructions is not None)  # the conversation's first message after the instructions
    try:
        chat = fitted(chat_request(req, conversation), req, state, first)
        job = await chat_job(chat, state)
    except ApiError as e:  # named as this request names the field
        raise renamed(e, req) from None
    completion = ResponseCompletion(job.completion, state, [job.prompt], job.params, client_request_id(request),
                                    calls=job.calls, asked=req,
                                    conversation=[m.model_dump(exclude_none=True) for m in chat.messages[first:]])
    if not req.background:
        return await respond(completion, request)
    await completion.submit()
    completion.choice.streamed = True  # its pieces dropped once read into its items (GET shows them as they grow)
    if req.stream:
        completion.log = []
    queued = completion.keep(completion.response("queued"))
    state.responses.running[completion.id] = completion
    completion.task = asyncio.create_task(completion.detached())
    headers = {"X-Request-Id": completion.request_id}
    if req.stream:
        return StreamingResponse(completion.replay(-1), media_type="text/event-stream",
                                 headers={**SSE_HEADERS, **headers})
    return JSONResponse(queued, headers=headers)


def renamed(e: ApiError, req: ResponsesRequest) -> ApiError:
    """A chat request's error in the Responses API's names: max_output_tokens, input, text.format."""
    names = {"max_completion_tokens": "max_output_tokens", "messages": "input"}
    if req.response_format is None:
        names["response_format"] = "text.format"
    if e.param is None or e.param.split(".")[0] not in names:
        return e
    old = e.param.split(".")[0]
    message = e.message if old == "messages" else e.message.replace(old, names[old])  # (a template's own words stay)
    return ApiError(e.status, message, names[old] + e.param[len(old):], e.code, e.headers)


def check_asked(req: ResponsesRequest, state: AppState) -> None:
    """What the Responses API cannot ask of this server: a 400 naming the field."""
    if req.background and (state.responses is None or not req.store):
        raise ApiError(400, "background: a background response is kept until it is fetched: it needs store true, "
                            "on a server started with --enable-responses-api-store", "background", "invalid_value")
    if req.n != 1:
        raise ApiError(400, "n: a response has one output; ask for several with /v1/chat/completions", "n",
                       "invalid_value")
    if req.return_patches:
        raise ApiError(400, "return_patches: a response's output has no place for them; ask /v1/completions or "
                            "/v1/chat/completions", "return_patches", "unsupported")
    if req.tools and req.tool_choice != "none" and logprobs_asked(req):
        raise ApiError(400, "include: logprobs are given for a message's text only, not where tools may be called "
                            "(a call's bytes are not the message's); tool_choice 'none' allows them",
                       "include", "unsupported")


def logprobs_asked(req: ResponsesRequest) -> bool:
    return LOGPROBS in (req.include or []) or bool(req.top_logprobs)


def previous_conversation(req: ResponsesRequest, state: AppState) -> list[dict]:
    """The messages of the stored response the request continues, its output included ([] without one)."""
    if req.previous_response_id is None:
        return []
    if state.responses is None:
        raise ApiError(400, "previous_response_id: this server keeps no responses; start it with "
                            "--enable-responses-api-store, or send the whole conversation as input",
                       "previous_response_id", "unsupported")
    stored = state.responses.get(req.previous_response_id)
    if req.previous_response_id in state.responses.running:
        raise ApiError(400, f"previous_response_id: the background response {req.previous_response_id!r} is still "
                            "generating; continue it once it has finished", "previous_response_id", "invalid_value")
    if stored is None:
        raise ApiError(400, f"previous_response_id: no response {req.previous_response_id!r} is kept (never "
                            "stored, deleted, or forgotten for the store's budget)", "previous_response_id",
                       "previous_response_not_found")
    return [dict(m) for m in stored.conversation]


def input_messages(given: str | list[dict[str, Any]]) -> list[dict]:
    """The request's input as chat messages: a function_call item joins the assistant message before it (a chat
    message's tool_calls), a function_call_output item is a tool message."""
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    if not given:
        raise ApiError(400, "input: give text or at least one item", "input", "invalid_value")
    messages: list[dict] = []
    for i, item in enumerate(given):
        kind, where = item.get("type", "message"), f"input[{i}]"
        if kind == "message":
            role = item.get("role")
            if role not in ROLES:
                raise ApiError(400, f"{where}.role: {role!r} is none of {', '.join(ROLES)}", f"{where}.role",
                               "invalid_value")
            messages.append({"role": "system" if role == "developer" else role,
                             "content": item_text(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call = {"id": field(item, "call_id", where), "type": "function",
                    "function": {"name": field(item, "name", where), "arguments": field(item, "arguments", where)}}
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": field(item, "call_id", where),
                             "content": output if isinstance(output, str) else item_text(output, f"{where}.output")})
        else:
            raise ApiError(400, f"{where}.type: {kind!r}; this server reads message, function_call and "
                                "function_call_output items", f"{where}.type", "unsupported")
    return messages


def field(item: dict, name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise ApiError(400, f"{where}.{name}: a string is needed", f"{where}.{name}", "invalid_value")
    return value


def item_text(content: Any, where: str) -> str:
    """A message's content as text: a string, or its text parts joined by newlines (as chat.py joins them)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where}: a string or a list of text parts is needed", where, "invalid_value")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ApiError(400, f"{where}[{j}]: a part of type {kind!r}; this server reads text parts only "
                                f"({', '.join(TEXT_PARTS)})", where, "unsupported")
        texts.append(part["text"])
    return "\n".join(texts)


def chat_request(req: ResponsesRequest, conversation: list[dict]) -> ChatCompletionRequest:
    """The request in a chat completion's terms."""
    fields = {name: getattr(req, name) for name in SamplingFields.model_fields
              if name in req.model_fields_set and name not in NOT_COPIED}
    system = [{"role": "system", "content": req.instructions}] if req.instructions is not None else []
    return ChatCompletionRequest.model_validate({
        **fields, "messages": system + conversation, "max_completion_tokens": req.max_output_tokens,
        "logprobs": logprobs_asked(req), "top_logprobs": req.top_logprobs if logprobs_asked(req) else None,
        "tools": chat_tools(req.tools), "tool_choice": chat_tool_choice(req.tool_choice),
        "parallel_tool_calls": req.parallel_tool_calls, "response_format": response_format(req),
        "chat_template_kwargs": req.chat_template_kwargs})


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Function tools, {'type': 'function', 'name', ...}, as chat's {'type': 'function', 'function': {...}}."""
    if tools is None:
        return None
    functions = []
    for i, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise ApiError(400, f"tools[{i}]: a tool of type {tool.get('type')!r}; this server calls functions "
                                "only", f"tools[{i}].type", "unsupported")
        functions.append({"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}})
    return functions


def chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if isinstance(choice, dict) and choice.get("type") == "function" and "function" not in choice:
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def response_format(req: ResponsesRequest) -> dict | None:
    """text.format as a chat request's response_format (vLLM's response_format is refused beside it)."""
    form = (req.text or {}).get("format") or {"type": "text"}
    if not isinstance(form, dict):
        raise ApiError(400, "text.format: an object with a type is needed", "text.format", "invalid_value")
    if req.response_format is not None:
        if form.get("type") != "text":
            raise ApiError(400, "response_format: give text.format or response_format, not both", "response_format",
                           "invalid_value")
        return req.response_format.model_dump(exclude_none=True)
    kind = form.get("type")
    if kind == "json_schema":
        if not isinstance(form.get("schema"), dict):
            raise ApiError(400, "text.format.schema: a JSON schema (an object) is needed", "text.format.schema",
                           "invalid_value")
        return {"type": "json_schema", "json_schema": {k: form[k] for k in ("name", "schema", "strict") if k in form}}
    if kind in ("text", "json_object"):
        return None if kind == "text" else {"type": "json_object"}
    raise ApiError(400, f"text.format.type: {kind!r} is none of text, json_object, json_schema", "text.format.type",
                   "invalid_value")


def fitted(chat: ChatCompletionRequest, req: ResponsesRequest, state: AppState, first: int) -> ChatCompletionRequest:
    """With truncation "auto", the conversation without its oldest messages (from `first`, after the
    instructions), as few left out as let the prompt and the bytes asked for fit in the context; the last
    message always stays. A tool message whose call was left out goes with it. The prompt shrinks as
    messages go, so the cut is found by bisection: a few prompts rendered, not one per message."""
    if req.truncation != "auto":
        return chat
    room = req.max_output_tokens if req.max_output_tokens is not None else max(req.min_tokens, 1)
    messages = list(chat.messages)
    cuts = [first]  # where the kept messages may begin: each time the oldest goes, with the tool messages after it
    while len(messages) - cuts[-1] > 1:
        cut = cuts[-1] + 1
        while len(messages) - cut > 1 and messages[cut].role == "tool":
            cut += 1
        cuts.append(cut)

    def kept(i: int) -> ChatCompletionRequest:
        return chat.model_copy(update={"messages": messages[:first] + messages[cuts[i]:]})

    low, high = 0, len(cuts) - 1  # the last message alone is kept whether it fits or not (then refused)
    while low < high:
        middle = (low + high) // 2
        if len(conversation_prompt(kept(middle), state)) + room <= state.max_model_len - 1:
            high = middle
        else:
            low = middle + 1
    return kept(low)


def stored(response_id: str, state: AppState, stream: bool = False, starting_after: int | None = None):
    """GET /v1/responses/{id}: the response as it was answered (a background one still generating: as it stands,
    its output so far), or a 404. With `stream`, a background stream's events after `starting_after` (all of
    them without it), then, where it still runs, each as it comes."""
    kept = _kept(response_id, state)
    running = state.responses.running.get(response_id)
    if stream:
        if (running.log if running is not None else kept.events) is None:
            raise ApiError(400, "stream: only a response created with background and stream true can be streamed "
                                "again", "stream", "invalid_value")
        after = -1 if starting_after is None else starting_after
        events = running.replay(after) if running is not None else iter(kept.events[after + 1:])
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
    return running.response("in_progress" if running.started else "queued") if running is not None else \
        kept.response


def listed_inputs(response_id: str, state: AppState, after: str | None, limit: int, order: str) -> dict:
    """GET /v1/responses/{id}/input_items: the request's input items (not those of the responses it continues),
    `limit` at a time after the item `after`, newest first by default (order "desc"), as OpenAI lists them."""
    if not 1 <= limit <= 100:
        raise ApiError(400, f"limit: {limit}; between 1 and 100", "limit", "invalid_value")
    items = list(_kept(response_id, state).inputs or [])
    items = items[::-1] if order == "desc" else items
    start = 0
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise ApiError(400, f"after: {after!r} is no input item of response {response_id!r}", "after",
                           "invalid_value")
        start = ids.index(after) + 1
    page = items[start:start + limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": start + limit < len(items)}


async def delete_stored(response_id: str, state: AppState) -> dict:
    """DELETE /v1/responses/{id}: forgotten (a background response still generating is cancelled first)."""
    _kept(response_id, state)
    running = state.responses.running.get(response_id)
    if running is not None:
        await running.cancel()
    state.responses.delete(response_id)
    return {"id": response_id, "object": "response", "deleted": True}


async def cancel_stored(response_id: str, state: AppState) -> dict:
    """POST /v1/responses/{id}/cancel: a background response still generating stops; its response, cancelled."""
    _kept(response_id, state)
    running = state.responses.running.get(response_id)
    if running is None:
        raise ApiError(400, "only a background response still generating can be cancelled; this one has finished",
                       "response_id", "invalid_value")
    return await running.cancel()


def _kept(response_id: str, state: AppState):
    """What is kept of a response (a background one still generating may have been forgotten for the budget: it is
    kept again when it ends)."""
    store = state.responses
    kept = store.get(response_id) if store is not None else None
    if kept is None and store is not None and response_id in store.running:
        running = store.running[response_id]
        kept = Stored(running.response("in_progress"), running.conversation, 0, running.log, running.inputs)
    if kept is None:
        why = "" if state.responses is not None else " (this server keeps none: --enable-responses-api-store)"
        raise ApiError(404, f"no response {response_id!r} is kept{why}", "response_id", "not_found")
    return kept
