"""The local encoder's input embedding of one new byte per row, as one Triton kernel.

A decode step embeds each row's new byte as its byte embedding plus one hash n-gram embedding per
table (model.hashing: the window of the last max(G) ids, hashed in wrapping int64 arithmetic, floor
modulo the table size, offset to the table's rows), and shifts the byte into the row's hash history.
Eagerly that is about 15 kernels (gather the history, concatenate, multiply, sum, modulo, offsets,
two embedding lookups, the sum over tables, the add, the history write); here it is one launch that
computes the same integers, sums the tables' rows in fp32 and rounds where the eager code rounds:
the tables' sum to the model's dtype, then the byte's embedding plus that sum. In bf16 the fp32 sum
of a handful of bf16 rows is exact whatever its order, so the result is PyTorch's bit for bit; in
fp32 the order of the sum can move the last bit. Prefill chunks keep the eager path (one launch
set per chunk, not per byte). Used by runner.Runner.encode when its kernels are Triton's.
"""

from __future__ import annotations

import torch

from .attention import next_power_of_2, rounded, row_of, tl, triton


def _embed_program(Ids, History, HistoryOut, Rows, Powers, Hashed, Bytes, Out, row_offset, vocab, s_ids, s_hist,
                   s_hist_out, s_hashed, s_bytes, s_out, TABLES: tl.constexpr, WIDTH: tl.constexpr,
                   W_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, GATHER: tl.constexpr):
    """One row b: the window (its history, then its new id Ids[b]), each table's hash of it and that
    table's row of Hashed, summed over the tables, plus the byte's row of Bytes, to Out; the history
    moved on by one id, to HistoryOut (History itself, or another table). History rows are Rows[b]
    (GATHER) or b + row_offset."""
    b = tl.program_id(0)
    row = row_of(Rows, b, row_offset, GATHER)
    m = tl.arange(0, W_PAD)
    new_id = tl.load(Ids + b * s_ids).to(tl.int64)
    older = tl.load(History + row * s_hist + m, mask=m < WIDTH - 1, other=0).to(tl.int64)
    window = tl.where(m == WIDTH - 1, new_id, older)  # oldest id first, the new one last
    d = tl.arange(0, D_PAD)
    inside = d < D
    total = tl.zeros([D_PAD], dtype=tl.float32)
    for j in tl.static_range(TABLES):
        powers = tl.load(Powers + j * WIDTH + m, mask=m < WIDTH, other=0)
        hashed = tl.sum(window * powers, 0)  # int64, wrapping as the eager product and sum do
        index = hashed % vocab
        index = tl.where(index < 0, index + vocab, index) + j * vocab  # floor modulo, then the table's rows
        total += tl.load(Hashed + index * s_hashed + d, mask=inside, other=0.0).to(tl.float32)
    dtype = Out.dtype.element_ty
    summed = rounded(total, dtype).to(tl.float32)
    own = tl.load(Bytes + new_id * s_bytes + d, mask=inside, other=0.0).to(tl.float32)
    tl.store(Out + b * s_out + d, rounded(own + summed, dtype), mask=inside)
    # every id of the window but the oldest, in place: only this program reads the row (a step's rows
    # are distinct slots, but for padding rows, which share the scratch slot and are never read)
    tl.store(HistoryOut + row * s_hist_out + m - 1, window, mask=(m >= 1) & (m < WIDTH))


if triton is not None:
    _embed_kernel = triton.jit(_embed_program)


def embed_new_bytes(ids: torch.Tensor, history: torch.Tensor, rows: torch.Tensor | slice, powers: torch.Tensor,
                    hashed: torch.Tensor, byte_table: torch.Tensor, vocab: int,
                    history_out: torch.Tensor | None = None) -> torch.Tensor:
    """ids (B, 1), the rows' new bytes; history (slots, W - 1) int64, each slot's last W - 1 ids (0 before
    the first), shifted here to take the new id (into `history_out`, of the same shape, where given:
    `history` then stays as it was); rows: each row's slot (a tensor, or consecutive slots as a
    slice); powers (tables, W) int64 (hashing.power_matrix); hashed (tables * vocab, d) and byte_table
    (bytes, d), the embedding tables -> (B, 1, d) as BltModel.embed_new_bytes computes it from the
    history and the ids."""
    B, T = ids.shape
    tables, width = powers.shape
    if T != 1:
        raise ValueError(f"embed_new_bytes takes one new byte per row, not {T}")
    if history.shape[1] != width - 1 or history.dtype != torch.long or powers.dtype != torch.long:
        raise ValueError(f"history must be (slots, {width - 1}) and powers ({tables}, {width}), both int64; got "
                         f"{tuple(history.shape)} {history.dtype} and {powers.dtype}")
    if hashed.dtype != byte_table.dtype or hashed.shape[1] != byte_table.shape[1]:
        raise ValueError("the hash and byte embedding tables must share a dtype and a width")
    history_out = history if history_out is None else history_out
    if history_out.shape != history.shape or history_out.dtype != torch.long:
        raise ValueError(f"history_out must be int64 {tuple(history.shape)}, not {history_out.dtype} "
                         f"{tuple(history_out.shape)}")
    if (history.stride(1) != 1 or history_out.stride(1) != 1 or hashed.stride(1) != 1 or byte_table.stride(1) != 1
            or not powers.is_contiguous()):
        raise ValueError("history rows, powers and the embedding tables' rows must be contiguous")
    d = hashed.shape[1]
    out = torch.empty(B, 1, d, device=hashed.device, dtype=hashed.dtype)
    gather = not isinstance(rows, slice)
    if B:
        _embed_kernel[(B,)](ids, history, history_out, rows if gather else ids, powers, hashed, byte_table, out,
                            0 if gather else rows.start, vocab, ids.stride(0), history.stride(0),
                            history_out.stride(0), hashed.stride(0), byte_table.stride(0), out.stride(0),
                            TABLES=tables, WIDTH=width,
                            W_PAD=next_power_of_2(width), D=d, D_PAD=next_power_of_2(d), GATHER=gather)
    return out
