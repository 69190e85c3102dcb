"""Patch boundaries from entropies (spec section 3), for a whole sequence.

Rule: positions 0 and 1 always start a patch (BOS is a patch of its own); for t >= 1, position t+1
starts a patch iff H[t] > threshold (strict). Start flags are kept for positions 0..L, so the
"next byte" position L is included: a sequence whose last entropy is high ends with an empty
patch, as transformers reports it. A flag at t+1 depends only on bytes 0..t, which is the prefix
property incremental generation relies on. Knows nothing about models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def starts_next(entropy: torch.Tensor, position: torch.Tensor | int, threshold: float) -> torch.Tensor:
    """Whether position+1 starts a patch, given H[position]. Positions 0 -> 1 always do."""
    return (entropy > threshold) | (torch.as_tensor(position, device=entropy.device) == 0)


def patch_starts(entropies: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, L) fp32 entropies -> (B, L+1) bool: does position t start a patch (t = 0..L)."""
    B, L = entropies.shape
    first = torch.ones(B, 1, dtype=torch.bool, device=entropies.device)
    positions = torch.arange(L, device=entropies.device)
    return torch.cat([first, starts_next(entropies, positions, threshold)], dim=1)


@dataclass(frozen=True)
class PatchLayout:
    """Where each byte sits among the patches of a batch of sequences of L bytes."""

    patch_ids: torch.Tensor  # (B, L) index of the patch holding byte t
    decoder_patch_ids: torch.Tensor  # (B, L) latest completed patch when predicting byte t+1: pid(t+1)-1
    num_patches: torch.Tensor  # (B,) patches per row, the trailing empty one included
    lengths: torch.Tensor  # (B, P_max) bytes per patch, zero-padded on the right

    @property
    def max_patches(self) -> int:
        return self.lengths.shape[1]


def layout_from_starts(starts: torch.Tensor) -> PatchLayout:
    """(B, L+1) start flags -> PatchLayout."""
    counts = starts.long().cumsum(dim=1)  # counts[:, t] = pid(t) + 1
    patch_ids = counts[:, :-1] - 1
    num_patches = counts[:, -1]
    p_max = int(num_patches.max())
    lengths = torch.zeros(starts.shape[0], p_max, dtype=torch.long, device=starts.device)
    lengths.scatter_add_(1, patch_ids, torch.ones_like(patch_ids))
    return PatchLayout(patch_ids=patch_ids, decoder_patch_ids=counts[:, 1:] - 2,
                       num_patches=num_patches, lengths=lengths)

