"""The `serve` fixture: an app around a given engine, on a real uvicorn in a thread."""

from __future__ import annotations

import contextlib

import pytest
from serverkit import running

from server import Settings, create_app


@pytest.fixture
def serve():
    """serve(engine, **settings) -> (base URL, app state); stopped after the test."""
    stack = contextlib.ExitStack()

    def start(engine, **settings):
        app = create_app(Settings(**{"served_model_name": "tiny", **settings}), engine)
        return stack.enter_context(running(app)), app.state.blt

    with stack:
        yield start


@pytest.fixture(scope="session")
def tiny(hf_checkpoint):
    """A tiny random model directory (native layout)."""
    return hf_checkpoint("1b")[1]
