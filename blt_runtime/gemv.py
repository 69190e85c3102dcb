"""A decode step's projections with the norm before them and SwiGLU's gate after them, one Triton
kernel each: the `--kernels triton-gemv` path.

With triton_ops.py's kernels a block's step is 8 launches: norm, qkv, attention, o, add and norm,
gate/up, gate, down. At batch 1 each launch costs a few microseconds whatever its size, and the
weights a byte step reads take about 0.13 ms at an H200's bandwidth, so the launches are the step's
cost. Here a norm (after its residual add, or BLT's double residual) is computed by the program of
the product that reads it, and SwiGLU's gate by the program that has both halves of a gate/up
column block, so a block is 5 launches: norm + qkv, attention, o, add + norm + gate/up + gate,
down (and the decoder's cross-attention query gets its norm the same way).

Each program of `norm_linear` takes BLOCK_N output columns of its rows: it sums the rows' squares
over the full width, then multiplies the normed rows by its columns of the weight, BLOCK_K at a
time, accumulating in fp32 (on tensor cores from 16 rows). At a decode step's few rows BLOCK_K is the
whole width where it fits (`blocks`): the rows are read once and each program streams a few whole
rows of the weight in one step. The norm is the eager step's arithmetic
(triton_ops._norm_program: rounded to the dtype where it rounds); the product rounds once, as
cuBLAS does, but sums in another order, so values differ from F.linear in the last bit and greedy
bytes may differ from "triton"'s where two bytes are nearly tied. No atomics: the result is the
same at every run, in a CUDA graph or not. `GemvOps`, the engine's ops when its kernels are
"triton-gemv", fuses for up to FUSED_ROWS rows (batch 1 to 16, and the closing rows of a patch
step); more rows (64 streams, prefill chunks) run as TritonOps runs them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import next_power_of_2, rounded, tl, triton
from .model.layers import BoundNorm
from .triton_ops import ADD, DOUBLE, PLAIN, TritonOps

# Rows up to which GemvOps fuses. Every program norms all the rows it multiplies, so the norm's work
# grows with rows x programs: at 64 rows (64 streams) it costs more than the launch it saves, so such
# a step runs triton_ops' norm kernel once and cuBLAS instead. On an H200 the fused products were slower
# than the norm kernel and cuBLAS at 1, 16 and 64 rows alike (bench/RESULTS.md, "GPU"), which is why
# "auto" never picks them; that was with blocks 128 deep below 16 rows (6 to 16 steps of latency a
# product), which the whole-width blocks replace: not timed yet.
FUSED_ROWS = 16


def _residual(X, Delta, rows, c, inside, sx, sd, dtype, BEFORE: tl.constexpr):
    """(rows, columns c) of h: X, X + Delta (BEFORE 1) or X + (Delta + X) (BEFORE 2), rounded as the
    eager step rounds each sum."""
    h = tl.load(X + rows[:, None] * sx + c[None, :], mask=inside, other=0.0)
    if BEFORE == 1:
        d = tl.load(Delta + rows[:, None] * sd + c[None, :], mask=inside, other=0.0)
        h = rounded(h.to(tl.float32) + d.to(tl.float32), dtype)
    if BEFORE == 2:
        x = h.to(tl.float32)
        d = tl.load(Delta + rows[:, None] * sd + c[None, :], mask=inside, other=0.0)
        h = rounded(x + rounded(d.to(tl.float32) + x, dtype).to(tl.float32), dtype)
    return h


def _product(x, w, acc, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr):
    """acc + x @ w in fp32: on tensor cores for 16 rows or more (tl.dot's least), else as products
    summed over the tile's depth (a one-row product would waste 15 of the 16 rows of a tensor-core
    tile, in the norm before it as well). UPCAST: from fp32 operands (the interpreter's bf16 tl.dot
    multiplies the bits as integers; a bf16 product is exact in fp32)."""
    if BLOCK_M >= 16:
        if UPCAST:
            x, w = x.to(tl.float32), w.to(tl.float32)
        return tl.dot(x, w, acc, input_precision="ieee")
    return acc + tl.sum(x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], 1)


def _scale(squares, width, inv_width, eps, dtype):
    """Each row's 1 / RMS from its sum of squares, as layers.rms_norm computes it (triton_ops._norm_program:
    in fp32 a multiply by 1 / width, else a divide)."""
    if dtype == tl.float32:
        return tl.math.rsqrt(squares * inv_width + eps)
    return tl.math.rsqrt(squares / width + eps)


def _normed(hf, scale, NormW, c, in_k, dtype):
    """Columns c of the normed rows: h x scale, rounded where the eager step rounds, times the norm's weight."""
    w = tl.load(NormW + c, mask=in_k, other=0.0).to(tl.float32)[None, :]
    if dtype == tl.float32:
        return hf * scale[:, None] * w
    return rounded(w * rounded(hf * scale[:, None], dtype).to(tl.float32), dtype)


def _gemv_program(X, Delta, NormW, H, W, Out, n_rows, width, n_out, eps, inv_width, sx, sd, sh, swn, swk, so, up_offset,
                  BEFORE: tl.constexpr, GATED: tl.constexpr, UPCAST: tl.constexpr, WHOLE: tl.constexpr,
                  NORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Columns [BLOCK_N * pid(0), ...) of rows [BLOCK_M * pid(1), ...): norm(h) @ W.T, h as BEFORE says
    (stored to H by the first column block); GATED: silu(norm(h) @ gate.T) * (norm(h) @ up.T), the up
    rows of W `up_offset` rows after the gate rows. UPCAST: see _product. WHOLE: BLOCK_K covers the
    width, so the rows are read once (the sum of their squares, then the product, from registers);
    else twice, BLOCK_K at a time (the squares first). Without NORM, h @ W.T (BEFORE 0): a plain
    product, the rows read once."""
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows, in_cols = rows < n_rows, cols < n_out
    rows64 = rows.to(tl.int64)
    dtype = X.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    squares = tl.zeros([BLOCK_M], dtype=tl.float32)
    hf = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)  # (WHOLE: the rows, kept from the first pass)
    scale = squares  # (without NORM, none)
    if NORM:
        for k0 in range(0, width, BLOCK_K):
            c = k0 + tl.arange(0, BLOCK_K)
            inside = in_rows[:, None] & (c < width)[None, :]
            h = _residual(X, Delta, rows64, c, inside, sx, sd, dtype, BEFORE)
            if BEFORE != 0:  # noqa: SIM102 - BEFORE is known when compiling, the program at run time
                if tl.program_id(0) == 0:
                    tl.store(H + rows64[:, None] * sh + c[None, :], h, mask=inside)
            hf = h.to(tl.float32)
            squares += tl.sum(hf * hf, 1)
        scale = _scale(squares, width, inv_width, eps, dtype)
    for k0 in range(0, width, BLOCK_K):
        c = k0 + tl.arange(0, BLOCK_K)
        in_k = c < width
        if not (WHOLE and NORM):
            hf = _residual(X, Delta, rows64, c, in_rows[:, None] & in_k[None, :], sx, sd, dtype, BEFORE).to(tl.float32)
        if NORM:
            x = _normed(hf, scale, NormW, c, in_k, dtype)
        else:
            x = hf.to(dtype)  # the rows as they are (their dtype to fp32 and back: exact)
        tile = W + cols[None, :].to(tl.int64) * swn + c[:, None] * swk  # (BLOCK_K, BLOCK_N) of W.T
        both = in_k[:, None] & in_cols[None, :]
        acc = _product(x, tl.load(tile, mask=both, other=0.0), acc, UPCAST, BLOCK_M)
        if GATED:
            acc_up = _product(x, tl.load(tile + up_offset * swn, mask=both, other=0.0), acc_up, UPCAST, BLOCK_M)
    out = rounded(acc, dtype)
    if GATED:  # F.silu rounds, then the product rounds (triton_ops._silu_mul_program)
        gate = out.to(tl.float32)
        silu = rounded(gate / (1.0 + tl.exp(-gate)), dtype)
        out = rounded(silu.to(tl.float32) * rounded(acc_up, dtype).to(tl.float32), dtype)
    tl.store(Out + rows64[:, None] * so + cols[None, :], out, mask=in_rows[:, None] & in_cols[None, :])


if triton is not None:
    _residual = triton.jit(_residual)
    _product = triton.jit(_product)
    _scale = triton.jit(_scale)
    _normed = triton.jit(_normed)
    _gemv_kernel = triton.jit(_gemv_program)


PRODUCTS = 8192  # multiply-adds a program holds in registers below 16 rows (8 warps; a gated product's two halves)


def blocks(rows: int, width: int, cols: int, device: torch.device, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """BLOCK_M, BLOCK_N, BLOCK_K and warps for `rows` rows of `width` inputs and `cols` output columns.
    BLOCK_M: the rows, up to 64 (more: several row blocks). On a GPU below 16 rows (products summed on
    the CUDA cores, rows x depth x columns of them in registers; a decode step's rows): the whole width
    in one block where it fits (up to 2,048 inputs at one row, at least 4 columns: the rows read once,
    a step of latency where blocks 128 deep took 6 to 16), and as many columns as PRODUCTS allows
    (half with fp32 tiles; a gated product's two tiles each half, norm_linear), 8 warps; each program
    then streams BLOCK_N whole rows of the weight.
    From 16 rows (a tensor-core tile): BLOCK_N narrow, so that the programs cover the GPU's 132 SMs
    even for a 768-column product, wider for the wide products (fewer programs that each norm the same
    rows); BLOCK_K 64 for a 16-row tile, 32 for more, fp32 tiles half as deep; 4 warps. The
    interpreter (on a CPU) takes the widest blocks: fewer programs run faster there."""
    block_m = min(next_power_of_2(rows), 64)
    if device.type != "cuda":
        return block_m, min(next_power_of_2(cols), 128), 128, 4
    if block_m < 16:
        products = PRODUCTS if dtype != torch.float32 else PRODUCTS // 2
        block_k = min(next_power_of_2(width), products // block_m // 4)
        return block_m, max(1, products // (block_m * block_k)), block_k, 8
    block_n = 16 if cols <= 4096 else 32
    block_k = 64 if block_m == 16 else 32
    return block_m, block_n, max(16, block_k // 2) if dtype == torch.float32 else block_k, 4


def norm_linear(x: torch.Tensor, delta: torch.Tensor | None, n: BoundNorm, weight: torch.Tensor,
                before: int = PLAIN, gated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, y): h = x, x + delta (ADD) or x + (delta + x) (DOUBLE), as triton_ops.norm computes it, and
    y = F.linear(n(h), weight), or with `gated` (weight the gate rows, then the up rows)
    silu(gate) * up. One kernel, for any number of rows (GemvOps uses it for at most FUSED_ROWS)."""
    if len({x.dtype, n.weight.dtype, weight.dtype} | ({delta.dtype} if delta is not None else set())) != 1:
        raise ValueError(f"norm_linear: x, delta, the norm and the weight must share a dtype, not {x.dtype}, "
                         f"{None if delta is None else delta.dtype}, {n.weight.dtype} and {weight.dtype}")
    K = x.shape[-1]
    if weight.shape[1] != K or (gated and weight.shape[0] % 2):
        raise ValueError(f"norm_linear: weight {tuple(weight.shape)} for rows of width {K}"
                         + (" (gated: an even number of rows)" if gated else ""))
    xs = _rows(x)
    ds = xs if delta is None else _rows(delta)
    N = weight.shape[0] // 2 if gated else weight.shape[0]
    h = x if before == PLAIN else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    hs = xs if before == PLAIN else h.view(-1, K)
    return h, _launch(x, xs, ds, n.weight, n.eps, hs, weight, N, before, gated, True)


def plain_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) (no bias) by the same kernel without a norm: at a decode step's rows, blocks of the
    whole width where it fits (`blocks`) instead of cuBLAS's tiles. The product rounds once, summed in
    another order than cuBLAS's."""
    if x.dtype != weight.dtype or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"plain_linear: rows of {x.shape[-1]} {x.dtype} by a weight {tuple(weight.shape)} "
                         f"{weight.dtype}")
    xs = _rows(x)
    return _launch(x, xs, xs, xs, 0.0, xs, weight, weight.shape[0], PLAIN, False, False)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, width), its width contiguous (a view where it can be)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _launch(x: torch.Tensor, xs: torch.Tensor, ds: torch.Tensor, norm_weight: torch.Tensor, eps: float,
            hs: torch.Tensor, weight: torch.Tensor, N: int, before: int, gated: bool, norm: bool) -> torch.Tensor:
    """_gemv_kernel over the rows xs (of x; ds the residual's, hs where h goes) -> x's shape with N outputs."""
    (M, K), device = xs.shape, x.device
    out = torch.empty(x.shape[:-1] + (N,), dtype=x.dtype, device=device)
    if M:
        bm, bn, bk, warps = blocks(M, K, N, device, x.dtype)
        bn = max(1, bn // 2) if gated and bm < 16 else bn  # (two tiles a step: the gate's and the up's)
        _gemv_kernel[(triton.cdiv(N, bn), triton.cdiv(M, bm))](
            xs, ds, norm_weight, hs, weight, out.view(-1, N), M, K, N, eps, 1.0 / K, xs.stride(0), ds.stride(0),
            hs.stride(0), weight.stride(0), weight.stride(1), N, N, BEFORE=before, GATED=gated,
            UPCAST=device.type != "cuda", WHOLE=bk >= K, NORM=norm, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
            num_warps=warps, num_stages=3)
    return out


class GemvOps(TritonOps):
    """TritonOps, and the norms with the projection after them (and SwiGLU's gate) as one kernel each
    (norm_linear), and the other products by the same kernel (plain_linear), for up to `fused_rows` rows
    (a decode step's); more rows as TritonOps runs them."""

    def __init__(self, fused_rows: int = FUSED_ROWS):
        self.fused_rows = fused_rows

    def _fused(self, x: torch.Tensor) -> bool:
        return x.numel() // x.shape[-1] <= self.fused_rows

    def linear(self, x, weight):
        if not self._fused(x):
            return F.linear(x, weight)
        return plain_linear(x, weight)

    def add_norm_linear(self, h, delta, n, weight):
        if not self._fused(h):
            return super().add_norm_linear(h, delta, n, weight)
        return norm_linear(h, delta, n, weight, PLAIN if delta is None else ADD)

    def add_norm_swiglu(self, h, delta, n, gate_up):
        if not self._fused(h):
            return super().add_norm_swiglu(h, delta, n, gate_up)
        return norm_linear(h, delta, n, gate_up, PLAIN if delta is None else ADD, gated=True)

    def double_residual_norm_linear(self, x, attended, n, weight):
        if not self._fused(x):
            return super().double_residual_norm_linear(x, attended, n, weight)
        return norm_linear(x, attended, n, weight, DOUBLE)
