"""`blt-serve [MODEL_DIR]`: load the model (the shipped one by default), then serve it with uvicorn.

A model that cannot be loaded ends the process at once with one line naming the problem (exit 2).
SIGTERM or Ctrl+C drains: new requests get 503, running ones may finish for --shutdown-timeout
seconds, the rest are stopped with a clean error, and the process exits 0. A second signal stops
at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import uvicorn

from blt_runtime.errors import BltError

from .app import build_engine, create_app, drain, from_hub
from .chat_template import ChatTemplateError, find_chat_template
from .generation_defaults import GenerationConfigError, load_generation_defaults
from .settings import Settings, load_settings

log = logging.getLogger("blt.server")


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains the engine before the server stops."""

    def __init__(self, config: uvicorn.Config, state, timeout: float):
        super().__init__(config)
        self.state, self.timeout = state, timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:  # runs in the main thread, between bytecodes
        if self._draining or self._loop is None:
            self.should_exit = True
            self.force_exit = self._draining
            return
        self._draining = True
        log.info("received %s: draining", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain_then_exit()))

    async def _drain_then_exit(self) -> None:
        try:
            await drain(self.state, self.timeout)
        finally:
            self.should_exit = True


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def uvicorn_config(app, settings: Settings) -> uvicorn.Config:
    """uvicorn's settings for blt-serve. The event loop is asyncio's even where uvloop is installed
    (uvicorn would pick it): the engine's worker thread needs the GIL after each step's wait for the
    device, and asyncio's loop lets go of it at every socket write, where uvloop's keeps it until
    the interpreter's switch interval forces it. With uvloop, the scripted engine of
    bench/http_overhead.py stepped less than half as often (bench/RESULTS.md)."""
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                          access_log=False, timeout_graceful_shutdown=5, lifespan="on", loop="asyncio",
                          ssl_keyfile=settings.ssl_keyfile, ssl_certfile=settings.ssl_certfile,
                          root_path=settings.root_path)


def serve(settings: Settings) -> int:
    configure_logging(settings.log_level)
    try:
        settings = from_hub(settings)
    except BltError as e:
        print(f"blt-serve: cannot load the model: {e}", file=sys.stderr)
        return 2
    try:  # before the model's minutes of loading
        find_chat_template(settings.chat_template, settings.model_dir)
        load_generation_defaults(settings.generation_config, settings.model_dir, settings.override_generation_config)
    except (ChatTemplateError, GenerationConfigError) as e:
        print(f"blt-serve: {e}", file=sys.stderr)
        return 2
    try:
        engine = build_engine(settings)
    except (BltError, OSError, ValueError) as e:
        print(f"blt-serve: cannot load the model from {settings.model_dir}: {e}", file=sys.stderr)
        return 2
    app = create_app(settings, engine)
    server = DrainingServer(uvicorn_config(app, settings), app.state.blt, settings.shutdown_timeout)
    server.run()
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    return serve(load_settings(argv))


if __name__ == "__main__":
    sys.exit(main())
