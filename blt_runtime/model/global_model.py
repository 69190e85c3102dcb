"""The global transformer: one position per patch, fully causal over patches, no final norm.

Its input is a patch's k encoder slots concatenated (k * d_enc); when that width differs from the
global width (7B), `token_embedding_projection` maps it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import BltConfig
from .layers import Stack


class GlobalModel(Stack):
    def __init__(self, cfg: BltConfig):
        super().__init__(cfg.global_model)
        self.token_embedding_projection = (
            nn.Linear(cfg.global_input_size, cfg.global_model.hidden_size, bias=False)
            if cfg.has_global_input_projection else None
        )

    def project_input(self, patch_slots: torch.Tensor) -> torch.Tensor:
        """(B, P, k*d_enc) -> (B, P, d_global)."""
        if self.token_embedding_projection is None:
            return patch_slots
        return self.token_embedding_projection(patch_slots)

    def forward(self, patch_slots: torch.Tensor) -> torch.Tensor:
        """(B, P, k*d_enc) -> (B, P, d_global); patch positions 0..P-1."""
        return self.run_layers(self.project_input(patch_slots))
