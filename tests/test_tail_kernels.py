"""tail_kernels.py, in Triton's interpreter, against the eager end of a static byte step: sampling.sample
for greedy rows and the bookkeeping after it; entropy_nats and patcher.starts_next."""

import pytest
import torch
from interpreter import interpreted

from blt_runtime.model.entropy import entropy_nats
from blt_runtime.patcher import starts_next
from blt_runtime.sampling import SamplingBatch, SamplingParams, never_sampled, sample
from blt_runtime.tail_kernels import entropy_flags, greedy_pick
from blt_runtime.tokenizer import EOS_ID

V = 260


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_pick_equals_sample_and_its_bookkeeping(dtype):
    g = torch.Generator().manual_seed(3)
    B, slots = 6, torch.tensor([4, 0, 2, 5, 1, 3])
    logits = (torch.randn(B, V, generator=g) * 3).to(dtype)
    logits[0, EOS_ID] = 50.0  # EOS the best: taken where allowed (row 0), skipped where not (row 1)
    logits[1, EOS_ID] = 50.0
    logits[2, 7] = logits[2, 9] = 40.0  # equal maxima: the first, as torch.argmax
    logits[3, 0] = 60.0  # a special id never sampled, however likely
    allow_eos = torch.tensor([1, 0, 1, 0, 1, 1])
    counts, seen = torch.zeros(7, V), torch.zeros(7, V, dtype=torch.bool)
    counts[slots[4], 100:110] = 2
    seen[slots[5], 50] = True
    embed = torch.randn(V, 24, generator=g).to(dtype)

    params = [SamplingParams(temperature=0.0, ignore_eos=not a) for a in allow_eos.tolist()]
    batch = SamplingBatch.build(params, [0] * B, "cpu")
    want = sample(logits, batch, torch.arange(B), counts[slots], seen[slots], EOS_ID)
    want_counts, want_seen = counts.clone(), seen.clone()
    want_counts[slots, want] += 1
    want_seen[slots, want] = True

    out = torch.full((B, 2), -1.0, dtype=torch.float64)
    ids, embedded = greedy_pick(logits, allow_eos, never_sampled(V, torch.device("cpu")), counts, seen, slots,
                                embed, EOS_ID, out)
    assert torch.equal(ids, want)
    assert ids[0] == EOS_ID and ids[1] != EOS_ID and ids[2] == 7 and ids[3] != 0
    assert torch.equal(counts, want_counts) and torch.equal(seen, want_seen)
    assert torch.equal(out[:, 0], want.double()) and (out[:, 1] == -1).all()
    assert torch.equal(embedded, embed[want][:, None])


@interpreted
def test_entropy_flags_equal_starts_next():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(8, V, generator=g) * torch.tensor([0.1, 1, 3, 10, 0.1, 1, 3, 10])[:, None]
    entropy = entropy_nats(logits)
    threshold = float(entropy.sort().values[3:5].mean())  # half above, half below, none near it
    positions = torch.tensor([1, 5, 9, 0, 7, 4, 3, 2])  # row 3: a low entropy at position 0
    out = torch.full((8, 2), -1.0, dtype=torch.float64)
    entropy_flags(logits, positions, threshold, out)
    want = starts_next(entropy, positions, threshold)
    assert want.any() and not want.all() and (want != (entropy > threshold)).any()  # position 0 decides one
    assert torch.equal(out[:, 1], want.double()) and (out[:, 0] == -1).all()
    # and the entropy itself, to within 1e-5 relative: just below each row's it flags it, just above not
    for below, flagged in ((1 - 1e-5, 1.0), (1 + 1e-5, 0.0)):
        for i in (1, 2, 4, 6):
            entropy_flags(logits, positions, float(entropy[i]) * below, out)
            assert out[i, 1] == flagged, (i, below)


@interpreted
def test_tail_kernels_refuse_wrong_dtypes():
    out = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="fp32"):
        entropy_flags(torch.zeros(2, V, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.long), 1.0, out)
    with pytest.raises(ValueError, match="float64"):
        greedy_pick(torch.zeros(2, V), torch.ones(2), never_sampled(V, torch.device("cpu")), torch.zeros(2, V),
                    torch.zeros(2, V, dtype=torch.bool), torch.arange(2), torch.zeros(V, 4), EOS_ID, out.float())
