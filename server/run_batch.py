"""`blt-run-batch -i requests.jsonl -o results.jsonl [MODEL_DIR] [blt-serve's flags]`: a file of requests in
OpenAI's batch format (vLLM's `run_batch`), answered without a server, in the input's order.

Each input line is a JSON object `{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions",
"body": {...}}`; the url is one of BATCH_URLS. Each is sent to the same app blt-serve serves (create_app, its
lifespan run), in process, with no socket: the same validation, defaults, guides and engine. Many are in
flight at once, so that the engine batches them; the answers are written as they complete, each after those of
the lines before it. An output line is `{"id": "batch_req_...", "custom_id": ..., "response": {"status_code":
200, "request_id": ..., "body": {...}}, "error": null}`; where the request failed, `error` is the app's error
object (or a line's own fault: not JSON, no custom_id, a custom_id seen before, another method or url, a
stream asked for) and `body` is null. Nothing is dropped: every non-blank input line has an output line. A
request the queue cannot take yet (429) is sent again after the Retry-After the app gives.

Exit status 0 once every line is answered (whether or not some failed); 2 where the model, a flag or the
files cannot be used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
import uuid

from blt_runtime.errors import BltError

from .app import build_engine, create_app, from_hub
from .chat_template import ChatTemplateError
from .generation_defaults import GenerationConfigError
from .settings import load_settings

log = logging.getLogger("blt.server")

BATCH_URLS = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/patches")
PROGRESS_S = 10.0  # seconds between progress lines


async def post(app, url: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    """POST `body` (JSON) to the app at `url`, as an HTTP client would, without a socket: status, headers, body.
    With --api-key, it sends the first key."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    keys = app.state.blt.settings.api_key
    if keys:
        headers.append((b"authorization", f"Bearer {keys[0]}".encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": url, "raw_path": url.encode(), "query_string": b"", "root_path": "", "headers": headers,
             "client": ("batch", 0), "server": ("batch", 0)}
    sent = False
    status, answer_headers, chunks = 500, {}, []

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the request is whole; a disconnect never comes

    async def send(message):
        nonlocal status, answer_headers
        if message["type"] == "http.response.start":
            status = message["status"]
            answer_headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, answer_headers, b"".join(chunks)


def error_line(custom_id, status: int, error) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": f"batch-{uuid.uuid4().hex}", "body": None},
            "error": error}


def check_line(text: str, number: int, seen: set) -> tuple[dict | None, dict | None]:
    """(the request, None), or (None, its output line) where the line itself is at fault."""
    try:
        request = json.loads(text)
    except json.JSONDecodeError as e:
        return None, error_line(None, 400, f"line {number}: not JSON ({e})")
    if not isinstance(request, dict):
        return None, error_line(None, 400, f"line {number}: not a JSON object")
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str):
        return None, error_line(None, 400, f"line {number}: custom_id (a string) is missing")
    if custom_id in seen:
        return None, error_line(custom_id, 400, f"line {number}: custom_id {custom_id!r} was used on a line before")
    seen.add(custom_id)
    method, url, body = request.get("method", "POST"), request.get("url"), request.get("body")
    if method != "POST" or url not in BATCH_URLS:
        return None, error_line(custom_id, 400, f"line {number}: {method} {url} is not served in a batch (POST to "
                                                f"{', '.join(BATCH_URLS)})")
    if not isinstance(body, dict):
        return None, error_line(custom_id, 400, f"line {number}: body (a JSON object) is missing")
    if body.get("stream"):
        return None, error_line(custom_id, 400, f"line {number}: a request in a batch is not streamed (stream: true)")
    return request, None


async def answer(app, request: dict) -> dict:
    """The output line of one request; a 429 (the queue is full) is sent again after its Retry-After."""
    body = json.dumps(request["body"]).encode()
    while True:
        status, headers, content = await post(app, request["url"], body)
        if status != 429:
            break
        await asyncio.sleep(min(5.0, float(headers.get("retry-after", "1") or 1)))
    try:
        data = json.loads(content)
    except json.JSONDecodeError:
        data = {"error": {"message": content.decode("utf-8", "replace"), "code": status}}
    if status == 200:
        request_id = data.get("id") if isinstance(data, dict) else None
        return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": request["custom_id"],
                "response": {"status_code": 200, "request_id": request_id or f"batch-{uuid.uuid4().hex}",
                             "body": data}, "error": None}
    return error_line(request["custom_id"], status, data.get("error", data) if isinstance(data, dict) else data)


async def run_batch(app, lines, out, in_flight: int) -> dict[str, int]:
    """Answer every non-blank line of `lines` (an iterable of str) with `app`, `in_flight` at once at most,
    writing each output line to `out` after those of the lines before it: {"requests", "failed"}."""
    done: dict[int, dict] = {}
    written = failed = 0
    gate = asyncio.Semaphore(in_flight)
    tasks: set[asyncio.Task] = set()
    last = time.monotonic()

    def flush():
        nonlocal written, failed, last
        while written in done:
            line = done.pop(written)
            failed += line["error"] is not None
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
            written += 1
        if time.monotonic() - last > PROGRESS_S:
            last = time.monotonic()
            log.info("batch: %d answered, %d of them failed, %d in flight", written, failed, len(tasks))

    async def one(index: int, request: dict):
        try:
            done[index] = await answer(app, request)
        except Exception as e:  # noqa: BLE001 - a line's answer, whatever went wrong
            done[index] = error_line(request["custom_id"], 500, f"{type(e).__name__}: {e}")
        finally:
            gate.release()
        flush()

    seen: set[str] = set()
    index = 0
    async with app.router.lifespan_context(app):
        for number, text in enumerate(lines, 1):
            if not text.strip():
                continue
            request, fault = check_line(text, number, seen)
            if fault is not None:
                done[index] = fault
                flush()
            else:
                await gate.acquire()
                task = asyncio.create_task(one(index, request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            index += 1
        if tasks:
            await asyncio.gather(*tasks)
    flush()
    return {"requests": index, "failed": failed}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blt-run-batch", description="Answer a file of requests in OpenAI's batch "
                                "format (JSONL), without a server; every other flag is blt-serve's.")
    p.add_argument("-i", "--input-file", required=True, help="requests, one JSON object a line")
    p.add_argument("-o", "--output-file", required=True, help="answers, one JSON object a line, in the input's order")
    return p


def main(argv: list[str] | None = None) -> int:
    args, rest = parser().parse_known_args(argv)
    settings = load_settings(rest)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        lines = open(args.input_file, encoding="utf-8")  # noqa: SIM115 - read as the batch goes
        out = open(args.output_file, "w", encoding="utf-8")  # noqa: SIM115
    except OSError as e:
        print(f"blt-run-batch: {e}", file=sys.stderr)
        return 2
    try:
        settings = from_hub(settings)
        app = create_app(settings, build_engine(settings))
    except (BltError, OSError, ValueError, ChatTemplateError, GenerationConfigError) as e:
        print(f"blt-run-batch: cannot load the model from {settings.model_dir}: {e}", file=sys.stderr)
        return 2
    engine = app.state.blt.engine
    with lines, out:
        counts = asyncio.run(run_batch(app, lines, out, in_flight=2 * engine.max_batch_size))
    log.info("batch: %d requests answered into %s, %d of them failed", counts["requests"], args.output_file,
             counts["failed"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
