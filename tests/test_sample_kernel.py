"""sample_kernel.py, in Triton's interpreter, against sampling.sample and the bookkeeping of a static
step; and static engines with Triton kernels that sample, against the PyTorch engine."""

import pytest
import torch
from enginekit import run_engine
from factory import PARITY_TEXT
from interpreter import interpreted

from blt_runtime import load_model
from blt_runtime.engine import Engine
from blt_runtime.guide import ByteGuide
from blt_runtime.sample_kernel import sample_pick
from blt_runtime.sampling import SamplingBatch, SamplingParams, never_sampled, sample
from blt_runtime.tokenizer import EOS_ID

V = 260
CPU = torch.device("cpu")


def eager_pick(logits, batch, positions, counts, seen, bias, slots):
    """sampling.sample and a static step's bookkeeping, on copies of the tables."""
    counts, seen = counts.clone(), seen.clone()
    ids = sample(logits, batch, positions, counts[slots], seen[slots], EOS_ID, bias[slots])
    counts[slots, ids] += 1
    seen[slots, ids] = True
    return ids, counts, seen


def check(logits, params, seeds, positions, slots, counts, seen, bias=None):
    """The kernel's ids, tables, output column and embeddings are the eager ones; returns the ids."""
    batch = SamplingBatch.build(params, seeds, "cpu")
    bias = torch.zeros_like(counts) if bias is None else bias
    want, want_counts, want_seen = eager_pick(logits, batch, positions, counts, seen, bias, slots)
    embed = torch.randn(V, 24, generator=torch.Generator().manual_seed(9)).to(logits.dtype)
    out = torch.full((len(params), 2), -1.0, dtype=torch.float64)
    ids, embedded = sample_pick(logits, batch, positions, never_sampled(V, CPU), counts, seen, bias, slots, embed,
                                EOS_ID, out)
    assert ids.tolist() == want.tolist()
    assert torch.equal(counts, want_counts) and torch.equal(seen, want_seen)
    assert torch.equal(out[:, 0], want.double()) and (out[:, 1] == -1).all()
    assert torch.equal(embedded, embed[want][:, None])
    return ids


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_pick_equals_sample(dtype):
    """Every filter, penalty and logit bias, per row, with greedy rows among sampled ones; 32 draws per
    kind of row (seeds and positions differ), so that a filter the kernel got wrong changes some draw."""
    g = torch.Generator().manual_seed(1)
    kinds = [SamplingParams(temperature=0.8), SamplingParams(temperature=0.0),
             SamplingParams(temperature=1.0, top_p=0.6), SamplingParams(temperature=1.5, top_k=3),
             SamplingParams(temperature=1.3, min_p=0.2, ignore_eos=True),
             SamplingParams(temperature=1.0, presence_penalty=1.5, frequency_penalty=0.7, repetition_penalty=1.6,
                            top_p=0.8, top_k=40),
             SamplingParams(temperature=2.0, top_k=1),
             SamplingParams(temperature=0.5, top_p=0.5, min_p=0.1, logit_bias={0: 2.5, 7: -1.0})]
    params = kinds * 4
    B = len(params)
    slots = torch.randperm(B + 1, generator=g)[:B]
    logits = (torch.randn(B, V, generator=g) * 2).to(dtype)
    logits[1::8, EOS_ID] = 30.0  # greedy rows: EOS the best, allowed
    logits[4::8, EOS_ID] = 30.0  # and where it is not
    counts, seen = torch.zeros(B + 1, V), torch.zeros(B + 1, V, dtype=torch.bool)
    counts[:, 60:120] = torch.randint(0, 3, (B + 1, 60), generator=g).float()
    seen[:, 40:140] = True
    bias = torch.zeros(B + 1, V)
    bias[slots[7::8], 4:12] = torch.randn(4, 8, generator=g) * 2  # the rows with a logit bias
    seeds = torch.randint(0, 2**63 - 1, (B,), generator=g).tolist()
    positions = torch.randint(0, 4096, (B,), generator=g)
    ids = check(logits, params, seeds, positions, slots, counts, seen, bias)
    eager_order = logits.float().argsort(dim=-1, descending=True, stable=True)
    assert (ids[1::8] == EOS_ID).all() and (ids[4::8] != EOS_ID).all()
    assert all(i in eager_order[r, :3] for r, i in zip(range(3, B, 8), ids[3::8].tolist()))  # top-k 3
    assert (ids[6::8] == eager_order[6::8, 0]).all()  # top-k 1: the argmax
    assert (ids[0::8] != eager_order[0::8, 0]).any()  # draws, not argmaxes


@interpreted
def test_sample_pick_ranks_equal_logits_by_id():
    """Top-k and top-p at a boundary among equal logits keep the lowest ids, as filter_logits' stable
    sort does; and a step with only greedy rows and penalties (the kernel's argmax-only variant)."""
    logits = torch.full((6, V), -4.0)
    logits[:, 10] = 3.0
    logits[:, [50, 20, 30, 40]] = 2.0  # four equal, ranked 20, 30, 40, 50
    params = [SamplingParams(temperature=1.0, top_k=2), SamplingParams(temperature=1.0, top_k=3),
              SamplingParams(temperature=5.0, top_p=0.3)] * 2
    slots, counts, seen = torch.arange(6), torch.zeros(6, V), torch.zeros(6, V, dtype=torch.bool)
    draws = {i: set() for i in range(3)}
    for seed in range(12):
        ids = check(logits, params, [seed * 7919 + r for r in range(6)], torch.full((6,), seed), slots, counts, seen)
        for r, i in enumerate(ids.tolist()):
            draws[r % 3].add(i)
    assert draws[0] <= {10, 20} and draws[1] <= {10, 20, 30} and 30 in draws[1]
    greedy = [SamplingParams(temperature=0.0, **penalty) for penalty in (
        dict(repetition_penalty=3.0, ignore_eos=True), dict(presence_penalty=1.5), dict(presence_penalty=0.6),
        dict(frequency_penalty=0.6), dict(frequency_penalty=0.6))]
    counts, seen = torch.zeros(5, V), torch.zeros(5, V, dtype=torch.bool)  # the draws above were counted
    seen[:, 10] = True
    counts[1:, 10] = torch.tensor([1.0, 2.0, 2.0, 1.0])
    # byte 10 (3.0) against the equal ones (2.0): 1.0 (repetition), 1.5 and 2.4 (presence, counted once and
    # twice), 1.8 and 2.4 (frequency, twice and once)
    tables = counts.clone(), seen.clone()  # as they were: check() counts the bytes chosen
    ids = check(logits[:5], greedy, [0] * 5, torch.zeros(5, dtype=torch.long), torch.arange(5), counts, seen)
    assert ids.tolist() == [20, 20, 10, 20, 10]
    bias = torch.zeros(5, V)
    bias[0, 50], bias[1, 20], bias[2, 10] = 1.5, -0.5, -1.5  # added before the penalties, as vLLM does
    ids = check(logits[:5], greedy, [0] * 5, torch.zeros(5, dtype=torch.long), torch.arange(5), *tables, bias)
    assert ids.tolist() == [50, 30, 20, 20, 10]


@interpreted
def test_sampling_triton_engine_equals_torch_engine(hf_checkpoint):
    """Static steps whose choices go through the sampling kernel: seeded requests with temperature, top-p,
    top-k, min-p and penalties, one greedy with a penalty, sharing steps with one joining late, one with a logit
    bias later still, and one guided (guide.py): the PyTorch engine's bytes and patches. (`triton-gemv` picks
    bytes with the same kernel.)"""
    model = load_model(hf_checkpoint("gqa")[1])
    kinds = [SamplingParams(max_bytes=10, temperature=0.9, top_p=0.9, seed=11),
             SamplingParams(max_bytes=8, temperature=1.2, top_k=20, min_p=0.02, presence_penalty=0.5, seed=12),
             SamplingParams(max_bytes=9, temperature=0.0, repetition_penalty=1.3, ignore_eos=True),
             SamplingParams(max_bytes=9, temperature=0.7, logit_bias={32: 3.0, 101: -100}, seed=13),
             SamplingParams(max_bytes=12, temperature=1.1, seed=14, guide=ByteGuide.regex("[a-f]{3}( [0-9]+)?"))]
    requests = {f"s{i}": (PARITY_TEXT[30 * i:30 * i + 40], p) for i, p in enumerate(kinds)}
    joins = {"s0": 0, "s1": 0, "s2": 3, "s3": 4, "s4": 5}
    got = run_engine(Engine(model, max_batch_size=5, prefill_chunk=64, static=True, kernels="triton"), requests, joins)
    want = run_engine(Engine(model, max_batch_size=5, prefill_chunk=64, static=True, kernels="torch"),
                      requests, joins)
    for rid in requests:
        assert got[rid][0] == want[rid][0], rid
        assert got[rid][1].usage == want[rid][1].usage, rid


@interpreted
def test_sample_pick_keeps_to_the_ids_a_guide_allows():
    """A guide's bias rows are -inf but for a few ids (guide.py): every kind of row, greedy among them,
    chooses among those ids, as the eager sampler does."""
    g = torch.Generator().manual_seed(3)
    kinds = [SamplingParams(temperature=0.8), SamplingParams(temperature=0.0), SamplingParams(top_p=0.5),
             SamplingParams(top_k=2, temperature=1.5), SamplingParams(min_p=0.3),
             SamplingParams(temperature=0.0, repetition_penalty=1.5, presence_penalty=1.0)]
    params = kinds * 4
    B = len(params)
    slots = torch.arange(B)
    logits = torch.randn(B, V, generator=g) * 3
    counts, seen = torch.zeros(B, V), torch.zeros(B, V, dtype=torch.bool)
    seen[:, 60:100] = True
    bias = torch.full((B, V), float("-inf"))
    allowed = [torch.randperm(256, generator=g)[:1 + r % 4] + 4 for r in range(B)]  # 1 to 4 byte ids per row
    for r, ids in enumerate(allowed):
        bias[r, ids] = 0.0
    seeds = torch.randint(0, 2**63 - 1, (B,), generator=g).tolist()
    logits[:, EOS_ID] = 50.0  # the best id, but -inf in every bias row: never chosen
    picked = check(logits, params, seeds, torch.randint(0, 4096, (B,), generator=g), slots, counts, seen, bias)
    assert all(i in ids.tolist() for i, ids in zip(picked.tolist(), allowed)), picked
