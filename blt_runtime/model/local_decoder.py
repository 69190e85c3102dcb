"""The local decoder: byte states in, next-byte hidden states out.

Owns the projection of global outputs into k decoder slots per patch, the windowed byte layers, and
the cross-attention in which byte t reads the k slots of the latest completed patch
(`decoder_patch_ids[t]`), with BLT's double residual, on the first layer or on every layer.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import BltConfig
from .layers import CrossAttention, RMSNorm, Stack, double_residual


def attend_own_slots(ca: CrossAttention, h: torch.Tensor, slots: torch.Tensor,
                     slot_patch: torch.Tensor, k: int) -> torch.Tensor:
    """Byte t of h (B, L, d) attends only to the k slots of patch slot_patch[t] among slots (B, P*k, d).

    Equal to masked attention over all P*k slots (masked entries weigh exactly zero), at O(L*k).
    """
    keys, values = ca.keys_values(slots)  # (B, H, P*k, D)
    return attend_gathered(ca, h, keys, values, slot_patch, k)


def attend_gathered(ca: CrossAttention, h: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    slot_patch: torch.Tensor, k: int) -> torch.Tensor:
    """As attend_own_slots, from slot keys/values (B, H, P*k, D) already projected (the engine caches them)."""
    B, H, _, D = keys.shape
    L = h.shape[1]
    index = slot_patch[:, None, :, None, None].expand(B, H, L, k, D)
    keys = keys.view(B, H, -1, k, D).gather(2, index)  # (B, H, L, k, D)
    values = values.view(B, H, -1, k, D).gather(2, index)
    q = ca.queries(h)  # (B, H, L, D)
    scores = torch.einsum("bhld,bhlkd->bhlk", q.float(), keys.float()) * D**-0.5
    weights = scores.softmax(dim=-1).to(values.dtype)
    return ca.merge(torch.einsum("bhlk,bhlkd->bhld", weights, values))


class LocalDecoder(Stack):
    def __init__(self, cfg: BltConfig):
        super().__init__(cfg.decoder)
        d = cfg.decoder.hidden_size
        self.k = cfg.cross_attn_k
        self.patch_embedding_projection = nn.Linear(cfg.global_model.hidden_size, d * self.k, bias=False)
        n_cross = cfg.decoder.num_layers if cfg.decoder_cross_attn_all_layers else 1
        self.cross_attn_layers = nn.ModuleList(CrossAttention(cfg.decoder) for _ in range(n_cross))
        self.norm = RMSNorm(d, cfg.decoder.norm_eps)

    def slots(self, global_out: torch.Tensor) -> torch.Tensor:
        """Global outputs (B, P, d_global) -> decoder slots (B, P*k, d)."""
        B, P, _ = global_out.shape
        return self.patch_embedding_projection(global_out).view(B, P * self.k, -1)

    def forward(self, byte_states: torch.Tensor, slots: torch.Tensor,
                decoder_patch_ids: torch.Tensor) -> torch.Tensor:
        """(B, L, d) encoder byte states -> (B, L, d) normed states that predict byte t+1."""
        rotation, mask = self.positions(byte_states.shape[1], byte_states.device)
        h = byte_states
        for i, layer in enumerate(self.layers):
            if i < len(self.cross_attn_layers):
                ca = self.cross_attn_layers[i]
                h = double_residual(h, attend_own_slots(ca, h, slots, decoder_patch_ids, self.k))
            h = layer(h, rotation, mask)
        return self.norm(h)
