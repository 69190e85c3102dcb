"""The Triton decode-attention kernel (attention.py) computes SDPA's single-query attention.

Here it runs in Triton's interpreter on the CPU (conftest.py sets TRITON_INTERPRET); on a GPU,
tests/gpu and bench/gpu_check.py run the compiled kernel. Kernel against SDPA on random inputs with
every feature a step uses, then whole engines using it against full recompute.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from enginekit import replay_full_recompute, run_engine
from factory import PARITY_TEXT

from blt_runtime import load_model
from blt_runtime.attention import decode_attention, resolve, sdpa_attention, self_check, triton_importable
from blt_runtime.engine import Engine
from blt_runtime.errors import ConfigError
from blt_runtime.sampling import SamplingParams


def _interpreter_works() -> str | None:
    """Why the kernel cannot run here, or None."""
    if not triton_importable():
        return "Triton is not installed (the test extra installs it)"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "a GPU is present: tests/gpu runs the compiled kernel"
    import triton
    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    if (major, minor) < (3, 7) and int(np.__version__.split(".")[0]) >= 2:
        return f"Triton {triton.__version__}'s interpreter cannot take a loop bound from an argument under NumPy 2"
    return None


interpreted = pytest.mark.skipif(_interpreter_works() is not None, reason=str(_interpreter_works()))


def cache_and_query(B, H, H_kv, D, slots, capacity, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(2, 3, slots, H_kv, capacity, D, generator=g).to(dtype)
    q = torch.randn(B, H, 1, D, generator=g).to(dtype)
    return kv, q


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H, H_kv, D, span", [(4, 4, 64, 512), (4, 2, 48, 70), (2, 1, 128, 1), (3, 3, 16, 129)])
@pytest.mark.parametrize("rows", ["gathered", "consecutive"])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("block", [None, 32])
def test_kernel_equals_sdpa(dtype, H, H_kv, D, span, rows, masked, block):
    """Gathered slots (in any order, repeated) or consecutive ones read in place; an additive mask with
    windows of visible entries (some rows seeing one entry), or none; grouped heads; head sizes and
    spans that are not powers of two or multiples of the block; the whole span in one block (the
    interpreter's default) or many (as on a GPU: the running softmax across blocks, blocks that
    are wholly masked)."""
    B = 3
    kv, q = cache_and_query(B, H, H_kv, D, 6, 520, dtype, seed=H * D + span)
    picked = torch.tensor([5, 0, 5]) if rows == "gathered" else slice(2, 5)
    mask = None
    if masked:
        mask = torch.zeros(B, 1, 1, span, dtype=dtype)
        mask[0, ..., :span // 2] = float("-inf")
        mask[1, ..., :span - 1] = float("-inf")  # the newest entry alone
    got = decode_attention(q, kv, 1, picked, span, mask, block)
    read = kv[:, 1, picked, :, :span]
    want = sdpa_attention(q, read[0], read[1], mask)
    assert got.shape == (B, 1, H * D) and got.dtype == dtype
    tolerance = 2e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H, H_kv", [(4, 4), (4, 2)])
@pytest.mark.parametrize("rows", ["gathered", "consecutive"])
def test_kernel_stores_then_attends(dtype, H, H_kv, rows):
    """With `store`, the kernel leaves the cache and the output as KVCache.write followed by SDPA over
    the rows read: new entries at ring indices inside and outside the first block, a padding row
    that writes to the scratch slot (5) while it reads another row, grouped heads (stored once)."""
    B, D, span = 3, 32, 100
    kv, q = cache_and_query(B, H, H_kv, D, 6, 128, dtype, seed=H + H_kv)
    g = torch.Generator().manual_seed(1)
    k_new = torch.randn(B, H_kv, 1, D, generator=g).to(dtype)
    v_new = torch.randn(B, H_kv, 1, D, generator=g).to(dtype)
    picked = torch.tensor([3, 0, 1]) if rows == "gathered" else slice(1, 4)
    write_rows = torch.tensor([3, 0, 5] if rows == "gathered" else [1, 2, 5])[:, None]
    write_index = torch.tensor([[2], [70], [99]])
    mask = torch.zeros(B, 1, 1, span, dtype=dtype)
    mask[0, ..., 50:] = float("-inf")
    want_kv = kv.clone()
    want_kv[:, 1][:, write_rows, :, write_index] = torch.stack((k_new, v_new), dim=1).permute(0, 3, 1, 2, 4)
    read = want_kv[:, 1, picked, :, :span]
    want = sdpa_attention(q, read[0], read[1], mask)
    got = decode_attention(q, kv, 1, picked, span, mask, 32, store=(k_new, v_new, write_rows, write_index))
    assert torch.equal(kv, want_kv)
    tolerance = 2e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)


@interpreted
def test_kernel_reads_strided_queries():
    """q as a step makes it: a transposed view of the qkv projection, not contiguous."""
    kv, _ = cache_and_query(2, 4, 4, 32, 3, 64, torch.float32)
    qkv = torch.randn(2, 1, 12, 32)
    q = qkv[:, :, :4].transpose(1, 2)
    assert not q.is_contiguous()
    got = decode_attention(q, kv, 0, slice(0, 2), 64, None)
    read = kv[:, 0, 0:2, :, :64]
    torch.testing.assert_close(got, sdpa_attention(q, read[0], read[1], None), atol=2e-6, rtol=2e-6)


COMPILE_FOR_HOPPER = """
import inspect, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from blt_runtime.attention import _attention_program, _kernel
params = inspect.signature(_attention_program).parameters
pointers = {"Rows": "*i64", "WRows": "*i64", "WIndex": "*i64"}
for gather, mask, store, D, groups in [(True, True, True, 64, 1), (False, False, True, 128, 2),
                                       (True, True, False, 48, 1), (False, True, False, 64, 4)]:
    constexprs = dict(GROUPS=groups, D=D, D_PAD=1 << (D - 1).bit_length(), BLOCK=64, GATHER=gather, HAS_MASK=mask,
                      STORE=store)
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "*bf16") if name[0].isupper()
                 else "fp32" if name == "scale" else "i64" if name == "skv_kv" else "i32" for name in params}
    kernel = triton.compile(ASTSource(fn=_kernel, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", 90, 32))
    assert kernel.asm["cubin"], "no cubin"
print("compiled")
"""


def test_kernel_compiles_for_hopper():
    """The kernel as the GPU machine's Triton builds it (not the interpreter): compiled ahead of time
    for sm_90 (an H100/H200) down to a cubin with Triton's ptxas, for the variants a step launches."""
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]


@interpreted
def test_self_check_and_resolve():
    cpu = torch.device("cpu")
    assert self_check(cpu, torch.float32) is None and self_check(cpu, torch.bfloat16) is None
    assert resolve("auto", cpu, torch.float32) == "sdpa"  # the kernel is for GPUs
    assert resolve("triton", cpu, torch.float32) == "triton"  # the interpreter, as here
    assert resolve("sdpa", cpu, torch.float32) == "sdpa"
    with pytest.raises(ConfigError, match="expected one of"):
        resolve("flash", cpu, torch.float32)


@interpreted
def test_engine_with_kernel_equals_sdpa_engine(hf_checkpoint):
    """Static steps with every self-attention (entropy model, encoder, global model, decoder) through
    the kernel, on grouped-query heads: three requests sharing steps, the first finishing early so
    that the rest are gathered from high slots, and patch steps reading gathered global rows. Bytes
    and patches as the SDPA engine's. (Triton's interpreter is slow: few bytes.)"""
    model = load_model(hf_checkpoint("gqa")[1])
    requests = {f"r{i}": (PARITY_TEXT[40 * i:40 * i + 30 + 20 * i],
                          SamplingParams(max_bytes=8 + 10 * i, temperature=0.0, ignore_eos=True))
                for i in range(3)}
    joins = {"r0": 0, "r1": 0, "r2": 2}
    kernel = Engine(model, max_batch_size=4, prefill_chunk=64, static=True, attention="triton")
    assert kernel.attention == "triton"
    got = run_engine(kernel, requests, joins)
    want = run_engine(Engine(model, max_batch_size=4, prefill_chunk=64, static=True, attention="sdpa"),
                      requests, joins)
    for rid in requests:
        assert got[rid][0] == want[rid][0], rid
        assert got[rid][1].usage == want[rid][1].usage, rid
    assert any(not key[-1] for key in kernel.static.keys_seen if key[0] == "encode"), "no step gathered its rows"
    assert sum(o.usage.global_steps for _, o in got.values()) > 0


@interpreted
def test_dynamic_engine_with_kernel_equals_full_recompute(hf_checkpoint):
    """Dynamic steps through the kernel: greedy bytes and logprobs as full recompute computes them."""
    model = load_model(hf_checkpoint("gqa")[1])
    prompt = PARITY_TEXT[:90]
    params = SamplingParams(max_bytes=24, temperature=0.0, ignore_eos=True, logprobs=1)
    engine = Engine(model, static=False, attention="triton")
    engine.add_request("g", prompt, params)
    seed, outputs = engine.sequences["g"].seed, []
    while engine.has_work():
        outputs += engine.step()
    generated = b"".join(o.new_bytes for o in outputs)
    replay_full_recompute(model, prompt, params, seed, generated, engine_logprobs=[o.logprobs for o in outputs])
    assert outputs[-1].usage.completion_patches > 0
