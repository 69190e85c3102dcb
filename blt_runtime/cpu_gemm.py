"""Large matrix products on a CPU: oneDNN's, where torch's BLAS is slower.

On a CPU, F.linear calls the BLAS that torch was built with (MKL in the pip wheels). On this project's
development machine (AMD EPYC, AVX-512) MKL's large fp32 products take about twice as long as oneDNN's
(torch.ops.mkldnn._linear_pointwise: the kernel torch.compile's CPU code calls for a linear layer), and
its small ones (a decode step's few rows) are faster (bench/RESULTS.md: they cross between 1 and 3
million multiply-adds, by shape and threads). So a step's fp32 products on a CPU of at least MACS
multiply-adds go to oneDNN: a prefill chunk's, of tens of rows or more. Other devices and dtypes,
smaller products, and torch builds without that operator (or where it does not
agree with F.linear at a check when an engine is built) keep F.linear. The sums run in another order, so
values differ from F.linear's in the last bits, as a batched product's differ from a matrix-vector
one's. Used by the engine's step code (runner.py, fused.py, step_weights.py); the model's full forward,
the reference the tests hold the engine to, keeps F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MACS = 1 << 22  # multiply-adds (rows x inputs x outputs) from which a product goes to oneDNN


def _onednn():
    """oneDNN's linear, or None where this torch has none or it does not agree with F.linear."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        if not torch.backends.mkldnn.is_available():
            return None
        gen = torch.Generator().manual_seed(0)
        x, w = torch.randn(2, 33, 72, generator=gen), torch.randn(72, 40, generator=gen)
        ok = True
        with torch.inference_mode():
            # inputs that are views with a leading dim, weights as they are and as (out, in) views of (in, out)
            # matrices (step_weights.wide_layout)
            for weight in (w.t(), w.t().contiguous()):
                got, want = op(x[:, 1:], weight, None, "none", [], ""), F.linear(x[:, 1:], weight)
                ok &= got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-4)
        return op if ok else None
    except Exception:  # noqa: BLE001 - no such operator, another signature, a build without oneDNN: F.linear
        return None


def linear_for(device: torch.device, dtype: torch.dtype):
    """The function a step's projections should call on `device` in `dtype`: F.linear, or on a CPU in fp32 with
    oneDNN's operator present and agreeing, `linear`, which sends products of MACS multiply-adds or more to it."""
    if device.type != "cpu" or dtype != torch.float32:
        return F.linear
    op = _onednn()
    if op is None:
        return F.linear

    def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.numel() * weight.shape[0] >= MACS:
            return op(x, weight, None, "none", [], "")
        return F.linear(x, weight)
    return linear
