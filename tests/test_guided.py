"""Guided generation in the engine: each byte is chosen among those the guide allows (guide.py), with EOS
only where the text is a whole match; the bytes equal full recompute's under the same biases, alone or
batched, in dynamic, static and overlapped steps; and a text the guide finishes ends there."""

import re

import pytest
from enginekit import replay_full_recompute, run_engine
from factory import PARITY_TEXT

from blt_runtime import load_model
from blt_runtime.engine import Engine
from blt_runtime.guide import ByteGuide
from blt_runtime.json_guide import schema_guide
from blt_runtime.pushdown import ProductGuide, PushdownGuide
from blt_runtime.sampling import SamplingParams

PATTERN = r"(yes|no|maybe), [a-z]{2,6}( [a-z0-9]{1,5}){0,3}\."
WORD = ByteGuide.regex(PATTERN)
CHOICE = ByteGuide.choice(["alpha", "beta", "gamma delta", "é中😀"])
ANY_JSON = schema_guide({})  # response_format json_object: a PushdownGuide, nested at any depth
JSON_WITHOUT = ANY_JSON.intersect(ByteGuide.avoiding([b"null", b"[[", b'":']))  # a ProductGuide
BRACKETS = ByteGuide.grammar('root ::= "(" inner ")"\ninner ::= ([a-z ]+ | "(" inner ")")*')


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return load_model(hf_checkpoint("1b")[1])


def requests() -> dict:
    return {
        "greedy_regex": (PARITY_TEXT[:300], SamplingParams(max_bytes=80, temperature=0.0, guide=WORD)),
        "sampled_regex": (PARITY_TEXT[100:140], SamplingParams(max_bytes=80, temperature=1.2, top_p=0.9, seed=5,
                                                               guide=WORD)),
        "choice": (PARITY_TEXT[:30], SamplingParams(max_bytes=40, temperature=0.9, seed=2, guide=CHOICE)),
        "penalised": (PARITY_TEXT[50:90], SamplingParams(max_bytes=60, temperature=0.0, repetition_penalty=1.4,
                                                         logit_bias={ord("m"): 50.0}, guide=WORD)),
        "free": (PARITY_TEXT[200:240], SamplingParams(max_bytes=50, temperature=0.0, ignore_eos=True)),
        "unicode": (PARITY_TEXT[400:420], SamplingParams(max_bytes=60, temperature=2.0, seed=9,
                                                         guide=ByteGuide.regex(r"[^a-z\s]{3,12}!"))),
        "json": (PARITY_TEXT[:64], SamplingParams(max_bytes=70, temperature=1.3, seed=11, guide=ANY_JSON,
                                                  logit_bias={ord("["): 50.0})),  # 70 levels deep
        "json_without": (PARITY_TEXT[64:96], SamplingParams(max_bytes=50, temperature=1.0, seed=3, guide=JSON_WITHOUT)),
        "brackets": (PARITY_TEXT[300:340], SamplingParams(max_bytes=60, temperature=1.5, seed=4,
                                                          logit_bias={ord("("): 30.0, ord(")"): 25.0}, guide=BRACKETS)),
    }


@pytest.mark.parametrize("static, overlap", [(False, False), (True, False), (True, True)])
def test_guided_bytes_equal_full_recompute(model, static, overlap):
    reqs = requests()
    results = run_engine(Engine(model, max_batch_size=4, prefill_chunk=64, static=static, overlap=overlap), reqs,
                         {"choice": 3, "unicode": 7})
    for rid, (prompt, params) in reqs.items():
        generated, final = results[rid]
        guide_ended = params.guide is not None and params.guide.ends(params.guide.state_after(generated))
        replay_full_recompute(model, prompt, params, params.seed or 0, generated,
                              ended_by_eos=final.finish_reason == "stop" and not guide_ended)
        if params.guide is not None:
            if final.finish_reason == "stop":  # EOS or the end of the guide: a whole match either way
                assert params.guide.matches(generated), (rid, generated)
            else:  # out of bytes: a prefix of a match
                assert final.finish_reason == "length" and params.guide.state_after(generated) is not None
            generated.decode("utf-8")  # a guided text is valid UTF-8, even cut short
    for rid in ("greedy_regex", "sampled_regex", "penalised"):
        text, reason = results[rid][0].decode(), results[rid][1].finish_reason
        assert re.fullmatch(PATTERN, text) if reason == "stop" else len(text) == 80, (rid, text)
    assert isinstance(ANY_JSON, PushdownGuide) and isinstance(BRACKETS, PushdownGuide)
    assert isinstance(JSON_WITHOUT, ProductGuide) and not any(w in results["json_without"][0]
                                                              for w in (b"null", b"[[", b'":'))
    assert results["choice"][0].decode() in ("alpha", "beta", "gamma delta", "é中😀")
    assert results["choice"][1].finish_reason == "stop"


def test_a_guided_request_alone_or_batched_gives_the_same_bytes(model):
    reqs = requests()
    together = run_engine(Engine(model, max_batch_size=6), reqs)
    for rid in ("sampled_regex", "choice", "unicode"):
        alone = run_engine(Engine(model, max_batch_size=6), {rid: reqs[rid]})
        assert alone[rid][0] == together[rid][0], rid


def test_the_guide_ends_a_text_that_nothing_may_follow_even_with_ignore_eos(model):
    """With ignore_eos and min_bytes the guide still ends a whole match that nothing may follow; where
    more may follow, ignore_eos goes on, within the guide."""
    done = ByteGuide.choice(["stop here"])
    more = ByteGuide.regex("(ab)+")
    reqs = {"done": (b"x", SamplingParams(max_bytes=40, temperature=0.0, ignore_eos=True, min_bytes=20, guide=done)),
            "more": (b"x", SamplingParams(max_bytes=15, temperature=0.0, ignore_eos=True, guide=more))}
    results = run_engine(Engine(model), reqs)
    assert results["done"][0] == b"stop here" and results["done"][1].finish_reason == "stop"
    assert results["done"][1].usage.generated_bytes == 9
    assert results["more"][0] == b"ab" * 7 + b"a" and results["more"][1].finish_reason == "length"


def test_a_slot_that_held_a_guided_request_forgets_its_guide(model):
    """The next request in the same slot (here resuming from it: shared prompts) samples freely."""
    engine = Engine(model, max_batch_size=1)
    first = run_engine(engine, {"g": (b"Hello", SamplingParams(max_bytes=10, temperature=0.0, guide=CHOICE))})["g"]
    free = SamplingParams(max_bytes=30, temperature=0.0, ignore_eos=True)
    after = run_engine(engine, {"f": (b"Hello" + first[0] + b" and", free)})["f"]
    fresh = run_engine(Engine(model, max_batch_size=1), {"f": (b"Hello" + first[0] + b" and", free)})["f"]
    assert after[0] == fresh[0]


def test_a_guide_that_allows_only_the_empty_text_is_refused():
    with pytest.raises(ValueError, match="only the empty text"):
        SamplingParams(guide=ByteGuide.regex("()"))


def test_an_id_the_sampler_could_not_have_chosen_ends_its_request_with_an_error():
    """Only non-finite logits lead there: the request ends (finish_reason "error", code "not_finite"), and
    nothing is raised into the step that would fail every request in flight."""
    from blt_runtime.scheduler import Sequence
    from blt_runtime.tokenizer import EOS_ID, OFFSET, encode

    def accepted(byte_id, **params):
        seq = Sequence("r", encode(b"x"), SamplingParams(max_bytes=10, **params), 0)
        seq.accept(byte_id, 100)
        return seq

    for seq in (accepted(OFFSET + ord("z"), guide=CHOICE), accepted(1), accepted(EOS_ID, ignore_eos=True),
                accepted(EOS_ID, guide=CHOICE), accepted(EOS_ID, min_bytes=3)):
        assert (seq.finish_reason, seq.error_code, bytes(seq.generated)) == ("error", "not_finite", b""), seq.error
        assert "not finite" in seq.error
    assert accepted(OFFSET + ord("a"), guide=CHOICE).finish_reason is None
    assert accepted(EOS_ID).finish_reason == "stop"


@pytest.mark.parametrize("static", [False, True])
def test_a_model_that_gives_nan_fails_its_requests_one_by_one(hf_checkpoint, static):
    broken = load_model(hf_checkpoint("1b")[1])
    for p in broken.parameters():
        p.data.fill_(float("nan"))
    engine = Engine(broken, max_batch_size=4, static=static)
    for name, (prompt, params) in requests().items():
        engine.add_request(name, prompt, params)
    outputs = []
    while engine.has_work():
        outputs += engine.step()  # never raises
    finals = {o.request_id: o for o in outputs if o.finished}
    assert set(finals) == set(requests())
    guided = [name for name, (_, params) in requests().items() if params.guide is not None]
    # a NaN row's argmax is its first NaN: sooner or later an id the guide forbids ("free" takes any byte: its
    # bytes mean nothing, and no check that costs nothing tells them from others)
    assert all((finals[n].finish_reason, finals[n].error_code) == ("error", "not_finite") for n in guided), finals
