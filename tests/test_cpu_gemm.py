"""cpu_gemm.py: a CPU's large fp32 products by oneDNN, small ones and every other device or dtype by F.linear;
oneDNN's results agree with F.linear's (to the last bits), for (out, in) weights and for views of (in, out)
ones (step_weights.wide_layout); and where the operator is missing or disagrees, F.linear alone."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from blt_runtime import Engine, load_model
from blt_runtime.cpu_gemm import MACS, linear_for

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


def test_large_products_agree_with_f_linear_and_small_ones_are_f_linears():
    linear = linear_for(CPU, torch.float32)
    if linear is F.linear:
        pytest.skip("this torch build has no oneDNN linear (F.linear is used throughout, as the test below checks)")
    gen = torch.Generator().manual_seed(0)
    for weight in (torch.randn(96, 80, generator=gen), torch.randn(80, 96, generator=gen).t()):
        big = torch.randn(3, MACS // (96 * 80 * 3) + 1, 80, generator=gen)
        assert big.numel() * 96 >= MACS
        torch.testing.assert_close(linear(big, weight), F.linear(big, weight), rtol=1e-5, atol=1e-5)
        small = torch.randn(2, 5, 80, generator=gen)
        assert torch.equal(linear(small, weight), F.linear(small, weight))


def test_other_devices_and_dtypes_keep_f_linear():
    assert linear_for(CPU, torch.bfloat16) is F.linear
    assert linear_for(torch.device("cuda"), torch.float32) is F.linear


def test_an_operator_that_is_missing_or_disagrees_is_not_used(monkeypatch):
    class Wrong:
        @staticmethod
        def _linear_pointwise(x, w, b, attr, scalars, algorithm):
            return F.linear(x, w) + 1.0

    monkeypatch.setattr(torch.ops, "mkldnn", Wrong)
    assert linear_for(CPU, torch.float32) is F.linear
    monkeypatch.setattr(torch.ops, "mkldnn", object())
    assert linear_for(CPU, torch.float32) is F.linear


def test_the_engine_runs_its_products_through_it():
    engine = Engine(load_model(ROOT / "weights" / "blt-shakespeare"), max_batch_size=2)
    chosen = linear_for(CPU, torch.float32)
    assert engine.runner.ops.linear is F.linear if chosen is F.linear else engine.runner.ops.linear is not F.linear


def test_benchmark_script_runs():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "cpu_gemm.py"), "--rounds", "1"], capture_output=True,
                         text=True, timeout=600, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    if result["onednn"]:
        assert all(v > 0 for v in result["prefill_1024_ms"]) and "same_bytes" in result
        assert set(result["products_us"]) >= {"1x128->128", "512x256->768"}
