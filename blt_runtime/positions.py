"""Where a step's new positions go: their RoPE, attention mask and cache addresses (`Positions`),
worked out once per stack and shared by its layers (`positions_for`), and whether a batch's slots
read the caches in place (`consecutive`). Tensors only where the kernels need them (see
positions_for); knows nothing about requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import BAND_BLOCK_CPU, CAUSAL, Causal, ChunkBand, RotationTable, Visible
from .cache import KVCache, entry_positions
from .fused import EAGER, StepOps
from .model.layers import Stack


@dataclass
class Positions:
    """RoPE, attention mask and cache addresses for B rows of T new positions after `lengths` cached
    ones, shared by every layer of a stack."""

    slots: torch.Tensor  # (B,) cache rows of the batch
    read_slots: slice | None  # the same rows as a slice when they are consecutive (read in place)
    lengths: torch.Tensor  # (B,) positions cached before the new ones
    span: int  # cache entries to read
    rotation: torch.Tensor | RotationTable  # (B, T, 1, D/2) complex: RoPE is applied before heads are
    # transposed; or the cache's table, which the attention kernel reads at each row's length
    mask: torch.Tensor | Visible | ChunkBand | Causal | None  # (B, 1, T, keys) additive, or for the attention
    # kernel to work out (attention.Visible), or a long chunk's positions (attention.ChunkBand), or causal over
    # the chunk alone (attention.CAUSAL); None when every row sees every entry read
    write_rows: torch.Tensor  # (B, kept) slot of each new entry
    write_index: torch.Tensor | None  # (B, kept) cache index of each new entry; None: the attention
    # kernel works it out from each row's length (with a RotationTable)
    kept: int  # new entries stored (the last `window` of them at most)
    write_first: bool  # one new position: store it, then read the cache (no concatenation)
    write_at: tuple[int, int] | None  # (slot, cache index) of a single row's one new entry, known on the host
    min_length: int | None  # the shortest row's cached positions, when the host knows it
    real: torch.Tensor | None = None  # (B, T) bool: rows right-padded to T new positions (a batched prefill),
    # whose padding stores its entries in the scratch slot (`scratch`), never over a row's own
    scratch: int | None = None


def positions_for(stack: Stack, cache: KVCache, slots: torch.Tensor, lengths: torch.Tensor, T: int,
                  max_length: int, read_slots: slice | None = None, min_length: int | None = None,
                  ops: StepOps | None = None, kernels: str = "torch", real: torch.Tensor | None = None,
                  scratch: int | None = None) -> Positions:
    """`max_length` (and `min_length`, if given) bound `lengths` on the host. With one new position
    and min_length + 1 >= the entries read, every entry read is valid and inside every row's window
    (a full ring, or rows of equal length), so no mask is built. The tensors come from `ops`. With
    one new position and Triton `kernels`, the attention kernel works the mask out itself
    (attention.Visible): none is built; and where the cache has a RotationTable (the runner makes
    one for Triton kernels), it also rotates by the table and finds the entries to store, so no
    tensor is built at all. `real` (B, T): which new positions are real in right-padded rows; the
    padding's entries go to the `scratch` slot."""
    # With one new position a ring buffer can take it first: it overwrites exactly the entry that
    # just left the window. Several new positions would overwrite keys that earlier ones still see.
    write_first = T == 1
    span = cache.span(max_length + 1 if write_first else max_length)
    table = cache.rotations
    if write_first and kernels != "torch" and table is not None and max_length < table.table.shape[0]:
        # the attention kernel rotates by the table's row and stores at the entry of each row's new
        # position, both from its length, and works out the mask: nothing to compute here
        return Positions(slots, read_slots, lengths, span, table, Visible(lengths, cache.window, stack.cfg.window),
                         slots[:, None], None, 1, True, None, min_length)
    masked = not (write_first and min_length is not None and min_length + 1 >= span)
    in_kernel = masked and write_first and kernels != "torch"
    # a chunk of more than two blocks is attended a block of queries at a time (attention.ChunkBand): on a CPU
    # blocks of 64, a third less work than the whole mask's; on CUDA, where each block is a few more kernels,
    # a window's (bench/RESULTS.md)
    window = stack.cfg.window
    block = window if window is None or cache.kv.device.type == "cuda" else min(BAND_BLOCK_CPU, window)
    banded = window is not None and 2 * block < T
    # a chunk from position 0 (nothing cached) inside the window: causal, which SDPA applies itself; its rows,
    # right-padded in a batch, see none of the padding after them
    causal = not write_first and max_length == 0 and (stack.cfg.window is None or stack.cfg.window >= T)
    kept = T if cache.window is None else min(T, cache.window)
    rotation, mask, index = (ops or EAGER).positions(
        lengths, T, span, kept, masked and not in_kernel and not banded and not causal, cache.window, stack.cfg.window,
        stack.cfg.head_dim, stack.cfg.rope_theta, cache.kv.dtype)
    if in_kernel:
        mask = Visible(lengths, cache.window, stack.cfg.window)
    if causal:
        mask = CAUSAL
    if banded:
        new = lengths[:, None] + torch.arange(T, device=lengths.device)[None, :]
        keys = torch.cat([entry_positions(lengths, span, cache.window), new], dim=1)
        mask = ChunkBand.of(keys, span, window, block, cache.kv.dtype)
    rows = slots[:, None].expand_as(index)
    if real is not None:
        rows = torch.where(real[:, T - kept:], rows, scratch)
    if cache.pages is not None:  # a cache of pages: the page and entry of each slot's position
        rows, index = cache.addresses(rows, index)
    write_at = None
    if write_first and read_slots is not None and read_slots.stop - read_slots.start == 1 and min_length == max_length:
        write_at = (read_slots.start, max_length if cache.window is None else max_length % cache.window)
        if cache.pages is not None:
            write_at = cache.host_address(*write_at)
    return Positions(slots, read_slots, lengths, span, rotation, mask, rows, index, kept, write_first,
                     write_at, min_length, real, scratch)


def consecutive(slots: list[int]) -> slice | None:
    """The slots as a slice when they are consecutive, so caches are read in place."""
    if slots == list(range(slots[0], slots[0] + len(slots))):
        return slice(slots[0], slots[0] + len(slots))
    return None
