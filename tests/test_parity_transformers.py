"""Parity with transformers' BltForCausalLM (>= 5.23): same patches, logits within 1e-4 (fp32).

Each checkpoint is random and written by transformers' own save_pretrained, then read by
load_model. Inputs are 1,200 bytes of UTF-8 text with multi-byte characters, past the 512 window.
"""

import pytest
import torch
from factory import PARITY_TEXT, STRUCTURES, sample_text

from blt_runtime import encode, load_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _hf_outputs(hf, ids):
    with torch.no_grad():
        logits = hf(ids, use_cache=False).logits
        _, lengths, _ = hf.model.patcher(ids, patch_size=4, threshold=hf.config.patching_threshold)
    return logits, lengths.long()


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
def test_logits_and_patches_match(hf_checkpoint, structure):
    hf, directory = hf_checkpoint(structure)
    model = load_model(directory)
    ids = torch.tensor([encode(PARITY_TEXT)])
    assert ids.shape[1] > 1100
    want_logits, want_lengths = _hf_outputs(hf, ids)
    lengths = model.patch_lengths(ids)
    assert torch.equal(lengths, want_lengths)
    assert 2.0 < ids.shape[1] / lengths.shape[1] < 8.0, "threshold should give realistic patches"
    torch.testing.assert_close(model.logits(ids), want_logits, atol=1e-4, rtol=0)


def test_batch_rows_match_single_rows(hf_checkpoint):
    """Rows with different patch counts in one batch give what each gives alone."""
    hf, directory = hf_checkpoint("1b")
    model = load_model(directory)
    texts = [PARITY_TEXT[:700], sample_text(700, seed=5)[:700]]
    ids = torch.tensor([encode(t) for t in texts])
    batched = model.logits(ids)
    lengths = model.patch_lengths(ids)
    for row in range(2):
        want_logits, want_lengths = _hf_outputs(hf, ids[row:row + 1])
        torch.testing.assert_close(batched[row], want_logits[0], atol=1e-4, rtol=0)
        n = want_lengths.shape[1]
        assert lengths[row, :n].tolist() == want_lengths[0].tolist()
        assert not lengths[row, n:].any()


def test_window_is_exercised(hf_checkpoint, tmp_path):
    """The parity inputs reach past the window: without it the logits differ after byte 512."""
    import json
    import shutil

    _, directory = hf_checkpoint("1b")
    shutil.copytree(directory, tmp_path / "m")
    config = json.loads((tmp_path / "m/config.json").read_text())
    config["local_attention_window_len"] = None
    (tmp_path / "m/config.json").write_text(json.dumps(config))
    ids = torch.tensor([encode(PARITY_TEXT)])
    windowed, unwindowed = load_model(directory).logits(ids), load_model(tmp_path / "m").logits(ids)
    torch.testing.assert_close(windowed[:, :512], unwindowed[:, :512], atol=1e-4, rtol=0)
    assert (windowed[:, 600:] - unwindowed[:, 600:]).abs().max() > 1e-2


def test_short_inputs(hf_checkpoint):
    """BOS alone and a few bytes: the trailing next-byte patch is reported as transformers does."""
    hf, directory = hf_checkpoint("gqa")
    model = load_model(directory)
    for text in (b"", b"a", "é".encode(), b"hi there"):
        ids = torch.tensor([encode(text)])
        want_logits, want_lengths = _hf_outputs(hf, ids)
        assert torch.equal(model.patch_lengths(ids), want_lengths)
        torch.testing.assert_close(model.logits(ids), want_logits, atol=1e-4, rtol=0)


def test_bfloat16_runs_with_fp32_entropies(hf_checkpoint):
    """bf16 weights: entropies and logits come out in fp32 and, on the same patches, agree with fp32.

    (Left to choose its own patches, bf16 entropies move a few boundaries, which is why the spec
    asks for fp32 entropies and why the comparison fixes the patches.)"""
    from blt_runtime.patcher import patch_starts

    _, directory = hf_checkpoint("1b")
    ids = torch.tensor([encode(PARITY_TEXT[:300])])
    full = load_model(directory)
    half = load_model(directory, dtype=torch.bfloat16)
    assert half.lm_head.weight.dtype == torch.bfloat16
    assert half.entropies(ids).dtype == torch.float32
    assert half.logits(ids).dtype == torch.float32
    starts = patch_starts(full.entropies(ids), full.config.patching_threshold)
    with torch.no_grad():
        want, got = full(ids, starts).logits, half(ids, starts).logits
    assert torch.isfinite(got).all()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95
