"""The whole BLT and its full-sequence forward pass (spec section 5): the reference the fast path
must equal, and the differentiable forward that training uses.

Module names mirror the native checkpoint: a parameter's checkpoint key is "model." + its name here,
except `lm_head.weight`, which stands at the top (see `checkpoint_key`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import BltConfig
from ..patcher import PatchLayout, layout_from_starts, patch_starts
from ..sampling import ranked
from ..tokenizer import encode_tensor
from .entropy import EntropyModel, entropy_nats
from .global_model import GlobalModel
from .hashing import embed_with_hashes, power_matrix
from .layers import Embedding
from .local_decoder import LocalDecoder
from .local_encoder import LocalEncoder


def checkpoint_key(name: str) -> str:
    """Runtime parameter name -> native checkpoint key."""
    return name if name == "lm_head.weight" else "model." + name


@dataclass
class BltOutput:
    logits: torch.Tensor  # (B, L, vocab) fp32; row t predicts byte t+1
    layout: PatchLayout
    entropies: torch.Tensor | None  # (B, L) fp32, when the entropy model cut the patches


class BltModel(nn.Module):
    def __init__(self, cfg: BltConfig):
        super().__init__()
        self.config = cfg
        self.patcher = EntropyModel(cfg.patcher, cfg.vocab_size)
        self.local_encoder = LocalEncoder(cfg)
        self.encoder_hash_tok_embedding = Embedding(cfg.num_hash_tables * cfg.hash_vocab,
                                                       cfg.encoder.hidden_size)
        self.global_transformer = GlobalModel(cfg)
        self.local_decoder = LocalDecoder(cfg)
        self.lm_head = nn.Linear(cfg.decoder.hidden_size, cfg.vocab_size, bias=False)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    # ------------------------------------------------------------------ pieces
    def embed_bytes(self, ids: torch.Tensor) -> torch.Tensor:
        """Byte embedding plus every hash n-gram embedding. (B, L) -> (B, L, d_enc)."""
        return self.embed_new_bytes(ids, ids.shape[1])

    def embed_new_bytes(self, ids: torch.Tensor, new: int, powers: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings of the last `new` ids of (B, C) `ids`, the earlier ones serving as hash context."""
        cfg = self.config
        if powers is None:
            powers = power_matrix(cfg.hash_group_sizes, cfg.hash_functions, ids.device)
        return embed_with_hashes(ids, new, powers, self.encoder_hash_tok_embedding.weight,
                                 self.local_encoder.embed_tokens.weight, cfg.hash_vocab)

    @torch.no_grad()
    def entropies(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L) fp32 entropy of the entropy model's next-byte prediction."""
        return entropy_nats(self.patcher(ids))

    def layout(self, ids: torch.Tensor) -> tuple[PatchLayout, torch.Tensor]:
        entropies = self.entropies(ids)
        return layout_from_starts(patch_starts(entropies, self.config.patching_threshold)), entropies

    # ------------------------------------------------------------------ full forward
    def forward(self, ids: torch.Tensor, starts: torch.Tensor | None = None) -> BltOutput:
        """Full-sequence forward. ids (B, L) with BOS first; `starts` (B, L+1) bool overrides the
        entropy model's patch starts (training with precomputed patches)."""
        entropies = None
        if starts is None:
            layout, entropies = self.layout(ids)
        else:
            layout = layout_from_starts(starts)
        byte_states = self.local_encoder.run_layers(self.embed_bytes(ids))
        patches = self.local_encoder.patch_slots(byte_states, layout.patch_ids, layout.max_patches)
        global_out = self.global_transformer(patches)
        slots = self.local_decoder.slots(global_out)
        h = self.local_decoder(byte_states, slots, layout.decoder_patch_ids)
        return BltOutput(logits=self.lm_head(h).float(), layout=layout, entropies=entropies)

    # ------------------------------------------------------------------ public API
    @torch.inference_mode()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) LongTensor of ids, BOS first -> fp32 logits (B, L, vocab); row t predicts byte t+1."""
        return self.forward(self._check_ids(ids)).logits

    @torch.inference_mode()
    def patch_lengths(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, P) patch lengths, the trailing "next byte" patch included (length 0 when
        the last byte's entropy starts a new patch); rows with fewer patches are zero-padded."""
        return self.layout(self._check_ids(ids))[0].lengths

    @torch.inference_mode()
    def byte_patches(self, data: bytes) -> tuple[list[float], list[tuple[int, int]]]:
        """What the entropy model makes of `data`: the entropy (nats) of the prediction of each byte
        from the bytes before it (BOS first), and the patches as (start byte, length). BOS, a patch
        of its own, is left out; byte 0 always begins a patch, byte k > 0 when its entropy exceeds
        the threshold."""
        ids = encode_tensor(data, self.device)
        entropies = self.entropies(ids)  # (1, L); position t predicts id t+1 = byte t
        starts = patch_starts(entropies, self.config.patching_threshold)[0, 1:len(data) + 1]  # byte k: position k+1
        begins = [k for k, s in enumerate(starts.tolist()) if s]
        ends = begins[1:] + [len(data)]
        return entropies[0, :len(data)].tolist(), [(b, e - b) for b, e in zip(begins, ends)]

    @torch.inference_mode()
    def prompt_logprobs(self, data: bytes, top_n: int) -> list[tuple[float, list[tuple[int, float]]]]:
        """For each byte of `data`: its log-probability given the bytes before it (BOS first) and the
        `top_n` most likely ids with theirs, from one full forward: what the engine's prefill computes for
        a request with prompt_logprobs (echo with logprobs), and is tested against."""
        if not data:
            return []
        ids = encode_tensor(data, self.device)
        logp = torch.log_softmax(self.forward(ids).logits[0, :-1].float(), dim=-1)  # row t predicts byte t
        chosen = logp.gather(1, ids[0, 1:, None])[:, 0].tolist()
        values, indices = (t.tolist() for t in ranked(logp, max(top_n, 1)))
        return [(chosen[t], list(zip(indices[t][:top_n], values[t][:top_n]))) for t in range(len(data))]

    def _check_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
            raise ValueError("ids must be a LongTensor of shape (batch, length)")
        if ids.shape[1] == 0:
            raise ValueError("ids must hold at least BOS")
        if int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
            raise ValueError(f"ids must lie in 0..{self.config.vocab_size - 1}")
        return ids.to(self.device)
