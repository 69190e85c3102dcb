"""Every error the server returns, in OpenAI's shape, mapped from its cause in one place.

`{"error": {"message", "type", "param", "code"}}` for 400, 401, 404, 405, 413, 429, 503 and 500;
FastAPI's 422 becomes a 400 naming the field; an unexpected exception becomes a 500 whose body
never holds a traceback (the log does).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from blt_runtime import PromptTooLong, QueueFull

log = logging.getLogger("blt.server")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
         503: "service_unavailable", 500: "internal_server_error"}
RETRY_AFTER_S = 1
MAX_ECHO = 100  # characters of a rejected input quoted back


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def queue_full(message: str) -> ApiError:
    return ApiError(429, message, code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})


def prompt_too_long(e: PromptTooLong, param: str = "max_tokens") -> ApiError:
    return ApiError(400, str(e), param=param, code="context_length_exceeded")


def utf8(text: str, param: str) -> bytes:
    """A request's text as UTF-8; a lone surrogate (valid JSON, not encodable) is a 400 naming `param`."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"{param} is not valid Unicode (lone surrogate at character {e.start})", param,
                       "invalid_value") from None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= MAX_ECHO else text[:MAX_ECHO] + "...(truncated)"


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first problem of a 422, as (message, param)."""
    err = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None
    if err.get("type") == "json_invalid":
        return f"the body is not valid JSON: {err.get('msg')}", None
    where = ".".join(loc) or "body"
    message = f"{where}: {err.get('msg', 'invalid value')}"
    if "input" in err and err.get("type") != "missing":
        message += f" (got {_short(err['input'])})"
    return message, param


def count_invalid(request: Request) -> None:
    """A refused request (400) counts in blt_requests_rejected_total{reason="invalid"}, whichever check
    refused it: the schema's, or the server's own."""
    state = getattr(request.app.state, "blt", None)
    if state is not None:
        state.metrics.of(state.metrics.rejected, reason="invalid").inc()


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError):
        if exc.status == 400:
            count_invalid(request)
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        count_invalid(request)
        message, param = validation_message(exc)
        return error_response(400, message, param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(QueueFull)
    async def _full(request: Request, exc: QueueFull):
        e = queue_full(str(exc))
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error", code="internal_error")
