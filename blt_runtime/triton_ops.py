"""The element-wise stretches of a step (fused.py) as hand-written Triton kernels, one launch each.

In eager PyTorch a decode step's bf16 RMSNorm is four kernels (up-cast, norm, down-cast, weight) and
five with the residual add before it, BLT's double residual and norm six, SwiGLU's gate two. On a GPU
each costs a launch of a few microseconds whatever its size, and a byte step has about 24 blocks of
them. `TritonOps` runs each stretch as one kernel, computed as the eager step computes it: the same
operations in fp32, rounded to the model's dtype where the eager step rounds (to nearest even, by
attention.rounded, so that Triton's interpreter gives on a CPU what a GPU gives). The only
difference left is the order of the norm's sum of squares, a last-bit matter in fp32. The
alternative is `CompiledOps` (torch.compile, `--compile`), which needs compilation at start-up.
With the attention kernel (attention.py), which rotates, stores and attends in one launch, a
block's step is 8 kernels: norm, qkv, attention, o, add and norm, gate/up, gate, down (5 with
gemv.py, which puts each norm and the gate inside a projection's kernel).
The positions stretch and RoPE where the attention kernel does not take them over (prefill
chunks; in decode steps it reads each position's rotation from a table and works out the cache
entries) stay eager, and so does the `entropy` stretch (a static decode step computes the entropy
with tail_kernels.py's kernel instead). Used by the engine when its kernels are "triton".
"""

from __future__ import annotations

import torch

from .attention import next_power_of_2, rounded, tl, triton
from .fused import StepOps
from .model.layers import BoundNorm

PLAIN, ADD, DOUBLE = 0, 1, 2  # what comes before the norm: nothing, h + delta, x + (delta + x)


def _norm_program(X, Delta, Weight, H, Out, n_cols, eps, inv_n, sx, sd, sh, so,
                  D_PAD: tl.constexpr, BEFORE: tl.constexpr):
    """One row: the residual add BEFORE asks for, stored to H, then its RMSNorm times the weight, to Out
    (fused.StepOps.add_norm / double_residual_norm, layers.rms_norm)."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, D_PAD)
    inside = c < n_cols
    dtype = X.dtype.element_ty
    h = tl.load(X + r * sx + c, mask=inside, other=0.0)
    if BEFORE == 1:
        h = rounded(h.to(tl.float32) + tl.load(Delta + r * sd + c, mask=inside, other=0.0).to(tl.float32), dtype)
        tl.store(H + r * sh + c, h, mask=inside)
    if BEFORE == 2:
        x = h.to(tl.float32)
        a = rounded(tl.load(Delta + r * sd + c, mask=inside, other=0.0).to(tl.float32) + x, dtype)
        h = rounded(x + a.to(tl.float32), dtype)
        tl.store(H + r * sh + c, h, mask=inside)
    hf = h.to(tl.float32)
    squares = tl.sum(hf * hf, 0)
    w = tl.load(Weight + c, mask=inside, other=0.0).to(tl.float32)
    if dtype == tl.float32:  # layers.rms_norm in fp32: x * rsqrt(sum(x^2) * (1/d) + eps) * w
        out = hf * tl.math.rsqrt(squares * inv_n + eps) * w
    else:  # F.rms_norm in fp32 (the mean as a division), rounded, then times the weight, rounded
        out = rounded(w * rounded(hf * tl.math.rsqrt(squares / n_cols + eps), dtype).to(tl.float32), dtype)
    tl.store(Out + r * so + c, out, mask=inside)


def _silu_mul_program(GateUp, Out, n_cols, sg, so, BLOCK: tl.constexpr):
    """Columns [BLOCK * pid(1), ...) of one row: silu(gate) * up, each rounded to the dtype as F.silu and
    the product round it."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = c < n_cols
    dtype = Out.dtype.element_ty
    gate = tl.load(GateUp + r * sg + c, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(GateUp + r * sg + n_cols + c, mask=inside, other=0.0).to(tl.float32)
    silu = rounded(gate / (1.0 + tl.exp(-gate)), dtype)
    tl.store(Out + r * so + c, rounded(silu.to(tl.float32) * up, dtype), mask=inside)


if triton is not None:
    _norm_kernel = triton.jit(_norm_program)
    _silu_mul_kernel = triton.jit(_silu_mul_program)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., d) as (rows, d) with contiguous columns, a view where it can be."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def norm(x: torch.Tensor, n: BoundNorm, delta: torch.Tensor | None = None,
         before: int = PLAIN) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, n(h)) with h = x, x + delta (ADD) or x + (delta + x) (DOUBLE); one kernel."""
    if n.weight.dtype != x.dtype or (delta is not None and delta.dtype != x.dtype):
        raise ValueError(f"norm: x, delta and weight must share a dtype, not {x.dtype}, "
                         f"{None if delta is None else delta.dtype} and {n.weight.dtype}")
    d = x.shape[-1]
    xs = _rows(x)
    ds = _rows(delta) if delta is not None else xs
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = torch.empty_like(out) if before != PLAIN else x
    hs = h.view(-1, d) if before != PLAIN else xs
    if xs.shape[0]:
        _norm_kernel[(xs.shape[0],)](xs, ds, n.weight, hs, out.view(-1, d), d, n.eps, 1.0 / d, xs.stride(0),
                                     ds.stride(0), hs.stride(0), d, D_PAD=next_power_of_2(d), BEFORE=before)
    return h, out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """(..., 2F) -> (..., F) silu(gate) * up (fused.StepOps.silu_mul); one kernel."""
    f = gate_up.shape[-1] // 2
    gs = _rows(gate_up)
    out = torch.empty(gate_up.shape[:-1] + (f,), dtype=gate_up.dtype, device=gate_up.device)
    block = min(next_power_of_2(f), 1024) if gate_up.device.type == "cuda" else next_power_of_2(f)
    if gs.shape[0]:
        _silu_mul_kernel[(gs.shape[0], triton.cdiv(f, block))](gs, out.view(-1, f), f, gs.stride(0), f, BLOCK=block)
    return out


class TritonOps(StepOps):
    """add_norm, double_residual_norm and silu_mul as one Triton kernel each; the rest as StepOps."""

    def add_norm(self, h, delta, n):
        return norm(h, n) if delta is None else norm(h, n, delta, ADD)

    def double_residual_norm(self, x, attended, n):
        return norm(x, n, attended, DOUBLE)

    def silu_mul(self, gate_up):
        return silu_mul(gate_up)
