"""The local encoder: byte states, then one patch vector (k slots) per patch.

Owns the windowed byte layers, max-pooling of a patch's byte states, the projection to k slots and
the cross-attention in which the slots read their own patch's bytes (double residual). The hash
n-gram embeddings that feed it live at the model's top level, as in the checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import BltConfig
from .layers import CrossAttention, Embedding, Stack, double_residual


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

    def patch_slots(self, byte_states: torch.Tensor, patch_ids: torch.Tensor, num_patches: int) -> torch.Tensor:
        """(B, L, d) byte states -> (B, P, k*d): each patch's k slots after cross-attending its bytes."""
        B, _, d = byte_states.shape
        slots = self.init_slots(max_pool(byte_states, patch_ids, num_patches))
        slot_patch = torch.arange(num_patches * self.k, device=byte_states.device) // self.k  # 0,0,1,1,...
        mask = patch_ids[:, None, :] == slot_patch[None, :, None]  # (B, P*k, L)
        # An empty patch (the trailing "next byte" one, or right padding) has no bytes; let it see all
        # of them so its row stays finite. Its output is never read: the global model is causal and
        # the decoder only reads completed patches.
        mask = mask | ~mask.any(dim=-1, keepdim=True)
        slots = double_residual(slots, self.cross_attn_layers[0](slots, byte_states, mask))
        return slots.view(B, num_patches, self.k * d)
