"""Building blocks shared by all four stacks (spec section 2).

Owns: the embedding tables' class (no initial values on the meta device), RMSNorm (statistics in
fp32), interleaved RoPE (angles in fp32), SwiGLU, grouped-query self-attention with an optional
sliding window (banded, a window of queries at a time, past twice the window), cross-attention with
its q/k norms, and the pre-norm block. Parameter names match the native checkpoint layout, so a
module's state_dict keys are the checkpoint's keys below its prefix. Nothing here knows about bytes
or patches.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import StackConfig


class Embedding(nn.Embedding):
    """nn.Embedding that leaves its initial values out on the meta device (where load_model and the
    weights check build the model to learn its shapes): there, `normal_` runs a Python decomposition
    that imports torch._dynamo, 1-2 s of every process's start-up, for values nobody reads."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, eps_t: torch.Tensor,
             inv_dim: torch.Tensor) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, statistics in fp32. In fp32 it is F.rms_norm's arithmetic in
    5 kernels instead of 8 (a decode step's norms are vectors of 128-2048 floats, where each kernel
    call is the cost), with eps and 1/d as tensors (`eps_t`, `inv_dim`) on x's device."""
    if x.dtype == torch.float32:
        return x * torch.addcmul(eps_t, (x * x).sum(-1, keepdim=True), inv_dim).rsqrt_() * weight
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return weight * normed.to(x.dtype)


@dataclass(frozen=True)
class BoundNorm:
    """An RMSNorm as a plain function of x: its weight and constants bound, no module attribute lookups
    per call (the engine's hot path); the fields are what a compiled step reads (fused.py)."""

    weight: torch.Tensor
    eps: float
    eps_t: torch.Tensor
    inv_dim: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.eps_t, self.inv_dim)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, *self._constants_on(x.device))

    def bound(self, device: torch.device) -> BoundNorm:
        return BoundNorm(self.weight, self.eps, *self._constants_on(device))

    def _constants_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._constants:
            with torch.inference_mode(False):
                self._constants[device] = (torch.tensor(self.eps, device=device),
                                           torch.tensor(1.0 / self.weight.shape[0], device=device))
        return self._constants[device]


@functools.lru_cache(maxsize=64)
def _inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):  # a plain tensor, usable by training as well as by the engine
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))


def rope_rotation(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """cos + i sin of the rotation angles (computed in fp32), shape positions.shape + (head_dim // 2,)."""
    angles = positions.float()[..., None] * _inv_freq(head_dim, theta, positions.device)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x (..., T, head_dim) by angles whose cos + i sin is `rotation`
    (broadcast to (..., T, head_dim/2)): (x0 + i x1)(cos + i sin), in fp32."""
    pairs = x.float().unflatten(-1, (-1, 2))
    if pairs.storage_offset() % 2 or any(stride % 2 for stride in pairs.stride()[:-1]):
        pairs = pairs.clone()  # view_as_complex needs pairs at even offsets (a copy starts at 0); head views have them
    return torch.view_as_real(torch.view_as_complex(pairs) * rotation).flatten(-2).to(x.dtype)


@dataclass(frozen=True)
class Band:
    """Sliding-window causal attention over a sequence longer than twice its window, computed a window
    of queries at a time (`banded_attention`): O(L * window) time and memory, not an (L, L) mask."""

    window: int


def band_mask(queries: range, keys: range, window: int, device) -> torch.Tensor:
    """Boolean (len(queries), len(keys)) mask: query i sees keys i-window+1 .. i."""
    delta = torch.arange(queries.start, queries.stop, device=device)[:, None] - \
        torch.arange(keys.start, keys.stop, device=device)[None, :]
    return (delta >= 0) & (delta < window)


def window_mask(length: int, window: int | None, device) -> torch.Tensor | Band | None:
    """How a whole sequence's self-attention is masked: None where plain causal is the same, a Band
    beyond twice the window (echo's scoring of a long prompt, /v1/patches), else a boolean (L, L) mask."""
    if window is None or length <= window:
        return None
    if length > 2 * window:
        return Band(window)
    return band_mask(range(length), range(length), window, device)


def banded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Sliding-window causal attention, q (B, H, L, D) and k, v with as many heads, a block of `window`
    queries at a time over the keys they can see (at most 2 * window - 1): every query weighs the
    same keys as under the (L, L) mask, whose other entries weigh exactly zero."""
    L = q.shape[2]
    out = torch.empty_like(q)
    for start in range(0, L, window):
        end = min(start + window, L)
        first = max(start - window + 1, 0)
        mask = band_mask(range(start, end), range(first, end), window, q.device)
        out[:, :, start:end] = F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, first:end],
                                                              v[:, :, first:end], attn_mask=mask)
    return out


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, H_kv, T, D) -> (B, H_kv * groups, T, D); query head h reads kv head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Projections(nn.Module):
    def __init__(self, cfg: StackConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, d, bias=False)

    def heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """(B, T, n*D) -> (B, n, T, D)."""
        return x.unflatten(-1, (n, self.head_dim)).transpose(1, 2)

    def merge(self, o: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) -> o_proj((B, T, H*D))."""
        return self.o_proj(o.transpose(1, 2).flatten(2))


class SelfAttention(_Projections):
    def forward(self, x: torch.Tensor, rotation: torch.Tensor, mask: torch.Tensor | Band | None) -> torch.Tensor:
        q = apply_rope(self.heads(self.q_proj(x), self.num_heads), rotation)
        k = apply_rope(self.heads(self.k_proj(x), self.num_kv_heads), rotation)
        v = self.heads(self.v_proj(x), self.num_kv_heads)
        groups = self.num_heads // self.num_kv_heads
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        if isinstance(mask, Band):
            return self.merge(banded_attention(q, k, v, mask.window))
        return self.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None))


class CrossAttention(_Projections):
    """Attention without RoPE from queries to other states; q_norm/k_norm on the inputs.

    Returns only o_proj(attention); the caller applies BLT's double residual.
    """

    def __init__(self, cfg: StackConfig):
        super().__init__(cfg)
        self.q_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.k_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, H, T, D)."""
        return self.heads(self.q_proj(self.q_norm(x)), self.num_heads)

    def keys_values(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, d) -> k, v each (B, H, S, D) with kv heads repeated."""
        kv = self.k_norm(kv)
        groups = self.num_heads // self.num_kv_heads
        k = repeat_kv(self.heads(self.k_proj(kv), self.num_kv_heads), groups)
        v = repeat_kv(self.heads(self.v_proj(kv), self.num_kv_heads), groups)
        return k, v

    def forward(self, x: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, d) attends to kv (B, S, d) where mask (B, T, S) is True."""
        k, v = self.keys_values(kv)
        o = F.scaled_dot_product_attention(self.queries(x), k, v, attn_mask=mask[:, None])
        return self.merge(o)


def double_residual(x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """BLT's cross-attention residual: the module adds its input and the caller adds it again."""
    return x + (attended + x)


class Block(nn.Module):
    """Pre-norm Llama block: h += Attn(RMSNorm(h)); h += FFN(RMSNorm(h))."""

    def __init__(self, cfg: StackConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = SelfAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h: torch.Tensor, rotation: torch.Tensor, mask: torch.Tensor | Band | None) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), rotation, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class Stack(nn.Module):
    """A list of blocks over a sequence with RoPE positions 0..T-1 and the stack's window."""

    def __init__(self, cfg: StackConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))

    def positions(self, length: int, device) -> tuple[torch.Tensor, torch.Tensor | Band | None]:
        """RoPE rotation and the attention mask for a whole sequence of `length` positions."""
        rotation = rope_rotation(torch.arange(length, device=device), self.cfg.head_dim, self.cfg.rope_theta)
        return rotation, window_mask(length, self.cfg.window, device)

    def run_layers(self, h: torch.Tensor) -> torch.Tensor:
        rotation, mask = self.positions(h.shape[1], h.device)
        for layer in self.layers:
            h = layer(h, rotation, mask)
        return h
