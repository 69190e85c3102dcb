"""Preallocated per-slot caches for incremental generation, and the slot allocator.

Owns:
- `KVCache`: keys and values of one stack's self-attention for every slot. With a sliding window it
  is a ring buffer of `window` entries (position p lives at p % window), so the memory of a sequence
  is bounded by the window, not by its length. Without one (a local model without a window) position
  p lives at p, and the capacity grows by doubling as the longest sequence needs it, up to `max_len`.
  The global model's cache is one of pages (paged_cache.py), built on this one.
- `RowBuffer`: per-slot rows of vectors that grow the same way (the open patch's byte states).
- `SlotAllocator`: which slots are free.
- `CacheFull`: a cache could not grow (out of memory). When doubling fails, a cache tries smaller steps
  down to what is needed before it gives up.
Reading and writing take the rows of a batch (`slots`) and the number of positions each row
already holds (`lengths`). Knows nothing about what the vectors mean.
"""

from __future__ import annotations

import time

import torch

from .errors import BltError

RETRY_REFUSED_S = 10.0  # a size whose allocation failed is not tried again for this long


class CacheFull(BltError):
    """A cache could not grow to hold `needed` positions in every row: the allocation failed for want
    of memory, at every size tried."""

    def __init__(self, needed: int, capacity: int, rows: int | None, bytes_needed: int, fixed: bool = False):
        """`rows` None: a cache of pages (paged_cache.py), whose patches are those of all sequences together;
        `fixed`: its pool was given its size once and never grows (PagedKVCache.fix)."""
        self.needed, self.capacity, self.bytes_needed = needed, capacity, bytes_needed
        where = "for all sequences together" if rows is None else f"in each of its {rows} rows"
        if fixed:
            super().__init__(f"out of memory: the global model's cache is full: its pool of a fixed size holds "
                             f"{capacity:,} patches {where}, and {needed:,} were asked for "
                             f"({bytes_needed / 2**20:,.1f} MiB)")
            return
        super().__init__(f"out of memory: the global model's cache could not grow from {capacity:,} to {needed:,} "
                         f"patches {where} ({bytes_needed / 2**20:,.1f} MiB)")


def out_of_memory(e: BaseException) -> bool:
    """A failed allocation: CUDA's OutOfMemoryError, or the CPU allocator's."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and "can't allocate memory" in str(e)


def _allocate(like: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """Zeros of `shape` like `like` (the one allocation a growth makes; tests make it fail)."""
    return like.new_zeros(shape)


def _grown(t: torch.Tensor, dim: int, needed: int, cap: int | None = None) -> torch.Tensor:
    """`t` with dimension `dim` at least `needed`, doubling (but not past `cap` unless needed); old contents
    kept."""
    size = t.shape[dim]
    if needed <= size:
        return t
    new_size = max(2 * size, 16) if cap is None else min(max(2 * size, 16), cap)
    new_size = max(new_size, needed)
    shape = list(t.shape)
    shape[dim] = new_size
    out = _allocate(t, shape)
    out.narrow(dim, 0, size).copy_(t)
    return out


class KVCache:
    pages: tuple[torch.Tensor, int] | None = None  # a cache of pages' table and page size (paged_cache.py)

    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, window: int | None,
                 max_len: int, device, dtype, heads: int | None = None):
        self.window = window
        self.max_len = max_len
        capacity = window if window is not None else min(max_len, 64)
        # keys and values in one tensor, (2, layers, slots, kv_heads, capacity, head_dim): a step that
        # gathers its rows reads both with one kernel
        self.kv = torch.zeros((2, layers, slots, kv_heads, capacity, head_dim), device=device, dtype=dtype)
        # attention.RotationTable of the positions it holds, set by a runner whose attention kernel
        # rotates each new position by it (positions.positions_for); None otherwise
        self.rotations = None
        # where the splits of the attention kernel's (row, query head) meet (attention.decode_attention's
        # `counts`): zeroed, and left zeroed by every kernel; one set per cache, since the kernels of two
        # stacks may run at once (static.py's two CUDA streams), those of one stack never do
        self.split_counts = torch.zeros(slots * (heads or kv_heads), device=device, dtype=torch.int32)
        self._refused: tuple[int, float] | None = None  # the smallest capacity refused (out of memory), and when

    @property
    def k(self) -> torch.Tensor:
        """(layers, slots, kv_heads, capacity, head_dim) keys (a view)."""
        return self.kv[0]

    @property
    def v(self) -> torch.Tensor:
        return self.kv[1]

    def reserve(self, length: int) -> None:
        """Make room for positions < length (no-op for a ring buffer). Where doubling runs out of memory,
        smaller steps are tried, down to `length` rounded up to 64 entries and then `length` itself; if that
        fails too, CacheFull (and the cache is as it was). A size refused is not tried again for
        RETRY_REFUSED_S seconds: on CUDA a failed allocation empties the allocator's cache and waits for
        the device, and a prefill near the limit would try again at every step."""
        size = self.kv.shape[4]
        if self.window is not None or length <= size:
            return
        refused = None
        if self._refused is not None and time.monotonic() - self._refused[1] < RETRY_REFUSED_S:
            refused = self._refused[0]
        # doubling, but never more than a sequence can hold (a patch is a byte at least); then smaller steps
        first = max(min(max(2 * size, 16), self.max_len), length)
        tries = sorted({first, size * 3 // 2, size * 5 // 4, -(-length // 64) * 64, length}, reverse=True)
        for new_size in [n for n in tries if length <= n <= first and (refused is None or n < refused)]:
            try:
                self.kv = _grown(self.kv, 4, new_size, cap=new_size)
                return
            except Exception as e:  # noqa: BLE001 - only a failed allocation is tried again smaller
                if not out_of_memory(e):
                    raise
                self._refused = (new_size, time.monotonic())
        raise CacheFull(length, size, self.kv.shape[2], self.kv.nbytes // size * length)

    def read(self, layer: int, slots: torch.Tensor | slice, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `span` entries of each row: (B, H_kv, span, D) keys and values. A slice of
        consecutive slots reads in place; a tensor of slots gathers a copy of both."""
        if isinstance(slots, slice):
            return self.kv[0, layer, slots, :, :span], self.kv[1, layer, slots, :, :span]
        both = self.kv[:, layer, :, :, :span].index_select(1, slots)
        return both[0], both[1]

    def span(self, max_length: int) -> int:
        """How many entries a batch whose longest row holds `max_length` positions must read."""
        return min(max_length, self.window) if self.window is not None else max_length

    def write(self, layer: int, rows: torch.Tensor, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              at: tuple[int, int] | None = None, kv: torch.Tensor | None = None) -> None:
        """Store new keys/values (B, H_kv, T, D) at (rows, index), both (B, T) (see index_of). `at`:
        the (slot, index) of a single new entry, when the host knows it (a plain copy, no gather).
        `kv`: the same keys and values side by side, (B, T, 2, H_kv, D), stored with one copy."""
        if kv is not None:
            if at is not None:
                self.kv[:, layer, at[0], :, at[1]].copy_(kv[0, 0])
            else:
                self.kv[:, layer][:, rows, :, index] = kv
            return
        if at is not None:
            self.k[layer, at[0], :, at[1]].copy_(k[0, :, 0])
            self.v[layer, at[0], :, at[1]].copy_(v[0, :, 0])
            return
        self.k[layer][rows, :, index] = k.transpose(1, 2)
        self.v[layer][rows, :, index] = v.transpose(1, 2)


def entry_positions(lengths: torch.Tensor, span: int, window: int | None) -> torch.Tensor:
    """(B, span) absolute position held by each of a cache's first `span` entries, given each row's
    length and the cache's window (None: position p at entry p); -1 if empty."""
    i = torch.arange(span, device=lengths.device)[None, :]
    n = lengths[:, None]
    if window is None:
        return torch.where(i < n, i, -1)
    pos = n - 1 - torch.remainder(n - 1 - i, window)
    return torch.where(pos >= 0, pos, -1)


def index_of(positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """Cache entry that holds each absolute position."""
    return positions if window is None else torch.remainder(positions, window)


class RowBuffer:
    """(slots, capacity, dim) vectors per slot, each slot filled from 0 up to its own length."""

    def __init__(self, slots: int, dim: int, device, dtype, capacity: int = 64):
        self.data = torch.zeros(slots, capacity, dim, device=device, dtype=dtype)

    def reserve(self, length: int) -> None:
        self.data = _grown(self.data, 1, length)

    def write(self, slots: torch.Tensor, starts: torch.Tensor, values: torch.Tensor) -> None:
        """values (B, T, dim) at rows `slots`, offsets starts .. starts+T-1."""
        T = values.shape[1]
        idx = starts[:, None] + torch.arange(T, device=starts.device)[None, :]
        self.data[slots[:, None].expand_as(idx), idx] = values


class SlotAllocator:
    """Pure bookkeeping: the lowest free slot first, so that batches stay dense at the start."""

    def __init__(self, slots: int):
        self.free = list(range(slots))

    def allocate(self) -> int | None:
        if not self.free:
            return None
        self.free.sort()
        return self.free.pop(0)

    def take(self, slot: int) -> int:
        """Hand out that free slot."""
        self.free.remove(slot)
        return slot

    def release(self, slot: int) -> None:
        if slot in self.free:
            raise ValueError(f"slot {slot} released twice")
        self.free.append(slot)

    @property
    def num_free(self) -> int:
        return len(self.free)
