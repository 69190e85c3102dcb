"""The local encoder: byte states, then one patch vector (k slots) per patch.

Owns the windowed byte layers, max-pooling of a patch's byte states, the projection to k slots and
the cross-attention in which the slots read their own patch's bytes (double residual), PATCH_BLOCK
patches at a time over the bytes they span, so that a long sequence needs no (P*k, L) mask. The hash
n-gram embeddings that feed it live at the model's top level, as in the checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import BltConfig
from .layers import CrossAttention, Embedding, Stack, double_residual

PATCH_BLOCK = 128  # patches whose slots cross-attend together in a full forward


def attend_own_bytes(ca: CrossAttention, slots: torch.Tensor, byte_states: torch.Tensor, patch_ids: torch.Tensor,
                     k: int, blocked: bool = True) -> torch.Tensor:
    """Each patch's k slots (B, P*k, d) attend to its bytes among byte_states (B, L, d), patch_ids (B, L)
    non-decreasing; PATCH_BLOCK patches at a time over the bytes they span in any row, where other
    bytes are masked: every slot weighs the same bytes as under a whole (P*k, L) mask. An empty patch
    (the trailing "next byte" one, or right padding) has no bytes: it sees all of its block's, so that
    its row stays finite; its output is never read (the global model is causal and the decoder reads
    completed patches only). Not `blocked` (the engine, whose steps must not wait for the device; its
    chunks are short) or one block: all at once, reading no value back from the device."""
    B, L, _ = byte_states.shape
    P = slots.shape[1] // k
    edges = (list(range(0, P, PATCH_BLOCK)) if blocked else [0]) + [P]
    if len(edges) == 2:
        lows, highs = [0], [0, L]
    else:
        first = torch.searchsorted(patch_ids.contiguous(), torch.tensor(edges, device=patch_ids.device)
                                   .expand(B, -1).contiguous())  # (B, blocks + 1): each block's first byte per row
        lows, highs = first.min(dim=0).values.tolist(), first.max(dim=0).values.tolist()
    out = []
    for i, (p0, p1) in enumerate(zip(edges, edges[1:])):
        lo = min(lows[i], L - 1)
        hi = max(highs[i + 1], lo + 1)
        slot_patch = torch.arange(p0 * k, p1 * k, device=slots.device) // k
        mask = patch_ids[:, None, lo:hi] == slot_patch[None, :, None]  # (B, (p1 - p0) * k, hi - lo)
        mask = mask | ~mask.any(dim=-1, keepdim=True)
        out.append(ca(slots[:, p0 * k:p1 * k], byte_states[:, lo:hi], mask))
    return torch.cat(out, dim=1)


def max_pool(byte_states: torch.Tensor, patch_ids: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Elementwise max of byte states per patch. (B, L, d), (B, L) -> (B, P, d); 0 for an empty patch."""
    B, _, d = byte_states.shape
    out = byte_states.new_zeros(B, num_patches, d)
    index = patch_ids[..., None].expand(-1, -1, d)
    return out.scatter_reduce(1, index, byte_states, reduce="amax", include_self=False)


class LocalEncoder(Stack):
    def __init__(self, cfg: BltConfig):
        super().__init__(cfg.encoder)
        d = cfg.encoder.hidden_size
        self.k = cfg.cross_attn_k
        self.embed_tokens = Embedding(cfg.vocab_size, d)
        self.patch_embedding_projection = nn.Linear(d, d * self.k, bias=False)
        self.cross_attn_layers = nn.ModuleList([CrossAttention(cfg.encoder)])

    def init_slots(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled patch states (B, P, d) -> initial slot queries (B, P*k, d)."""
        B, P, d = pooled.shape
        return self.patch_embedding_projection(pooled).view(B, P * self.k, d)

    def patch_slots(self, byte_states: torch.Tensor, patch_ids: torch.Tensor, num_patches: int,
                    blocked: bool = True) -> torch.Tensor:
        """(B, L, d) byte states -> (B, P, k*d): each patch's k slots after cross-attending its bytes
        (`blocked`: see attend_own_bytes)."""
        B, _, d = byte_states.shape
        slots = self.init_slots(max_pool(byte_states, patch_ids, num_patches))
        slots = double_residual(slots, attend_own_bytes(self.cross_attn_layers[0], slots, byte_states, patch_ids,
                                                        self.k, blocked))
        return slots.view(B, num_patches, self.k * d)
