"""Model ids of the Hugging Face Hub ("org/name") as local directories, as transformers and vLLM take them.

A name that is an existing path is a path. Otherwise a name shaped like a Hub id is fetched with
`huggingface_hub` (the config, the safetensors and a chat template; files already in its cache are not
fetched again, and with no network, or HF_HUB_OFFLINE=1, the cached copy is used), where that package
is installed; its HF_TOKEN, HF_HOME and HF_HUB_CACHE settings apply. Imports no torch.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import ConfigError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
FILES = ["*.json", "*.safetensors", "chat_template.jinja"]  # what load_model and blt-serve read


def is_hub_id(name: str | Path) -> bool:
    """Could `name` be a Hub model id rather than a path? (Not when a file or directory by that name exists.)"""
    return isinstance(name, str) and HUB_ID.fullmatch(name) is not None and not Path(name).exists()


def resolve_model_dir(name: str | Path, files: list[str] = FILES, revision: str | None = None,
                      cache_dir: str | None = None) -> Path:
    """The directory of a model: `name` itself, or the local copy of the Hub model it names (the files that
    match `files`), in `cache_dir` (default: the Hub's cache)."""
    if not is_hub_id(name):
        return Path(name)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConfigError(f"{name}: no such directory; to load the model of that id from the Hugging Face Hub, "
                          "install huggingface_hub (pip install huggingface_hub)") from None
    try:
        return Path(snapshot_download(str(name), revision=revision, allow_patterns=files, cache_dir=cache_dir))
    except Exception as e:  # noqa: BLE001 - the Hub's errors are many (not found, gated, offline); each says why
        reason = " ".join(str(e).split())
        raise ConfigError(f"{name}: no such directory, and no model of that id could be had from the Hugging Face "
                          f"Hub ({type(e).__name__}: {reason[:400]})") from None
