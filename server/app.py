"""The FastAPI app: `create_app(settings, engine=None)` wires routes, middleware, errors and the worker.

Thin on purpose: each route hands its work to completions.py, chat.py, responses.py, invocations.py,
patches.py or tokenizing.py.
With no engine given, the model named by the settings is loaded (bad weights fail here, before
serving; a bad chat template or generation config before that). The lifespan warms the engine up,
starts its worker thread, and stops it at the end.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Body, Depends, FastAPI, Query, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from blt_runtime import SamplingParams

from . import errors
from .chat import create_chat_completion
from .chat_template import find_chat_template
from .completions import create_completion
from .generation_defaults import load_generation_defaults
from .invocations import invoke
from .metrics import Metrics
from .middleware import ApiKeyMiddleware, BodyLimitMiddleware
from .patches import model_card, patches
from .response_store import ResponseStore
from .responses import cancel_stored, create_response, delete_stored, listed_inputs, stored
from .schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    PatchesRequest,
    PatchesResponse,
    ResponsesRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from .settings import Settings
from .state import AppState
from .tokenizing import detokenize, tokenize
from .worker import EngineWorker

log = logging.getLogger("blt.server")
PLAYGROUND = Path(__file__).resolve().parent / "static" / "playground.html"
VERSION = "0.1.0"  # pyproject.toml's
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 503)}


def get_state(request: Request) -> AppState:
    return request.app.state.blt


State = Annotated[AppState, Depends(get_state)]


def from_hub(settings: Settings) -> Settings:
    """Settings whose model directory is the local copy of the Hugging Face Hub model they name by id ("org/name",
    fetched where it is not cached: blt_runtime/hub.py), served under that id; other settings as they are."""
    from blt_runtime.errors import ConfigError
    from blt_runtime.hub import is_hub_id, resolve_model_dir

    if not is_hub_id(settings.model_dir):
        if settings.revision is not None:
            raise ConfigError(f"--revision {settings.revision}: {settings.model_dir} is a directory, not a Hugging "
                              "Face Hub model id; a revision picks a version of a Hub model")
        return settings
    log.info("%s is no directory here: looking for it on the Hugging Face Hub", settings.model_dir)
    directory = resolve_model_dir(settings.model_dir, revision=settings.revision, cache_dir=settings.download_dir)
    log.info("%s: %s", settings.model_dir, directory)
    return replace(settings, model_dir=str(directory), served_model_name=settings.served_model_name or
                   settings.model_dir)


def build_engine(settings: Settings):
    """Load the model the settings name and wrap it in an Engine (a BltError names what is wrong)."""
    from blt_runtime import Engine, load_model
    from blt_runtime.device import memory_info, resolve_device_dtype, serving_threads
    from blt_runtime.errors import ConfigError
    from blt_runtime.pool_size import use_device_share

    share = settings.gpu_memory_utilization if settings.kv_cache_memory_bytes is None else None
    if settings.gpu_memory_utilization is not None and share is None:
        log.info("--gpu-memory-utilization: --kv-cache-memory-bytes gives the global model's cache its size")
    free_at_start = None  # the device's free memory before the model: what a share of it is measured from
    if share is not None:
        info = memory_info(resolve_device_dtype(settings.device, settings.dtype)[0])
        if info is None:
            log.warning("--gpu-memory-utilization %s: the model is not on a GPU, ignored (--kv-cache-memory-bytes "
                        "gives the global model's cache a size on a CPU)", share)
        else:
            free_at_start = info[0]
    model = load_model(settings.model_dir, settings.device, settings.dtype)
    threads = serving_threads(model.device, settings.threads)
    log.info("loaded %s on %s in %s (%d CPU threads)", settings.model_dir, model.device, model.dtype, threads)
    if settings.max_model_len is not None and not 2 <= settings.max_model_len <= model.config.max_seq_len:
        raise ConfigError(f"--max-model-len {settings.max_model_len}: must be in 2..{model.config.max_seq_len} "
                          "(the model's max_seq_len)")
    try:
        engine = Engine(model, max_batch_size=settings.max_batch_size, max_model_len=settings.max_model_len,
                        max_queue=settings.max_queue, prefill_chunk=settings.prefill_chunk,
                        cuda_graphs=False if settings.enforce_eager else None,  # None: graphs where CUDA is
                        compile=settings.compile, kernels=settings.kernels,
                        overlap=False if settings.no_overlap else None,  # None: overlap where CUDA is
                        share_prompts=not settings.no_prompt_sharing, kept_prefixes=settings.kept_prefixes,
                        jump_forward=settings.jump_forward, seed=settings.seed,
                        lookahead_rows=settings.lookahead_rows, global_cache_bytes=settings.kv_cache_memory_bytes)
    except ConfigError as e:
        if settings.kv_cache_memory_bytes is None:
            raise
        raise ConfigError(f"--kv-cache-memory-bytes {settings.kv_cache_memory_bytes}: {e}") from None
    if free_at_start is not None:
        warm_up(engine)  # its CUDA graphs, and their memory, before the share is measured
        try:
            use_device_share(engine, share, free_at_start)
        except ConfigError as e:
            raise ConfigError(f"--gpu-memory-utilization {share}: {e}") from None
    log.info("decode steps: %s%s, %s kernels%s%s; %s", "CUDA graphs" if engine.uses_cuda_graphs else
             "static shapes, eager" if engine.static is not None else "dynamic shapes, eager",
             ", element-wise stretches compiled" if settings.compile else "", engine.kernels,
             ", each queued before the last one's outputs are handled" if engine.overlap else "",
             f", bytes decoded ahead at up to {engine.static.lookahead_rows} rows"
             if engine.static is not None and engine.static.lookahead_rows else "",
             f"{engine.jump_forward} or more bytes a guide forces prefilled as one chunk" if engine.jump_forward
             else "bytes a guide forces sampled a step each")
    log_caches(engine)
    return engine


def log_caches(engine) -> None:
    """What the caches take, and what the global model's pages would for a full context at 4 bytes a patch
    (about what the shipped model, and English at the released models' threshold, give): how many sequences
    of the full context its pool holds where its size is fixed; else the device's free memory besides, and a
    warning where it holds not one."""
    from blt_runtime.device import free_memory

    per_patch = engine.runner.global_bytes_per_patch()
    full = per_patch * (engine.max_model_len // 4)
    pool = engine.runner.global_kv
    if pool.fixed:
        patches = (pool.num_pages - 1) * pool.page
        log.info("caches: %.1f MiB for the local models' windows; %.2f GiB for the global model's pages, fixed: "
                 "%d patches for all sequences together (shared prompts share theirs), %d sequences of %d bytes "
                 "in patches of 4 at once, one at a patch a byte; beyond that, sequences wait their turn",
                 engine.cache_bytes()["local"] / 2**20, engine.cache_bytes()["global"] / 2**30, patches,
                 patches // max(1, engine.max_model_len // 4), engine.max_model_len)
        return
    log.info("caches: %.1f MiB for the local models' windows; the global model's takes pages as sequences need "
             "them, %.1f MiB per 1,000 patches of a sequence (shared prompts share theirs): %.2f GiB for a "
             "sequence of %d bytes in patches of 4, %.2f GiB if all %d slots held one", engine.cache_bytes()["local"]
             / 2**20, 1000 * per_patch / 2**20, full / 2**30, engine.max_model_len,
             full * engine.max_batch_size / 2**30, engine.max_batch_size)
    free = free_memory(engine.model.device)
    if free is None:
        return
    if full > free:
        log.warning("a sequence of the full context would grow the global model's cache by %.1f GiB, and %.1f GiB "
                    "is free on the device: lower --max-model-len", full / 2**30, free / 2**30)
    elif full * engine.max_batch_size > free:
        log.info("the free memory (%.1f GiB) holds %d sequences of the full context at once; beyond what it "
                 "holds, sequences are preempted and wait their turn", free / 2**30, free // full)


def warm_up(engine) -> None:
    """Run short requests through every step kind (and, with CUDA graphs, every batch bucket, which
    captures their graphs), so that the first clients do not pay for it."""
    if getattr(engine, "model", None) is None:
        return
    sizes = engine.static.sizes if engine.uses_cuda_graphs else [1]
    for size in sizes:  # one prompt is prefilled per step: each lives long enough for all to run together
        params = SamplingParams(max_bytes=size + 8, temperature=0.0, ignore_eos=True)
        for i in range(size):
            engine.add_request(f"warm-up-{size}-{i}", b"Warm up.", params)
        while engine.has_work():
            engine.step()


async def drain(state: AppState, timeout: float) -> None:
    """Stop admitting (503), let running requests finish for `timeout` s, then stop the rest."""
    state.draining = True
    log.info("draining: %d sequence(s) in flight, up to %.0f s", len(state.worker.open), timeout)
    if not await state.worker.drain(timeout):
        log.warning("drain timeout: stopping %d sequence(s)", len(state.worker.open))
        state.worker.abort(list(state.worker.open), reason="shutdown")
        await state.worker.drain(10.0)


def create_app(settings: Settings, engine=None) -> FastAPI:
    # a bad chat template or generation config fails before the model's loading
    chat_template = find_chat_template(settings.chat_template, settings.model_dir)
    defaults, defaults_file = load_generation_defaults(settings.generation_config, settings.model_dir,
                                                       settings.override_generation_config)
    engine = engine if engine is not None else build_engine(settings)
    metrics = Metrics(settings.model_name)
    worker = EngineWorker(engine, metrics, settings.log_interval, not settings.disable_log_requests,
                          not settings.disable_log_stats)
    state = AppState(settings, engine, worker, metrics, chat_template, defaults,
                     ResponseStore() if settings.enable_responses_api_store else None)
    if chat_template is not None:
        log.info("chat template: %s", chat_template.origin)
    if state.tool_call_parser is not None:
        log.info("tool_choice 'auto': calls read by the %s tool-call parser%s", state.tool_call_parser,
                 "" if chat_template is not None else " (but without a chat template, chat completions are refused)")
    if defaults:
        log.info("requests that leave them out get the defaults of %s: %s", defaults_file,
                 ", ".join(f"{k}={v}" for k, v in defaults.items()))
    if hasattr(engine, "cache_bytes"):
        metrics.watch_caches(engine.cache_bytes)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(warm_up, engine)
        # What start-up made (modules, the model, the routes) lives as long as the process: moved out of
        # the collector's sight, so that full collections no longer scan it (bench/RESULTS.md).
        gc.collect()
        gc.freeze()
        state.worker.start(asyncio.get_running_loop())
        ticker = asyncio.create_task(state.keepalive.run())
        state.ready = True
        log.info("serving %s (max %d bytes of context, %d slots, queue %d)", settings.model_name,
                 engine.max_model_len, engine.max_batch_size, settings.max_queue)
        yield
        state.ready = False
        ticker.cancel()
        state.worker.stop()
        state.patches_thread.shutdown(wait=False, cancel_futures=True)
        gc.unfreeze()  # collectable again once the app is gone (tests run several apps in one process)

    docs = not settings.disable_fastapi_docs
    app = FastAPI(title="blt-serve", version=VERSION, lifespan=lifespan,
                  description="OpenAI-compatible completions from a Byte Latent Transformer; counts are bytes.",
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    app.state.blt = state
    errors.install(app)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground():
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))

    @app.get("/health", responses={503: {"model": ErrorResponse}})
    @app.api_route("/ping", methods=["GET", "POST"], include_in_schema=False)
    async def health(state: State):  # /ping: vLLM's name for it (SageMaker's health check)
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not (state.ready and state.worker.alive):
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def prometheus(state: State):
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def models(state: State):
        return {"object": "list", "data": [model_card(state, created, name) for name in state.settings.model_names]}

    @app.get("/v1/models/{model_id}", response_model=ModelCard, responses=ERRORS)
    async def model(model_id: str, state: State):
        state.check_model(model_id)
        return model_card(state, created, model_id)

    @app.post("/v1/completions", response_model=CompletionResponse,
              responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}})
    async def completions(req: CompletionRequest, request: Request, state: State):
        return await create_completion(req, request, state)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}})
    async def chat_completions(req: ChatCompletionRequest, request: Request, state: State):
        return await create_chat_completion(req, request, state)

    @app.post("/v1/responses", responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}})
    async def responses(req: ResponsesRequest, request: Request, state: State):
        return await create_response(req, request, state)

    @app.get("/v1/responses/{response_id}", responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}})
    async def get_response(response_id: str, state: State, stream: bool = False, starting_after: int | None = None):
        return stored(response_id, state, stream, starting_after)

    @app.get("/v1/responses/{response_id}/input_items", responses=ERRORS)
    async def response_input_items(response_id: str, state: State, after: str | None = None, limit: int = 20,
                                   order: Literal["asc", "desc"] = "desc",
                                   include: Annotated[list[str] | None, Query()] = None):
        return listed_inputs(response_id, state, after, limit, order)  # (include: nothing to add to input items)

    @app.delete("/v1/responses/{response_id}", responses=ERRORS)
    async def delete_response(response_id: str, state: State):
        return await delete_stored(response_id, state)

    @app.post("/v1/responses/{response_id}/cancel", responses=ERRORS)
    async def cancel_response(response_id: str, state: State):
        return await cancel_stored(response_id, state)

    @app.post("/invocations", responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}})
    async def invocations(body: Annotated[Any, Body()], request: Request, state: State):
        return await invoke(body, request, state)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
    async def tokenize_route(req: TokenizeRequest, state: State):
        return tokenize(req, state)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
    async def detokenize_route(req: DetokenizeRequest, state: State):
        return detokenize(req, state)

    @app.get("/version")
    async def version():
        return {"version": VERSION}

    @app.post("/v1/patches", response_model=PatchesResponse, responses=ERRORS)
    async def patches_route(req: PatchesRequest, state: State):
        return await patches(req, state)

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, keys=settings.api_key, metrics_open=settings.metrics_without_key)
    if settings.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins), allow_credentials=False,
                           allow_methods=["GET", "POST", "DELETE", "OPTIONS"], expose_headers=["X-Request-Id"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id"])
    return app
