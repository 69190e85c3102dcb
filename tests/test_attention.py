"""The Triton decode-attention kernel (attention.py) computes SDPA's single-query attention.

Here it runs in Triton's interpreter on the CPU (tests/interpreter.py); on a GPU, tests/gpu and
bench/gpu_check.py run the compiled kernel. Kernel against SDPA on random inputs with every feature
a step uses. Compiled for a Hopper GPU, and whole engines: tests/test_kernels.py. And a long prefill
chunk's attention a window of queries at a time (band_attention) against SDPA under the whole mask.
"""

import pytest
import torch
from interpreter import interpreted

from blt_runtime.attention import (
    CAUSAL,
    ChunkBand,
    RotationTable,
    Visible,
    band_attention,
    decode_attention,
    sdpa_attention,
)
from blt_runtime.cache import entry_positions
from blt_runtime.fused import EAGER, additive_mask
from blt_runtime.model.layers import rope_rotation


def cache_and_query(B, H, H_kv, D, slots, capacity, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(2, 3, slots, H_kv, capacity, D, generator=g).to(dtype)
    q = torch.randn(B, H, 1, D, generator=g).to(dtype)
    return kv, q


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H, H_kv, D, span", [(4, 4, 64, 512), (4, 2, 48, 70), (2, 1, 128, 1), (3, 3, 16, 129)])
@pytest.mark.parametrize("rows", ["gathered", "consecutive"])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("block, splits", [(None, None), (32, None), (32, 3)])
def test_kernel_equals_sdpa(dtype, H, H_kv, D, span, rows, masked, block, splits):
    """Gathered slots (in any order, repeated) or consecutive ones read in place; an additive mask with
    windows of visible entries (some rows seeing one entry), or none; grouped heads; head sizes and
    spans that are not powers of two or multiples of the block; the whole span in one block (the
    interpreter's default) or many (as on a GPU: the running softmax across blocks, blocks that
    are wholly masked); and the span split among programs, combined by a second kernel (a GPU's at
    few rows: splits with nothing visible, a last split shorter than the others)."""
    B = 3
    kv, q = cache_and_query(B, H, H_kv, D, 6, 520, dtype, seed=H * D + span)
    picked = torch.tensor([5, 0, 5]) if rows == "gathered" else slice(2, 5)
    mask = None
    if masked:
        mask = torch.zeros(B, 1, 1, span, dtype=dtype)
        mask[0, ..., :span // 2] = float("-inf")
        mask[1, ..., :span - 1] = float("-inf")  # the newest entry alone
    got = decode_attention(q, kv, 1, picked, span, mask, block, splits=splits)
    read = kv[:, 1, picked, :, :span]
    want = sdpa_attention(q, read[0], read[1], mask)
    assert got.shape == (B, 1, H * D) and got.dtype == dtype
    tolerance = 2e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H, H_kv", [(4, 4), (4, 2)])
@pytest.mark.parametrize("rows", ["gathered", "consecutive"])
@pytest.mark.parametrize("splits", [None, 4])
def test_kernel_stores_then_attends(dtype, H, H_kv, rows, splits):
    """With `store`, the kernel leaves the cache and the output as KVCache.write followed by SDPA over
    the rows read: new entries at ring indices inside and outside the first block, a padding row
    that writes to the scratch slot (5) while it reads another row, grouped heads (stored once); with
    the span split, the new entries fall in the first, third and fourth splits (stored by the
    first, read from registers by each)."""
    B, D, span = 3, 32, 100
    kv, q = cache_and_query(B, H, H_kv, D, 6, 128, dtype, seed=H + H_kv)
    g = torch.Generator().manual_seed(1)
    k_new = torch.randn(B, H_kv, 1, D, generator=g).to(dtype)
    v_new = torch.randn(B, H_kv, 1, D, generator=g).to(dtype)
    picked = torch.tensor([3, 0, 1]) if rows == "gathered" else slice(1, 4)
    write_rows = torch.tensor([3, 0, 5] if rows == "gathered" else [1, 2, 5])[:, None]
    write_index = torch.tensor([[2], [70], [99]])
    mask = torch.zeros(B, 1, 1, span, dtype=dtype)
    mask[0, ..., 50:] = float("-inf")
    want_kv = kv.clone()
    want_kv[:, 1][:, write_rows, :, write_index] = torch.stack((k_new, v_new), dim=1).permute(0, 3, 1, 2, 4)
    read = want_kv[:, 1, picked, :, :span]
    want = sdpa_attention(q, read[0], read[1], mask)
    got = decode_attention(q, kv, 1, picked, span, mask, 32, store=(k_new, v_new, write_rows, write_index),
                           splits=splits)
    assert torch.equal(kv, want_kv)
    tolerance = 2e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H, H_kv, D", [(4, 4, 32), (4, 2, 48)])
def test_kernel_rotates_queries_and_keys(dtype, H, H_kv, D):
    """With `rotation`, q and the new key come unrotated, as views of the qkv projection, and the
    kernel gives what the eager step does: StepOps.heads (RoPE in fp32, rounded back), the store,
    SDPA. Positions differ per row; the rotated key lands in the cache."""
    B, span = 3, 80
    kv, _ = cache_and_query(B, H, H_kv, D, 5, 96, dtype, seed=D)
    qkv = torch.randn(B, 1, (H + 2 * H_kv) * D, generator=torch.Generator().manual_seed(2)).to(dtype)
    lengths = torch.tensor([3, 40, 79])
    rotation = rope_rotation(lengths[:, None], D, 10000.0)[:, :, None]  # as StepOps.positions makes it
    write_rows, write_index = torch.tensor([[4], [0], [2]]), lengths[:, None]
    q, k, v, _ = EAGER.heads(qkv, rotation, H, H_kv, D)
    want_kv = kv.clone()
    want_kv[:, 1][:, write_rows, :, write_index] = torch.stack((k, v), dim=1).permute(0, 3, 1, 2, 4)
    read = want_kv[:, 1, [4, 0, 2], :, :span]
    mask = torch.zeros(B, 1, 1, span, dtype=dtype)
    mask[0, ..., 4:] = float("-inf")
    want = sdpa_attention(q, read[0], read[1], mask)
    q_raw, k_raw, v_raw = qkv.unflatten(-1, (-1, D)).transpose(1, 2).split([H, H_kv, H_kv], 1)
    got = decode_attention(q_raw, kv, 1, torch.tensor([4, 0, 2]), span, mask, 32,
                           store=(k_raw, v_raw, write_rows, write_index), rotation=rotation)
    assert torch.equal(kv, want_kv)
    tolerance = 2e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)
    with pytest.raises(ValueError, match="rotation must be"):
        decode_attention(q_raw, kv, 1, torch.tensor([4, 0, 2]), span, mask, rotation=rotation[:, :, :, :4])


@interpreted
@pytest.mark.parametrize("cache_window, stack_window, span", [(None, None, 40), (None, 8, 40), (16, None, 16),
                                                                (16, 6, 16), (16, None, 9)])
@pytest.mark.parametrize("splits", [None, 5])
def test_kernel_works_out_the_mask(cache_window, stack_window, span, splits):
    """attention.Visible: the kernel decides from each row's length which entries it sees, as the
    additive mask of fused.StepOps.positions does: rows of length 0, shorter than the span, and
    rings that have wrapped (entries holding positions before the stack's window); the new entry
    stored first."""
    B, H, D = 5, 2, 16
    kv, q = cache_and_query(B, H, H, D, 6, 48, torch.float32, seed=span)
    lengths = torch.tensor([0, 3, span - 1, 37, 20 if cache_window else 39])
    index = lengths[:, None] if cache_window is None else lengths[:, None] % cache_window
    new = torch.randn(2, B, H, 1, D, generator=torch.Generator().manual_seed(3))
    visible = Visible(lengths, cache_window, stack_window)
    want_kv = kv.clone()
    want_kv[:, 1][:, torch.arange(B)[:, None], :, index] = new.permute(1, 3, 0, 2, 4)
    read = want_kv[:, 1, 0:B, :, :span]
    want = sdpa_attention(q, read[0], read[1], visible.additive(span, torch.float32))
    got = decode_attention(q, kv, 1, slice(0, B), span, visible, 8, store=(new[0], new[1], torch.arange(B)[:, None],
                                                                             index), splits=splits)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)


@interpreted
@pytest.mark.parametrize("cache_window, splits", [(None, None), (None, 4), (16, None), (16, 3)])
def test_kernel_reads_nothing_past_each_rows_new_position(cache_window, splits):
    """With a Visible mask a row reads its entries up to its new position's and stops: a row shorter
    than the span (a ring not yet full, the global cache's power-of-two span) reads only what it
    holds. NaN past that entry, which any read would carry into the result (a weight of zero times
    NaN), changes nothing; the splits that lie wholly past it read nothing and weigh nothing."""
    B, H, D, span = 3, 2, 16, 16
    kv, q = cache_and_query(B, H, H, D, 4, 48, torch.float32, seed=11)
    lengths = torch.tensor([0, 5, 12])
    visible = Visible(lengths, cache_window, None)
    clean = decode_attention(q, kv, 1, slice(0, B), span, visible, 4, splits=splits)
    for b, length in enumerate(lengths.tolist()):
        kv[:, 1, b, :, length + 1:] = float("nan")
    got = decode_attention(q, kv, 1, slice(0, B), span, visible, 4, splits=splits)
    assert not got.isnan().any() and torch.equal(got, clean)
    want = sdpa_attention(q, kv[0, 1, :B, :, :span].nan_to_num(), kv[1, 1, :B, :, :span].nan_to_num(),
                          visible.additive(span, torch.float32))
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache_window, stack_window", [(None, None), (16, 16), (16, 6)])
def test_kernel_rotates_and_stores_at_each_rows_length(dtype, cache_window, stack_window):
    """With a RotationTable and no write index (what a step passes when its cache has a table), the
    kernel rotates by the table's row at each row's length and stores at that position's entry (a
    ring's entry for rings that have wrapped): the same cache and result as the rotation and index
    the step would compute (StepOps.positions), bit for bit."""
    B, H, H_kv, D = 4, 4, 2, 32
    span = cache_window or 48
    kv, _ = cache_and_query(B, H, H_kv, D, 5, 48, dtype, seed=7)
    qkv = torch.randn(B, 1, (H + 2 * H_kv) * D, generator=torch.Generator().manual_seed(4)).to(dtype)
    lengths = torch.tensor([0, 5, 40, 47])
    q_raw, k_raw, v_raw = qkv.unflatten(-1, (-1, D)).transpose(1, 2).split([H, H_kv, H_kv], 1)
    rows = torch.tensor([[4], [0], [2], [1]])
    visible = Visible(lengths, cache_window, stack_window)
    stepped = kv.clone()
    rotation = rope_rotation(lengths[:, None], D, 10000.0)[:, :, None]
    index = lengths[:, None] if cache_window is None else lengths[:, None] % cache_window
    want = decode_attention(q_raw, stepped, 1, rows[:, 0], span, visible, 16, store=(k_raw, v_raw, rows, index),
                            rotation=rotation)
    table = RotationTable.of(64, D, 10000.0, torch.device("cpu"))
    assert torch.equal(torch.view_as_complex(table.table[lengths])[:, None, None], rotation)
    got = decode_attention(q_raw, kv, 1, rows[:, 0], span, visible, 16, store=(k_raw, v_raw, rows, None),
                           rotation=table)
    assert torch.equal(kv, stepped) and torch.equal(got, want)
    with pytest.raises(ValueError, match="Visible"):
        decode_attention(q_raw, kv, 1, rows[:, 0], span, None, rotation=table)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [3, 16])
@pytest.mark.parametrize("rows", ["gathered", "consecutive"])
def test_splits_meet_in_one_kernel(dtype, splits, rows):
    """Given counters (KVCache.split_counts), the last split of each (row, head) to finish combines the
    parts in the attention kernel itself: the same output, bit for bit, as the second kernel's, with
    the new entries stored and the mask worked out (splits wholly past a row's position among them);
    the counters are left zeroed for the next layer, and too few of them fall back to the second
    kernel. In the interpreter the programs run one after another, so the last is the last split; on
    a GPU any may be (tests/gpu)."""
    B, H, H_kv, D, span = 3, 4, 2, 32, 64
    kv, q = cache_and_query(B, H, H_kv, D, 6, 64, dtype, seed=splits)
    g = torch.Generator().manual_seed(3)
    k_new, v_new = (torch.randn(B, H_kv, 1, D, generator=g).to(dtype) for _ in range(2))
    picked = torch.tensor([3, 0, 1]) if rows == "gathered" else slice(1, 4)
    write_rows = torch.tensor([3, 0, 1] if rows == "gathered" else [1, 2, 3])[:, None]
    visible = Visible(torch.tensor([5, 40, 63]), None, 50)

    def attend(counts):
        cache = kv.clone()
        out = decode_attention(q, cache, 1, picked, span, visible, 4, store=(k_new, v_new, write_rows, None),
                               splits=splits, counts=counts)
        return out, cache

    apart, stored = attend(None)
    counts = torch.zeros(B * H, dtype=torch.int32)
    for _ in range(2):  # the counters as the first call left them
        together, cache = attend(counts)
        assert torch.equal(together, apart) and torch.equal(cache, stored)
        assert not counts.any()
    assert torch.equal(attend(torch.zeros(B * H - 1, dtype=torch.int32))[0], apart)
    read = stored[:, 1, picked, :, :span]
    want = sdpa_attention(q, read[0], read[1], visible.additive(span, dtype))
    tolerance = 2e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(apart, want, atol=tolerance, rtol=tolerance)
    with pytest.raises(ValueError, match="int32"):
        attend(torch.zeros(B * H, dtype=torch.int64))


def test_default_splits_fill_the_multiprocessors(monkeypatch):
    """On CUDA, a layer's rows x heads programs are split until they fill the multiprocessors, at most
    one split per block and MAX_SPLITS; fewer rows, more splits; none on a CPU (the interpreter)."""
    from blt_runtime import attention

    cuda = torch.device("cuda")  # only named: the multiprocessor count is stood in for
    monkeypatch.setattr(attention, "multiprocessors", lambda device: 132)
    assert attention.default_splits(1 * 16, 4, cuda) == 4  # batch 1, a local ring of 512 in blocks of 128
    assert attention.default_splits(1 * 16, 16, cuda) == 8  # batch 1, 1,024 patches in blocks of 64
    assert attention.default_splits(1 * 12, 64, cuda) == 11
    assert attention.default_splits(1 * 2, 64, cuda) == attention.MAX_SPLITS
    assert attention.default_splits(8 * 16, 16, cuda) == 1 == attention.default_splits(64 * 16, 16, cuda)
    assert attention.default_splits(1 * 16, 4, torch.device("cpu")) == 1


@interpreted
def test_kernel_reads_strided_queries():
    """q as a step makes it: a transposed view of the qkv projection, not contiguous."""
    kv, _ = cache_and_query(2, 4, 4, 32, 3, 64, torch.float32)
    qkv = torch.randn(2, 1, 12, 32)
    q = qkv[:, :, :4].transpose(1, 2)
    assert not q.is_contiguous()
    got = decode_attention(q, kv, 0, slice(0, 2), 64, None)
    read = kv[:, 0, 0:2, :, :64]
    torch.testing.assert_close(got, sdpa_attention(q, read[0], read[1], None), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("H, H_kv", [(4, 4), (4, 2)])
@pytest.mark.parametrize("cache_window, stack_window", [(16, 16), (16, 6), (20, 16)])
@pytest.mark.parametrize("block, T", [(16, 53), (4, 53), (4, 9), (5, 16), (1, 7), (2, 5)])
def test_a_long_chunk_attended_a_block_at_a_time_equals_the_whole_mask(H, H_kv, cache_window, stack_window, block, T):
    """band_attention (a prefill chunk of more than two blocks of queries) weighs what SDPA under the chunk's
    whole (T, entries + T) mask does: rows whose ring is empty, partly and wholly filled, and wrapped, read in
    position order or as they lie; blocks of a window and smaller, the last one short."""
    g = torch.Generator().manual_seed(3)
    lengths, D = torch.tensor([0, 5, 16, 40]), 8
    B, span = len(lengths), cache_window
    if block == 2:  # a short read of the rings (rows of 0 and 5 positions): every block reads all of it
        lengths, span = torch.tensor([0, 5, 3, 1]), 5
        B = len(lengths)
    q = torch.randn(B, H, T, D, generator=g)
    k, v = torch.randn(2, B, H_kv, T, D, generator=g)
    cached_k, cached_v = torch.randn(2, B, H_kv, span, D, generator=g)
    new = lengths[:, None] + torch.arange(T)[None, :]
    mask = additive_mask(lengths, new, T, span, True, cache_window, stack_window, torch.float32)
    want = sdpa_attention(q, torch.cat([cached_k, k], 2), torch.cat([cached_v, v], 2), mask)
    band = ChunkBand.of(torch.cat([entry_positions(lengths, span, cache_window), new], 1), span, stack_window,
                        block, torch.float32)
    assert [b[:2] for b in band.blocks] == [(s, min(s + block, T)) for s in range(0, T, block)]
    assert all(b[2] <= stack_window - 1 and b[4].shape[-1] == b[2] + b[1] - b[3] for b in band.blocks)
    assert (band.order is None) == (block == 2 and stack_window > 6)  # read as they lie where no block reads part
    torch.testing.assert_close(band_attention(q, cached_k, cached_v, k, v, band), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("H, H_kv", [(4, 4), (4, 2)])
@pytest.mark.parametrize("T, stack_window", [(7, 16), (16, 16), (9, None)])
def test_a_chunk_from_position_0_inside_its_window_is_causal(H, H_kv, T, stack_window):
    """sdpa_attention under CAUSAL (SDPA's is_causal) weighs what it does under the chunk's whole mask, for a
    chunk that starts at position 0 and fits its window; positions_for gives CAUSAL for such chunks only."""
    g = torch.Generator().manual_seed(5)
    B, D = 2, 8
    q = torch.randn(B, H, T, D, generator=g)
    k, v = torch.randn(2, B, H_kv, T, D, generator=g)
    lengths = torch.zeros(B, dtype=torch.long)
    mask = additive_mask(lengths, torch.arange(T)[None, :].expand(B, T), T, 0, True, stack_window, stack_window,
                         torch.float32)
    torch.testing.assert_close(sdpa_attention(q, k, v, CAUSAL), sdpa_attention(q, k, v, mask), atol=1e-6, rtol=1e-5)


def test_prefill_chunks_from_position_0_inside_the_window_are_causal(hf_checkpoint, monkeypatch):
    """The engine's prefill attends its first chunk under CAUSAL where it fits the window, and the chunks after
    it (which see cached entries) under their masks."""
    import blt_runtime.runner as runner
    from blt_runtime import load_model
    from blt_runtime.engine import Engine
    from blt_runtime.sampling import SamplingParams

    masks = []

    def recording(q, k, v, mask):
        masks.append(mask)
        return sdpa_attention(q, k, v, mask)
    monkeypatch.setattr(runner, "sdpa_attention", recording)
    engine = Engine(load_model(hf_checkpoint("1b")[1]), prefill_chunk=100)
    engine.add_request("r", bytes(range(65, 91)) * 6, SamplingParams(max_bytes=1, ignore_eos=True))  # 156 bytes
    engine.step()  # the first chunk: BOS and 100 bytes
    assert masks and all(m is CAUSAL for m in masks)
    masks.clear()
    while engine.has_work():
        engine.step()
    assert masks and not any(m is CAUSAL for m in masks)
