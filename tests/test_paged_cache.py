"""The global model's cache of pages (paged_cache.py): what each slot reads is what was written at its positions,
through any mix of growing, sharing and trimming; pages are counted exactly (none lost, none held twice);
the attention kernel reads and stores through the page table exactly as it does in a cache of rows; and
sequences that share a prompt share its pages.
"""

import random

import numpy as np
import pytest
import torch
from enginekit import run_engine
from factory import PARITY_TEXT
from interpreter import interpreted

from blt_runtime import load_model, paged_cache
from blt_runtime.attention import RotationTable, Visible, decode_attention
from blt_runtime.engine import Engine
from blt_runtime.paged_cache import PAGE, PagedKVCache
from blt_runtime.sampling import SamplingParams


def assert_consistent(kv: PagedKVCache) -> None:
    """Every page is free or held, never both; a page's count is the slots that hold it; columns past what a
    slot holds point to the null page; the device table is the host's."""
    counts = np.zeros(kv.num_pages, dtype=np.int64)
    for slot, held in enumerate(kv.held):
        np.add.at(counts, kv.host[slot, :held], 1)
        assert not kv.host[slot, held:].any() and (kv.host[slot, :held] > 0).all(), slot
    assert (counts[1:] == kv.refs[1:]).all()
    assert sorted(kv.free) == [p for p in range(1, kv.num_pages) if counts[p] == 0]
    assert torch.equal(kv.table, torch.from_numpy(kv.host))


def test_what_each_slot_reads_is_what_was_written_at_its_positions(monkeypatch):
    """Random writes (a few positions from a slot's length on, pages reserved first), copies of a prefix
    into another slot (shared pages, some of them partly filled), trims and a pool that grows: after each,
    every slot reads back, at each of its positions, the value last written there for it, and the pages
    are counted exactly (and the device's table is the host's). A copy on write that went to the wrong
    slot, or a page handed out twice, would show as another slot's values."""
    monkeypatch.setattr(paged_cache, "FIRST_PATCHES", 4)  # a page a slot at first
    rng = random.Random(0)
    slots, layers, H_kv, D = 5, 2, 2, 4
    # the table apart from the host's, as on a GPU: the entries that change are copied to it
    kv = PagedKVCache(layers, slots, H_kv, D, 4096, "cpu", torch.float32, page=4, shared_table=False)
    want: list[list[float]] = [[] for _ in range(slots)]  # each slot's values by position
    counter = 0.0
    for _ in range(400):
        op, slot = rng.random(), rng.randrange(slots)
        if op < 0.6:  # write n positions after the slot's last
            n, start = rng.randint(1, 9), len(want[slot])
            kv.reserve_rows([(slot, start, start + n)])
            positions = torch.arange(start, start + n)[None, :]
            pages, entries = kv.addresses(torch.full_like(positions, slot), positions)
            values = torch.arange(counter, counter + n)
            counter += n
            new = values[None, None, :, None].expand(1, H_kv, n, D)
            for layer in range(layers):
                kv.write(layer, pages, entries, new, -new)
            want[slot] += values.tolist()
        elif op < 0.8:  # another slot takes a copy of a prefix of this one
            target = rng.randrange(slots)
            if target != slot:
                length = rng.randint(0, len(want[slot]))
                kv.share(slot, target, length)
                want[target] = want[slot][:length]
        else:
            length = rng.randint(0, len(want[slot]))
            kv.trim(slot, length)
            want[slot] = want[slot][:length]
        assert_consistent(kv)
        for s in range(slots):
            if want[s]:
                keys, values = kv.read(layers - 1, torch.tensor([s]), len(want[s]))
                assert keys[0, :, :, 0].tolist() == [want[s]] * H_kv, s
                assert values[0, 1, :, 2].tolist() == [-v for v in want[s]], s
    assert kv.num_pages > 4 * (1 + slots)  # it grew (doubling, twice at least)


def test_a_slot_whose_pages_follow_each_other_is_read_in_place():
    """One slot whose pages follow each other in the pool is read without a copy (a sequence alone, at each
    patch step of each layer on a CPU); pages elsewhere, or several slots, are gathered; both read the same."""
    kv = PagedKVCache(1, 4, 2, 2, 1000, "cpu", torch.float32)
    kv.reserve_rows([(1, 0, 40), (2, 0, 20)])  # slot 1: pages 1, 2, 3; slot 2: 4, 5
    kv.reserve_rows([(3, 0, 10), (2, 20, 40)])  # slot 3: 6; slot 2: 7
    kv.kv.normal_()
    for slot, span, in_place in ((1, 40, True), (1, 7, True), (2, 32, True), (2, 40, False)):
        got = kv.read(0, slice(slot, slot + 1), span)
        gathered = kv.read(0, torch.tensor([slot]), span)
        assert all(torch.equal(a, b) for a, b in zip(got, gathered)) and got[0].shape == (1, 2, span, 2)
        assert (got[0].data_ptr() == kv.pool[0, 0, 0, kv.host[slot, 0]].data_ptr()) == in_place, (slot, span)
    both = kv.read(0, slice(1, 3), 40)
    assert torch.equal(both[1][1, 0, 32:40], kv.kv[1, 0, 7, 0, :8])  # slot 2's positions 32 .. 39: page 7


def paged(kv: torch.Tensor, page: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache of rows (2, layers, slots, H_kv, capacity, D) as a pool of pages in shuffled order (page 0 left
    empty, NaN) and its table: position p of slot s at table[s, p // page], entry p % page."""
    _, layers, slots, H_kv, capacity, D = kv.shape
    columns = capacity // page
    order = torch.randperm(slots * columns, generator=torch.Generator().manual_seed(seed)) + 1
    table = order.view(slots, columns).to(torch.int32)
    pool = torch.full((2, layers, 1 + slots * columns, H_kv, page, D), float("nan"), dtype=kv.dtype)
    for s in range(slots):
        for c in range(columns):
            pool[:, :, table[s, c]] = kv[:, :, s, :, c * page:(c + 1) * page]
    return pool, table


def rows_of(pool: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The cache of rows a pool of pages stands for (paged's inverse)."""
    pages = pool[:, :, table.long()]  # (2, layers, slots, columns, H_kv, page, D)
    return pages.permute(0, 1, 2, 4, 3, 5, 6).flatten(4, 5)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page, block", [(16, 16), (8, 32), (16, 64)])
@pytest.mark.parametrize("rows", ["gathered", "consecutive"])
@pytest.mark.parametrize("kind", ["additive", "visible", "at_length"])
@pytest.mark.parametrize("splits", [None, 3])
def test_the_kernel_reads_and_stores_through_pages_as_through_rows(dtype, page, block, rows, kind, splits):
    """The same cache as rows and as shuffled pages: the kernel gives the same output bit for bit, and stores
    the new keys and values at the same positions (a page and entry given, or each row's length looked up in
    the table); blocks of entries that span pages or lie inside one; the span split among programs; a
    padding row that stores in the scratch slot's null page."""
    B, H, H_kv, D, span, capacity = 3, 4, 2, 32, 100, 128
    g = torch.Generator().manual_seed(page + block)
    kv = torch.randn(2, 2, 5, H_kv, capacity, D, generator=g).to(dtype)
    pool, table = paged(kv, page, seed=block)
    q = torch.randn(B, H, 1, D, generator=g).to(dtype)
    k_new, v_new = (torch.randn(B, H_kv, 1, D, generator=g).to(dtype) for _ in range(2))
    picked = torch.tensor([3, 0, 1]) if rows == "gathered" else slice(1, 4)
    slots = picked if rows == "gathered" else torch.arange(1, 4)
    lengths = torch.tensor([2, 70, 99])
    write_slots = torch.tensor([3, 0, 4] if rows == "gathered" else [1, 2, 4])[:, None]  # 4: padding (scratch)
    paged_table = torch.cat([table[:4], torch.zeros(1, table.shape[1], dtype=torch.int32)])  # slot 4: the null page
    rotation = None
    if kind == "additive":
        mask = torch.zeros(B, 1, 1, span, dtype=dtype)
        mask[0, ..., 50:] = float("-inf")
    else:
        mask = Visible(lengths, None, None)
    if kind == "at_length":
        rotation = RotationTable.of(capacity, D, 10000.0, torch.device("cpu"))
        rows_store = (k_new, v_new, write_slots, None)
        pages_store = rows_store
    else:
        index = lengths[:, None]
        rows_store = (k_new, v_new, write_slots, index)
        columns = torch.div(index, page, rounding_mode="floor")
        pages_store = (k_new, v_new, paged_table[write_slots, columns].long(), index % page)
    want_kv = kv.clone()
    want = decode_attention(q, want_kv, 1, picked, span, mask, block, store=rows_store, rotation=rotation,
                            splits=splits)
    got = decode_attention(q, pool, 1, picked, span, mask, block, store=pages_store, rotation=rotation,
                           splits=splits, pages=(paged_table, page))
    assert torch.equal(got, want)
    stored = rows_of(pool, table)
    assert torch.equal(stored[:, :, :4], want_kv[:, :, :4]), "the real rows' new entries, where rows put them"
    assert torch.equal(stored[:, :, slots], want_kv[:, :, slots])
    assert not pool[:, 1, 0].isnan().all(), "the padding row stored in the null page"


def test_shared_prompts_share_pages(hf_checkpoint):
    """Four choices of one 700-byte prompt hold its pages once (and each its own pages after it, the first
    of them copied where the prompt's last page was partly filled); what they generate is checked against
    full recompute in test_shared_prompts.py."""
    engine = Engine(load_model(hf_checkpoint("1b")[1]), max_batch_size=4)
    kv = engine.runner.global_kv
    params = SamplingParams(max_bytes=120, temperature=1.0, seed=3, ignore_eos=True)
    peak = []
    step = engine.step

    def watched():
        out = step()
        peak.append(kv.pages_held())
        assert_consistent(kv)
        return out

    engine.step = watched
    results = run_engine(engine, {f"c{i}": (PARITY_TEXT[:700], params) for i in range(4)})
    prompt_patches = results["c0"][1].usage.prompt_patches
    each = [-(-final.usage.global_steps // PAGE) for _, final in results.values()]
    assert max(peak) < sum(each)  # less than four copies
    assert max(peak) <= -(-prompt_patches // PAGE) + sum(n - prompt_patches // PAGE for n in each)
