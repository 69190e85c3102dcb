"""What every handler of one app shares: settings, the engine worker, metrics, the chat template, the
model's sampling defaults, readiness, the streams' keep-alive ticker, and the one thread that computes
/v1/patches beside the engine on a CPU."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .chat_template import ChatTemplate
from .errors import ApiError
from .keepalive import KeepAlive
from .metrics import Metrics
from .response_store import ResponseStore
from .settings import Settings
from .worker import EngineWorker


@dataclass
class AppState:
    settings: Settings
    engine: object  # blt_runtime.Engine, or anything with its interface (tests script one)
    worker: EngineWorker
    metrics: Metrics
    chat_template: ChatTemplate | None = None  # chat_template.py; None: chat completions are refused
    generation_defaults: dict = field(default_factory=dict)  # generation_defaults.py: the model's sampling defaults
    responses: ResponseStore | None = None  # finished responses kept (--enable-responses-api-store); None: none
    ready: bool = False
    draining: bool = False
    keepalive: KeepAlive = field(init=False)  # ticks while the app runs (app.py's lifespan)
    # /v1/patches' full forwards on a CPU (patches.py), one at a time: however many requests come at once,
    # the engine's thread competes with one of them for the cores
    patches_thread: ThreadPoolExecutor = field(init=False)

    def __post_init__(self):
        self.keepalive = KeepAlive(self.settings.keepalive_interval)
        self.patches_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blt-patches")

    @property
    def model_name(self) -> str:
        return self.settings.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def tool_call_parser(self) -> str | None:
        """The parser that reads tool_choice "auto"'s calls (tool_parser.py), where the server serves it."""
        return self.settings.tool_call_parser if self.settings.enable_auto_tool_choice else None

    def check_model(self, model: str | None) -> None:
        names = self.settings.model_names
        if model is not None and model not in names:
            served = " or ".join(repr(n) for n in names)
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {served}", "model",
                           "model_not_found")

    def check_admitting(self) -> None:
        if self.draining:
            self.metrics.of(self.metrics.rejected, reason="draining").inc()
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        if not self.ready:
            raise ApiError(503, "the model is still loading", code="not_ready")
