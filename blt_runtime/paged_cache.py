"""The global model's keys and values in pages, each sequence holding only the patches it has.

A patch position p of a slot lives in page `table[slot, p // PAGE]`, at entry p % PAGE. Pages are handed
out as a sequence's patches need them (`reserve_rows`, which the engine calls before each step for the rows
whose patches it may write), so the cache takes the patches of all sequences together, not every slot times
the longest sequence (a 1B model's 64 slots at a full context of 24 KB would take 75 GiB that way). A page
that several slots see is shared, not copied: a prefix copied into another slot (`share`: shared prompts,
kept prefixes, a follower's fork) takes its pages by reference, and the page that holds a row's next
position is copied first where another slot sees it too (copy on write: pages below a row's length are
never written again, so only that page can be shared and written). Page 0 is never handed out: table
entries no page holds point there, and padding rows (the runner's scratch slot) write there.

The pool of pages is one tensor, seen through `kv` as (2, layers, pages, kv_heads, PAGE, head_dim): a slot's
row of a `KVCache` is a page here, so writes and the attention kernel take (page, entry) where they took
(slot, entry). It grows by doubling when pages run out, by smaller steps where that fails for want of memory
or would leave less than HEADROOM of a GPU free (the steps' activations and the CUDA graphs captured later
need it), and raises CacheFull when even the pages asked for cannot be had; or it is given its size once (`fix`: from
a byte budget or a share of the GPU's memory, pool_size.py) and never grows, raising CacheFull past it. The
table is on the device (the attention kernel and the step's reads look pages up there) and mirrored on the
host, which alone decides; the entries that change are copied up before the step that needs them (on a CPU
the two are one). Knows nothing about requests.
"""

from __future__ import annotations

import heapq
import time

import numpy as np
import torch

from . import cache
from . import device as devices
from .cache import CacheFull, KVCache, _grown, out_of_memory

PAGE = 16  # patches per page: a sequence leaves at most 15 entries of its last page unused
FIRST_PATCHES = 64  # the pool's first size: this many patches a slot
HEADROOM = 0.05  # of a GPU's memory, what a growing pool leaves free (a pool given its size: pool_size.py)


class PagedKVCache(KVCache):
    """A KVCache without a window whose rows hold pages (see the module's docstring). Reads, writes and the
    attention kernel take its `pages` (the device table and PAGE); `read` gathers a batch's pages, or where
    one slot's pages follow each other in the pool, reads them in place.

    The pool is stored (2, layers, kv_heads, pages, PAGE, head_dim), so that a head's entries in consecutive
    pages are one stretch of memory (what `read` takes in place), and seen through `kv` as (2, layers, pages,
    kv_heads, PAGE, head_dim), a KVCache's layout with pages for rows (what writes and the kernel take)."""

    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, max_len: int, device, dtype,
                 heads: int | None = None, page: int = PAGE, shared_table: bool | None = None):
        """`shared_table`: the device table is the host's memory (None: on a CPU, where nothing a step queued
        runs later); else changed entries are copied up (`_sync`)."""
        self.window, self.max_len, self.page = None, max_len, page
        self.rotations = None  # see KVCache
        self._refused: tuple[int, float] | None = None
        # table columns: every span a step reads, a power of two above the longest sequence at most
        self.columns = -(-(1 << (max_len + 2 - 1).bit_length()) // page)
        first = 1 + slots * max(1, FIRST_PATCHES // page)  # the null page, and the first patches of every slot
        self.pool = torch.zeros((2, layers, kv_heads, first, page, head_dim), device=device, dtype=dtype)
        self.split_counts = torch.zeros(slots * (heads or kv_heads), device=device, dtype=torch.int32)
        self.host = np.zeros((slots, self.columns), dtype=np.int32)
        if shared_table is None:
            shared_table = torch.device(device).type == "cpu"
        self.table = torch.from_numpy(self.host) if shared_table else \
            torch.zeros((slots, self.columns), dtype=torch.int32, device=device)
        self.shared_table = shared_table
        self.held = [0] * slots  # pages each slot holds: its columns 0 .. held - 1
        self.refs = np.zeros(first, dtype=np.int64)  # slots that hold each page
        self.free = list(range(1, first))  # a heap: the lowest free page is handed out first
        self._dirty: list[tuple[int, int, int]] = []  # (slot, first, end) columns the device has not seen
        self.fixed = False  # the pool was given its size (`fix`) and never grows

    def fix(self, pages: int) -> None:
        """From now on the pool is `pages` pages besides the null page, and never grows (past them, CacheFull).
        Only while no slot holds a page. The old pool is freed first (on CUDA given back to the device), so
        that its memory may be the new one's."""
        if pages < 1:
            raise ValueError(f"a pool of {pages} pages holds nothing")
        if any(self.held):
            raise RuntimeError(f"the pool's size is fixed only while no slot holds a page ({self.pages_held()} held)")
        shape, device, dtype = list(self.pool.shape), self.pool.device, self.pool.dtype
        shape[3] = 1 + pages
        del self.pool
        if device.type == "cuda":
            torch.cuda.empty_cache()
        self.pool = cache._allocate(torch.empty(0, device=device, dtype=dtype), shape)
        self.refs = np.zeros(1 + pages, dtype=np.int64)
        self.free = list(range(1, 1 + pages))
        self.fixed, self._refused = True, None

    @property
    def page_bytes(self) -> int:
        """What a page takes: keys and values of PAGE patches, every layer."""
        return self.pool.nbytes // self.num_pages

    def pages_for(self, positions: int) -> int:
        """Pages a sequence of that many patches holds."""
        return -(-positions // self.page)

    @property
    def kv(self) -> torch.Tensor:
        """The pool as (2, layers, pages, kv_heads, PAGE, head_dim): a view."""
        return self.pool.transpose(2, 3)

    @property
    def pages(self) -> tuple[torch.Tensor, int]:
        """What the attention kernel needs to find a position: the device table and the page size."""
        return self.table, self.page

    @property
    def capacity(self) -> int:
        """Entries a row's table spans: every span a step may read."""
        return self.columns * self.page

    @property
    def num_pages(self) -> int:
        return self.pool.shape[3]

    def reserve(self, length: int) -> None:
        """Nothing: rows hold pages by `reserve_rows`, which the engine calls for the rows it will write."""

    # ------------------------------------------------------------------ pages of rows
    def reserve_rows(self, rows: list[tuple[int, int, int]]) -> None:
        """Make each (slot, start, end) ready for positions start .. end - 1 to be written: pages up to the
        one that holds end - 1, and the pages from start's on the slot's alone (copied where another slot
        holds them too). All or nothing: where the pool cannot grow to the pages needed, CacheFull, with
        nothing changed."""
        wanted, copies = 0, []
        for slot, start, end in rows:
            if end <= start:
                continue
            if end > self.capacity:
                raise ValueError(f"position {end - 1} is past the global cache's {self.capacity} entries a row")
            shared = self._shared(slot, start)
            copies += [(slot, c) for c in shared]
            wanted += max(0, -(-end // self.page) - self.held[slot]) + len(shared)
        if wanted > len(self.free):
            self._grow(self.num_pages - len(self.free) + wanted)
        for slot, column in copies:
            old = int(self.host[slot, column])
            if self.refs[old] == 1:  # the other slots that held it copied it first (in this call)
                continue
            new = heapq.heappop(self.free)
            self.kv[:, :, new].copy_(self.kv[:, :, old])
            self.refs[old] -= 1
            self.refs[new] = 1
            self.host[slot, column] = new
            self._dirty.append((slot, column, column + 1))
        for slot, _, end in rows:
            held, needed = self.held[slot], -(-end // self.page)
            if needed > held:
                pages = [heapq.heappop(self.free) for _ in range(needed - held)]
                self.refs[pages] = 1
                self.host[slot, held:needed] = pages
                self.held[slot] = needed
                self._dirty.append((slot, held, needed))
        self._sync()

    def room(self, slot: int, start: int) -> int:
        """Positions from `start` on that the slot could write without the pool growing."""
        return max(0, (self.held[slot] + len(self.free) - len(self._shared(slot, start))) * self.page - start)

    def _shared(self, slot: int, start: int) -> list[int]:
        """The slot's columns from position `start`'s on whose pages another slot holds too (to copy before
        writing: only the column of `start` can be, see the module's docstring)."""
        return [c for c in range(start // self.page, self.held[slot]) if self.refs[self.host[slot, c]] > 1]

    def trim(self, slot: int, length: int) -> None:
        """The slot keeps its first `length` positions: the pages past them go back."""
        keep, held = -(-length // self.page), self.held[slot]
        if keep >= held:
            return
        pages = self.host[slot, keep:held].copy()  # (a slot holds a page once)
        self.refs[pages] -= 1
        for page in pages[self.refs[pages] == 0].tolist():
            heapq.heappush(self.free, page)
        self.host[slot, keep:held] = 0
        self.held[slot] = keep
        self._dirty.append((slot, keep, held))
        self._sync()

    def share(self, source: int, target: int, length: int) -> None:
        """Slot `target` holds what `source` holds at its first `length` positions: the same pages."""
        self.trim(target, 0)
        n = -(-length // self.page)
        pages = self.host[source, :n]
        self.refs[pages] += 1
        self.host[target, :n] = pages
        self.held[target] = n
        self._dirty.append((target, 0, n))
        self._sync()

    def pages_held(self) -> int:
        """Pages some slot holds (each once, however many share it)."""
        return self.num_pages - 1 - len(self.free)

    def _sync(self) -> None:
        """Copy the table entries that changed up to the device, in one index_put (between steps: what a step
        queued before reads the table as it was, in stream order). Nothing to copy with a shared table."""
        if not self._dirty or self.shared_table:
            self._dirty.clear()
            return
        flat = np.concatenate([np.arange(a, b) + slot * self.columns for slot, a, b in self._dirty])
        self._dirty.clear()
        values = self.host.reshape(-1)[flat]
        device = self.table.device
        self.table.view(-1)[torch.from_numpy(flat).to(device)] = torch.from_numpy(values).to(device)

    def grow(self, pages: int) -> None:
        """A pool of `pages` pages at least (a benchmark grows it before it times steps)."""
        if pages > self.num_pages:
            self._grow(pages)

    def _grow(self, needed: int) -> None:
        """At least `needed` pages: doubling, else smaller steps down to `needed` (not a size refused in the
        last cache.RETRY_REFUSED_S seconds); CacheFull if none can be had, or if the pool's size is fixed."""
        size = self.num_pages
        if self.fixed:
            raise CacheFull((needed - 1) * self.page, (size - 1) * self.page, None, self.page_bytes * needed,
                            fixed=True)
        refused = None
        if self._refused is not None and time.monotonic() - self._refused[1] < cache.RETRY_REFUSED_S:
            refused = self._refused[0]
        spare = devices.spare_memory(self.pool.device)
        if spare is not None:  # the new pool is allocated while the old one is still there
            most = int(spare[0] - HEADROOM * spare[1]) // self.page_bytes
            refused = most + 1 if refused is None else min(refused, most + 1)
        first = max(2 * size, needed)
        tries = sorted({first, size * 3 // 2, size * 5 // 4, needed}, reverse=True)
        for new_size in [n for n in tries if needed <= n <= first and (refused is None or n < refused)]:
            try:
                self.pool = _grown(self.pool, 3, new_size, cap=new_size)
            except Exception as e:  # noqa: BLE001 - only a failed allocation is tried again smaller
                if not out_of_memory(e):
                    raise
                self._refused = (new_size, time.monotonic())
                continue
            self.refs = np.concatenate([self.refs, np.zeros(new_size - size, dtype=self.refs.dtype)])
            self.free += range(size, new_size)
            heapq.heapify(self.free)
            return
        raise CacheFull((needed - 1) * self.page, (size - 1) * self.page, None, self.page_bytes * needed)

    # ------------------------------------------------------------------ reads and writes
    def addresses(self, rows: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(page, entry) of each slot's position, both like `positions`. Columns past the table (a padding
        row's positions, which the scratch slot takes) are read at its last."""
        columns = torch.clamp(torch.div(positions, self.page, rounding_mode="floor"), max=self.columns - 1)
        return self.table[rows, columns].long(), torch.remainder(positions, self.page)

    def host_address(self, slot: int, position: int) -> tuple[int, int]:
        return int(self.host[slot, position // self.page]), position % self.page

    def read(self, layer: int, slots: torch.Tensor | slice, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `span` positions of each row: (B, H_kv, span, D) each, gathered from their pages, or for
        one slot whose pages follow each other in the pool (a sequence alone, mostly), a view."""
        n = -(-span // self.page)
        pool = self.pool[:, layer]  # (2, H_kv, pages, PAGE, D)
        if isinstance(slots, slice) and slots.stop - slots.start == 1:
            first = int(self.host[slots.start, 0])
            if n == 1 or (np.diff(self.host[slots.start, :n]) == 1).all():
                both = pool[:, :, first:first + n].flatten(2, 3)[:, None, :, :span]
                return both[0], both[1]
        both = pool[:, :, self.table[slots, :n].long()]  # (2, H_kv, B, n, PAGE, D)
        both = both.transpose(1, 2).flatten(3, 4)[:, :, :, :span]
        return both[0], both[1]
