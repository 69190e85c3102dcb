"""POST /invocations (vLLM's, for SageMaker): one route for every kind of generation, told apart by the body.

A body with `messages` is a chat completion, one with `prompt` a completion, one with `input` a response (in
that order, as vLLM tries them); each is checked by its own schema (a 400 naming the field) and answered as its
own route answers it, streamed or not.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from .chat import create_chat_completion
from .completions import create_completion
from .errors import ApiError
from .responses import create_response
from .schemas import ChatCompletionRequest, CompletionRequest, ResponsesRequest
from .state import AppState

KINDS = (("messages", ChatCompletionRequest, create_chat_completion), ("prompt", CompletionRequest, create_completion),
         ("input", ResponsesRequest, create_response))


async def invoke(body: Any, request: Request, state: AppState):
    if isinstance(body, dict):
        for key, schema, create in KINDS:
            if key in body:
                try:
                    asked = schema.model_validate(body)
                except ValidationError as e:
                    raise RequestValidationError(e.errors()) from None
                return await create(asked, request, state)
    raise ApiError(400, "/invocations takes a JSON object with messages (a chat completion), prompt (a completion) "
                        "or input (a response)", None, "invalid_value")
