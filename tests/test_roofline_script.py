"""bench/roofline.py: the weights each piece of a decode step reads are measured from the engine's own
steps, every parameter is read by some piece, and the floor adds up from the shapes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import roofline  # noqa: E402
from blt_runtime import BltConfig, BltModel  # noqa: E402


@pytest.fixture(scope="module")
def reads():
    return roofline.measured_reads()


def test_pieces_read_their_own_stacks(reads):
    cfg = BltConfig.from_dict({"model_type": "blt"})
    with torch.device("meta"):
        every = {n for n, _ in BltModel(cfg).named_parameters()}
    read = set().union(*(set(r["whole"]) | set(r["gathered"]) for r in reads.values()))
    assert read == every
    byte_step = set(reads["encode"]["whole"]) | set(reads["finish"]["whole"])
    patch = set(reads["patch"]["whole"])
    # the global transformer only when a patch closes; the entropy model and the local stacks' blocks at every byte
    assert {n for n in every if n.startswith("global_transformer.")} <= patch - byte_step
    for stack in ("patcher.layers.", "local_encoder.layers.", "local_decoder.layers."):
        assert {n for n in every if n.startswith(stack)} <= byte_step - patch, stack
    # the decoder's cross-attention: its queries at every byte, the patch's keys and values once per patch
    assert "local_decoder.cross_attn_layers.0.q_proj.weight" in byte_step - patch
    assert "local_decoder.cross_attn_layers.0.k_proj.weight" in patch - byte_step
    # the entropy head is read as its fp32 copy; a byte's hash embeddings are rows of the table, one per
    # n-gram size and hash function
    assert reads["finish"]["whole"]["patcher.lm_head.weight"] == 4
    assert reads["finish"]["whole"]["lm_head.weight"] == 2
    assert reads["encode"]["gathered"]["encoder_hash_tok_embedding.weight"] == cfg.num_hash_tables
    assert not set(reads["encode"]["gathered"]) & byte_step


def test_floor_adds_up(reads):
    cfg = BltConfig.from_dict({"model_type": "blt"})
    with torch.device("meta"):
        model = BltModel(cfg)
    one = roofline.floor(cfg, reads, 1, 1025, 256, 4.5, 4.8e12)
    many = roofline.floor(cfg, reads, 64, 201, 256, 4.5, 4.8e12)
    g = sum(p.numel() for n, p in model.named_parameters() if n.startswith("global_transformer.")) * 2
    assert g / 1e6 < one["weights_mb"]["patch_step"] < 1.1 * g / 1e6
    assert one["weights_mb"]["patch_step_chance"] == pytest.approx(1 / 4.5, abs=1e-3)
    assert many["weights_mb"]["patch_step_chance"] > 0.999
    # batch 1 after a 1 KB prompt: every local ring full (512 entries of 14 + 1 + 9 layers)
    stacks = (cfg.patcher, cfg.encoder, cfg.decoder)
    ring = sum(s.num_layers * 2 * s.num_kv_heads * s.head_dim * 2 * 512 for s in stacks)
    assert ring / 1e6 < one["caches_mb_per_row"] < ring / 1e6 + 20
    assert many["caches_mb_per_row"] < one["caches_mb_per_row"]  # rings still filling after 200-byte prompts
    for f in (one, many):
        assert f["floor_bytes_per_s"] == pytest.approx(f["rows"] / (f["mb_per_step"] * 1e6 / 4.8e12), rel=1e-2)
    assert one["floor_bytes_per_s"] < many["floor_bytes_per_s"] < 64 * one["floor_bytes_per_s"]


def test_script_prints_the_scenarios():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "roofline.py"), "--bandwidth-tb-s", "2.4"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["parameters_never_read"] == []
    assert set(roofline.SCENARIOS) <= set(result)
    assert result["streams_64"]["target_bytes_per_s"] == 50000
    assert 0 < result["batch_1"]["target_share_of_floor"] < 1
