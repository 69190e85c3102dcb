"""Short rests of prompts prefilled together (Scheduler.batchable, Runner.prefill_start with several rows):
new short prompts that arrive together, the ends of long ones, the parts after a shared prefix or a
resumed slot go through the models as the rows of one padded batch, instead of one per step, and every
request's bytes, patches and prompt scores are what it gets alone and what full recompute gives. Short
ones go before the next chunk of a long prompt admitted earlier, every other step.

CPU, fp32, random tiny models.
"""

import pytest
from enginekit import replay_full_recompute, run_engine
from factory import PARITY_TEXT

from blt_runtime import load_model
from blt_runtime.engine import Engine
from blt_runtime.reference import reference_patch_lengths
from blt_runtime.sampling import SamplingParams
from blt_runtime.scheduler import Scheduler, Sequence, Status
from blt_runtime.tokenizer import encode

GREEDY = dict(temperature=0.0, ignore_eos=True)
# prompts of 0 to 300 bytes, 1- to 4-byte characters among them
PROMPTS = {f"p{i}": PARITY_TEXT[start:start + n] for i, (start, n) in
           enumerate([(0, 0), (5, 1), (40, 60), (100, 7), (300, 150), (500, 33), (700, 300), (900, 90)])}


@pytest.fixture(scope="module")
def models(hf_checkpoint):
    return {s: load_model(hf_checkpoint(s)[1]) for s in ("1b", "7b")}


def batches_of(engine: Engine) -> list[int]:
    """Record the rows of every prefill of several sequences that the engine runs."""
    rows, start = [], engine.runner.prefill_start

    def recorded(slots, chunks, *rest):
        if len(chunks) > 1:
            rows.append(len(chunks))
        return start(slots, chunks, *rest)

    engine.runner.prefill_start = recorded
    return rows


@pytest.mark.parametrize("structure, static, overlap", [("1b", False, False), ("1b", True, False),
                                                        ("7b", False, True)])
def test_prompts_prefilled_together_equal_full_recompute(models, structure, static, overlap):
    model = models[structure]
    engine = Engine(model, max_batch_size=8, static=static, overlap=overlap)
    rows = batches_of(engine)
    requests = {rid: (p, SamplingParams(max_bytes=24, **GREEDY)) for rid, p in PROMPTS.items()}
    requests["p3"] = (PROMPTS["p3"], SamplingParams(max_bytes=24, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True))
    out = run_engine(engine, requests)
    assert rows and max(rows) >= 3  # several prompts went through together
    for rid, (prompt, params) in requests.items():
        got, final = out[rid]
        replay_full_recompute(model, prompt, params, params.seed or 0, got)  # greedy, or p3's seeded draws
        assert got == run_engine(Engine(model, static=static), {rid: (prompt, params)})[rid][0]
        assert final.usage.prompt_patches == len(reference_patch_lengths(model, encode(prompt)))


def test_scores_choices_and_an_abort_in_a_batch(models):
    """Scoring rows score as the full forward does; the n choices of a batched prompt follow it; a row
    aborted while its batch runs leaves the others alone."""
    model = models["1b"]
    engine = Engine(model, max_batch_size=10, overlap=True)
    rows = batches_of(engine)
    scored = {"s1": PROMPTS["p2"], "s2": PROMPTS["p4"]}
    for rid, prompt in scored.items():
        engine.add_request(rid, prompt, SamplingParams(max_bytes=0 if rid == "s1" else 5, prompt_logprobs=2,
                                                       **GREEDY))
    for i in range(3):
        engine.add_request(f"n{i}", PROMPTS["p5"], SamplingParams(max_bytes=20, **GREEDY))
    engine.add_request("gone", PROMPTS["p7"], SamplingParams(max_bytes=20, **GREEDY))
    engine.add_request("plain", PROMPTS["p1"], SamplingParams(max_bytes=20, **GREEDY))
    got, scores, finals = {}, {}, {}
    outputs = engine.step()  # queues the first step, with the batch; the next one runs it
    engine.abort("gone")
    while engine.has_work():
        outputs += engine.step()
    for o in outputs:
        got[o.request_id] = got.get(o.request_id, b"") + o.new_bytes
        if o.prompt_logprobs is not None:
            scores[o.request_id] = o.prompt_logprobs
        if o.finished:
            finals[o.request_id] = o
    assert rows and rows[0] >= 4 and finals["gone"].finish_reason == "abort"
    for rid, prompt in scored.items():
        want = model.prompt_logprobs(prompt, 2)
        assert len(scores[rid]) == len(want)
        assert all(abs(g[0] - w[0]) < 1e-4 and [i for i, _ in g[1]] == [i for i, _ in w[1]]
                   for g, w in zip(scores[rid], want))
    assert [finals[f"n{i}"].usage.shared_prompt_bytes for i in range(3)] == [0, 33, 33]
    for rid in ("n0", "n1", "n2", "plain", "s2"):
        prompt = PROMPTS["p5"] if rid.startswith("n") else PROMPTS["p1"] if rid == "plain" else scored[rid]
        params = SamplingParams(max_bytes=5 if rid == "s2" else 20, **GREEDY)
        assert got[rid] == run_engine(Engine(model), {rid: (prompt, params)})[rid][0]


@pytest.mark.parametrize("x_bytes, z_rest", [(600, b" and on"), (406, PARITY_TEXT[1000:1150])])
def test_the_rests_of_long_and_resumed_prompts_are_prefilled_together(models, x_bytes, z_rest):
    """A long prompt's first chunks go alone; what is left of it, and of a prompt that resumed from a
    finished request's slot (a next turn), goes with others as rows of one batch: rows that start
    after cached positions, with an open patch, whose padding must not touch their ring buffers. A rest of
    150 bytes after 201 cached positions is attended in blocks (attention.ChunkBand), the cache read as it
    lies (rows of different lengths in one batch: the test after next)."""
    model = models["1b"]
    prompts = {"x": PARITY_TEXT[:x_bytes], "y": PARITY_TEXT[:300] + b"!", "z": PARITY_TEXT[:200] + z_rest}
    outs = {}
    for together in (True, False):
        engine = Engine(model, max_batch_size=4, prefill_chunk=256)
        engine.scheduler.short_first = False  # z's rest waits for x's, and goes with it
        rows = batches_of(engine)
        if not together:
            engine.scheduler.batch_prompt = None
        run_engine(engine, {"a": (PARITY_TEXT[:200], SamplingParams(max_bytes=4, **GREEDY))})
        outs[together] = run_engine(engine, {rid: (p, SamplingParams(max_bytes=30, **GREEDY))
                                             for rid, p in prompts.items()})
        assert bool(rows) == together and outs[together]["z"][1].usage.shared_prompt_bytes > 0
    for rid, prompt in prompts.items():
        got, final = outs[True][rid]
        assert got == outs[False][rid][0]
        replay_full_recompute(model, prompt, SamplingParams(max_bytes=30, **GREEDY), 0, got)
        assert final.usage.prompt_patches == len(reference_patch_lengths(model, encode(prompt)))


def test_plans_let_short_prompts_go_before_a_long_ones_next_chunk_every_other_step():
    """Scheduler.plan: short rests of prompts admitted after a long one go before its next chunk, but never
    two steps running; in admission order with short_first off."""
    for short_first in (True, False):
        scheduler = Scheduler(max_running=8, max_waiting=8, prefill_chunk=100, batch_prompt=100)
        scheduler.short_first = short_first
        seqs = {rid: Sequence(rid, [0] * (n + 1), SamplingParams(), 0)  # BOS and n bytes
                for rid, n in (("long", 400), ("a", 30), ("b", 50), ("c", 40))}
        for s in seqs.values():
            scheduler.add(s)
        scheduler.admit(lambda s, ids=list(seqs): ids.index(s.request_id))  # a slot each
        order = []
        while any(s.status is Status.PREFILLING for s in seqs.values()):
            plan = scheduler.plan()
            rows = plan.batch or [plan.prefill]
            order.append("".join(s.request_id[0] for s in rows))
            for s in rows:
                s.processed = plan.chunk[1] if s is plan.prefill else s.prompt_len
                s.status = Status.PREFILLED if s.processed == s.prompt_len else Status.PREFILLING
        if short_first:  # a and b fill a chunk's budget together; c goes after the long prompt's next chunk
            assert order == ["ab", "l", "c", "l", "l", "l"]
        else:
            assert order == ["l", "l", "l", "l", "ab", "c"]


@pytest.mark.parametrize("static, overlap", [(False, False), (True, True)])
def test_short_prompts_before_a_long_ones_chunks_equal_full_recompute(models, static, overlap):
    """Short prompts that arrive while a long one is prefilled chunk by chunk get their first bytes before it
    (in admission order, after it), and every request's bytes are the same either way and what full
    recompute gives; a prompt that follows the long one forks from it where they part."""
    model = models["1b"]
    prompts = {"long": PARITY_TEXT[:1100], "follows": PARITY_TEXT[:300] + b"?",
               **{f"s{i}": PARITY_TEXT[200 * i + 7:200 * i + 47 + 10 * i] for i in range(4)}}
    params = SamplingParams(max_bytes=12, **GREEDY)
    outs, first_steps = {}, {}
    for short_first in (True, False):
        engine = Engine(model, max_batch_size=6, prefill_chunk=128, static=static, overlap=overlap)
        engine.scheduler.short_first = short_first
        out, first, step = {rid: b"" for rid in prompts}, {}, 0
        engine.add_request("long", prompts["long"], params)
        while engine.has_work() or step < 2:
            if step == 1:
                for rid, prompt in prompts.items():
                    if rid != "long":
                        engine.add_request(rid, prompt, params)
            for o in engine.step():
                out[o.request_id] += o.new_bytes
                first.setdefault(o.request_id, step)
                if o.finished:
                    assert o.usage.shared_prompt_bytes == (300 if o.request_id == "follows" else 0)
            step += 1
        outs[short_first], first_steps[short_first] = out, first
    shorts = [f"s{i}" for i in range(4)]
    assert max(first_steps[True][s] for s in shorts) < first_steps[True]["long"]
    assert min(first_steps[False][s] for s in shorts) >= first_steps[False]["long"]
    assert first_steps[True]["long"] <= first_steps[False]["long"] + len(shorts)
    assert outs[True] == outs[False]
    for rid, prompt in prompts.items():
        replay_full_recompute(model, prompt, params, 0, outs[True][rid])


def test_next_turns_of_two_conversations_of_different_lengths_prefilled_together(models, monkeypatch):
    """Two conversations' next turns resume in their finished requests' slots (201+ and 101+ positions held)
    and their 150-byte rests go together: a chunk attended in blocks (attention.ChunkBand) whose shorter row
    reads fewer positions than the span, the cache read as it lies. Bytes as alone and as full recompute."""
    import blt_runtime.attention as attention

    bands = []
    of = attention.ChunkBand.of.__func__

    def recorded(cls, keys, span, *rest):
        band = of(cls, keys, span, *rest)
        bands.append((keys.shape[0], band.order is None, bool((keys[:, :span] < 0).any())))
        return band

    monkeypatch.setattr(attention.ChunkBand, "of", classmethod(recorded))
    model, params = models["1b"], SamplingParams(max_bytes=6, **GREEDY)
    first = {"a": PARITY_TEXT[:200], "b": PARITY_TEXT[300:400]}
    outs = {}
    for together in (True, False):
        engine = Engine(model, max_batch_size=4)
        if not together:
            engine.scheduler.batch_prompt = None
        answers = run_engine(engine, {rid: (p, params) for rid, p in first.items()})
        turns = {f"{rid}2": first[rid] + answers[rid][0] + PARITY_TEXT[600 + 200 * i:750 + 200 * i]
                 for i, rid in enumerate(first)}
        outs[together] = run_engine(engine, {rid: (p, params) for rid, p in turns.items()})
        assert all(final.usage.shared_prompt_bytes > 100 for _, final in outs[together].values())
        if together:
            assert (2, True, True) in bands  # two rows, the cache read whole as it lies, a row shorter than it
    for rid, prompt in turns.items():
        assert outs[True][rid][0] == outs[False][rid][0]
        replay_full_recompute(model, prompt, params, 0, outs[True][rid][0])
