"""The patch-start rule and the prefix property."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blt_runtime.patcher import layout_from_starts, patch_starts


def _reference_lengths(entropies: list[float], threshold: float) -> list[int]:
    """Plain-Python statement of the rule, with transformers' trailing "next byte" patch."""
    L = len(entropies)
    starts = [0] + ([1] if L >= 1 else []) + [t + 1 for t in range(1, L) if entropies[t] > threshold]
    ends = starts[1:] + [L]
    return [e - s for s, e in zip(starts, ends)]


entropy_lists = st.lists(st.floats(0, 5.5, width=32), min_size=1, max_size=60)


@settings(max_examples=200, deadline=None)
@given(entropies=entropy_lists, threshold=st.floats(0, 5.5, width=32))
def test_rule_matches_reference(entropies, threshold):
    layout = layout_from_starts(patch_starts(torch.tensor([entropies]), threshold))
    assert layout.lengths[0].tolist() == _reference_lengths(entropies, threshold)
    assert int(layout.lengths.sum()) == len(entropies)


@settings(max_examples=200, deadline=None)
@given(entropies=entropy_lists, threshold=st.floats(0, 5.5, width=32), data=st.data())
def test_prefix_property(entropies, threshold, data):
    """The patches of a prefix never change when bytes are appended (only the open one grows)."""
    cut = data.draw(st.integers(1, len(entropies)))
    full = layout_from_starts(patch_starts(torch.tensor([entropies]), threshold))
    prefix = layout_from_starts(patch_starts(torch.tensor([entropies[:cut]]), threshold))
    assert torch.equal(prefix.patch_ids, full.patch_ids[:, :cut])
    assert torch.equal(prefix.decoder_patch_ids, full.decoder_patch_ids[:, :cut])
    completed = int(prefix.decoder_patch_ids[0, -1]) + 1  # patches closed once byte cut-1 is seen
    closed = prefix.lengths[0, :completed].tolist()
    assert closed == full.lengths[0, :len(closed)].tolist()


def test_decoder_reads_latest_completed_patch():
    # Patch starts at 0, 1, 3 (H[2] > thr); the last byte's entropy is high, so byte 3 completes patch 2.
    layout = layout_from_starts(patch_starts(torch.tensor([[9.0, 0.0, 9.0, 9.0]]), 1.0))
    assert layout.patch_ids[0].tolist() == [0, 1, 1, 2]
    assert layout.lengths[0].tolist() == [1, 2, 1, 0]
    assert layout.decoder_patch_ids[0].tolist() == [0, 0, 1, 2]
