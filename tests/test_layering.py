"""Dependencies point one way: server -> blt_runtime -> torch. The runtime never imports the web stack."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEB_STACK = {"fastapi", "starlette", "uvicorn", "pydantic", "prometheus_client", "httpx", "jinja2", "server"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_runtime_never_imports_the_web_stack():
    offenders = {str(p.relative_to(ROOT)): sorted(_imports(p) & WEB_STACK)
                 for p in (ROOT / "blt_runtime").rglob("*.py") if _imports(p) & WEB_STACK}
    assert not offenders


def test_transformers_is_test_only():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "blt_runtime").rglob("*.py")
                 if "transformers" in _imports(p)]
    assert not offenders


def test_server_never_touches_torch():
    """HTTP handlers talk to the engine through the worker; the runtime owns every tensor."""
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "server").rglob("*.py")
                 if {"torch", "safetensors", "transformers"} & _imports(p)]
    assert not offenders
