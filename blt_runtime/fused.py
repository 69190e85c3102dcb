"""The element-wise stretches of a step, between its matrix products and attentions, as functions that
torch.compile can turn into one kernel each.

On a GPU a decode step is bound by kernel launches, not by memory (issue 8: about 24 blocks of small
kernels per byte). In eager PyTorch a bf16 RMSNorm is four kernels (up-cast, norm, down-cast, weight),
RoPE three, SwiGLU's gate two, BLT's double residual two; compiled, each stretch is one:
- `add_norm`: a residual add (each block leaves its last one to the next norm) and that norm;
- `double_residual`: the decoder's cross-attention residual x + (a + x);
- `rope`: RoPE of the q and k heads of a fused qkv projection; `silu_mul`: SwiGLU's silu(gate) * up.
`StepOps` runs them as the eager step always has (the engine's default, and the arithmetic the tests
hold equal to full recompute). `CompiledOps` compiles the same arithmetic, written without complex
numbers (which inductor does not generate code for), with `emulate_precision_casts`, so bf16 values
are rounded where the eager code rounds them. Matrix products, attention and cache copies stay
outside: they are single kernels already. Used by runner.py; knows nothing about caches or requests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .model.layers import BoundNorm, apply_rope


class StepOps:
    """The stretches as the eager step runs them."""

    compiled = False

    def add_norm(self, h: torch.Tensor, delta: torch.Tensor | None,
                 n: BoundNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + delta, n(h + delta)); delta None: (h, n(h))."""
        if delta is not None:
            h = h + delta
        return h, n(h)

    def double_residual(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """BLT's cross-attention residual (layers.double_residual)."""
        return x + (attended + x)

    def rope(self, qkv: torch.Tensor, rotation: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
        """The first `heads` heads of qkv (B, T, *) rotated: (B, T, heads, head_dim). `rotation` is
        (B, T, 1, head_dim / 2) complex (layers.rope_rotation)."""
        return apply_rope(qkv[..., :heads * head_dim].unflatten(-1, (heads, head_dim)), rotation)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """layers.rms_norm: statistics in fp32, normalised values rounded to x's dtype, then the weight."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _add_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
              eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = h + delta
    return h, _norm(h, weight, eps)


def _double_residual(x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    return x + (attended + x)


def _rope(qkv: torch.Tensor, rotation: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """layers.apply_rope with the complex product written out: rotation is (B, T, 1, head_dim / 2, 2),
    cos and sin (torch.view_as_real of the complex rotation, a view)."""
    pairs = qkv[..., :heads * head_dim].unflatten(-1, (heads, head_dim // 2, 2)).float()
    x0, x1 = pairs.unbind(-1)
    cos, sin = rotation.unbind(-1)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).to(qkv.dtype)


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class CompiledOps(StepOps):
    """The stretches compiled (inductor; Triton kernels on a GPU). Shapes are dynamic, so batch sizes,
    prompt chunks and the stacks' widths share a few compilations; the first call of each is slow."""

    compiled = True

    def __init__(self):
        # Each function is compiled per dtype, per batch and length of 1 or more, per stride pattern:
        # a dozen variants in a process that runs two dtypes, past dynamo's default limit of 8 per
        # function (past which it would run the function eagerly). The limit is process-wide; raising
        # it is this class's only side effect.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

        def compiled(fn):
            return torch.compile(fn, dynamic=True, options={"emulate_precision_casts": True})
        self._norm, self._add_norm, self._double_residual = compiled(_norm), compiled(_add_norm), \
            compiled(_double_residual)
        self._rope, self._silu_mul = compiled(_rope), compiled(_silu_mul)

    def add_norm(self, h, delta, n):
        # weights go in detached: a parameter's shape would be compiled in, one compilation per width
        if delta is None:
            return h, self._norm(h, n.weight.detach(), n.eps)
        return self._add_norm(h, delta, n.weight.detach(), n.eps)

    def double_residual(self, x, attended):
        return self._double_residual(x, attended)

    def rope(self, qkv, rotation, heads, head_dim):
        return self._rope(qkv, torch.view_as_real(rotation), heads, head_dim)

    def silu_mul(self, gate_up):
        return self._silu_mul(gate_up)
