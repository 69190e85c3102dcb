"""Prompt scores (SamplingParams.prompt_logprobs, what echo with logprobs shows): the engine's prefill
chunks score the prompt's bytes as the full forward does (BltModel.prompt_logprobs), whatever the
chunks, the step kind or the company; the request's bytes do not change.

CPU, fp32, random tiny models; prompts past the 512-byte window, prefilled in several chunks.
"""

import pytest
import torch
from enginekit import run_engine
from factory import PARITY_TEXT

from blt_runtime import load_model
from blt_runtime.engine import Engine
from blt_runtime.reference import reference_patch_lengths
from blt_runtime.sampling import SamplingParams
from blt_runtime.tokenizer import encode

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def models(hf_checkpoint):
    return {s: load_model(hf_checkpoint(s)[1]) for s in ("1b", "7b")}


def scored(engine: Engine, requests: dict[str, tuple[bytes, SamplingParams]]) -> dict[str, tuple]:
    """Drive the engine -> {id: (bytes, prompt scores, final output)}; the scores come with exactly one
    output, the first."""
    got, final, scores = {rid: bytearray() for rid in requests}, {}, {}
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    while engine.has_work():
        for o in engine.step():
            if o.prompt_logprobs is not None:
                assert o.request_id not in scores and not got[o.request_id], "once, with the first output"
                scores[o.request_id] = o.prompt_logprobs
            got[o.request_id] += o.new_bytes
            if o.finished:
                final[o.request_id] = o
    return {rid: (bytes(got[rid]), scores.get(rid), final[rid]) for rid in requests}


def assert_scores_equal(got: list, want: list, top_n: int) -> None:
    """Each byte's log-probability within 1e-4 of the full forward's, and the same top ids (a pair
    that swaps places only where their values tie within that)."""
    assert len(got) == len(want)
    torch.testing.assert_close(torch.tensor([g[0] for g in got]), torch.tensor([w[0] for w in want]),
                               atol=1e-4, rtol=0)
    for (_, g), (_, w) in zip(got, want):
        assert len(g) == len(w) == top_n
        for (gi, gv), (wi, wv) in zip(g, w):
            assert abs(gv - wv) < 1e-4
            assert gi == wi or any(i == gi and abs(v - gv) < 1e-4 for i, v in w), (g, w)


@pytest.mark.parametrize("structure, prompt_bytes, chunk, max_bytes, top_n", [
    ("1b", 700, 512, 0, 3), ("1b", 700, 96, 20, 0), ("1b", 1, 512, 5, 2), ("7b", 1100, 300, 10, 5)])
def test_prefill_scores_equal_the_full_forward(models, structure, prompt_bytes, chunk, max_bytes, top_n):
    model = models[structure]
    prompt = PARITY_TEXT[:prompt_bytes]
    plain = SamplingParams(max_bytes=max_bytes, **GREEDY)
    out = scored(Engine(model, prefill_chunk=chunk), {
        "s": (prompt, SamplingParams(max_bytes=max_bytes, prompt_logprobs=top_n, **GREEDY)),
        "plain": (prompt, plain)})
    got, scores, final = out["s"]
    assert_scores_equal(scores, model.prompt_logprobs(prompt, top_n), top_n)
    assert got == out["plain"][0] and len(got) >= max_bytes  # scoring changes no byte
    assert final.finish_reason == "length" and final.usage.generated_bytes == len(got)
    assert final.usage.prompt_patches == len(reference_patch_lengths(model, encode(prompt)))
    assert final.usage.shared_prompt_bytes == 0
    assert out["plain"][1] is None
    if max_bytes:  # it followed the scoring one (with max_bytes 0 it is never prefilled)
        assert out["plain"][2].usage.shared_prompt_bytes == prompt_bytes


@pytest.mark.parametrize("static, overlap", [(True, False), (False, True)])
def test_scores_in_company_equal_the_full_forward(models, static, overlap):
    """Several scoring requests among generating ones, in static steps or overlapped ones; one scoring
    request is aborted while it prefills; a prompt of no bytes has no scores."""
    model = models["1b"]
    engine = Engine(model, prefill_chunk=128, static=static, overlap=overlap)
    engine.add_request("gone", PARITY_TEXT[:900], SamplingParams(max_bytes=5, prompt_logprobs=1))
    engine.step()
    engine.abort("gone")
    assert [(o.request_id, o.finish_reason, o.prompt_logprobs) for o in engine.step()] == [("gone", "abort", None)]
    prompts = {"a": PARITY_TEXT[:600], "b": PARITY_TEXT[200:500], "c": b"", "d": PARITY_TEXT[:600] + b"!"}
    requests = {rid: (p, SamplingParams(max_bytes=8, prompt_logprobs=2, **GREEDY)) for rid, p in prompts.items()}
    requests["gen"] = (PARITY_TEXT[50:90], SamplingParams(max_bytes=200, **GREEDY))
    out = scored(engine, requests)
    for rid, prompt in prompts.items():
        assert_scores_equal(out[rid][1], model.prompt_logprobs(prompt, 2), 2)
    alone = run_engine(Engine(model), {"gen": requests["gen"]})["gen"][0]
    assert out["gen"][0] == alone and out["a"][0] == run_engine(Engine(model), {"a": requests["a"]})["a"][0]


def test_a_scoring_request_neither_resumes_nor_follows_but_leaves_its_state(models):
    """It must score every byte, so it prefills its whole prompt; a finished one's slot is still kept
    for a prompt that begins with it (max_bytes 0 too: it was prefilled to be scored)."""
    model = models["1b"]
    engine = Engine(model, prefill_chunk=128)
    prompt = PARITY_TEXT[:500]
    first = scored(engine, {"first": (prompt, SamplingParams(max_bytes=0, prompt_logprobs=1))})["first"]
    assert first[0] == b"" and first[2].finish_reason == "length" and len(first[1]) == 500
    plain = scored(engine, {"plain": (prompt + b" less", SamplingParams(max_bytes=4, **GREEDY))})["plain"]
    assert plain[2].usage.shared_prompt_bytes == 500  # resumed from the first's slot
    longer = prompt + b" less" + plain[0] + b" more"  # begins with what the plain one's slot holds now
    again = scored(engine, {"again": (longer, SamplingParams(max_bytes=4, prompt_logprobs=1, **GREEDY))})["again"]
    assert again[2].usage.shared_prompt_bytes == 0
    assert_scores_equal(again[1], model.prompt_logprobs(longer, 1), 1)
    assert again[0] == run_engine(Engine(model), {"x": (longer, SamplingParams(max_bytes=4, **GREEDY))})["x"][0]


def test_a_scoring_request_follows_a_scoring_leader_and_takes_its_scores(models):
    """Requests that share a prefix with a scoring one still prefilling it take its state and its scores
    up to the fork, then score the rest themselves; one that asks for more alternatives than the leader
    scored prefills its own."""
    model = models["1b"]
    engine = Engine(model, prefill_chunk=200)
    context = PARITY_TEXT[:450]
    prompts = {"lead": (context + b" one", 2), "two": (context + b" two", 2), "prefix": (context, 1),
               "more": (context + b" three", 3), "plain": (context + b" four", None)}
    requests = {rid: (p, SamplingParams(max_bytes=6, prompt_logprobs=n, **GREEDY)) for rid, (p, n) in prompts.items()}
    out = scored(engine, requests)
    shared = {rid: out[rid][2].usage.shared_prompt_bytes for rid in prompts}
    assert shared == {"lead": 0, "two": 451, "prefix": 450, "more": 0, "plain": 451}
    for rid, (prompt, n) in prompts.items():
        if n is not None:
            assert_scores_equal(out[rid][1], model.prompt_logprobs(prompt, n), n)
        alone = run_engine(Engine(model), {rid: (prompt, SamplingParams(max_bytes=6, **GREEDY))})[rid][0]
        assert out[rid][0] == alone


def test_prompt_logprobs_is_checked():
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
