"""The full-sequence forward as training uses it, and the public API's input checks."""

import pytest
import torch
from factory import PARITY_TEXT

from blt_runtime import encode, load_model
from blt_runtime.model import local_encoder
from blt_runtime.model.layers import Band, band_mask, banded_attention, window_mask
from blt_runtime.patcher import layout_from_starts


def test_forward_is_differentiable(hf_checkpoint):
    _, directory = hf_checkpoint("7b")
    model = load_model(directory).train().requires_grad_(True)
    model.patcher.requires_grad_(False)  # the entropy model is trained on its own, then frozen
    ids = torch.tensor([encode(PARITY_TEXT[:300]), encode(PARITY_TEXT[300:600])])
    out = model(ids)
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    for name in ("local_encoder.layers.0.mlp.up_proj.weight", "encoder_hash_tok_embedding.weight",
                 "local_encoder.patch_embedding_projection.weight",
                 "local_encoder.cross_attn_layers.0.o_proj.weight",
                 "global_transformer.token_embedding_projection.weight",
                 "global_transformer.layers.1.self_attn.q_proj.weight",
                 "local_decoder.cross_attn_layers.2.k_proj.weight", "lm_head.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_entropy_model_trains_on_its_own(hf_checkpoint):
    _, directory = hf_checkpoint("1b")
    model = load_model(directory).requires_grad_(True)
    ids = torch.tensor([encode(PARITY_TEXT[:200])])
    logits = model.patcher(ids)
    torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()
    assert model.patcher.embed_tokens.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("ids, message", [
    (torch.zeros(1, 0, dtype=torch.long), "at least BOS"),
    (torch.tensor([[1, 300]]), "0..259"),
    (torch.tensor([1, 5]), "shape"),
    (torch.tensor([[1.0, 5.0]]), "LongTensor"),
])
def test_bad_ids(hf_checkpoint, ids, message):
    _, directory = hf_checkpoint("1b")
    with pytest.raises(ValueError, match=message):
        load_model(directory).logits(ids)


@pytest.mark.parametrize("length", [33, 40, 64, 81])
def test_banded_attention_equals_the_masked_one(length):
    """A sequence longer than twice the window attends a window of queries at a time; every query
    weighs the same keys as under the whole (L, L) mask, so the outputs agree to rounding."""
    window = 16
    assert isinstance(window_mask(length, window, "cpu"), Band)
    g = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(2, 3, length, 8, generator=g) for _ in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=band_mask(range(length), range(length), window, "cpu"))
    torch.testing.assert_close(banded_attention(q, k, v, window), want, atol=1e-6, rtol=1e-5)


def test_blocked_cross_attention_equals_the_whole_mask(hf_checkpoint, monkeypatch):
    """The encoder's slots cross-attend their patches' bytes 4 patches at a time (PATCH_BLOCK, 128 in use):
    every non-empty patch's slots equal those under the whole (P*k, L) mask, in two rows whose patches
    differ (the shorter one padded with empty patches)."""
    monkeypatch.setattr(local_encoder, "PATCH_BLOCK", 4)
    model = load_model(hf_checkpoint("1b")[1])
    ca, k, d = model.local_encoder.cross_attn_layers[0], model.local_encoder.k, model.config.encoder.hidden_size
    g = torch.Generator().manual_seed(3)
    starts = torch.rand(2, 61, generator=g) < torch.tensor([[0.3], [0.15]])
    starts[:, 0] = True
    layout = layout_from_starts(starts)
    P = layout.max_patches
    slots, byte_states = torch.randn(2, P * k, d, generator=g), torch.randn(2, 60, d, generator=g)
    got = local_encoder.attend_own_bytes(ca, slots, byte_states, layout.patch_ids, k)
    slot_patch = torch.arange(P * k) // k
    mask = layout.patch_ids[:, None, :] == slot_patch[None, :, None]
    want = ca(slots, byte_states, mask | ~mask.any(dim=-1, keepdim=True))
    filled = (layout.lengths > 0).repeat_interleave(k, dim=1)
    assert P > 12 and (~filled).any()
    torch.testing.assert_close(got[filled], want[filled], atol=1e-5, rtol=1e-5)
