"""Which kernels a decode step runs, "torch", "triton" or "triton-gemv", and the start-up check that
decides "auto".

- "torch": PyTorch operators: SDPA over cache rows read in place or gathered (attention.py), the
  element-wise stretches as eager operators (fused.StepOps; compiled with `--compile`).
- "triton": the repository's Triton kernels: single-query attention that rotates (RoPE), stores and
  attends in one launch (attention.py), and the norms and SwiGLU's gate as one launch each
  (triton_ops.py; `--compile` compiles the stretches instead); in decode steps also the new bytes'
  hash embeddings (byte_embedding.py), the greedy choice and the entropy's patch flag
  (tail_kernels.py), and sampling with temperature, filters and penalties (sample_kernel.py), one
  launch each. The sampling kernel has a check of its own (`sampling_check`): should it fail under
  "auto", steps that sample do so with PyTorch's operators and the other kernels still run.
- "triton-gemv": "triton", with each norm computed by the projection after it and SwiGLU's gate by
  the gate/up projection, in decode steps: matrix-vector products in Triton (gemv.py), 5 launches
  per block instead of 8. Their sums run in another order than cuBLAS's: the last bit differs.
"auto" is "triton" on CUDA where Triton imports and every kernel agrees with the PyTorch path on
this device at start-up (`self_check`), else "torch", with a warning that says why. On a CPU,
"triton" runs Triton's interpreter (TRITON_INTERPRET=1 set before Triton is imported): slow, for
tests only. Used by engine.py; knows nothing about requests.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from .attention import RotationTable, Visible, decode_attention, sdpa_attention, triton_importable
from .byte_embedding import embed_new_bytes
from .errors import ConfigError
from .fused import EAGER
from .gemv import GemvOps
from .model.entropy import entropy_nats
from .model.hashing import embed_with_hashes, power_matrix
from .model.layers import RMSNorm, rope_rotation
from .patcher import starts_next
from .sample_kernel import sample_pick
from .sampling import SamplingBatch, SamplingParams, allowed, never_sampled, sample
from .tail_kernels import entropy_flags, greedy_pick
from .tokenizer import EOS_ID
from .triton_ops import TritonOps

log = logging.getLogger(__name__)
CHOICES = ("auto", "torch", "triton", "triton-gemv")


def _check_attention(device: torch.device, dtype: torch.dtype, g: torch.Generator) -> str | None:
    """The attention kernel against KVCache.write + SDPA with every feature a step uses: masks,
    gathered and consecutive rows, grouped heads, a head size that is not a power of two, a span that
    is not a multiple of the block, storing the new entries or not, rotating or not (by each row's
    rotation, or by a RotationTable at each row's length, storing there), a mask worked out in the
    kernel."""
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    for H, H_kv, D, span in ((4, 4, 64, 300), (4, 2, 48, 70)):
        kv = torch.randn(2, 2, 5, H_kv, 320, D, generator=g).to(device, dtype)
        counts = torch.zeros(3 * H, device=device, dtype=torch.int32)  # where the splits meet, on a GPU
        qkv = torch.randn(3, 1, (H + 2 * H_kv) * D, generator=g).to(device, dtype)
        raw = qkv.unflatten(-1, (-1, D)).transpose(1, 2).split([H, H_kv, H_kv], 1)
        where = torch.tensor([[0], [span - 1], [7]], device=device)
        rotation = rope_rotation(where * 3, D, 10000.0)[:, :, None]
        table = RotationTable.of(span, D, 10000.0, device)  # row `where` for the rows at `where`
        mask = torch.zeros(3, 1, 1, span, device=device, dtype=dtype)
        mask[1, ..., span // 2:] = float("-inf")
        gathered, consecutive = torch.tensor([4, 0, 2], device=device), torch.arange(1, 4, device=device)
        visible = Visible(where[:, 0] + torch.tensor([0, 0, 20], device=device), None, span // 3)  # all within span
        at_length = Visible(where[:, 0], None, span // 3)
        for rows, m, written, rope in ((gathered, mask, None, None), (slice(1, 4), None, None, None),
                                       (gathered, mask, gathered, None), (slice(1, 4), None, consecutive, None),
                                       (gathered, mask, gathered, "rows"), (slice(1, 4), mask, consecutive, "rows"),
                                       (gathered, visible, gathered, "rows"), (gathered, at_length, gathered, "table"),
                                       (slice(1, 4), at_length, consecutive, "table")):
            turn = {None: None, "rows": rotation, "table": rope_rotation(where, D, 10000.0)[:, :, None]}[rope]
            q, k, v = raw if turn is None else EAGER.heads(qkv, turn, H, H_kv, D)[:3]
            expected = kv.clone()
            store = None
            if written is not None:
                expected[:, 1][:, written[:, None], :, where] = torch.stack((k, v), dim=1).permute(0, 3, 1, 2, 4)
                store = (raw[1] if rope else k, v, written[:, None], None if rope == "table" else where)
            got = decode_attention(raw[0] if rope else q, kv, 1, rows, span, m, store=store,
                                   rotation={None: None, "rows": rotation, "table": table}[rope], counts=counts)
            if counts.any():
                return "attention: the splits' counters were not left at 0"
            picked = expected[:, 1, rows, :, :span]
            want = sdpa_attention(q, picked[0], picked[1], m.additive(span, dtype) if isinstance(m, Visible) else m)
            # stored as given, or rotated as the eager step rotates them (up to the rounding of a fused
            # multiply-add where the compiler makes one)
            stored = torch.allclose(kv.float(), expected.float(), atol=tolerance, rtol=tolerance) if rope \
                else torch.equal(kv, expected)
            if not stored:
                return "attention: the new keys and values were not stored where asked"
            if not torch.allclose(got.float(), want.float(), atol=tolerance, rtol=tolerance):
                return f"attention differs from SDPA by {float((got.float() - want.float()).abs().max()):.3g}"
    return None


def _check_stretches(device: torch.device, dtype: torch.dtype, g: torch.Generator) -> str | None:
    """The norm and SwiGLU kernels against the eager stretches, at widths a step uses."""
    ops, tolerance = TritonOps(), (1e-5 if dtype == torch.float32 else 1e-2)
    for d in (128, 100, 2048):
        norm = RMSNorm(d, 1e-5).requires_grad_(False)
        norm.weight.data = torch.randn(d, generator=g) * 0.5 + 1
        n = norm.to(device, dtype).bound(device)
        x, delta = ((torch.randn(3, 2, d, generator=g) * 3).to(device, dtype) for _ in range(2))
        gate_up = (torch.randn(3, 1, 2 * d, generator=g) * 3).to(device, dtype)
        for name, got, want in (("norm", ops.add_norm(x, None, n), EAGER.add_norm(x, None, n)),
                                ("add and norm", ops.add_norm(x, delta, n), EAGER.add_norm(x, delta, n)),
                                ("double residual and norm", ops.double_residual_norm(x, delta, n),
                                 EAGER.double_residual_norm(x, delta, n)),
                                ("silu_mul", (ops.silu_mul(gate_up),), (EAGER.silu_mul(gate_up),))):
            for a, b in zip(got, want):
                error = float((a.float() - b.float()).abs().max())
                if not torch.allclose(a.float(), b.float(), atol=tolerance, rtol=tolerance):
                    return f"{name} at width {d} differs from PyTorch by {error:.3g}"
    return None


def _check_gemv(device: torch.device, dtype: torch.dtype, g: torch.Generator) -> str | None:
    """norm_linear against the eager stretches and F.linear, and plain_linear (GemvOps.linear) against
    F.linear: every residual kind, plain and gated, at 1, 5 and 64 rows (the kernel itself, though a
    step fuses fewer), widths that are not multiples of the blocks; on a GPU also at the global model's
    widths (wider column blocks)."""
    ops, tolerance = GemvOps(fused_rows=64), (1e-4 if dtype == torch.float32 else 2e-2)
    shapes = [(1, 100, 200), (5, 700, 320), (64, 256, 130)]
    for rows, d, f in shapes + ([(16, 2048, 5632)] if device.type == "cuda" else []):
        norm = RMSNorm(d, 1e-5).requires_grad_(False)
        norm.weight.data = torch.randn(d, generator=g) * 0.5 + 1
        n = norm.to(device, dtype).bound(device)
        x, delta = ((torch.randn(rows, 1, d, generator=g) * 3).to(device, dtype) for _ in range(2))
        weight = (torch.randn(2 * f, d, generator=g) / d ** 0.5).to(device, dtype)
        for name, method, args in (("norm and product", "add_norm_linear", (x, None, n, weight[:f])),
                                   ("add, norm and product", "add_norm_linear", (x, delta, n, weight[:f])),
                                   ("add, norm, gate/up and gate", "add_norm_swiglu", (x, delta, n, weight)),
                                   ("double residual, norm and product", "double_residual_norm_linear",
                                    (x, delta, n, weight[:f]))):
            got, want = getattr(ops, method)(*args), getattr(EAGER, method)(*args)
            if not torch.equal(got[0], want[0]):
                return f"gemv {name}: the residual differs from PyTorch's"
            error = float((got[1].float() - want[1].float()).abs().max())
            if not torch.allclose(got[1].float(), want[1].float(), atol=tolerance, rtol=tolerance):
                return f"gemv {name} at {rows} rows of width {d} differs from PyTorch by {error:.3g}"
        got, want = ops.linear(x, weight[:f]), torch.nn.functional.linear(x, weight[:f])
        if not torch.allclose(got.float(), want.float(), atol=tolerance, rtol=tolerance):
            error = float((got.float() - want.float()).abs().max())
            return f"gemv product at {rows} rows of width {d} differs from PyTorch by {error:.3g}"
    return None


def _check_embedding_and_tail(device: torch.device, dtype: torch.dtype, g: torch.Generator) -> str | None:
    """The new bytes' embedding (byte_embedding.py) and the step's tail (tail_kernels.py) against the
    eager code: the released hash layout, gathered rows, EOS allowed and not."""
    powers = power_matrix((3, 4, 5, 6, 7, 8), 1, device)
    hashed, own = (torch.randn(n, 48, generator=g).to(device, dtype) for n in (6 * 97, 260))
    history = torch.randint(0, 260, (5, 7), generator=g).to(device)
    ids, rows = torch.randint(0, 260, (3, 1), generator=g).to(device), torch.tensor([4, 0, 2], device=device)
    context = torch.cat([history[rows], ids], dim=1)
    want = embed_with_hashes(context, 1, powers, hashed, own, 97)
    got = embed_new_bytes(ids, history, rows, powers, hashed, own, 97)
    if not torch.equal(history[rows], context[:, 1:]):
        return "byte embedding: the hash history was not moved on"
    if not torch.allclose(got.float(), want.float(), atol=1e-5, rtol=1e-5):
        return f"byte embedding differs from PyTorch's by {float((got.float() - want.float()).abs().max()):.3g}"
    logits = (torch.randn(3, 260, generator=g) * 3).to(device, dtype)
    allow_eos = torch.tensor([1, 0, 1], device=device)
    logits[:2, EOS_ID] = 50.0
    never = never_sampled(260, device)
    counts, seen = torch.zeros(5, 260, device=device), torch.zeros(5, 260, dtype=torch.bool, device=device)
    out = torch.zeros(3, 2, dtype=torch.float64, device=device)
    chosen, _ = greedy_pick(logits, allow_eos, never, counts, seen, rows, own, EOS_ID, out)
    best = allowed(logits, allow_eos, EOS_ID).argmax(-1)
    if not torch.equal(chosen, best) or not torch.equal(out[:, 0], best.double()) or counts.sum() != 3 \
            or not bool(seen[rows, best].all()):
        return "greedy choice differs from sampling.sample's, or was not counted"
    scales = torch.tensor([0.1, 3.0, 10.0], device=device)[:, None]
    entropy_logits = torch.randn(3, 260, generator=g).to(device) * scales
    positions = torch.tensor([5, 0, 9], device=device)
    entropy_flags(entropy_logits, positions, 4.5, out)  # entropies about 5.5, 3 and 0.1: far from 4.5
    if not torch.equal(out[:, 1], starts_next(entropy_nats(entropy_logits), positions, 4.5).double()):
        return "entropy patch flags differ from PyTorch's"
    return None


def _check_sampling(device: torch.device, dtype: torch.dtype, g: torch.Generator) -> str | None:
    """The sampling kernel (sample_kernel.py) against sampling.sample on 16 rows whose draws vary:
    temperature, top-k, top-p, min-p, penalties and logit biases, greedy rows among sampled ones; then
    greedy rows with a penalty only."""
    kinds = [SamplingParams(temperature=1.5, top_p=0.3), SamplingParams(temperature=0.0),
             SamplingParams(temperature=1.2, top_k=3, min_p=0.01, presence_penalty=0.5, frequency_penalty=0.3),
             SamplingParams(temperature=1.0, repetition_penalty=1.3, ignore_eos=True, logit_bias={5: 3.0})]
    logits = torch.randn(16, 260, generator=g).to(device, dtype)
    rows, never = torch.randperm(17, generator=g)[:16].to(device), never_sampled(260, device)
    embed = torch.randn(260, 48, generator=g).to(device, dtype)
    positions = torch.randint(0, 4096, (16,), generator=g).to(device)
    for params in (kinds * 4, [SamplingParams(temperature=0.0, presence_penalty=1.0)] * 16):
        batch = SamplingBatch.build(params, torch.randint(0, 2**62, (16,), generator=g).tolist(), device)
        counts = torch.randint(0, 3, (17, 260), generator=g).float().to(device)
        seen = counts > 0
        bias = (torch.randn(17, 260, generator=g) * (torch.rand(17, 260, generator=g) < 0.1)).to(device)
        want = sample(logits, batch, positions, counts[rows], seen[rows], EOS_ID, bias[rows])
        out = torch.zeros(16, 2, dtype=torch.float64, device=device)
        got, _ = sample_pick(logits, batch, positions, never, counts, seen, bias, rows, embed, EOS_ID, out)
        if not torch.equal(got, want) or not torch.equal(out[:, 0], want.double()):
            return f"sampled bytes {got.tolist()} differ from sampling.sample's {want.tolist()}"
    return None


@functools.cache
def gemv_check(device: torch.device, dtype: torch.dtype) -> str | None:
    """The "triton-gemv" projections (gemv.py) against the PyTorch path on `device`: None if they
    agree, else what went wrong. (An explicit kernels choice is taken as asked; this is for the
    checks and benchmarks that report whether they hold on a device.)"""
    try:
        return _check_gemv(device, dtype, torch.Generator(device="cpu").manual_seed(0))
    except Exception as e:  # noqa: BLE001 - any failure means: do not use the kernels
        return f"{type(e).__name__}: {e}"


@functools.cache
def self_check(device: torch.device, dtype: torch.dtype) -> str | None:
    """Every Triton kernel a step launches against the PyTorch path, on random inputs on `device`: None
    if they agree, else what went wrong."""
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        return _check_attention(device, dtype, g) or _check_stretches(device, dtype, g) or \
            _check_embedding_and_tail(device, dtype, g)
    except Exception as e:  # noqa: BLE001 - any failure means: do not use the kernels
        return f"{type(e).__name__}: {e}"


@functools.cache
def sampling_check(device: torch.device, dtype: torch.dtype) -> str | None:
    """The sampling kernel (sample_kernel.py) against sampling.sample on `device`: None if they agree,
    else what went wrong. Apart from self_check: should it alone fail, the other kernels still run."""
    try:
        return _check_sampling(device, dtype, torch.Generator(device="cpu").manual_seed(0))
    except Exception as e:  # noqa: BLE001 - any failure means: sample eagerly
        return f"{type(e).__name__}: {e}"


def sampling_kernel(choice: str, kernels: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether steps that sample choose their bytes with sample_kernel.py: where the kernels are
    Triton's and, when they were chosen by "auto", where the sampling kernel passes its check (else
    the eager sampler, with a warning)."""
    if kernels == "torch":
        return False
    if choice == "auto":
        problem = sampling_check(device, dtype)
        if problem is not None:
            log.warning("the sampling kernel is disabled, sampling with PyTorch's operators: %s", problem)
            return False
    return True


def resolve(choice: str, device: torch.device, dtype: torch.dtype) -> str:
    """"torch", "triton" or "triton-gemv" for `choice` on this device (see the module docstring)."""
    if choice not in CHOICES:
        raise ConfigError(f"kernels {choice!r}: expected one of {', '.join(CHOICES)}")
    if choice == "torch" or (choice == "auto" and device.type != "cuda"):
        return "torch"
    if not triton_importable():
        if choice != "auto":
            raise ConfigError(f"kernels {choice!r}: Triton is not installed (pip install triton)")
        return "torch"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"kernels {choice!r} on a CPU run in Triton's interpreter, for tests: set "
                          "TRITON_INTERPRET=1 before Triton is imported")
    if choice == "auto":
        problem = self_check(device, dtype)
        if problem is not None:
            log.warning("Triton kernels disabled, using PyTorch's: %s", problem)
            return "torch"
        return "triton"
    return choice
