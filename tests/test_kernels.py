"""The Triton kernels of a step (triton_ops.py, attention.py) against the PyTorch path, and the choice
between them (kernels.py).

In Triton's interpreter on the CPU (tests/interpreter.py): the norms and SwiGLU's gate give the
eager stretches' values, in bf16 bit for bit (the kernels round as PyTorch does); whole engines
running every Triton kernel give the PyTorch engine's bytes, and full recompute's.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from enginekit import replay_full_recompute, run_engine
from factory import PARITY_TEXT
from interpreter import interpreted

from blt_runtime import attention, load_model
from blt_runtime.engine import Engine
from blt_runtime.errors import ConfigError
from blt_runtime.fused import EAGER
from blt_runtime.gemv import GemvOps
from blt_runtime.kernels import gemv_check, resolve, sampling_check, sampling_kernel, self_check
from blt_runtime.model.layers import RMSNorm
from blt_runtime.sampling import SamplingParams
from blt_runtime.triton_ops import TritonOps


def bound_norm(d: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    norm = RMSNorm(d, 1e-5)
    norm.weight.data = torch.randn(d, generator=g) * 0.5 + 1
    return norm.to(dtype).bound(torch.device("cpu")), g


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [48, 100, 2048])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5)])
def test_norms_equal_eager(dtype, d, shape):
    """add_norm (with and without the residual) and double_residual_norm: the residual sums exactly,
    the normed values within fp32 rounding, and exactly in bf16."""
    n, g = bound_norm(d, dtype, d)
    x, delta = ((torch.randn(*shape, d, generator=g) * 3).to(dtype) for _ in range(2))
    ops = TritonOps()
    for got, want in ((ops.add_norm(x, None, n), EAGER.add_norm(x, None, n)),
                      (ops.add_norm(x, delta, n), EAGER.add_norm(x, delta, n)),
                      (ops.double_residual_norm(x, delta, n), EAGER.double_residual_norm(x, delta, n))):
        assert torch.equal(got[0], want[0])
        assert got[1].shape == want[1].shape and got[1].dtype == dtype
        if dtype == torch.bfloat16:
            assert torch.equal(got[1], want[1])
        else:
            torch.testing.assert_close(got[1], want[1], atol=2e-6, rtol=2e-6)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("f", [96, 1500])
def test_silu_mul_equals_eager(dtype, f):
    g = torch.Generator().manual_seed(f)
    gate_up = (torch.randn(4, 2, 2 * f, generator=g) * 4).to(dtype)
    got, want = TritonOps().silu_mul(gate_up), EAGER.silu_mul(gate_up)
    assert got.shape == want.shape == (4, 2, f)
    if dtype == torch.bfloat16:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@interpreted
def test_stretches_take_views_and_refuse_mixed_dtypes():
    """Strided inputs as a step makes them (a slice of a wider tensor); a weight in another dtype than x
    is refused with the dtypes named, not computed in the wrong one."""
    n, g = bound_norm(64, torch.float32, 0)
    wide = torch.randn(3, 1, 96, generator=g)
    x = wide[..., :64]
    torch.testing.assert_close(TritonOps().add_norm(x, None, n)[1], EAGER.add_norm(x, None, n)[1],
                               atol=2e-6, rtol=2e-6)
    with pytest.raises(ValueError, match="bfloat16"):
        TritonOps().add_norm(x.bfloat16(), None, n)


COMPILE_FOR_HOPPER = """
import inspect
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import torch
from blt_runtime import attention, byte_embedding, gemv, sample_kernel, tail_kernels, triton_ops

def compile(kernel, program, types, constexprs, default="*bf16", options=None):
    # pointers (capitalised parameters) are bf16 unless `types` says otherwise, scalars i32
    signature = {name: "constexpr" if name in constexprs else types.get(name, default if name[0].isupper() else "i32")
                 for name in inspect.signature(program).parameters}
    built = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                           target=GPUTarget("cuda", 90, 32), options=options)
    assert built.asm["cubin"], "no cubin"
    # an H100/H200 gives a block at most 227 KiB of shared memory; more fails at launch, not here
    assert built.metadata.shared <= 232448, (kernel, constexprs, built.metadata.shared)

types = {"Rows": "*i64", "WRows": "*i64", "WIndex": "*i64", "Rot": "*fp32", "Part": "*fp32", "Counts": "*i32",
         "Pages": "*i32", "scale": "fp32", "skv_kv": "i64"}
for gather, mask, store, rope, D, groups, windows, split, meet, page in [
        (True, 2, True, True, 64, 1, (0, 0), False, False, 0),
        (False, 2, True, True, 128, 2, (512, 512), False, False, 0),
        (False, 0, True, True, 128, 2, (512, 0), False, False, 0),
        (True, 1, False, False, 48, 1, (0, 0), False, False, 0),
        (False, 1, False, False, 64, 4, (0, 0), False, False, 0),
        (True, 2, 2, 2, 64, 1, (512, 512), False, False, 0),
        (False, 2, 2, 2, 128, 2, (0, 0), False, False, 0),
        (False, 2, 2, 2, 64, 1, (512, 512), True, True, 0),
        (True, 2, 2, 2, 128, 1, (0, 0), True, True, 0),
        (True, 1, True, True, 48, 2, (0, 0), True, False, 0),
        (False, 2, 2, 2, 64, 1, (512, 512), True, False, 0),
        # the global model's cache of pages: stored at each row's length, or at a page and entry given
        (True, 2, 2, 2, 128, 1, (0, 0), True, True, 16),
        (False, 2, 2, 2, 128, 1, (0, 0), False, False, 16),
        (True, 2, True, True, 64, 2, (0, 0), False, False, 16),
        (True, 1, False, False, 128, 1, (0, 0), True, False, 16)]:
    compile(attention._kernel, attention._attention_program, types | ({"Mask": "*i64"} if mask == 2 else {}),
            dict(GROUPS=groups, D=D, D_PAD=1 << (D - 1).bit_length(), BLOCK=64, GATHER=gather, MASK=mask,
                 STORE=store, ROPE=rope, CACHE_WINDOW=windows[0], STACK_WINDOW=windows[1], SPLIT=split, MEET=meet,
                 SPLITS_PAD=8, PAGE=page))
for D, splits_pad in ((64, 4), (128, 8), (48, 16)):
    compile(attention._combine, attention._combine_program, {"Part": "*fp32"},
            dict(D=D, D_PAD=1 << (D - 1).bit_length(), SPLITS_PAD=splits_pad))
for dtype, torch_dtype in (("*bf16", torch.bfloat16), ("*fp32", torch.float32)):
    for before in (0, 1, 2):
        compile(triton_ops._norm_kernel, triton_ops._norm_program, {"eps": "fp32", "inv_n": "fp32"},
                dict(D_PAD=2048, BEFORE=before), dtype)
    compile(triton_ops._silu_mul_kernel, triton_ops._silu_mul_program, {}, dict(BLOCK=1024), dtype)
    for before, gated, norm, rows, width, cols in (
            (0, False, True, 1, 768, 2304), (1, True, True, 64, 2048, 5632), (2, False, True, 16, 1024, 3072),
            (1, True, True, 5, 1024, 2816), (1, False, True, 2, 2048, 6144), (1, True, True, 1, 2048, 5632),
            (2, False, True, 1, 1024, 1024), (0, False, False, 1, 5632, 2048), (0, False, False, 1, 1024, 1024),
            (0, False, False, 8, 2816, 1024), (0, False, False, 16, 2048, 2048)):
        block_m, block_n, block_k, warps = gemv.blocks(rows, width, cols, torch.device("cuda"), torch_dtype)
        block_n = max(1, block_n // 2) if gated and block_m < 16 else block_n  # (as norm_linear halves it)
        compile(gemv._gemv_kernel, gemv._gemv_program, {"eps": "fp32", "inv_width": "fp32"},
                dict(BEFORE=before, GATED=gated, UPCAST=False, WHOLE=block_k >= width, NORM=norm, BLOCK_M=block_m,
                     BLOCK_N=block_n, BLOCK_K=block_k), dtype, dict(num_warps=warps))
    for gather, tables, width, d in ((True, 6, 8, 1024), (False, 18, 5, 1280)):
        compile(byte_embedding._embed_kernel, byte_embedding._embed_program,
                {"Ids": "*i64", "History": "*i64", "HistoryOut": "*i64", "Rows": "*i64", "Powers": "*i64"},
                dict(TABLES=tables, WIDTH=width, W_PAD=1 << (width - 1).bit_length(), D=d,
                     D_PAD=1 << (d - 1).bit_length(), GATHER=gather), dtype)
    compile(tail_kernels._greedy_kernel, tail_kernels._greedy_program,
            {"AllowEos": "*i64", "Never": "*u8", "Counts": "*fp32", "Seen": "*u8", "Slots": "*i64", "Ids": "*i64",
             "Out": "*fp64"}, dict(V_PAD=512, D=1024, D_PAD=1024), dtype)
    for penalty, sample in ((0, 1), (1, 1), (1, 0)):
        compile(sample_kernel._sample_kernel, sample_kernel._sample_program,
                {"AllowEos": "*i64", "Never": "*u8", "Counts": "*fp32", "Seen": "*u8", "Slots": "*i64",
                 "Temperature": "*fp32", "TopP": "*fp32", "TopK": "*i64", "MinP": "*fp32", "Presence": "*fp32",
                 "Frequency": "*fp32", "Repetition": "*fp32", "Seeds": "*i64", "Positions": "*i64", "Ids": "*i64",
                 "Out": "*fp64"}, dict(V_PAD=512, CHUNK=sample_kernel.CHUNK, D=1024, D_PAD=1024, PENALTY=penalty,
                                       SAMPLE=sample), dtype,
                dict(num_warps=sample_kernel.WARPS, enable_fp_fusion=False))
compile(tail_kernels._entropy_kernel, tail_kernels._entropy_program,
        {"Logits": "*fp32", "Positions": "*i64", "Out": "*fp64", "threshold": "fp32"}, dict(V_PAD=512))
print("compiled")
"""


def test_kernels_compile_for_hopper():
    """The kernels as the GPU machine's Triton builds them (not the interpreter): compiled ahead of time
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
    assert sampling_check(cpu, torch.float32) is None and sampling_check(cpu, torch.bfloat16) is None
    assert gemv_check(cpu, torch.float32) is None and gemv_check(cpu, torch.bfloat16) is None
    assert resolve("auto", cpu, torch.float32) == "torch"  # the kernels are for GPUs
    assert resolve("triton", cpu, torch.float32) == "triton"  # the interpreter, as here
    assert resolve("triton-gemv", cpu, torch.float32) == "triton-gemv"
    assert resolve("torch", cpu, torch.float32) == "torch"
    with pytest.raises(ConfigError, match="expected one of"):
        resolve("sdpa", cpu, torch.float32)


def test_auto_on_cuda_picks_the_triton_kernels_that_pass_their_check(monkeypatch, caplog):
    """On a CUDA device "auto" is "triton" where the kernels pass their check, else "torch" with a
    warning; never "auto" itself, which the engine would run as neither (the first H200 run found
    that: PyTorch's operators around the Triton tail, slower than both)."""
    from blt_runtime import kernels

    cuda = torch.device("cuda")  # only named: the checks that would run on it are stood in for
    monkeypatch.setattr(kernels, "triton_importable", lambda: True)
    monkeypatch.setattr(kernels, "self_check", lambda device, dtype: None)
    assert resolve("auto", cuda, torch.bfloat16) == "triton"
    monkeypatch.setattr(kernels, "self_check", lambda device, dtype: "norm differs")
    assert resolve("auto", cuda, torch.bfloat16) == "torch"
    assert "Triton kernels disabled" in caplog.text and "norm differs" in caplog.text
    monkeypatch.setattr(kernels, "triton_importable", lambda: False)
    assert resolve("auto", cuda, torch.bfloat16) == "torch"


def test_a_failing_sampling_kernel_leaves_the_other_kernels_on(monkeypatch, caplog):
    """Under "auto", a sampling kernel that fails its check only sends sampling back to PyTorch's
    operators (with a warning); an explicit choice is taken as asked, and "torch" never samples in Triton."""
    from blt_runtime import kernels

    cpu = torch.device("cpu")
    monkeypatch.setattr(kernels, "sampling_check", lambda device, dtype: "sampled bytes differ")
    assert not sampling_kernel("auto", "triton", cpu, torch.float32)
    assert "sampling kernel is disabled" in caplog.text and "sampled bytes differ" in caplog.text
    assert sampling_kernel("triton", "triton", cpu, torch.float32)
    assert sampling_kernel("triton-gemv", "triton-gemv", cpu, torch.float32)
    assert not sampling_kernel("torch", "torch", cpu, torch.float32)
    monkeypatch.setattr(kernels, "sampling_check", lambda device, dtype: None)
    assert sampling_kernel("auto", "triton", cpu, torch.float32)


@interpreted
@pytest.mark.parametrize("kernels, ops, lookahead, splits",
                         [("triton", TritonOps, 0, 1), ("triton-gemv", GemvOps, 0, 1), ("triton", TritonOps, 4, 1),
                          ("triton", TritonOps, 0, 3)])
def test_triton_engine_equals_torch_engine(hf_checkpoint, monkeypatch, kernels, ops, lookahead, splits):
    """Static steps with every self-attention (entropy model, encoder, global model, decoder) through the
    attention kernel, and every norm and gate through theirs (triton-gemv: inside the projections), on
    grouped-query heads: three requests sharing steps (the first two prompts prefilled together), the first
    finishing early so that the rest are gathered from high slots, and patch steps reading gathered global rows.
    Bytes and patches as the PyTorch engine's; greedy rows that may and may not end with EOS (the greedy
    choice's kernel masks it per row). (Triton's interpreter is slow: few bytes.)
    With `lookahead`, every step decodes its sampled bytes ahead (static.py: the byte embedding kernel moves
    the hash history into a table aside). With `splits`, the attention kernel splits every span as a GPU
    does at few rows (blocks of 16 entries, up to 3 splits), and the splits meet in the kernel (the
    caches' counters, sized for the query heads: the second kernel never runs)."""
    chosen = [1]
    if splits > 1:
        monkeypatch.setattr(attention, "default_block", lambda head_dim, span, device: 16)
        monkeypatch.setattr(attention, "default_splits",
                            lambda programs, blocks, device: chosen.append(min(blocks, splits)) or chosen[-1])
        monkeypatch.setattr(attention, "_combine", None)  # a second kernel would fail
    model = load_model(hf_checkpoint("gqa")[1])
    requests = {f"r{i}": (PARITY_TEXT[40 * i:40 * i + 30 + 20 * i],
                          SamplingParams(max_bytes=6 + 6 * i, temperature=0.0, ignore_eos=i != 1))
                for i in range(3)}
    joins = {"r0": 0, "r1": 0, "r2": 2}
    triton = Engine(model, max_batch_size=4, prefill_chunk=80, static=True, kernels=kernels,  # r0, r1 together
                    lookahead_rows=lookahead)
    assert triton.kernels == kernels and type(triton.runner.ops) is ops
    batches, start = [], triton.runner.prefill_start
    triton.runner.prefill_start = lambda *a: batches.append(len(a[1])) or start(*a)
    got = run_engine(triton, requests, joins)
    want = run_engine(Engine(model, max_batch_size=4, prefill_chunk=80, static=True, kernels="torch"),
                      requests, joins)
    assert max(batches) == 2  # the first two prompts went through the kernels as the rows of one batch
    for rid in requests:
        assert got[rid][0] == want[rid][0], rid
        assert got[rid][1].usage == want[rid][1].usage, rid
    assert any(not key[-1] for key in triton.static.keys_seen if key[0] != "patch"), "no step gathered its rows"
    assert not lookahead or any(key[-2] == (True, True) for key in triton.static.keys_seen
                                if key[0] == "finish"), "no step sampled from logits decoded ahead"
    assert sum(o.usage.global_steps for _, o in got.values()) > 0
    assert max(chosen) == splits


@interpreted
@pytest.mark.parametrize("kernels", ["triton", "triton-gemv"])
def test_dynamic_triton_engine_equals_full_recompute(hf_checkpoint, kernels):
    """Dynamic steps through the Triton kernels (prefill chunks through the norm and gate kernels
    too): greedy bytes and logprobs as full recompute computes them."""
    model = load_model(hf_checkpoint("gqa")[1])
    prompt = PARITY_TEXT[:90]
    params = SamplingParams(max_bytes=30, temperature=0.0, ignore_eos=True, logprobs=1)  # a patch closes in them
    engine = Engine(model, static=False, kernels=kernels)
    engine.add_request("g", prompt, params)
    seed, outputs = engine.sequences["g"].seed, []
    while engine.has_work():
        outputs += engine.step()
    generated = b"".join(o.new_bytes for o in outputs)
    replay_full_recompute(model, prompt, params, seed, generated, engine_logprobs=[o.logprobs for o in outputs])
    assert outputs[-1].usage.completion_patches > 0
