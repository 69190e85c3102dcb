"""The model's own sampling defaults: what its `generation_config.json` says, for requests that leave a field out.

As vLLM does (its `--generation-config auto`): `temperature`, `top_p`, `top_k`, `min_p` and
`repetition_penalty` there become the defaults of those request fields, and `max_new_tokens` the
default of `max_tokens` (a completion's 256, a chat completion's rest of the context, where it is
less). A field a request sends, even with the API's default value, is the request's. `--generation-config
none` keeps the API's defaults; a directory instead of "auto" reads its generation_config.json.
`--override-generation-config '{"temperature": 0.5}'` (vLLM's) sets those keys over whichever of these applies.
Other keys (do_sample, eos_token_id, ...) are not read. A file that cannot be read stops the server
at start-up.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from blt_runtime.sampling import MIN_REPETITION

FILE = "generation_config.json"
# its key -> (the request's field, the type it takes, the range the request's field allows)
KEYS = {"temperature": ("temperature", float, 0.0, 100.0), "top_p": ("top_p", float, 1e-9, 1.0),
        "top_k": ("top_k", int, -1, 2**31), "min_p": ("min_p", float, 0.0, 1.0),
        "repetition_penalty": ("repetition_penalty", float, MIN_REPETITION, 10.0),
        "max_new_tokens": ("max_tokens", int, 0, 2**31)}


class GenerationConfigError(ValueError):
    """A generation_config.json that cannot be read, or holds a value no request could send."""


def load_generation_defaults(option: str, model_dir: str,
                             override: str | None = None) -> tuple[dict[str, float | int], str | None]:
    """(request field -> default, where they come from) for `--generation-config` `option`: "auto" (the model
    directory's file, if any), "none", or a directory; then `override` (--override-generation-config: a JSON
    object of the same keys, vLLM's) over them."""
    defaults, source = _from_file(option, model_dir)
    if override is None:
        return defaults, source
    try:
        raw = json.loads(override)
    except ValueError as e:
        raise GenerationConfigError(f"--override-generation-config: not JSON ({e})") from None
    unknown = sorted(set(raw) - set(KEYS)) if isinstance(raw, dict) else []
    if unknown:
        raise GenerationConfigError(f"--override-generation-config: {', '.join(unknown)} not read; the keys are "
                                    f"{', '.join(KEYS)}")
    defaults = {**defaults, **_defaults(raw, "--override-generation-config")}
    return defaults, " and ".join(filter(None, [source, "--override-generation-config"]))


def _from_file(option: str, model_dir: str) -> tuple[dict[str, float | int], str | None]:
    if option == "none":
        return {}, None
    path = Path(model_dir if option == "auto" else option) / FILE
    if not path.is_file():
        if option == "auto":
            return {}, None
        raise GenerationConfigError(f"--generation-config {option}: no {FILE} there")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GenerationConfigError(f"{path}: {e}") from None
    return _defaults(raw, str(path)), str(path)


def _defaults(raw, where: str) -> dict[str, float | int]:
    """The request defaults a JSON object of generation-config keys gives (a value no request could send fails)."""
    if not isinstance(raw, dict):
        raise GenerationConfigError(f"{where}: expected a JSON object")
    defaults: dict[str, float | int] = {}
    for key, (field, kind, low, high) in KEYS.items():
        value = raw.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and value != int(value)) \
                or not math.isfinite(value) or not low <= value <= high:
            raise GenerationConfigError(f"{where}: {key}={value!r} is not a value the request field {field} takes")
        defaults[field] = kind(value)
    return defaults
