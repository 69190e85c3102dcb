"""Loading native checkpoints: sharded files, and clean one-line failures for corrupt inputs."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from factory import PARITY_TEXT
from safetensors.torch import load_file, save_file

from blt_runtime import BltError, ConfigError, WeightsError, encode, load_model, save_model


@pytest.fixture
def checkpoint(hf_checkpoint, tmp_path):
    _, directory = hf_checkpoint("1b")
    copy = tmp_path / "model"
    shutil.copytree(directory, copy)
    return copy


def _one_line_error(directory, kind=BltError) -> str:
    with pytest.raises(kind) as info:
        load_model(directory)
    message = str(info.value)
    assert "\n" not in message and str(directory) in message
    return message


def test_loads_without_meta_tensors(checkpoint):
    model = load_model(checkpoint)
    assert all(p.device.type == "cpu" and not p.requires_grad for p in model.parameters())


def test_sharded_checkpoint(checkpoint, tmp_path):
    ids = torch.tensor([encode(PARITY_TEXT[:200])])
    want = load_model(checkpoint).logits(ids)
    tensors = load_file(checkpoint / "model.safetensors")
    keys = sorted(tensors)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(checkpoint / "config.json", sharded)
    weight_map = {}
    for n, part in enumerate((keys[::2], keys[1::2])):
        name = f"model-0000{n + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(sharded / name))
        weight_map.update(dict.fromkeys(part, name))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert torch.equal(load_model(sharded).logits(ids), want)


def test_save_model_round_trip(checkpoint, tmp_path):
    model = load_model(checkpoint)
    save_model(model, tmp_path / "again")
    ids = torch.tensor([encode(PARITY_TEXT[:100])])
    assert torch.equal(load_model(tmp_path / "again").logits(ids), model.logits(ids))


def test_truncated_file(checkpoint):
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "not a readable safetensors file" in _one_line_error(checkpoint, WeightsError)


def test_garbage_file(checkpoint):
    (checkpoint / "model.safetensors").write_bytes(b"\x00" * 10)
    assert "model.safetensors" in _one_line_error(checkpoint, WeightsError)


def test_wrong_shape_names_key_and_shapes(checkpoint):
    path = checkpoint / "model.safetensors"
    tensors = load_file(path)
    key = "model.global_transformer.layers.1.mlp.up_proj.weight"
    tensors[key] = tensors[key][:-1]
    save_file(tensors, str(path))
    message = _one_line_error(checkpoint, WeightsError)
    assert key in message and "[135, 64]" in message and "expected [136, 64]" in message


def test_missing_and_unexpected_keys_all_listed(checkpoint):
    path = checkpoint / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.local_decoder.norm.weight"], tensors["lm_head.weight"]
    tensors["model.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(path))
    message = _one_line_error(checkpoint, WeightsError)
    for part in ("missing lm_head.weight (expected shape [260, 32])",
                 "missing model.local_decoder.norm.weight", "unexpected model.extra.weight [2]"):
        assert part in message


def test_unknown_model_type(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["model_type"] = "llama"
    (checkpoint / "config.json").write_text(json.dumps(config))
    assert "model_type='llama'" in _one_line_error(checkpoint, ConfigError)


def test_missing_weights_file(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    assert "neither model.safetensors nor" in _one_line_error(checkpoint, WeightsError)


def test_device_and_dtype_resolution():
    from blt_runtime.device import resolve_device_dtype
    from blt_runtime.errors import ConfigError

    if not torch.cuda.is_available():
        assert resolve_device_dtype("auto", "auto") == (torch.device("cpu"), torch.float32)
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device_dtype("cuda", "auto")
    assert resolve_device_dtype("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    assert resolve_device_dtype("cpu", "half")[1] == torch.float16 and resolve_device_dtype("cpu", "float")[1] == \
        torch.float32  # vLLM's names
    with pytest.raises(ConfigError, match="dtype 'int8'"):
        resolve_device_dtype("cpu", "int8")
    with pytest.raises(ConfigError, match="device 'gpu0'"):
        resolve_device_dtype("gpu0", "auto")


def test_serving_threads_leave_a_core_on_the_cpu():
    from blt_runtime.device import serving_threads

    before = torch.get_num_threads()
    try:
        assert serving_threads(torch.device("cpu"), 3) == 3 == torch.get_num_threads()
        assert serving_threads(torch.device("cpu")) == max(1, (os.cpu_count() or 2) - 1)
        with pytest.raises(ConfigError):
            serving_threads(torch.device("cpu"), 0)
    finally:
        torch.set_num_threads(before)


def test_loading_does_not_import_dynamo(checkpoint):
    """The shapes check and load_model build the model on the meta device; initialising its embeddings
    there would import torch._dynamo, 1-2 s of every blt-serve start-up (model/layers.Embedding)."""
    code = ("import sys; from blt_runtime import load_model; load_model(sys.argv[1]); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(checkpoint)], capture_output=True, text=True, check=True,
                         timeout=120)
    assert out.stdout.strip() == "False"
