"""Sampling as one Triton kernel: how a decode step, or the step that samples a prompt's first byte,
chooses bytes when its rows do not all pick greedily without penalties (those take
tail_kernels.greedy_pick).

Eagerly, sampling.sample and the bookkeeping after it launch about 120 kernels per step (the noise
hash alone is some 60 integer operators, the filters a sort, a softmax, a cumulative sum and a
scatter); with temperature 1, the OpenAI default, every step pays them. `sample_pick` does it all
per row in one launch, with sampling.sample's arithmetic: the ids never sampled and (unless allowed)
EOS masked, the slot's logit bias and the penalties with vLLM's semantics, the greedy argmax, the
temperature (IEEE divisions, as PyTorch divides), top-k, top-p and min-p over the descending order
of the scaled logits with equal ones ordered by id (filter_logits sorts stably), the counter-based
noise hashed from (seed, position, byte) in the same wrapping int64 arithmetic, the Gumbel-max draw
in fp64; then the byte counted in its slot, copied to the step's output and embedded for the entropy
model, as greedy_pick does.

There is no sort: where a row has top-k or top-p, each byte's rank and the probability mass ranked
before it are counted over every other byte, CHUNK bytes at a time (about 260 x 260 comparisons a
row). That mass is summed in another order than torch.cumsum's and the softmax's exp may differ in
its last bit, so a byte whose mass before it lies within rounding of top_p (or whose probability
lies within rounding of min_p times the largest) may be kept where PyTorch drops it or the reverse,
as PyTorch on a CPU and on a GPU may differ; otherwise every draw is PyTorch's. Used by static.py and
runner.py where the runner's kernels are Triton's and `Runner.sample_kernel` is set (under "auto",
where the kernel passed kernels.sampling_check).
"""

from __future__ import annotations

import torch

from .attention import next_power_of_2, tl, triton
from .sampling import SamplingBatch
from .tail_kernels import _as_bytes, allowed_logits, record

# Bytes compared with all the others at once when ranking, and warps per row: (512 x 16) comparisons per
# iteration over 256 threads compile for sm_90 in 149 registers, without spills (32 at once spilled).
CHUNK, WARPS = 16, 8


def _hash32(x):
    """sampling.hash32 on int64 values (wrapping products, low 32 bits kept)."""
    low = tl.full([], 0xFFFFFFFF, tl.int64)
    x = x & low
    x = ((x ^ (x >> 16)) * tl.full([], 0x7FEB352D, tl.int64)) & low
    x = ((x ^ (x >> 15)) * tl.full([], 0x846CA68B, tl.int64)) & low
    return x ^ (x >> 16)


def _scores(Logits, AllowEos, Never, Counts, Seen, Bias, Presence, Frequency, Repetition, b, slot, v, inside, eos_id,
            s_logits, s_counts, s_seen, s_bias, PENALTY: tl.constexpr):
    """tail_kernels.allowed_logits, biased and penalised by the tables of row b's slot when PENALTY
    (sampling.apply_penalties)."""
    x = allowed_logits(Logits, AllowEos, Never, b, v, inside, eos_id, s_logits)
    if PENALTY:
        x = x + tl.load(Bias + slot * s_bias + v, mask=inside, other=0.0)
        rep = tl.load(Repetition + b)
        seen = tl.load(Seen + slot * s_seen + v, mask=inside, other=0) != 0
        x = tl.where(seen, tl.where(x > 0, tl.math.div_rn(x, rep + tl.zeros_like(x)), x * rep), x)
        counts = tl.load(Counts + slot * s_counts + v, mask=inside, other=0.0)
        x = x - tl.load(Frequency + b) * counts
        x = x - tl.load(Presence + b) * (counts > 0).to(tl.float32)
    return x


def _sample_program(Logits, AllowEos, Never, Counts, Seen, Bias, Slots, Temperature, TopP, TopK, MinP, Presence,
                    Frequency, Repetition, Seeds, Positions, Embed, Ids, Embedded, Out, n_ids, eos_id,
                    s_logits, s_counts, s_seen, s_bias, s_embed, s_embedded, s_out,
                    V_PAD: tl.constexpr, CHUNK: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                    PENALTY: tl.constexpr, SAMPLE: tl.constexpr):
    """Row b: sampling.sample's choice (SAMPLE: some row of the step samples; a row with temperature 0
    still takes the argmax); counted in its slot's Counts and Seen; to Ids[b], Out[b, 0] and,
    embedded, Embedded[b]."""
    b = tl.program_id(0)
    slot = tl.load(Slots + b).to(tl.int64)
    v = tl.arange(0, V_PAD)
    inside = v < n_ids
    x = _scores(Logits, AllowEos, Never, Counts, Seen, Bias, Presence, Frequency, Repetition, b, slot, v, inside,
                eos_id, s_logits, s_counts, s_seen, s_bias, PENALTY)
    chosen = tl.argmax(x, 0, tie_break_left=True).to(tl.int64)
    if SAMPLE:
        temperature = tl.load(Temperature + b)
        if temperature > 0:
            t = tl.maximum(temperature, 1e-5) + tl.zeros_like(x)
            y = tl.math.div_rn(x, t)
            top = tl.max(y, 0)
            total = tl.sum(tl.exp(y - top), 0)
            p = tl.math.div_rn(tl.exp(y - top), total + tl.zeros_like(x))
            drop = p < tl.load(MinP + b) * tl.max(p, 0)  # never the most likely byte: min_p <= 1
            top_k, top_p = tl.load(TopK + b), tl.load(TopP + b)
            if (top_k > 0) | (top_p < 1.0):
                rank = tl.zeros([V_PAD], tl.int32)  # bytes before each in the descending order
                mass = tl.zeros([V_PAD], tl.float32)  # and their probability
                for start in range(0, n_ids, CHUNK):
                    j = start + tl.arange(0, CHUNK)
                    xj = _scores(Logits, AllowEos, Never, Counts, Seen, Bias, Presence, Frequency, Repetition, b, slot,
                                 j, j < n_ids, eos_id, s_logits, s_counts, s_seen, s_bias, PENALTY)
                    yj = tl.math.div_rn(xj, tl.maximum(temperature, 1e-5) + tl.zeros_like(xj))
                    pj = tl.math.div_rn(tl.exp(yj - top), total + tl.zeros_like(xj))
                    before = (yj[None, :] > y[:, None]) | ((yj[None, :] == y[:, None]) & (j[None, :] < v[:, None]))
                    before = before & (j < n_ids)[None, :]
                    rank += tl.sum(before.to(tl.int32), 1)
                    mass += tl.sum(tl.where(before, pj[None, :], 0.0), 1)
                k = tl.where(top_k > 0, top_k, n_ids)
                cut = tl.where(top_p < 1.0, top_p, 2.0)  # top_p 1 is off, whatever the rounding of the mass
                drop = (drop | (rank >= k) | (mass >= cut)) & (rank != 0)
            seed, position = tl.load(Seeds + b).to(tl.int64), tl.load(Positions + b).to(tl.int64)
            row = _hash32(_hash32(seed) ^ _hash32((seed >> 32) + 0x9E3779B9) ^ _hash32(position * 2 + 1))
            bits = _hash32(row ^ _hash32(v.to(tl.int64) + 0x632BE5AB))
            u = (bits.to(tl.float64) + 0.5) * (1.0 / 4294967296.0)  # exact: the noise of sampling.uniform_noise
            drawn = tl.where(drop, float("-inf"), y).to(tl.float64) - tl.log(-tl.log(u))
            drawn = tl.where(inside, drawn, float("-inf"))
            chosen = tl.argmax(drawn, 0, tie_break_left=True).to(tl.int64)
    record(chosen, b, slot, Counts, Seen, Embed, Ids, Embedded, Out, s_counts, s_seen, s_embed, s_embedded, s_out,
           D, D_PAD)


if triton is not None:
    _hash32 = triton.jit(_hash32)
    _scores = triton.jit(_scores)
    _sample_kernel = triton.jit(_sample_program)


def sample_pick(logits: torch.Tensor, s: SamplingBatch, positions: torch.Tensor, never: torch.Tensor,
                counts: torch.Tensor, seen: torch.Tensor, bias: torch.Tensor, slots: torch.Tensor, embed: torch.Tensor,
                eos_id: int, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sampling.sample(logits, s, positions, counts[slots], seen[slots], eos_id, bias[slots]), then the
    bookkeeping of a static step, as tail_kernels.greedy_pick: logits (B, V) in any float dtype; s's columns
    (B,) (allow_eos bool or integer; its all_greedy and any_penalty say which variant runs); positions (B,) of
    the bytes being chosen; never (V,) bool; counts (slots, V) fp32 and seen (slots, V) bool, read and updated
    at each row's slot; bias (slots, V) fp32, read there; embed the entropy model's (V, d) byte embedding; out
    (B, 2+) float64, whose column 0 takes the ids -> (ids (B,) int64, their embeddings (B, 1, d))."""
    B, V = logits.shape
    if any(t.stride(1) != 1 for t in (logits, embed, counts, seen, bias)):
        raise ValueError("the logits', tables' and embedding's rows must be contiguous")
    if out.dtype != torch.float64 or counts.dtype != torch.float32 or bias.dtype != torch.float32:
        raise ValueError(f"out must be float64, counts and bias float32, not {out.dtype}, {counts.dtype} and "
                         f"{bias.dtype}")
    columns = [c.contiguous() for c in (s.temperature, s.top_p, s.top_k, s.min_p, s.presence, s.frequency,
                                         s.repetition, s.seeds, positions)]  # a static step's are already
    if any(c.shape != (B,) for c in columns):
        raise ValueError(f"the sampling columns and positions must be ({B},) tensors")
    d = embed.shape[1]
    ids = torch.empty(B, dtype=torch.long, device=logits.device)
    embedded = torch.empty(B, 1, d, dtype=embed.dtype, device=logits.device)
    if B:
        _sample_kernel[(B,)](logits, _as_bytes(s.allow_eos), _as_bytes(never), counts, _as_bytes(seen), bias, slots,
                             *columns, embed, ids, embedded, out, V, eos_id, logits.stride(0),
                             counts.stride(0), seen.stride(0), bias.stride(0), embed.stride(0), embedded.stride(0),
                             out.stride(0),
                             V_PAD=next_power_of_2(V), CHUNK=CHUNK, D=d, D_PAD=next_power_of_2(d),
                             PENALTY=s.any_penalty, SAMPLE=not s.all_greedy, num_warps=WARPS,
                             enable_fp_fusion=False)  # the penalties' products and sums rounded as PyTorch's
    return ids, embedded
