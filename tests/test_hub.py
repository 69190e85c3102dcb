"""Hub model ids (blt_runtime/hub.py): "org/name" loads the Hugging Face Hub cache's copy, offline here; a
path is a path; what cannot be had fails with a message that names the id."""

import json
import shutil
import sys

import pytest
import torch

from blt_runtime import ConfigError, load_model
from blt_runtime.hub import is_hub_id, resolve_model_dir

REVISION = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root, repo_id: str, model_dir) -> None:
    """A Hugging Face Hub cache under `root` that holds `model_dir`'s files as `repo_id`'s main revision."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty cache, offline: nothing is fetched from the network (the tests' machines have none)."""
    constants = pytest.importorskip("huggingface_hub.constants", reason="huggingface_hub (a test extra) missing")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "hub").mkdir()
    return tmp_path / "hub"


def test_a_hub_id_loads_the_cached_model(offline_hub, hf_checkpoint):
    model_dir = hf_checkpoint("1b")[1]
    hub_cache(offline_hub, "test-org/tiny-blt", model_dir)
    model, direct = load_model("test-org/tiny-blt"), load_model(model_dir)
    assert resolve_model_dir("test-org/tiny-blt").name == REVISION
    for (name, a), (_, b) in zip(model.state_dict().items(), direct.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ConfigError, match="test-org/missing: no such directory, and no model of that id"):
        load_model("test-org/missing")


def test_a_revision_picks_a_branch_tag_or_commit(offline_hub, hf_checkpoint):
    hub_cache(offline_hub, "test-org/tiny-blt", hf_checkpoint("1b")[1])
    repo = offline_hub / "models--test-org--tiny-blt"
    other = "fedcba9876543210fedcba9876543210fedcba98"
    shutil.copytree(hf_checkpoint("7b")[1], repo / "snapshots" / other)
    (repo / "refs" / "v2").write_text(other)
    want = load_model(hf_checkpoint("7b")[1]).state_dict()
    for revision in ("v2", other):
        assert resolve_model_dir("test-org/tiny-blt", revision=revision).name == other
        got = load_model("test-org/tiny-blt", revision=revision).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert resolve_model_dir("test-org/tiny-blt", revision="main").name == REVISION
    with pytest.raises(ConfigError, match="test-org/tiny-blt: no such directory, and no model"):
        load_model("test-org/tiny-blt", revision="v3")


def test_paths_are_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "model").mkdir(parents=True)
    assert not is_hub_id("org/model") and resolve_model_dir("org/model").is_dir()  # exists: a path
    assert is_hub_id("org/other") and not is_hub_id("./org/other") and not is_hub_id("a/b/c")
    assert not is_hub_id("/abs/path") and not is_hub_id("plain")
    with pytest.raises(ConfigError, match="no such file"):
        load_model("a/b/c")  # not an id: the directory's own error
    (tmp_path / "org" / "model" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="llama"):
        load_model("org/model")


def test_without_huggingface_hub_the_message_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(ConfigError, match="install huggingface_hub"):
        resolve_model_dir("org/not-here")


def test_a_meta_checkpoint_on_the_hub_is_converted_by_its_id(offline_hub, hf_checkpoint, tmp_path):
    from test_convert import write_meta_release

    from blt_runtime.convert import main

    hf, native_dir = hf_checkpoint("1b")
    write_meta_release(hf, native_dir, tmp_path / "meta")
    hub_cache(offline_hub, "test-org/meta-blt", tmp_path / "meta")
    with pytest.raises(ConfigError, match="Meta's layout.*blt-convert"):
        load_model("test-org/meta-blt")
    assert main(["test-org/meta-blt", str(tmp_path / "out")]) == 0  # its .pth entropy model included
    for a, b in zip(load_model(tmp_path / "out").state_dict().values(), load_model(native_dir).state_dict().values()):
        assert torch.equal(a, b)
