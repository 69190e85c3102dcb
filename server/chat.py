"""POST /v1/chat/completions: a conversation, rendered by the chat template, completed as one prompt.

Owns what is particular to chat: the messages (text content only), the template's options, the
request's chat-only fields in the completion's terms (max_completion_tokens, logprobs with
top_logprobs), and the answer's shape (chat.completion, or chat.completion.chunk deltas that begin
with the assistant's role). Everything else, sampling, guides, stops, streaming, abort on disconnect,
is completions.py's. Without a chat template (BLT checkpoints are base models, chat_template.py) the
request is a 400 that says how to give one. A tool choice that calls a tool (tools.py) guides the
completion to the calls' JSON, and the answer reads the calls out of it; "auto" reads the model's own text
as content and calls (tool_parser.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from blt_runtime import SamplingParams
from blt_runtime.pushdown import Guide

from .chat_template import ChatTemplateError, Conversation
from .choices import ChatChoiceState
from .completions import (
    Completion,
    admit,
    check_capacity,
    check_context,
    client_request_id,
    respond,
    sampling_params,
)
from .errors import ApiError, utf8
from .guided import asked_guide, asked_limits, asked_whitespace, compile_guide, request_guide, schema_text
from .schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields, TokenizeRequest
from .state import AppState
from .tool_parser import PARSERS
from .tools import CallStream, ToolCalling, tool_calling


class ChatCompletion(Completion):
    ID_PREFIX, OBJECT, CHUNK_OBJECT, CHOICE = "chatcmpl-", "chat.completion", "chat.completion.chunk", ChatChoiceState

    def __init__(self, *args, calls: ToolCalling | None = None, echo: str = "", **kw):
        """`calls`: the text is read as tool calls; `echo`: the text the answer begins with."""
        super().__init__(*args, **kw)
        for choice in self.choices.values():
            if calls is not None:
                choice.calls = PARSERS[calls.parser]() if calls.parser else CallStream(calls.name)
            choice.prefix = echo if calls is None or calls.parser else ""

    def opening(self) -> list[str]:
        return [self.chunk([delta]) for c in self.choices.values() for delta in c.opening()]


def message_text(message: ChatMessage, index: int) -> str:
    """A message's content as text: a string, or its text parts joined by newlines (as vLLM joins them)."""
    content = message.content
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise ApiError(400, f"messages[{index}].content[{j}]: a part of type {part.type!r}; this server reads "
                                "text parts only", f"messages[{index}].content", "unsupported")
        texts.append(part.text)
    return "\n".join(texts)


def conversation_prompt(req: ChatCompletionRequest | TokenizeRequest, state: AppState) -> bytes:
    """The prompt the server's chat template makes of the request's conversation (a 400 without a template,
    or for a conversation it refuses)."""
    if state.chat_template is None:
        raise ApiError(400, f"the model {state.model_name!r} has no chat template (BLT checkpoints are base models): "
                            "start the server with --chat-template FILE, or send the conversation as text to "
                            "/v1/completions", "messages", "no_chat_template")
    if not req.messages:
        raise ApiError(400, "messages: give at least one message", "messages", "invalid_value")
    if req.add_generation_prompt and req.continue_final_message:
        raise ApiError(400, "add_generation_prompt and continue_final_message cannot both be true: the prompt "
                            "either opens a new assistant message or continues the last one",
                       "continue_final_message", "invalid_value")
    messages = [{**m.model_dump(exclude_none=True), "content": message_text(m, i)}
                for i, m in enumerate(req.messages)]
    chat = Conversation(messages, req.add_generation_prompt, req.continue_final_message, req.tools,
                        req.chat_template_kwargs)
    try:
        return utf8(state.chat_template.render(chat), "messages")
    except ChatTemplateError as e:
        raise ApiError(400, str(e), "messages", "invalid_value") from None


def as_completion(req: ChatCompletionRequest, prompt: str, max_bytes: int) -> CompletionRequest:
    """The chat request in a completion request's terms (the sampling fields as they are)."""
    fields = {name: getattr(req, name) for name in SamplingFields.model_fields if name in req.model_fields_set}
    return CompletionRequest.model_validate({**fields, "prompt": prompt, "max_tokens": max_bytes,
                                             "logprobs": (req.top_logprobs or 0) if req.logprobs else None})


@dataclass(frozen=True)
class ChatJob:
    """A chat request in the engine's terms: the completion it asks for, its prompt, the sampling parameters of
    its choices (their guide included) and how its text is read as tool calls, if it is."""

    completion: CompletionRequest
    prompt: bytes
    params: SamplingParams
    calls: ToolCalling | None


async def chat_job(req: ChatCompletionRequest, state: AppState) -> ChatJob:
    """Everything a chat request asks, checked (a 400 naming the field) before anything is queued."""
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs=true", "top_logprobs", "invalid_value")
    calls = tool_calling(req.tools, req.tool_choice, req.parallel_tool_calls, state.tool_call_parser)
    prompt = conversation_prompt(req, state)
    text = prompt.decode("utf-8")
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if asked is None:  # the whole rest of the context (vLLM), or the model's max_new_tokens; down to min_tokens
        check_context([prompt], req.min_tokens, state.max_model_len, "min_tokens", "messages")
        asked = state.max_model_len - 1 - len(prompt)
        asked = max(min(asked, state.generation_defaults.get("max_tokens", asked)), req.min_tokens)
    else:
        check_context([prompt], asked, state.max_model_len, name, "messages")
    completion = as_completion(req, text, asked)
    if calls is not None and calls.one_call:  # the text ends with the call's end tag
        end = PARSERS[calls.parser].END
        if end is None:
            raise ApiError(400, f"parallel_tool_calls: false stops the text at the end tag of its first call; the "
                                f"{calls.parser} format has none", "parallel_tool_calls", "unsupported")
        stop = [completion.stop] if isinstance(completion.stop, str) else completion.stop or []
        completion = completion.model_copy(update={"stop": [*stop, end]})
    guide = await chat_guide(completion, calls)
    params = sampling_params(completion, 0, guide=guide, defaults=state.generation_defaults)
    check_capacity([prompt], req.n, state.engine.capacity)
    return ChatJob(completion, prompt, params, calls)


async def create_chat_completion(req: ChatCompletionRequest, request: Request, state: AppState):
    admit(req, state, "chat completion")
    job = await chat_job(req, state)
    last = req.messages[-1]
    echo = message_text(last, len(req.messages) - 1) if req.echo and last.role == "assistant" else ""
    return await respond(ChatCompletion(job.completion, state, [job.prompt], job.params, client_request_id(request),
                                        calls=job.calls, echo=echo), request)


async def chat_guide(completion: CompletionRequest, calls: ToolCalling | None) -> Guide | None:
    """The request's own guide, or its tool calls' (never both; "auto" has none)."""
    if calls is None or calls.schema is None:
        return await request_guide(completion)
    asked = asked_guide(completion)
    if asked is not None:
        raise ApiError(400, f"{asked[0]}: a tool call guides the completion to the tool's arguments; send either",
                       asked[0], "invalid_value")
    return await compile_guide("tool_choice" if calls.name else "tools", "json", schema_text(calls.schema),
                               asked_whitespace(completion), asked_limits(completion))
