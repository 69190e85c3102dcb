"""Short rests of prompts prefilled together (Scheduler.batchable, Runner.prefill_start with several rows):
new short prompts that arrive together, the ends of long ones, the parts after a shared prefix or a
resumed slot go through the models as the rows of one padded batch, instead of one per step, and every
request's bytes, patches and prompt scores are what it gets alone and what full recompute gives.

CPU, fp32, random tiny models.
"""

import pytest
from enginekit import replay_full_recompute, run_engine
from factory import PARITY_TEXT

from blt_runtime import load_model
from blt_runtime.engine import Engine
from blt_runtime.reference import reference_patch_lengths
from blt_runtime.sampling import SamplingParams
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


def test_the_rests_of_long_and_resumed_prompts_are_prefilled_together(models):
    """A long prompt's first chunks go alone; what is left of it, and of a prompt that resumed from a
    finished request's slot (a next turn), goes with others as rows of one batch: rows that start
    after cached positions, with an open patch, whose padding must not touch their ring buffers."""
    model = models["1b"]
    prompts = {"x": PARITY_TEXT[:600], "y": PARITY_TEXT[:300] + b"!", "z": PARITY_TEXT[:200] + b" and on"}
    outs = {}
    for together in (True, False):
        engine = Engine(model, max_batch_size=4, prefill_chunk=256)
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
