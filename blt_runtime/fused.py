"""The element-wise stretches of a step, between its matrix products and attentions, as functions that
torch.compile can turn into one kernel each.

On a GPU a decode step is bound by kernel launches, not by memory (issue 8: about 24 blocks of small
kernels per byte). In eager PyTorch a bf16 RMSNorm is four kernels (up-cast, norm, down-cast, weight),
RoPE three, SwiGLU's gate two, BLT's double residual two; compiled, each stretch is one:
- `add_norm`: a residual add (each block leaves its last one to the next norm) and that norm;
- `double_residual_norm`: the decoder's cross-attention residual x + (a + x) and the next norm;
- `heads`: the heads of a fused qkv projection, q and k rotated (compiled: with the new keys and
  values side by side, so the cache takes them in one copy); `silu_mul`: SwiGLU's silu(gate) * up;
- `entropy`: the entropy model's next-byte entropy from its logits (a softmax and two sums);
- `positions`: what every layer of a stack shares in a step: the new positions' RoPE rotation, the
  additive attention mask over the cache entries read, and the cache entries the new keys go to.
Each norm is followed by a projection: `add_norm_linear`, `add_norm_swiglu` (the MLP's gate/up and
SwiGLU's gate) and `double_residual_norm_linear` are that pair, as separate kernels here and inside
one in gemv.GemvOps. `StepOps` runs them as the eager step always has (the engine's default, and
the arithmetic the tests hold equal to full recompute). `CompiledOps` compiles the same arithmetic,
written without complex numbers (which inductor does not generate code for), with
`emulate_precision_casts`, so bf16 values are rounded where the eager code rounds them. Matrix
products, attention and cache copies stay outside: they are single kernels already. Used by
runner.py; knows nothing about requests, and takes the ring-buffer arithmetic of positions from
cache.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cache import entry_positions, index_of
from .model.entropy import entropy_nats
from .model.layers import BoundNorm, _inv_freq, apply_rope, rope_rotation


class StepOps:
    """The stretches as the eager step runs them. `linear`: the step's matrix products (the runner sets
    cpu_gemm's on a CPU)."""

    compiled = False
    linear = staticmethod(F.linear)

    def add_norm(self, h: torch.Tensor, delta: torch.Tensor | None,
                 n: BoundNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + delta, n(h + delta)); delta None: (h, n(h))."""
        if delta is not None:
            h = h + delta
        return h, n(h)

    def double_residual_norm(self, x: torch.Tensor, attended: torch.Tensor,
                             n: BoundNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """BLT's cross-attention residual h = x + (attended + x) (layers.double_residual), and n(h)."""
        h = x + (attended + x)
        return h, n(h)

    def add_norm_linear(self, h: torch.Tensor, delta: torch.Tensor | None, n: BoundNorm,
                        weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """add_norm, then the projection that reads the norm: (h + delta, F.linear(n(h + delta), weight)).
        (The norm and the product are separate kernels here; gemv.GemvOps fuses them.)"""
        h, x = self.add_norm(h, delta, n)
        return h, self.linear(x, weight)

    def add_norm_swiglu(self, h: torch.Tensor, delta: torch.Tensor | None, n: BoundNorm,
                        gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """add_norm, then the MLP's gate/up projection and SwiGLU's gate: (h + delta, silu(gate) * up)."""
        h, x = self.add_norm(h, delta, n)
        return h, self.silu_mul(self.linear(x, gate_up))

    def double_residual_norm_linear(self, x: torch.Tensor, attended: torch.Tensor, n: BoundNorm,
                                    weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """double_residual_norm, then the projection that reads the norm."""
        h, normed = self.double_residual_norm(x, attended, n)
        return h, self.linear(normed, weight)

    def heads(self, qkv: torch.Tensor, rotation: torch.Tensor, heads: int, kv_heads: int,
              head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """qkv (B, T, (heads + 2 kv_heads) * head_dim) -> q (B, heads, T, D) and k (B, kv_heads, T, D),
        rotated by `rotation` (B, T, 1, head_dim / 2) complex (layers.rope_rotation), v, and k and v
        side by side as (B, T, 2, kv_heads, D) when they are (None here)."""
        qk = apply_rope(qkv[..., :(heads + kv_heads) * head_dim].unflatten(-1, (heads + kv_heads, head_dim)),
                        rotation).transpose(1, 2)
        q, k = qk.split([heads, kv_heads], dim=1)
        v = qkv[..., (heads + kv_heads) * head_dim:].unflatten(-1, (kv_heads, head_dim)).transpose(1, 2)
        return q, k, v, None

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def entropy(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., V) logits -> (...) fp32 entropies in nats (model.entropy.entropy_nats)."""
        return entropy_nats(logits)

    def positions(self, lengths: torch.Tensor, T: int, span: int, kept: int, masked: bool,
                  cache_window: int | None, stack_window: int | None, head_dim: int, theta: float,
                  mask_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """T new positions after `lengths` (B,) cached ones, in a cache of window `cache_window` read
        at `span` entries (with T == 1, the new entry is written before the read) ->
        - rotation (B, T, 1, head_dim / 2) complex;
        - mask (B, 1, T, keys) additive (0 / -inf) in `mask_dtype`, or None when not `masked`;
        - index (B, kept): the cache entry of each of the last `kept` new positions."""
        new = lengths[:, None] + torch.arange(T, device=lengths.device)[None, :]  # (B, T)
        rotation = rope_rotation(new, head_dim, theta)[:, :, None]
        return rotation, additive_mask(lengths, new, T, span, masked, cache_window, stack_window, mask_dtype), \
            index_of(new[:, T - kept:], cache_window)


def visible(keys: torch.Tensor, queries: torch.Tensor, window: int | None) -> torch.Tensor:
    """Which cache entries or new positions, by the position they hold (-1: none), each query position sees
    (broadcast): held, not after it, and within the stack's window."""
    mask = (keys >= 0) & (keys <= queries)
    return mask if window is None else mask & (keys > queries - window)


def additive_mask(lengths: torch.Tensor, new: torch.Tensor, T: int, span: int, masked: bool,
                  cache_window: int | None, stack_window: int | None, mask_dtype: torch.dtype) -> torch.Tensor | None:
    """(B, 1, T, keys) 0 / -inf: the cache entries read (and with T > 1 the new positions, after them)
    that each new position `new` (B, T) sees; None when not `masked`."""
    if not masked:
        return None
    if T == 1:
        keys = entry_positions(lengths + 1, span, cache_window)
    else:
        keys = torch.cat([entry_positions(lengths, span, cache_window), new], dim=1)
    mask = visible(keys[:, None, :], new[:, :, None], stack_window)
    # additive, in the cache's dtype, built once for every layer of the stack: SDPA would otherwise
    # convert a boolean mask in each layer (same result, a kernel or two each)
    return torch.zeros(mask.shape, dtype=mask_dtype, device=mask.device).masked_fill_(~mask, float("-inf"))[:, None]


EAGER = StepOps()


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """layers.rms_norm: statistics in fp32, normalised values rounded to x's dtype, then the weight."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _add_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
              eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = h + delta
    return h, _norm(h, weight, eps)


def _double_residual_norm(x: torch.Tensor, attended: torch.Tensor, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = x + (attended + x)
    return h, _norm(h, weight, eps)


def _heads(qkv: torch.Tensor, rotation: torch.Tensor, rotated: int, head_dim: int) -> torch.Tensor:
    """qkv (B, T, n * head_dim) -> (B, T, n, head_dim) with the first `rotated` heads (q and k) rotated
    as layers.apply_rope does, its complex product written out, and the rest (v) as they are: one
    output, one kernel. rotation is (B, T, 1, head_dim / 2, 2) cos and sin (torch.view_as_real of the
    complex rotation, a view). v is multiplied by cos 1 and sin 0, which gives it back exactly."""
    pairs = qkv.unflatten(-1, (-1, head_dim // 2, 2)).float()
    x0, x1 = pairs.unbind(-1)
    turn = (torch.arange(pairs.shape[2], device=qkv.device) < rotated)[:, None]
    cos, sin = rotation.unbind(-1)
    cos, sin = torch.where(turn, cos, 1.0), torch.where(turn, sin, 0.0)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).to(qkv.dtype)


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _positions(lengths: torch.Tensor, inv_freq: torch.Tensor, T: int, span: int, kept: int, masked: bool,
               cache_window: int | None, stack_window: int | None,
               mask_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """StepOps.positions with the rotation as (B, T, head_dim / 2, 2) cos and sin (layers.rope_rotation's
    angles, from the same inverse frequencies)."""
    new = lengths[:, None] + torch.arange(T, device=lengths.device)[None, :]
    angles = new.float()[..., None] * inv_freq
    rotation = torch.stack((torch.cos(angles), torch.sin(angles)), dim=-1)
    return rotation, additive_mask(lengths, new, T, span, masked, cache_window, stack_window, mask_dtype), \
        index_of(new[:, T - kept:], cache_window)


class CompiledOps(StepOps):
    """The stretches compiled (inductor; Triton kernels on a GPU). Shapes are dynamic, so batch sizes,
    prompt chunks and the stacks' widths share a few compilations; the first call of each is slow."""

    compiled = True

    def __init__(self):
        # Each function is compiled per dtype, per batch and length of 1 or more, per stride pattern:
        # a dozen variants in a process that runs two dtypes, past dynamo's default limit of 8 per
        # function (past which it would run the function eagerly). The limit is process-wide; raising
        # it is this class's only side effect. (torch < 2.6 names it cache_size_limit.)
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))

        def compiled(fn):
            return torch.compile(fn, dynamic=True, options={"emulate_precision_casts": True})
        self._norm, self._add_norm, self._double_residual_norm = compiled(_norm), compiled(_add_norm), \
            compiled(_double_residual_norm)
        self._heads, self._silu_mul, self._positions = compiled(_heads), compiled(_silu_mul), compiled(_positions)
        self._entropy = compiled(entropy_nats)

    def add_norm(self, h, delta, n):
        # weights go in detached: a parameter's shape would be compiled in, one compilation per width
        if delta is None:
            return h, self._norm(h, n.weight.detach(), n.eps)
        return self._add_norm(h, delta, n.weight.detach(), n.eps)

    def double_residual_norm(self, x, attended, n):
        return self._double_residual_norm(x, attended, n.weight.detach(), n.eps)

    def heads(self, qkv, rotation, heads, kv_heads, head_dim):
        out = self._heads(qkv, torch.view_as_real(rotation), heads + kv_heads, head_dim)
        kv = out[:, :, heads:].unflatten(2, (2, kv_heads))
        return out[:, :, :heads].transpose(1, 2), kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2), kv

    def silu_mul(self, gate_up):
        return self._silu_mul(gate_up)

    def entropy(self, logits):
        return self._entropy(logits)

    def positions(self, lengths, T, span, kept, masked, cache_window, stack_window, head_dim, theta, mask_dtype):
        rotation, mask, index = self._positions(lengths, _inv_freq(head_dim, theta, lengths.device), T, span, kept,
                                                masked, cache_window, stack_window, mask_dtype)
        # through a flat view: before torch 2.6 view_as_complex refused inductor's odd stride on a size-1 T
        return torch.view_as_complex(rotation.flatten(0, 2)).view(rotation.shape[:-1])[:, :, None], mask, index
