"""Native checkpoint <-> model: safetensors only, never unpickling.

Owns: finding the weight files (single or sharded with `model.safetensors.index.json`), checking
every tensor's name and shape against the config before anything is loaded (one error listing all
keys at fault), building the model on the meta device and assigning the loaded tensors, and
writing a model back in the same layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import BltConfig
from .device import resolve_device_dtype
from .errors import WeightsError
from .hub import resolve_model_dir
from .model.blt import BltModel, checkpoint_key

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def expected_shapes(cfg: BltConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape, for every tensor the config calls for."""
    with torch.device("meta"):
        model = BltModel(cfg)
    return {checkpoint_key(k): tuple(v.shape) for k, v in model.state_dict().items()}


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: one, or the shards its index names."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return sorted({directory / name for name in weight_map.values()})
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise WeightsError(f"{index}: not a valid shard index ({e})") from None
    single = directory / SINGLE_FILE
    if not single.is_file():
        raise WeightsError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    return [single]


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    if not path.is_file():
        raise WeightsError(f"{path}: weight file missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None


def check_checkpoint(cfg: BltConfig, directory: Path) -> dict[str, Path]:
    """Compare the checkpoint's keys and shapes with what the config needs; raise one WeightsError
    naming every missing, unexpected, duplicated or misshapen tensor. Returns key -> file."""
    found: dict[str, tuple[int, ...]] = {}
    where: dict[str, Path] = {}
    problems = []
    for path in weight_files(directory):
        for key, shape in _file_shapes(path).items():
            if key in where:
                problems.append(f"{key} appears in both {where[key].name} and {path.name}")
            found[key], where[key] = shape, path
    expected = expected_shapes(cfg)
    problems += [f"missing {k} (expected shape {list(expected[k])})" for k in sorted(set(expected) - set(found))]
    problems += [f"unexpected {k} {list(found[k])}" for k in sorted(set(found) - set(expected))]
    problems += [f"{k} has shape {list(found[k])}, expected {list(expected[k])}"
                 for k in sorted(set(found) & set(expected)) if found[k] != expected[k]]
    if problems:
        raise WeightsError(f"{directory}: weights do not match config.json: " + "; ".join(problems))
    return where


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: str | torch.dtype = torch.float32, revision: str | None = None) -> BltModel:
    """Load a native BLT checkpoint directory (or the Hugging Face Hub model an "org/name" id names, hub.py, at
    `revision`: a branch, tag or commit, main by default) onto `device` in `dtype` (either may be "auto", see
    `resolve_device_dtype`), in eval mode."""
    device, dtype = resolve_device_dtype(device, dtype)
    directory = resolve_model_dir(path, revision=revision)
    cfg = BltConfig.from_file(directory)
    files = check_checkpoint(cfg, directory)
    with torch.device("meta"):
        model = BltModel(cfg)
    state: dict[str, torch.Tensor] = {}
    names = {checkpoint_key(k): k for k in model.state_dict()}
    by_file: dict[Path, list[str]] = {}
    for key in names:
        by_file.setdefault(files[key], []).append(key)
    for file, keys in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in keys:
                state[names[key]] = f.get_tensor(key).to(device=device, dtype=dtype)
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval().requires_grad_(False)


def save_model(model: BltModel, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write config.json and model.safetensors in the native layout."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory)
    # contiguous copies: parameters may be views into fused or transposed tensors (see runner.py)
    tensors = {checkpoint_key(k): (v.to(dtype) if dtype else v).detach().cpu()
               .clone(memory_format=torch.contiguous_format) for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / SINGLE_FILE), metadata={"format": "pt"})
