"""`blt-serve org/name`: the Hugging Face Hub cache's copy of a model, served under its id with the chat
template it ships (offline here: HF_HUB_OFFLINE=1); an id that cannot be had stops start-up with a message."""

from __future__ import annotations

import shutil

import httpx
import pytest
from serverkit import Process

from blt_runtime import ConfigError
from server.app import from_hub
from server.settings import load_settings

REVISION = "89abcdef0123456789abcdef0123456789abcdef"


def test_a_hub_id_is_served_under_its_id(tmp_path, tiny):
    repo = tmp_path / "hub" / "models--test-org--tiny-blt"
    shutil.copytree(tiny, repo / "snapshots" / REVISION)
    (repo / "snapshots" / REVISION / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    proc = Process("test-org/tiny-blt", "--max-model-len", "256", env=env, name=None)
    try:
        assert httpx.get(f"{proc.url}/v1/models").json()["data"][0]["id"] == "test-org/tiny-blt"
        r = httpx.post(f"{proc.url}/v1/chat/completions", timeout=60, json={
            "model": "test-org/tiny-blt", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len("user: Hi\nassistant:"), r.text
    finally:
        proc.stop()
    missing = Process("test-org/missing", env=env, wait=False)
    assert missing.proc.wait(60) == 2
    missing.reader.join(10)
    out = "".join(missing.lines)
    assert "test-org/missing: no such directory, and no model of that id" in out, out


def test_a_revision_is_for_hub_ids(tmp_path, tiny, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants", reason="huggingface_hub (a test extra) missing")
    repo = tmp_path / "hub" / "models--test-org--tiny-blt"
    shutil.copytree(tiny, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "stable").write_text(REVISION)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    settings = from_hub(load_settings(["test-org/tiny-blt", "--revision", "stable"], environ={}))
    assert settings.model_dir == str(repo / "snapshots" / REVISION) and settings.model_name == "test-org/tiny-blt"
    with pytest.raises(ConfigError, match="test-org/tiny-blt: no such directory"):
        from_hub(load_settings(["test-org/tiny-blt"], environ={}))  # no main branch
    # --download-dir (vLLM's): another cache than the Hub's
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    settings = from_hub(load_settings(["test-org/tiny-blt", "--revision", "stable", "--download-dir",
                                       str(tmp_path / "hub")], environ={}))
    assert settings.model_dir == str(repo / "snapshots" / REVISION)
    with pytest.raises(ConfigError, match="test-org/tiny-blt: no such directory"):
        from_hub(load_settings(["test-org/tiny-blt", "--revision", "stable"], environ={}))
    with pytest.raises(ConfigError, match="--revision stable: .* is a directory, not a Hugging Face Hub model id"):
        from_hub(load_settings([str(tiny), "--revision", "stable"], environ={}))
