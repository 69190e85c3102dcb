"""The end of a static byte step in Triton: the greedy choice of each row's next byte, and the entropy
that decides whether it closes its patch. One launch each.

Eagerly, after the byte head, a greedy step up-casts the logits, masks the ids never sampled and EOS
where a request ignores it, takes the argmax, counts the byte in its slot's output counts and seen
flags, copies it to the step's output and embeds it for the entropy model (about 11 kernels); after
the entropy model's head, it takes the log-softmax, the entropy, compares it with the threshold
and copies the flag out (about 9). `greedy_pick` and `entropy_flags` do each part in one kernel with
the same arithmetic: the argmax is exact and picks the first of equal maxima as torch.argmax does;
the entropy is fp32 as model.entropy.entropy_nats computes it, its sums in another order (the last
bit may differ, as with every projection of `--kernels triton-gemv`). Used by static.py's decode
steps when the runner's kernels are Triton's; a step that samples with temperature or penalties
chooses through sample_kernel.py instead, and prefill chunks keep the eager path.
"""

from __future__ import annotations

import torch

from .attention import next_power_of_2, tl, triton


def _greedy_program(Logits, AllowEos, Never, Counts, Seen, Slots, Embed, Ids, Embedded, Out, n_ids, eos_id,
                    s_logits, s_counts, s_seen, s_embed, s_embedded, s_out,
                    V_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr):
    """Row b: the argmax of its logits (fp32) with the ids at Never and, unless AllowEos[b], EOS masked
    out; counted in its slot's Counts and Seen; to Ids[b], Out[b, 0] and, embedded, Embedded[b]."""
    b = tl.program_id(0)
    v = tl.arange(0, V_PAD)
    x = allowed_logits(Logits, AllowEos, Never, b, v, v < n_ids, eos_id, s_logits)
    chosen = tl.argmax(x, 0, tie_break_left=True).to(tl.int64)
    slot = tl.load(Slots + b).to(tl.int64)
    record(chosen, b, slot, Counts, Seen, Embed, Ids, Embedded, Out, s_counts, s_seen, s_embed, s_embedded, s_out,
           D, D_PAD)


def allowed_logits(Logits, AllowEos, Never, b, v, inside, eos_id, s_logits):
    """Row b's logits at ids v in fp32, -inf at the ids never sampled and, unless AllowEos[b], at EOS
    (sampling.allowed). Shared with sample_kernel.py."""
    x = tl.load(Logits + b * s_logits + v, mask=inside, other=float("-inf")).to(tl.float32)
    never = tl.load(Never + v, mask=inside, other=1) != 0
    no_eos = tl.load(AllowEos + b) == 0
    return tl.where(never | ((v == eos_id) & no_eos), float("-inf"), x)


def record(chosen, b, slot, Counts, Seen, Embed, Ids, Embedded, Out, s_counts, s_seen, s_embed, s_embedded, s_out,
           D: tl.constexpr, D_PAD: tl.constexpr):
    """Row b chose byte id `chosen`: counted in its slot's Counts and Seen; to Ids[b], Out[b, 0] and,
    embedded (the entropy model's embedding, D wide), Embedded[b]. Shared with sample_kernel.py."""
    at = Counts + slot * s_counts + chosen
    tl.store(at, tl.load(at) + 1.0)
    tl.store(Seen + slot * s_seen + chosen, tl.full([], 1, tl.uint8))
    tl.store(Ids + b, chosen)
    tl.store(Out + b * s_out, chosen.to(tl.float64))
    d = tl.arange(0, D_PAD)
    row = tl.load(Embed + chosen * s_embed + d, mask=d < D, other=0.0)
    tl.store(Embedded + b * s_embedded + d, row, mask=d < D)


def _entropy_program(Logits, Positions, Out, n_ids, threshold, s_logits, s_out, V_PAD: tl.constexpr):
    """Row b: the entropy (nats) of softmax(Logits[b]) in fp32; Out[b, 1] = whether it is above
    `threshold` or the position is 0 (patcher.starts_next)."""
    b = tl.program_id(0)
    v = tl.arange(0, V_PAD)
    inside = v < n_ids
    x = tl.load(Logits + b * s_logits + v, mask=inside, other=float("-inf")).to(tl.float32)
    shifted = x - tl.max(x, 0)
    logp = tl.where(inside, shifted - tl.log(tl.sum(tl.exp(shifted), 0)), 0.0)  # padding lanes: 0, not -inf
    entropy = -tl.sum(tl.where(inside, tl.exp(logp), 0.0) * logp, 0)
    closes = (entropy > threshold) | (tl.load(Positions + b) == 0)
    tl.store(Out + b * s_out + 1, closes.to(tl.float64))


if triton is not None:
    allowed_logits = triton.jit(allowed_logits)
    record = triton.jit(record)
    _greedy_kernel = triton.jit(_greedy_program)
    _entropy_kernel = triton.jit(_entropy_program)


def _as_bytes(flags: torch.Tensor) -> torch.Tensor:
    return flags.view(torch.uint8) if flags.dtype == torch.bool else flags


def greedy_pick(logits: torch.Tensor, allow_eos: torch.Tensor, never: torch.Tensor, counts: torch.Tensor,
                seen: torch.Tensor, slots: torch.Tensor, embed: torch.Tensor, eos_id: int,
                out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sampling.sample for all-greedy rows without penalties, then the bookkeeping of a static step:
    logits (B, V) in any float dtype; allow_eos (B,) bool or integer, never (V,) bool; counts (slots, V) fp32 and
    seen (slots, V) bool, updated at each row's slot; embed the entropy model's (V, d) byte
    embedding; out (B, 2+) float64, whose column 0 takes the ids -> (ids (B,) int64, their
    embeddings (B, 1, d))."""
    B, V = logits.shape
    if logits.stride(1) != 1 or embed.stride(1) != 1 or counts.stride(1) != 1 or seen.stride(1) != 1:
        raise ValueError("the logits', tables' and embedding's rows must be contiguous")
    if out.dtype != torch.float64 or counts.dtype != torch.float32:
        raise ValueError(f"out must be float64 and counts float32, not {out.dtype} and {counts.dtype}")
    d = embed.shape[1]
    ids = torch.empty(B, dtype=torch.long, device=logits.device)
    embedded = torch.empty(B, 1, d, dtype=embed.dtype, device=logits.device)
    if B:
        _greedy_kernel[(B,)](logits, _as_bytes(allow_eos), _as_bytes(never), counts, _as_bytes(seen), slots, embed, ids,
                             embedded, out, V, eos_id, logits.stride(0), counts.stride(0), seen.stride(0),
                             embed.stride(0), embedded.stride(0), out.stride(0), V_PAD=next_power_of_2(V), D=d,
                             D_PAD=next_power_of_2(d))
    return ids, embedded


def entropy_flags(logits: torch.Tensor, positions: torch.Tensor, threshold: float, out: torch.Tensor) -> None:
    """logits (B, V) fp32, the entropy model's; positions (B,) of the bytes they follow -> out[:, 1]
    (float64): whether the next byte starts a patch (patcher.starts_next of the entropy)."""
    B, V = logits.shape
    if logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(f"the entropy model's logits must be fp32 with contiguous rows, not {logits.dtype}")
    if out.dtype != torch.float64:
        raise ValueError(f"out must be float64, not {out.dtype}")
    if B:
        _entropy_kernel[(B,)](logits, positions, out, V, threshold, logits.stride(0), out.stride(0),
                              V_PAD=next_power_of_2(V))
