"""ASGI middleware in front of every route: API keys and the request-body size limit.

Pure ASGI (no BaseHTTPMiddleware) so streaming responses and disconnects pass through untouched.
Keys are compared in constant time; /health (and /ping) and the playground page (/) are always open, /metrics
when asked. The body is read in full before the app sees it; past the limit the answer is 413 without reading
the rest.
"""

from __future__ import annotations

import hmac
import json

from .errors import error_body

OPEN_PATHS = ("/health", "/ping", "/")  # the playground page holds no data; its requests send the key


async def _send_error(send, status: int, message: str, code: str, headers=()) -> None:
    body = json.dumps(error_body(status, message, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class ApiKeyMiddleware:
    def __init__(self, app, keys: tuple[str, ...], metrics_open: bool = False):
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.open = OPEN_PATHS + (("/metrics",) if metrics_open else ())

    def _allowed(self, scope) -> bool:
        if not self.keys or scope["path"] in self.open or scope.get("method") == "OPTIONS":
            return True
        header = dict(scope.get("headers", ())).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        ok = False
        for key in self.keys:  # every key is compared, so timing does not say which one nearly matched
            ok |= hmac.compare_digest(token.strip(), key)
        return ok and scheme.lower() == b"bearer"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self._allowed(scope):
            return await self.app(scope, receive, send)
        await _send_error(send, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                          "invalid_api_key", [(b"www-authenticate", b"Bearer")])


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away while sending
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await self._too_large(send)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: only http.disconnect remains to be heard

        await self.app(scope, replay, send)

    async def _too_large(self, send) -> None:
        await _send_error(send, 413, f"the request body exceeds {self.max_bytes} bytes", "body_too_large")
