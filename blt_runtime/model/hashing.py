"""Hash n-gram ids for the local encoder's input embeddings (spec section 4).

For each hash function f and group size g, the window of the last g ids (oldest first, zero-padded
before position 0) is hashed as sum(w_m * p_f^m) in signed 64-bit arithmetic with two's-complement
wrap-around, then floor-modulo the table size. The result indexes table j = f * len(G) + gi of the
concatenated `[F * len(G) * V, d]` embedding, so each is offset by j * V.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PRIMES = (
    1000000007, 5915587277, 1500450271, 3267000013, 5754853343, 4093082899,
    9576890767, 3628273133, 2860486313, 5463458053, 3367900313,
)


def _wrap_int64(x: int) -> int:
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


def prime_powers(prime: int, group_size: int) -> list[int]:
    """p^0 .. p^(g-1) as int64 values with wrap-around, as the reference computes them."""
    return [_wrap_int64(prime**m) for m in range(group_size)]


def group_hash(ids: torch.Tensor, group_size: int, prime: int, vocab: int) -> torch.Tensor:
    """Hash of every position's trailing window. ids (B, L) int64 -> (B, L) in [0, vocab)."""
    padded = F.pad(ids, (group_size - 1, 0), value=0)
    windows = padded.unfold(1, group_size, 1)  # (B, L, g), oldest id first
    powers = torch.tensor(prime_powers(prime, group_size), dtype=torch.int64, device=ids.device)
    hashes = (windows * powers).sum(dim=-1)  # int64 arithmetic wraps around
    return torch.remainder(hashes, vocab)  # floor modulo, result in [0, vocab)


def power_matrix(group_sizes: tuple[int, ...], n_functions: int, device=None) -> torch.Tensor:
    """(n_tables, max_g) int64: row j = f * len(G) + gi holds p_f^0 .. p_f^(g-1) aligned to the end of a
    window of the last max_g ids (its oldest id gets p^0), zeros before; table j's hash of that window
    is then sum(window * row)."""
    width = max(group_sizes)
    rows = []
    for f in range(n_functions):
        for g in group_sizes:
            rows.append([0] * (width - g) + prime_powers(PRIMES[f], g))
    return torch.tensor(rows, dtype=torch.int64, device=device)


def hash_table_indices(ids: torch.Tensor, group_sizes: tuple[int, ...], n_functions: int, vocab: int,
                       powers: torch.Tensor | None = None, new: int | None = None) -> torch.Tensor:
    """Row indices into the concatenated hash table for every table at once.

    ids (B, L) -> (B, L, n_tables); positions before 0 count as id 0. With `new`, only the last `new`
    positions are hashed and ids[:, :-new] is their context (the engine passes the previous ids)."""
    if powers is None:
        powers = power_matrix(group_sizes, n_functions, ids.device)
    width = powers.shape[1]
    new = ids.shape[1] if new is None else new
    context = ids[:, -(new + width - 1):]
    padded = F.pad(context, (width - 1 + new - context.shape[1], 0), value=0)
    windows = padded.unfold(1, width, 1)  # (B, new, width), oldest id first
    hashes = (windows[:, :, None, :] * powers).sum(dim=-1)  # int64 arithmetic wraps around
    offsets = torch.arange(powers.shape[0], device=ids.device) * vocab
    return torch.remainder(hashes, vocab) + offsets


def embed_with_hashes(ids: torch.Tensor, new: int, powers: torch.Tensor, hash_table: torch.Tensor,
                      byte_table: torch.Tensor, vocab: int) -> torch.Tensor:
    """The local encoder's input for the last `new` ids of (B, C) `ids` (the earlier ones their hash
    context): each id's byte embedding plus the sum of its hash embeddings over the tables, from the
    (tables * vocab, d) hash table and (bytes, d) byte table. -> (B, new, d)."""
    rows = hash_table_indices(ids, (), 0, vocab, powers, new)
    return F.embedding(ids[:, -new:], byte_table) + F.embedding(rows, hash_table).sum(dim=-2)
