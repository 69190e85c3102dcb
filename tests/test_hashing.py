"""Hash n-gram ids: the spec's test vector and the int64 wrap-around arithmetic."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blt_runtime import encode
from blt_runtime.model.hashing import PRIMES, group_hash, hash_table_indices

# From ARCHITECTURE.md section 4: p = 1000000007, V = 500002, ids of BOS + b"Hello, world! BLT".
VECTOR_G3 = [443987, 124875, 393970, 386145, 358223, 190185, 141703, 484917, 141967, 146186, 10172,
             334275, 306354, 205291, 28827, 321247, 125336, 233820]
VECTOR_G8 = [172383, 205585, 456240, 129346, 299568, 322649, 430431, 246559, 94549, 155186, 258407,
             498251, 491201, 418709, 337801, 405809, 195358, 409281]


def test_spec_vector():
    ids = torch.tensor([encode(b"Hello, world! BLT")])
    assert group_hash(ids, 3, 1000000007, 500002)[0].tolist() == VECTOR_G3
    assert group_hash(ids, 8, 1000000007, 500002)[0].tolist() == VECTOR_G8


def _python_hash(window: list[int], prime: int, vocab: int) -> int:
    """Big-integer arithmetic reduced to signed int64 at the end: what wrap-around must equal."""
    total = sum(w * prime**m for m, w in enumerate(window)) % 2**64
    if total >= 2**63:
        total -= 2**64
    return total % vocab  # Python's % is floor modulo


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(0, 259), min_size=1, max_size=20), g=st.integers(1, 8),
       f=st.integers(0, len(PRIMES) - 1), vocab=st.integers(2, 600000))
def test_wraparound_matches_big_integers(ids, g, f, vocab):
    got = group_hash(torch.tensor([ids]), g, PRIMES[f], vocab)[0].tolist()
    padded = [0] * (g - 1) + ids
    want = [_python_hash(padded[t:t + g], PRIMES[f], vocab) for t in range(len(ids))]
    assert got == want


def test_table_offsets():
    ids = torch.tensor([encode("abc")])
    rows = hash_table_indices(ids, (3, 4), n_functions=2, vocab=7)
    assert rows.shape == (1, 4, 4)
    for j in range(4):  # table j = f * len(G) + gi lives at rows [j*V, (j+1)*V)
        assert bool(((rows[..., j] >= 7 * j) & (rows[..., j] < 7 * (j + 1))).all())
    assert torch.equal(rows[..., 3] - 21, group_hash(ids, 4, PRIMES[1], 7))


@settings(max_examples=40, deadline=None)
@given(ids=st.lists(st.integers(0, 259), min_size=1, max_size=30), new=st.integers(1, 30))
def test_all_tables_at_once(ids, new):
    """The vectorised form equals the per-group definition, also when hashing only the newest ids."""
    x = torch.tensor([ids])
    groups = (3, 4, 5, 6, 7, 8)
    rows = hash_table_indices(x, groups, n_functions=2, vocab=500002)
    for f in range(2):
        for gi, g in enumerate(groups):
            j = f * len(groups) + gi
            assert torch.equal(rows[..., j] - j * 500002, group_hash(x, g, PRIMES[f], 500002))
    new = min(new, len(ids))
    assert torch.equal(hash_table_indices(x, groups, 2, 500002, new=new), rows[:, -new:])
