"""server: the HTTP shell around blt_runtime (FastAPI + uvicorn), OpenAI-compatible.

`create_app(settings, engine=None)` builds the app; `blt-serve` (server.__main__) runs it. Handlers
never touch torch: one worker thread owns the engine (worker.py).
"""

from .app import create_app
from .settings import Settings, load_settings

__all__ = ["Settings", "create_app", "load_settings"]
