"""The entropy model (the patcher): a small byte LM whose next-byte entropy cuts patches.

Owns its layers and the fp32 entropy of its predictions. Knows nothing about patches themselves
(see blt_runtime/patcher.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import StackConfig
from .layers import Embedding, RMSNorm, Stack


def entropy_nats(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last axis, in nats, computed in fp32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


class EntropyModel(Stack):
    def __init__(self, cfg: StackConfig, vocab_size: int):
        super().__init__(cfg)
        self.embed_tokens = Embedding(vocab_size, cfg.hidden_size)
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, vocab_size, bias=False)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and output head; logits in fp32 so that entropies are fp32 end to end."""
        x = self.norm(h)
        return torch.nn.functional.linear(x.float(), self.lm_head.weight.float())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, L) -> next-byte logits (B, L, vocab), fp32."""
        return self.head(self.run_layers(self.embed_tokens(ids)))
