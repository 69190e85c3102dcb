"""Single-query attention over a KV cache's rows: what every decode step's self-attention layers do.

A decode step attends one new position per row to that row's cached keys and values (a 512-entry
ring for the local models, the patches so far for the global one). Two ways to run it:
- "sdpa": the rows are read from the cache (in place when they are consecutive slots, otherwise as a
  gathered copy of every row's keys and values) and handed to F.scaled_dot_product_attention;
- "triton": one Triton kernel per layer (`decode_attention`), one program per row and query head
  (on a GPU at few rows, one per split of the span too, whose partial results the last split of each
  row and head to finish combines, or a second kernel where no counters are given: flash-decoding),
  stores the row's new key and value, reads the row's entries where they lie in the cache (a slot
  index per row, or consecutive slots), adds the step's additive mask, and keeps a running softmax
  in fp32. Nothing is gathered or copied:
  a patch step's closing rows are scattered over the slots, and SDPA's gathered copy of their global
  cache is 8 MB per row and layer at the 1B widths and 1,024 patches of context (3.4 GB written per
  patch step for 16 closing rows of 64 streams).
The kernel can also rotate the query and the new key first (RoPE, by each row's rotation or by a
RotationTable's row at each row's length), so a step feeds it views of its qkv projection, and
store at each row's new position's entry, worked out from its length. Which way a step takes is
the engine's kernels setting (kernels.py). On a CPU the kernel runs in Triton's interpreter
(TRITON_INTERPRET=1 set before Triton is imported): slow, for tests only. `rounded` is the bf16
rounding the repository's Triton kernels share. Also a long prefill chunk's attention, a block of
queries at a time (`band_attention`). Used by runner.py's block_step; knows nothing about requests
or patches.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .fused import additive_mask, visible
from .model.layers import repeat_kv, rope_rotation

try:  # on CUDA machines it comes with torch; the kernel's body reads `tl` as a module global
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None
# whether the kernels run in Triton's interpreter (read by `rounded` when it is compiled)
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1") if tl is not None else None

Store = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]  # see decode_attention


@dataclass(frozen=True)
class Visible:
    """What the kernel needs to work out which cache entries each row sees, instead of reading a mask:
    the additive mask fused.StepOps.positions would build for one new position (entries that hold a
    position, within the stack's window), at no kernel of its own."""

    lengths: torch.Tensor  # (B,) positions cached before the new one (the new one is at this position)
    cache_window: int | None  # the cache's ring size (None: position p at entry p)
    stack_window: int | None  # the stack's attention window

    def additive(self, span: int, dtype: torch.dtype) -> torch.Tensor:
        """The (B, 1, 1, span) additive mask it stands for."""
        return additive_mask(self.lengths, self.lengths[:, None], 1, span, True, self.cache_window,
                             self.stack_window, dtype)


class Causal:
    """The mask of a chunk that starts at position 0, no longer than its stack's window: causal, which SDPA
    applies itself (is_causal), leaving out the work above the diagonal that a mask tensor would make it do
    (a prompt of up to a window's bytes, prefilled in one chunk: bench/RESULTS.md)."""


CAUSAL = Causal()


BAND_BLOCK_CPU = 64  # queries per block of a long chunk on a CPU (a window of them on CUDA; bench/RESULTS.md)

Block = tuple[int, int, int, int, torch.Tensor]  # see ChunkBand.blocks


@dataclass(frozen=True)
class ChunkBand:
    """A prefill chunk of more than two blocks of queries, in a stack with an attention window, attended a block
    of queries at a time (`band_attention`) instead of through one (T, entries + T) mask, whose work and memory
    grow with the chunk's square and which weighs every query against every key. A block weighs the keys its
    queries can see: the latest cache entries by position (the cache is read in position order), as many as its
    first query sees, and the chunk's own from a window before the block to its end. Built once per stack and
    step (`of`), for every layer."""

    order: torch.Tensor | None  # (B, 1, span, 1): the cache entries read, by the position they hold; None: as read
    blocks: tuple[Block, ...]  # (start, end, cached, first, mask): queries start..end over the last `cached` cache
    # entries in position order and the chunk's keys first..end, under the additive (B, 1, end - start, keys) mask

    @classmethod
    def of(cls, keys: torch.Tensor, span: int, window: int, block: int, dtype: torch.dtype) -> ChunkBand:
        """`keys` (B, span + T): the position each cache entry read holds (-1: none), then the chunk's."""
        T = keys.shape[1] - span
        # (start, end, cached, first) of each block: cached, the positions from its first query's window start on
        bounds = [(start, min(start + block, T), min(max(window - 1 - start, 0), span), max(start - window + 1, 0))
                  for start in range(0, T, block)]
        held, new, order = keys[:, :span], keys[:, span:], None
        if any(0 < cached < span for _, _, cached, _ in bounds):  # some block reads the latest entries only
            order = torch.argsort(held, dim=1)  # no position (-1) first
            held = held.gather(1, order)
        blocks = []
        for start, end, cached, first in bounds:
            seen = torch.cat([held[:, span - cached:], new[:, first:end]], dim=1)
            mask = visible(seen[:, None, :], new[:, start:end, None], window)
            additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
            blocks.append((start, end, cached, first, additive[:, None]))
        return cls(None if order is None else order[:, None, :, None], tuple(blocks))


def band_attention(q: torch.Tensor, cached_k: torch.Tensor, cached_v: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor, band: ChunkBand) -> torch.Tensor:
    """sdpa_attention of q (B, H, T, D) over the cache entries read and the chunk's own keys, with the mask of
    the whole chunk, a block of queries at a time over the keys it can see (ChunkBand). Every query weighs the
    same keys as under the whole mask, whose other entries weigh exactly zero. -> (B, T, H * D)."""
    span = cached_k.shape[2]
    if band.order is not None:
        index = band.order.expand(-1, cached_k.shape[1], -1, cached_k.shape[3])
        cached_k, cached_v = cached_k.gather(2, index), cached_v.gather(2, index)
    out = []
    for start, end, cached, first, mask in band.blocks:
        keys, values = k[:, :, first:end], v[:, :, first:end]
        if cached:
            keys = torch.cat([cached_k[:, :, span - cached:], keys], dim=2)
            values = torch.cat([cached_v[:, :, span - cached:], values], dim=2)
        out.append(sdpa_attention(q[:, :, start:end], keys, values, mask))
    return torch.cat(out, dim=1)


@dataclass(frozen=True)
class RotationTable:
    """The RoPE rotation of every position a stack's cache can hold, (positions, D / 2, 2) fp32 cos and
    sin (torch.view_as_real of layers.rope_rotation over 0, 1, ...: the values a step would compute
    for its new positions, element for element). With a Visible mask the attention kernel reads row
    `length` of it for each row's new position: the step computes no rotation."""

    table: torch.Tensor

    @classmethod
    def of(cls, positions: int, head_dim: int, theta: float, device: torch.device) -> RotationTable:
        return cls(torch.view_as_real(rope_rotation(torch.arange(positions, device=device), head_dim, theta)))


def triton_importable() -> bool:
    return triton is not None


def rounded(x, dtype: tl.constexpr):
    """fp32 x as `dtype`, rounded to nearest even as PyTorch rounds. Compiled, the GPU's conversion does
    that. Triton's interpreter truncates a plain .to(bfloat16), and the tests must see on the CPU what
    the GPU computes, so there a bf16 is rounded by integer arithmetic on the bits, then converted
    exactly. (NaN payloads may differ.)"""
    if dtype == tl.bfloat16 and INTERPRETED:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    return x.to(dtype)


def _rotated(X, d, in_head, cos, sin, ROPE: tl.constexpr):
    """The head vector at X (D_PAD lanes d), rotated as layers.apply_rope does when ROPE: channel pairs
    (2i, 2i+1) times cos + i sin in fp32, rounded back to X's dtype as the eager step rounds them."""
    x = tl.load(X + d, mask=in_head, other=0.0)
    if ROPE:
        partner = tl.load(X + (d ^ 1), mask=in_head, other=0.0).to(tl.float32)
        turned = partner * sin
        # even channel: x0 cos - x1 sin; odd channel: x0 sin + x1 cos (the same sum in the other order)
        x = rounded(x.to(tl.float32) * cos + tl.where(d % 2 == 0, -turned, turned), X.dtype.element_ty)
    return x


def row_of(Rows, b, row_offset, GATHER: tl.constexpr):
    """The cache row (slot) of program row b, as int64: Rows[b] (GATHER) or b + row_offset."""
    if GATHER:
        return tl.load(Rows + b).to(tl.int64)
    return (b + row_offset).to(tl.int64)


def _visible(n, length, CACHE_WINDOW: tl.constexpr, STACK_WINDOW: tl.constexpr):
    """Whether cache entries n hold positions a new one at `length` sees, the new one stored: the
    additive mask that fused.StepOps.positions builds (cache.entry_positions), worked out in place.
    A window of 0 is none."""
    if CACHE_WINDOW == 0:  # position p at entry p
        held = tl.where(n <= length, n, -1)
    else:  # a ring: the newest position at or below `length` that lives at entry n (floored modulo)
        back = (length - n) % CACHE_WINDOW
        held = length - tl.where(back < 0, back + CACHE_WINDOW, back)
    seen = held >= 0
    if STACK_WINDOW != 0:
        seen = seen & (held > length - STACK_WINDOW)
    return seen


def _attention_program(Q, KV, Rows, Mask, Out, KNew, VNew, WRows, WIndex, Rot, Part, Counts, Pages, row_offset,
                       span, per_split, scale, sq_b, sq_h, skv_kv, skv_row, skv_head, skv_entry, sm_b, so_b, so_h,
                       skn_b, skn_h, svn_b, svn_h, swr_b, swi_b, srot_b, sp_b, sp_h, sp_s, spg_row,
                       GROUPS: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
                       GATHER: tl.constexpr, MASK: tl.constexpr, STORE: tl.constexpr, ROPE: tl.constexpr,
                       CACHE_WINDOW: tl.constexpr, STACK_WINDOW: tl.constexpr, SPLIT: tl.constexpr,
                       MEET: tl.constexpr, SPLITS_PAD: tl.constexpr, PAGE: tl.constexpr):
    """One (row, query head, split): a running softmax over the row's cache entries from split x
    `per_split` to the next split's or `span`, BLOCK at a time, in fp32 (decode_attention). Without
    SPLIT there is one split, and the result is stored; with it, the split's running maximum, sum and
    unnormalised output go to Part, which _combine_program reduces, or with MEET the last of the
    (row, head)'s splits to finish: each split counts itself at Counts[row x heads + head] (an atomic
    add, after its part is stored), and the one that counts last combines the parts and sets the
    count back to 0. MASK: 0 every entry read is visible, 1 an additive mask at Mask, 2 the visible
    entries worked out from the row's length at Mask (Visible), reading no entry past the row's new
    position's (a row shorter than a ring's window, or than the global cache's span, reads only what it
    holds). ROPE: the query and the new key are
    rotated first, by the row's cos and sin at Rot (1) or by row `length` of a RotationTable (2). STORE:
    the row's new key and value are first stored (by the first query head of their kv head, in its first
    split), at the entry WIndex gives (1) or at the row's new position (2), and, where the row reads that
    entry, taken from registers: what other programs of the kv head store there meanwhile is never read.
    ROPE 2 and STORE 2 need MASK 2, which gives the length. PAGE (0: none): the cache is a pool of pages
    (paged_cache.py), row `row`'s position n in page Pages[row, n // PAGE] at entry n % PAGE, and a cache row
    (KV's `skv_row`) is a page: WRows and WIndex, with STORE 1, give the page and entry."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    row = row_of(Rows, b, row_offset, GATHER)
    d = tl.arange(0, D_PAD)
    in_head = d < D
    kvh = h // GROUPS
    cos = 1.0
    sin = 0.0
    length = 0
    if MASK == 2:
        length = tl.load(Mask + b * sm_b).to(tl.int64)
    if ROPE != 0:  # (B or positions, ..., D / 2, 2) cos and sin, the last two dimensions contiguous
        at_rot = Rot + (b if ROPE == 1 else length) * srot_b + (d // 2) * 2
        cos = tl.load(at_rot, mask=in_head, other=1.0)
        sin = tl.load(at_rot + 1, mask=in_head, other=0.0)
    q = _rotated(Q + b * sq_b + h * sq_h, d, in_head, cos, sin, ROPE).to(tl.float32) * scale
    if PAGE != 0:  # each block of entries finds its pages below
        k_base = KV + kvh * skv_head
    else:
        k_base = KV + row * skv_row + kvh * skv_head
    v_base = k_base + skv_kv
    if STORE != 0:
        w_row = tl.load(WRows + b * swr_b).to(tl.int64)
        if STORE == 1:
            w_index = tl.load(WIndex + b * swi_b).to(tl.int64)
        elif PAGE != 0:  # the page that holds the row's new position
            w_row = tl.load(Pages + w_row * spg_row + length // PAGE).to(tl.int64)
            w_index = length % PAGE
        elif CACHE_WINDOW == 0:
            w_index = length
        else:
            w_index = length % CACHE_WINDOW
        k_new = _rotated(KNew + b * skn_b + kvh * skn_h, d, in_head, cos, sin, ROPE)
        v_new = tl.load(VNew + b * svn_b + kvh * svn_h + d, mask=in_head, other=0.0)
        # the kv head's first query head stores it, in its first split; every split of every head takes
        # the new entry from registers
        first = d < tl.where((h % GROUPS == 0) & (split == 0), D, 0)
        at = KV + w_row * skv_row + kvh * skv_head + w_index * skv_entry + d
        tl.store(at, k_new, mask=first)
        tl.store(at + skv_kv, v_new, mask=first)
        new_at = tl.where(w_row == row, w_index, -1)  # the entry this row reads from registers, if any
    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros([D_PAD], dtype=tl.float32)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, span)
    if MASK == 2:  # no entry after the new position's holds one the row sees: a row shorter than the span
        hi = tl.minimum(hi, (length + 1).to(tl.int32))  # reads no further (a split past it, nothing)
    for start in tl.range(lo, hi, BLOCK):
        n = start + tl.arange(0, BLOCK)
        inside = n < hi
        if PAGE != 0:
            page = tl.load(Pages + row * spg_row + n // PAGE, mask=inside, other=0).to(tl.int64)
            where = (page * skv_row + (n % PAGE) * skv_entry)[:, None] + d[None, :]
            if STORE != 0:
                is_new = (page == w_row) & (n % PAGE == w_index)
        else:
            where = n[:, None] * skv_entry + d[None, :]
            if STORE != 0:
                is_new = n == new_at
        both = inside[:, None] & in_head[None, :]
        k = tl.load(k_base + where, mask=both, other=0.0)
        if STORE != 0:
            k = tl.where(is_new[:, None], k_new[None, :], k)
        s = tl.sum(k.to(tl.float32) * q[None, :], 1)
        if MASK == 1:
            s += tl.load(Mask + b * sm_b + n, mask=inside, other=0.0).to(tl.float32)
        if MASK == 2:
            s = tl.where(_visible(n, length, CACHE_WINDOW, STACK_WINDOW), s, float("-inf"))
        s = tl.where(inside, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet: sums stay 0
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe)
        v = tl.load(v_base + where, mask=both, other=0.0)
        if STORE != 0:
            v = tl.where(is_new[:, None], v_new[None, :], v)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        l_i = l_i * alpha + tl.sum(p, 0)
        m_i = m_new
    if SPLIT:
        part = Part + b * sp_b + h * sp_h
        tl.store(part + split * sp_s + d, acc)
        tl.store(part + split * sp_s + D_PAD, m_i)
        tl.store(part + split * sp_s + D_PAD + 1, l_i)
        if MEET:
            splits = tl.num_programs(2)
            count = Counts + b * tl.num_programs(1) + h
            tl.debug_barrier()  # every lane's stores of the part issued before the count says it is there
            if tl.atomic_add(count, 1, sem="acq_rel") == splits - 1:  # the last: every part is stored
                _combine_parts(part, Out + b * so_b + h * so_h, splits, sp_s, D, D_PAD, SPLITS_PAD)
                tl.atomic_xchg(count, 0)
    else:
        tl.store(Out + b * so_b + h * so_h + d, rounded(acc / l_i, Out.dtype.element_ty), mask=in_head)


def _combine_parts(part, out, splits, sp_s, D: tl.constexpr, D_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr):
    """A (row, query head)'s splits' partial softmaxes (at `part`, `sp_s` apart) made one, each scaled by
    exp(its maximum - the largest), stored at `out`. The parts are read past the SM's L1 (".cg"): other
    programs wrote them."""
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, D_PAD)
    real = s < splits
    at = part + s * sp_s
    m = tl.load(at + D_PAD, mask=real, other=float("-inf"), cache_modifier=".cg")
    l_s = tl.load(at + D_PAD + 1, mask=real, other=0.0, cache_modifier=".cg")
    m_all = tl.max(m, 0)
    weight = tl.exp(m - tl.where(m_all == float("-inf"), 0.0, m_all))  # a split that saw nothing: 0
    acc = tl.load(at[:, None] + d[None, :], mask=real[:, None], other=0.0, cache_modifier=".cg")
    total = tl.sum(acc * weight[:, None], 0) / tl.sum(l_s * weight, 0)
    tl.store(out + d, rounded(total, out.dtype.element_ty), mask=d < D)


def _combine_program(Part, Out, splits, sp_b, sp_h, sp_s, so_b, so_h,
                     D: tl.constexpr, D_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr):
    """One (row, query head): _combine_parts, as a kernel of its own after _attention_program's splits."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    _combine_parts(Part + b * sp_b + h * sp_h, Out + b * so_b + h * so_h, splits, sp_s, D, D_PAD, SPLITS_PAD)


if triton is not None:
    rounded = triton.jit(rounded)
    _rotated = triton.jit(_rotated)
    _visible = triton.jit(_visible)
    _combine_parts = triton.jit(_combine_parts)
    row_of = triton.jit(row_of)
    _kernel = triton.jit(_attention_program)
    _combine = triton.jit(_combine_program)
else:
    _kernel = _combine = None


def decode_attention(q: torch.Tensor, kv: torch.Tensor, layer: int, rows: torch.Tensor | slice, span: int,
                     mask: torch.Tensor | Visible | None, block: int | None = None, store: Store | None = None,
                     rotation: torch.Tensor | RotationTable | None = None, splits: int | None = None,
                     counts: torch.Tensor | None = None, pages: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    """q (B, H, 1, D); kv a cache's (2, layers, slots, H_kv, capacity, D) keys and values; `rows` the
    cache row of each query (a tensor of slots, or consecutive slots as a slice); the first `span`
    entries are read; mask (B, 1, 1, span) additive, or Visible (the kernel works the mask out), or
    None (every entry read is visible) -> (B, 1, H * D), SDPA's result (scale
    1/sqrt(D); query head h reads kv head h // (H / H_kv)) with its heads side by side. `block`:
    entries per loop iteration (a power of two); by default 8192 values of K at a time on a GPU, and
    the whole span at once in the interpreter, whose cost is per operation, not per value.
    `store`: (k, v, write_rows, write_index), each row's new key and value (B, H_kv, 1, D) and where
    they go (B, 1), stored by the same kernel, with the result of storing them first and then
    attending (KVCache.write, then the read): one kernel less per layer; write_index None: at each
    row's new position (its length, with a Visible mask). `rotation`: the step's RoPE rotation
    (B, 1, 1, D / 2) complex (Positions.rotation), or a RotationTable to read at each row's length
    (with a Visible mask; every length below its rows, which the caller makes sure of: the kernel
    cannot tell the host), by which q and the new key are rotated first, so that they come unrotated
    from the qkv projection (views of it): the kernel replaces the step's RoPE too
    (fused.StepOps.heads). `splits`: programs per row and head, each over its own consecutive blocks of
    the span, whose partial results are then combined (flash-decoding; see `counts`): by default, on
    a GPU, as many as fill the multiprocessors that B x H programs leave idle (`default_splits`), and
    one (nothing to combine) in the interpreter. The split is fixed by B, H and the span, so a step shape
    always runs the same sums. `counts`: zeroed int32 counters, one per row and query head
    (KVCache.split_counts; with fewer, the second kernel combines), where each (row, head)'s splits
    meet: the last to finish combines them, in the same kernel (one launch, not two), and sets its
    counter back to 0. The same sums as the second kernel's, in the same order. Two kernels that may
    run at once (on two CUDA streams) must not be given the same counters. `pages`: (table, page size)
    of a cache of pages (paged_cache.PagedKVCache.pages), whose `kv` is then (2, layers, pages, H_kv,
    page size, D): `rows` index the table, and `store`'s write_rows and write_index are pages and entries."""
    B, H, T, D = q.shape
    if T != 1:
        raise ValueError(f"decode_attention takes one query position per row, not {T}")
    if q.stride(3) != 1:
        q = q.contiguous()
    cache = kv[:, layer]  # (2, slots, H_kv, capacity, D), a view
    windows = (0, 0)
    at_length = isinstance(rotation, RotationTable) or (store is not None and store[3] is None)
    if at_length and not isinstance(mask, Visible):
        raise ValueError("a rotation table, or storing at each row's new position, needs a Visible mask "
                         "(the rows' lengths)")
    if isinstance(mask, Visible):
        windows = (mask.cache_window or 0, mask.stack_window or 0)
        mask = mask.lengths[:, None, None, None]
        kind = 2
    else:
        kind = 0 if mask is None else 1
    if cache.stride(4) != 1 or (mask is not None and mask.stride(3) != 1):
        raise ValueError("the cache's head dimension and the mask's entries must be contiguous")
    out = torch.empty(B, 1, H * D, device=q.device, dtype=q.dtype)
    gather = not isinstance(rows, slice)
    d_pad = next_power_of_2(D)
    block = default_block(D, span, q.device) if block is None else block
    k_new, v_new, w_rows, w_index = store if store is not None else (q, q, q, q)
    stored = 0 if store is None else 2 if w_index is None else 1
    w_index = q if w_index is None else w_index
    if store is not None and (k_new.stride(3) != 1 or v_new.stride(3) != 1 or k_new.shape[2] != 1):
        raise ValueError("new keys and values must be one position with a contiguous head dimension")
    rot, rope = q, 0
    if isinstance(rotation, RotationTable):
        rot, rope = rotation.table, 2
        if rot.shape[1:] != (D // 2, 2) or rot.stride(1) != 2 or rot.stride(2) != 1:
            raise ValueError(f"a rotation table must be contiguous (positions, D / 2, 2), not {tuple(rot.shape)}")
    elif rotation is not None:
        if rotation.shape != (B, 1, 1, D // 2):
            raise ValueError(f"rotation must be (B, 1, 1, D / 2) = {(B, 1, 1, D // 2)}, not {tuple(rotation.shape)}")
        rot, rope = torch.view_as_real(rotation if rotation.stride(3) == 1 else rotation.contiguous()), 1
    blocks = -(-span // block)
    splits = max(1, min(default_splits(B * H, blocks, q.device) if splits is None else splits, blocks))
    per_split = -(-blocks // splits) * block
    splits = -(-span // per_split)  # none left empty
    part = torch.empty(B, H, splits, d_pad + 2, device=q.device, dtype=torch.float32) if splits > 1 else out
    if counts is not None and (counts.dtype != torch.int32 or counts.device != q.device):
        raise ValueError(f"counts must be int32 on {q.device}, not {counts.dtype} on {counts.device}")
    meet = splits > 1 and counts is not None and counts.numel() >= B * H and ONE_LAUNCH  # (fewer: two kernels)
    table, page = pages if pages is not None else (q, 0)
    if pages is not None and (table.dtype != torch.int32 or table.stride(1) != 1 or span > table.shape[1] * page):
        raise ValueError(f"a page table must be contiguous int32 rows spanning the {span} entries read")
    _kernel[(B, H, splits)](
        q, cache, rows if gather else q, mask if mask is not None else q, out, k_new, v_new, w_rows, w_index, rot,
        part, counts if meet else q, table, 0 if gather else rows.start, span, per_split, D ** -0.5,
        q.stride(0), q.stride(1), cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3),
        mask.stride(0) if mask is not None else 0, out.stride(0), D,
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1), w_rows.stride(0), w_index.stride(0),
        rot.stride(0), *(part.stride()[:3] if splits > 1 else (0, 0, 0)), table.stride(0) if page else 0,
        GROUPS=H // cache.shape[2], D=D, D_PAD=d_pad, BLOCK=block, GATHER=gather, MASK=kind, STORE=stored, ROPE=rope,
        CACHE_WINDOW=windows[0], STACK_WINDOW=windows[1], SPLIT=splits > 1, MEET=meet,
        SPLITS_PAD=next_power_of_2(splits), PAGE=page)
    if splits > 1 and not meet:
        _combine[(B, H)](part, out, splits, *part.stride()[:3], out.stride(0), D, D=D, D_PAD=d_pad,
                         SPLITS_PAD=next_power_of_2(splits))
    return out


MAX_SPLITS = 16
ONE_LAUNCH = True  # splits given counters combine in the attention kernel (False: always the second kernel)


def default_block(head_dim: int, span: int, device: torch.device) -> int:
    """Cache entries per loop iteration of the decode-attention kernel: 8192 values of K at a time on a GPU
    (16 to 128 entries), the whole span at once in the interpreter (its cost is per operation)."""
    if device.type == "cuda":
        return max(16, min(128, 8192 // next_power_of_2(head_dim)))
    return next_power_of_2(max(span, 16))


@functools.lru_cache(maxsize=8)
def multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_splits(programs: int, blocks: int, device: torch.device) -> int:
    """Splits of each row and head's span for `programs` rows x heads: on CUDA as many as keep every
    multiprocessor busy (an H200 has 132; at batch 1 the 12 or 16 heads of a layer left the rest idle,
    and SDPA was twice as fast as the unsplit kernel: bench/RESULTS.md, "GPU"), at most one per block
    and MAX_SPLITS; else one."""
    if device.type != "cuda":
        return 1
    return max(1, min(blocks, MAX_SPLITS, multiprocessors(device) // max(programs, 1)))


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def sdpa_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   mask: torch.Tensor | Causal | None) -> torch.Tensor:
    """The reference: q (B, H, T, D) over keys and values (B, H_kv, S, D) -> (B, T, H * D)."""
    groups = q.shape[1] // keys.shape[1]
    causal = mask is CAUSAL
    o = F.scaled_dot_product_attention(q, repeat_kv(keys, groups), repeat_kv(values, groups),
                                       attn_mask=None if causal else mask, is_causal=causal)
    return o.transpose(1, 2).flatten(2)
