"""Kept prefixes (sharing.py): a prompt that shares a prefix with a request seen before, but not all of it,
keeps a copy of its state there, and later prompts that begin with that prefix start from a copy.

CPU, fp32, a random tiny model; the shared prefix runs past the 512-byte window, so that the ring
buffers have wrapped when the copy is made.
"""

from dataclasses import replace

import pytest
import torch
from enginekit import replay_full_recompute
from factory import PARITY_TEXT
from hypothesis import given
from hypothesis import strategies as st

from blt_runtime import load_model
from blt_runtime.engine import Engine
from blt_runtime.sampling import SamplingParams
from blt_runtime.sharing import MIN_SHARED_PREFIX, common_prefix

SYSTEM = PARITY_TEXT[:600] + b"\nQ: "  # the same instructions before every conversation
QUESTIONS = [b"what comes next?", b"was it so?", b"why not?", b"tell me more.", b"and then?"]
GREEDY = SamplingParams(max_bytes=24, temperature=0.0, ignore_eos=True, logprobs=1)


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return load_model(hf_checkpoint("1b")[1])


def generate(engine: Engine, rid: str, prompt: bytes, params: SamplingParams = GREEDY,
             join: tuple[str, bytes] | None = None, join_after: int = 3) -> dict[str, tuple[bytes, list, object]]:
    """Run `prompt` to its end, and `join` (id, prompt) added after `join_after` steps if given ->
    {id: (bytes, logprobs of its bytes, last output)}."""
    engine.add_request(rid, prompt, params)
    out, logprobs, final, step = {}, {}, {}, 0
    while engine.has_work():
        if join is not None and step == join_after:
            engine.add_request(join[0], join[1], params)
        for o in engine.step():
            out[o.request_id] = out.get(o.request_id, b"") + o.new_bytes
            logprobs.setdefault(o.request_id, []).extend([o.logprobs] if o.logprobs else [])
            if o.finished:
                final[o.request_id] = o
        step += 1
    return {r: (out[r], logprobs[r], final[r]) for r in final}


def kept(engine: Engine) -> dict[int, bytes]:
    """Slot -> the prompt bytes of the kept prefix it holds."""
    return {slot: bytes(i - 4 for i in held.ids[1:]) for slot, held in engine.sharing.retained.items() if held.kept}


@pytest.mark.parametrize("static, overlap", [(False, False), (True, True)])
def test_conversations_after_the_same_instructions_start_from_a_kept_copy(model, static, overlap):
    """The second conversation parts from the first's retained slot after the instructions and the "w"
    their questions begin with: its prefill keeps a copy there, and the third starts from a copy of
    it. The fourth shares only the instructions with it: it keeps a copy of its own there, in the
    place of the longer one by a byte, and the fifth starts from it. The kept prefix stays, and every
    output equals an engine's that shares nothing, and full recompute."""
    engine = Engine(model, max_batch_size=8, prefill_chunk=128, static=static, overlap=overlap)
    fresh = Engine(model, max_batch_size=8, prefill_chunk=128, static=static, share_prompts=False)
    common = len(SYSTEM) + 1  # "w" begins the first three questions
    for i, question in enumerate(QUESTIONS):
        prompt = SYSTEM + question
        got, logprobs, final = generate(engine, f"c{i}", prompt)[f"c{i}"]
        want, want_logprobs, want_final = generate(fresh, f"c{i}", prompt)[f"c{i}"]
        assert got == want
        torch.testing.assert_close(logprobs, want_logprobs, rtol=0, atol=1e-4)
        assert final.usage == replace(want_final.usage, shared_prompt_bytes=final.usage.shared_prompt_bytes)
        replay_full_recompute(model, prompt, GREEDY, 0, got, engine_logprobs=logprobs)
        assert final.usage.shared_prompt_bytes == [0, 0, common, 0, len(SYSTEM)][i], i
        assert list(kept(engine).values()) == [[], [SYSTEM + b"w"], [SYSTEM + b"w"], [SYSTEM], [SYSTEM]][i], i
    assert engine.slots.num_free == 8 and not engine.sequences


def test_a_copy_is_kept_from_a_running_request_and_from_a_fork(model):
    """A prompt that shares the instructions with a request still decoding (past them, so it cannot
    follow it) keeps a copy of its own; one that follows a request still prefilling keeps the copy it
    forks from."""
    engine = Engine(model, max_batch_size=8, prefill_chunk=128)
    out = generate(engine, "a", SYSTEM + QUESTIONS[1], join=("b", SYSTEM + QUESTIONS[3]), join_after=8)
    assert engine.sequences == {} and out["b"][2].usage.shared_prompt_bytes == 0
    assert list(kept(engine).values()) == [SYSTEM]
    engine = Engine(model, max_batch_size=8, prefill_chunk=128)
    out = generate(engine, "a", SYSTEM + QUESTIONS[1], join=("b", SYSTEM + QUESTIONS[3]), join_after=1)
    assert out["b"][2].usage.shared_prompt_bytes == len(SYSTEM)  # it followed "a"
    assert list(kept(engine).values()) == [SYSTEM]
    fresh = Engine(model, share_prompts=False)
    assert out["b"][0] == generate(fresh, "b", SYSTEM + QUESTIONS[3])["b"][0]


def test_requests_arriving_together_keep_one_copy(model):
    """Several prompts after the same instructions, arriving together: the later ones follow the first
    to where they part from it, at the end of the instructions or a letter or two later, and one copy
    of the state after the instructions is kept."""
    engine = Engine(model, max_batch_size=8, prefill_chunk=128)
    for i, question in enumerate(QUESTIONS):
        engine.add_request(f"q{i}", SYSTEM + question, GREEDY)
    while engine.has_work():
        engine.step()
    assert list(kept(engine).values()) == [SYSTEM]
    out = generate(engine, "later", SYSTEM + b"and one more?")
    assert out["later"][2].usage.shared_prompt_bytes == len(SYSTEM)


def test_a_kept_prefix_lasts_through_a_full_batch(model):
    """Kept prefixes have slots of their own, beyond the running sequences': four requests in the four
    slots leave the kept prefix alone (static steps read slots 0..3 in place), and a prompt that
    starts from it later gets the bytes it would get alone."""
    engine = Engine(model, max_batch_size=4, prefill_chunk=128, static=True, overlap=True)
    generate(engine, "a", SYSTEM + QUESTIONS[1])
    generate(engine, "b", SYSTEM + QUESTIONS[3])
    assert kept(engine) == {4: SYSTEM}
    for i in range(4):
        engine.add_request(f"o{i}", PARITY_TEXT[700 + 100 * i:790 + 100 * i], replace(GREEDY, max_bytes=40))
    engine.step()
    assert engine.slots.num_free == 0
    while engine.has_work():
        engine.step()
    assert kept(engine) == {4: SYSTEM}
    got, logprobs, final = generate(engine, "c", SYSTEM + QUESTIONS[4])["c"]
    assert final.usage.shared_prompt_bytes == len(SYSTEM)
    fresh = Engine(model, max_batch_size=4, prefill_chunk=128, static=True, share_prompts=False)
    want, want_logprobs, _ = generate(fresh, "c", SYSTEM + QUESTIONS[4])["c"]
    assert got == want
    torch.testing.assert_close(logprobs, want_logprobs, rtol=0, atol=1e-4)


def test_the_same_prompt_again_prefills_its_last_byte_only(model):
    """A prompt sent again (a retry, another sample) keeps a copy up to its last byte: the next time it
    is sent, that byte alone is prefilled, for the logits of its first."""
    engine = Engine(model, max_batch_size=4, prefill_chunk=128)
    prompt = SYSTEM + QUESTIONS[0]
    shared = [generate(engine, f"r{i}", prompt)[f"r{i}"][2].usage.shared_prompt_bytes for i in range(3)]
    assert shared == [0, 0, len(prompt) - 1]
    assert list(kept(engine).values()) == [prompt[:-1]]


def test_kept_prefixes_give_way(model):
    """With every kept slot taken, a new kept prefix takes the place of the one used longest ago; a prefix
    too short is not kept; with no kept slots nothing is kept, and no prefill is cut for it."""
    engine = Engine(model, max_batch_size=4, prefill_chunk=128, kept_prefixes=1)
    generate(engine, "a", SYSTEM + QUESTIONS[1])
    generate(engine, "b", SYSTEM + QUESTIONS[3])
    assert kept(engine) == {4: SYSTEM}
    other = PARITY_TEXT[700:900]
    generate(engine, "c", other, join=("d", other + b"and on"), join_after=0)  # d follows c, and keeps the copy
    assert kept(engine) == {4: other}  # the newest in the place of the older
    assert generate(engine, "e", other + b"and so")["e"][2].usage.shared_prompt_bytes == len(other)
    generate(engine, "f", PARITY_TEXT[:MIN_SHARED_PREFIX - 1] + b"#" * 100)
    generate(engine, "g", PARITY_TEXT[:MIN_SHARED_PREFIX - 1] + b"%" * 100)
    assert kept(engine) == {4: other}
    engine = Engine(model, max_batch_size=4, prefill_chunk=128, kept_prefixes=0)
    generate(engine, "a", SYSTEM + QUESTIONS[1])
    engine.add_request("b", SYSTEM + QUESTIONS[3], GREEDY)
    engine.step()
    assert engine.sequences["b"].keep_at == 0 and engine.runner.scratch == 4
    generate(engine, "c", SYSTEM + QUESTIONS[4])
    assert kept(engine) == {}
    with pytest.raises(ValueError, match="kept_prefixes=-1"):
        Engine(model, kept_prefixes=-1)


def test_a_prefix_used_again_gives_way_last(model):
    """Two kept slots: prompts that start from the older prefix make it the newest, so a third prefix
    takes the other's place."""
    engine = Engine(model, max_batch_size=4, prefill_chunk=128, kept_prefixes=2)
    other = PARITY_TEXT[700:900]
    generate(engine, "a", SYSTEM + QUESTIONS[1], join=("b", SYSTEM + QUESTIONS[3]), join_after=8)
    generate(engine, "c", other + b"and on", join=("d", other + b"so it goes"), join_after=8)
    assert sorted(kept(engine).values()) == sorted([SYSTEM, other])
    out = generate(engine, "e", SYSTEM + QUESTIONS[0], join=("f", SYSTEM + QUESTIONS[4]), join_after=8)
    assert out["e"][2].usage.shared_prompt_bytes == out["f"][2].usage.shared_prompt_bytes == len(SYSTEM)
    third = PARITY_TEXT[1000:1150]
    generate(engine, "g", third + b"one way", join=("h", third + b"another"), join_after=8)
    assert sorted(kept(engine).values()) == sorted([SYSTEM, third])


def test_requests_that_score_their_prompts_neither_keep_nor_take_copies(model):
    engine = Engine(model, max_batch_size=4, prefill_chunk=128)
    scoring = replace(GREEDY, prompt_logprobs=1)
    generate(engine, "a", SYSTEM + QUESTIONS[1])
    generate(engine, "b", SYSTEM + QUESTIONS[3], scoring)
    assert kept(engine) == {}
    generate(engine, "c", SYSTEM + QUESTIONS[4])
    assert kept(engine) == {4: SYSTEM}
    assert generate(engine, "d", SYSTEM + QUESTIONS[0], scoring)["d"][2].usage.shared_prompt_bytes == 0


@given(st.lists(st.integers(0, 2), max_size=600), st.lists(st.integers(0, 2), max_size=600), st.integers(0, 600))
def test_common_prefix_is_where_two_lists_part(a, b, shared):
    b = a[:shared] + b  # mostly a long shared stretch, across the spans it compares
    want = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    assert common_prefix(a, b) == common_prefix(b, a) == want
