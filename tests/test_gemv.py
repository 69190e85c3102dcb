"""gemv.py's projections with the norm before them and SwiGLU's gate after them, in Triton's interpreter
(tests/interpreter.py), against the eager stretches and F.linear (fused.StepOps): the residual bit
for bit, the products within their last bit (their sums run in another order)."""

import pytest
import torch
import torch.nn.functional as F
from interpreter import interpreted

from blt_runtime import gemv
from blt_runtime.fused import EAGER
from blt_runtime.gemv import FUSED_ROWS, GemvOps, norm_linear
from blt_runtime.model.layers import RMSNorm
from blt_runtime.triton_ops import ADD, TritonOps

TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=8e-3)}
METHODS = ("add_norm_linear", "add_norm_swiglu", "double_residual_norm_linear")


def inputs(rows: int, d: int, f: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    norm = RMSNorm(d, 1e-5)
    norm.weight.data = torch.randn(d, generator=g) * 0.5 + 1
    n = norm.to(dtype).bound(torch.device("cpu"))
    x, delta = ((torch.randn(rows, 1, d, generator=g) * 3).to(dtype) for _ in range(2))
    weight = (torch.randn(2 * f, d, generator=g) / d ** 0.5).to(dtype)
    return x, delta, n, weight


def call(ops, method: str, x, delta, n, weight):
    if method == "add_norm_swiglu":
        return ops.add_norm_swiglu(x, delta, n, weight)
    return getattr(ops, method)(x, delta, n, weight[:weight.shape[0] // 2])


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, d, f", [(1, 96, 200), (5, 300, 64), (16, 128, 48), (100, 160, 40)])
@pytest.mark.parametrize("method, residual", [(m, True) for m in METHODS] + [(m, False) for m in METHODS[:2]])
def test_projections_equal_eager(dtype, rows, d, f, method, residual):
    """Every residual kind (none, add, BLT's double residual), plain and gated, at one row and a few
    (products summed on the CUDA cores), a tensor-core tile and two row blocks, widths that are not
    multiples of the blocks."""
    x, delta, n, weight = inputs(rows, d, f, dtype, rows * d)
    delta = delta if residual else None
    got, want = call(GemvOps(fused_rows=rows), method, x, delta, n, weight), call(EAGER, method, x, delta, n, weight)
    assert torch.equal(got[0], want[0])
    assert got[1].shape == want[1].shape == (rows, 1, f) and got[1].dtype == dtype
    torch.testing.assert_close(got[1], want[1], **TOLERANCE[dtype])


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, d, f", [(1, 96, 200), (5, 300, 64), (16, 128, 48)])
def test_plain_products_equal_f_linear(dtype, rows, d, f):
    """plain_linear, the kernel without a norm (GemvOps.linear: the output and down projections, the byte
    heads), against F.linear: a row, a few with a width past one block, a tensor-core tile."""
    x, _, _, weight = inputs(rows, d, f, dtype, rows + d)
    weight = weight[:f]
    got = gemv.plain_linear(x, weight)
    assert got.shape == (rows, 1, f) and got.dtype == dtype
    torch.testing.assert_close(got, F.linear(x, weight), **TOLERANCE[dtype])
    torch.testing.assert_close(GemvOps(fused_rows=rows).linear(x, weight), got, atol=0, rtol=0)
    with pytest.raises(ValueError, match="plain_linear"):
        gemv.plain_linear(x, weight[:, :d - 1])


@interpreted
def test_projections_take_layouts_and_refuse_what_they_cannot_do(monkeypatch):
    """A transposed weight (the CPU layout, step_weights.wide_layout) and rows sliced from a wider tensor give
    the same values; GemvOps fuses up to FUSED_ROWS rows, and runs more (64 streams, prefill chunks)
    as TritonOps does; mixed dtypes and mismatched widths are refused with what is wrong named."""
    x, delta, n, weight = inputs(3, 64, 40, torch.float32, 0)
    wide = torch.cat([x, x], dim=-1)[..., :64]
    transposed = weight.t().contiguous().t()
    want = EAGER.add_norm_swiglu(x, delta, n, weight)
    for got in (GemvOps().add_norm_swiglu(wide, delta, n, weight), GemvOps().add_norm_swiglu(x, delta, n, transposed)):
        torch.testing.assert_close(got[1], want[1], **TOLERANCE[torch.float32])
    fused = []

    def counted(*args, **kwargs):
        fused.append(args[0].shape)
        return norm_linear(*args, **kwargs)

    monkeypatch.setattr(gemv, "norm_linear", counted)
    for rows in (FUSED_ROWS, FUSED_ROWS + 1):
        some = inputs(rows, 64, 40, torch.float32, rows)
        got = GemvOps().add_norm_swiglu(*some)
        torch.testing.assert_close(got[1], TritonOps().add_norm_swiglu(*some)[1], **TOLERANCE[torch.float32])
    assert fused == [(FUSED_ROWS, 1, 64)]
    with pytest.raises(ValueError, match="bfloat16"):
        norm_linear(x.bfloat16(), None, n, weight)
    with pytest.raises(ValueError, match="weight"):
        norm_linear(x, delta, n, weight[:, :32], ADD)
    with pytest.raises(ValueError, match="even"):
        norm_linear(x, delta, n, weight[:79], ADD, gated=True)


@interpreted
def test_gated_projection_is_swiglu_of_the_product():
    """The gate is the first half of the weight's rows and the up projection the second, as
    fuse_projections lays them out: swapping the halves changes the result."""
    x, delta, n, weight = inputs(2, 64, 48, torch.float32, 2)
    _, got = norm_linear(x, delta, n, weight, ADD, gated=True)
    normed = EAGER.add_norm(x, delta, n)[1]
    gate, up = F.linear(normed, weight).chunk(2, dim=-1)
    torch.testing.assert_close(got, F.silu(gate) * up, **TOLERANCE[torch.float32])
    swapped = torch.cat([weight[48:], weight[:48]])
    assert not torch.allclose(norm_linear(x, delta, n, swapped, ADD, gated=True)[1], got)
