"""Shared prompts (Engine(share_prompts=True), the default): a request whose prompt shares a prefix with
one still being prefilled copies the state there instead of computing it, and its outputs do not change.

CPU, fp32, random tiny models; prompts past the 512-byte window, so that the ring buffers are copied
whole, prefilled in several chunks, so that requests join a leader in the middle of its prompt.
"""

import json
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from enginekit import replay_full_recompute, run_engine
from factory import MODEL_SEED, PARITY_TEXT

from blt_runtime import encode, load_model
from blt_runtime.engine import Engine
from blt_runtime.guide import ByteGuide
from blt_runtime.patcher import patch_starts
from blt_runtime.runner import Runner
from blt_runtime.sampling import SamplingParams
from blt_runtime.sharing import MIN_SHARED_PREFIX, PromptSharing

ROOT = Path(__file__).resolve().parents[1]
PROMPT = PARITY_TEXT[:697]
FORCING = ByteGuide.regex(r"(the|a) (king|queen) (is|was) (dead|alive)\. Long live (the king|the queen)!")
GREEDY = SamplingParams(max_bytes=60, temperature=0.0, ignore_eos=True, logprobs=1)


def sampled(seed: int, **extra) -> SamplingParams:
    return SamplingParams(max_bytes=60, temperature=0.9, top_p=0.95, seed=seed, ignore_eos=True, logprobs=1, **extra)


# the n choices of one prompt, a longer prompt that begins with it, a shorter one that begins it, one
# that shares its first 400 bytes and then goes elsewhere, one that shares too few bytes to cut a chunk
# for, and one that shares nothing; most join while the first is still prefilling
REQUESTS = {
    "a": (PROMPT, GREEDY),
    "b": (PROMPT, sampled(1)),
    "c": (PROMPT, sampled(2, presence_penalty=0.5)),
    "longer": (PROMPT + b" and then some more", GREEDY),
    "shorter": (PROMPT[:300], sampled(3)),
    "sibling": (PROMPT[:400] + b"; and here it goes its own way", GREEDY),
    "few": (PROMPT[:20] + b"and not much else", GREEDY),
    "other": (PARITY_TEXT[100:400], GREEDY),
}
JOINS = {"a": 0, "b": 0, "c": 2, "longer": 3, "shorter": 1, "sibling": 2, "few": 1, "other": 0}


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return load_model(hf_checkpoint("1b")[1])


def run_with_logprobs(engine: Engine) -> dict[str, tuple[bytes, list, object]]:
    """run_engine's drive, keeping each byte's logprobs: they show a wrong copy that the bytes may not."""
    out = {rid: (bytearray(), []) for rid in REQUESTS}
    final, step = {}, 0
    while len(final) < len(REQUESTS):
        for rid, (prompt, params) in REQUESTS.items():
            if JOINS[rid] == step:
                engine.add_request(rid, prompt, params)
        for o in engine.step():
            out[o.request_id][0].extend(o.new_bytes)
            if o.logprobs is not None:
                out[o.request_id][1].append(o.logprobs)
            if o.finished:
                final[o.request_id] = o
        step += 1
    return {rid: (bytes(out[rid][0]), out[rid][1], final[rid]) for rid in REQUESTS}


def drain(engine: Engine, max_steps: int = 1000) -> dict[str, tuple[bytes, object, list]]:
    """Step until nothing is left (at most max_steps) -> {request id: (its bytes, its last output, the
    logprobs of its bytes)}."""
    out, final, logprobs = {}, {}, {}
    for _ in range(max_steps):
        if not engine.has_work():
            break
        for o in engine.step():
            out[o.request_id] = out.get(o.request_id, b"") + o.new_bytes
            logprobs.setdefault(o.request_id, []).extend([o.logprobs] if o.logprobs else [])
            if o.finished:
                final[o.request_id] = o
    assert not engine.has_work(), "a follower waits for a fork that never comes"
    return {rid: (out[rid], final[rid], logprobs[rid]) for rid in out}


def alone(model, prompt: bytes) -> bytes:
    """What an engine without sharing gives the prompt alone."""
    return run_engine(Engine(model, share_prompts=False), {"x": (prompt, GREEDY)})["x"][0]


def open_patch_bytes(model, prompt: bytes, length: int) -> int:
    """Bytes in the open patch once the first `length` positions of the prompt (BOS included) have run,
    by the full forward's patches."""
    starts = patch_starts(model.entropies(torch.tensor([encode(prompt)])), model.config.patching_threshold)[0]
    return 0 if starts[length] else length - max(t for t in range(length) if starts[t])


def counting_prefill(monkeypatch) -> tuple[list[int], list[tuple[int, int]], list[int]]:
    """Record the number of positions each prefill chunk (or row of a batched prefill) runs, (positions,
    the open patch's bytes) at each copy, and the positions of the copies into and out of kept slots."""
    chunks, open_lens, kept = [], [], []
    prefill_start, share_prompt = Runner.prefill_start, Runner.share_prompt
    keep, allocate = PromptSharing.keep, PromptSharing.allocate

    def counted_prefill_start(self, slots, rows, starts, transfer):
        chunks.extend(len(r) for r in rows)
        return prefill_start(self, slots, rows, starts, transfer)

    def counted_share_prompt(self, source, target, length, num_patches, open_len):
        open_lens.append((length, open_len))
        share_prompt(self, source, target, length, num_patches, open_len)

    def counted_keep(self, seq):
        copies = len(open_lens)
        keep(self, seq)
        kept.extend(length for length, _ in open_lens[copies:])

    def counted_allocate(self, seq, resume=True):
        copies = len(open_lens)
        slot = allocate(self, seq, resume)
        kept.extend(length for length, _ in open_lens[copies:])
        return slot

    monkeypatch.setattr(Runner, "prefill_start", counted_prefill_start)
    monkeypatch.setattr(Runner, "share_prompt", counted_share_prompt)
    monkeypatch.setattr(PromptSharing, "keep", counted_keep)
    monkeypatch.setattr(PromptSharing, "allocate", counted_allocate)
    return chunks, open_lens, kept


@pytest.mark.parametrize("static, overlap", [(False, False), (True, False), (True, True)])
def test_shared_prompts_change_no_output(model, monkeypatch, static, overlap):
    chunks, open_lens, kept = counting_prefill(monkeypatch)
    results = {}
    for share in (False, True):
        engine = Engine(model, max_batch_size=8, prefill_chunk=128, static=static, overlap=overlap,
                        share_prompts=share)
        chunks.clear()
        results[share] = run_with_logprobs(engine)
        assert not engine.sequences and engine.slots.num_free == 8
    prompt_positions = sum(len(p) + 1 for p, _ in REQUESTS.values())
    shared = {rid: final.usage.shared_prompt_bytes for rid, (_, _, final) in results[True].items()}
    n = len(PROMPT)
    assert shared == {"a": 0, "b": n, "c": n, "longer": n, "shorter": 300, "sibling": 400, "few": 0, "other": 0}
    assert sum(chunks) == prompt_positions - sum(shared.values()) - 5, "shared prefixes should not be prefilled again"
    # each copy takes the open patch the full forward's patches leave at its point; CI's model leaves one
    # open at 401 and 698 (seed 53's closes a patch at all three points, so there that part is not tested)
    assert open_lens == [(length, open_patch_bytes(model, PROMPT, length)) for length, _ in open_lens]
    # five forks; and where a prompt shares a prefix with one seen before but not all of it, a copy kept
    # for later prompts (sibling's 400 bytes; longer's whole PROMPT), which those admitted later copy
    assert len(open_lens) == 5 + len(kept) and set(kept) <= {401, 698}
    if MODEL_SEED == 0:
        assert any(o > 0 for _, o in open_lens), "some fork should copy an open patch"
    for rid, (prompt, params) in REQUESTS.items():
        alone, together = results[False][rid], results[True][rid]
        assert together[0] == alone[0], rid
        torch.testing.assert_close(together[1], alone[1], rtol=0, atol=1e-4)
        assert together[2].usage == replace(alone[2].usage, shared_prompt_bytes=shared[rid])
        if params.temperature == 0:
            replay_full_recompute(model, prompt, params, 0, together[0], engine_logprobs=together[1])


def test_a_leader_aborted_while_prefilling_hands_over(model):
    """The first follower prefills the prompt itself and the others follow it."""
    engine = Engine(model, max_batch_size=4, prefill_chunk=128)
    for rid in ("lead", "f1", "f2"):
        engine.add_request(rid, PROMPT, GREEDY)
    engine.step()
    assert engine.sequences["f1"].leader is engine.sequences["lead"]
    assert engine.abort("lead")
    assert engine.sequences["f1"].leader is None and engine.sequences["f2"].leader is None
    engine.step()  # they look again when the next step is planned
    assert engine.sequences["f1"].leader is None and engine.sequences["f2"].leader is engine.sequences["f1"]
    out = drain(engine)
    assert out["f1"][0] == out["f2"][0] == alone(model, PROMPT)
    assert out["f1"][1].usage.shared_prompt_bytes == 0 and out["f2"][1].usage.shared_prompt_bytes == len(PROMPT)
    assert engine.slots.num_free == 4


def test_an_aborted_follower_leaves_its_leader_alone(model):
    engine = Engine(model, max_batch_size=4, prefill_chunk=128)
    engine.add_request("lead", PROMPT, GREEDY)
    engine.add_request("f", PROMPT, GREEDY)
    engine.step()
    assert engine.abort("f")
    assert engine.slots.num_free == 3 and not engine.sequences["lead"].followers
    generated, final, _ = drain(engine)["lead"]
    assert generated == alone(model, PROMPT) and final.usage.shared_prompt_bytes == 0


def test_no_sharing_across_admission_order_or_once_prefilled(model):
    """A request follows only one admitted before it that is still prefilling."""
    engine = Engine(model, max_batch_size=4, prefill_chunk=4096)
    engine.add_request("first", PROMPT, GREEDY)
    engine.step()  # the whole prompt in one chunk: "first" is prefilled
    engine.add_request("late", PROMPT, GREEDY)
    engine.step()
    assert engine.sequences["late"].leader is None  # nothing left to wait for: it prefills itself


def test_benchmark_script_runs():
    """bench/shared_prompts.py stays runnable (it times; only its equality check is asserted)."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "shared_prompts.py"), "--n", "1,3", "--bytes", "4",
                          "--repeats", "1", "--prompt-bytes", "200"], capture_output=True, text=True, timeout=300,
                         check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["outputs_equal"] is True
    for n in (1, 3):
        for key in (f"first_bytes_ms_{n}", f"all_done_ms_{n}_unshared", f"first_bytes_speedup_{n}"):
            assert result[key] > 0, key
    assert result["next_turn_first_byte_ms"] > 0 and result["next_turn_first_byte_ms_unshared"] > 0
    assert result["conversations_first_byte_ms"] > 0 and result["conversations_first_byte_ms_unshared"] > 0


def test_followers_of_an_aborted_leader_look_again_only_once_queued_chunks_are_done(model):
    """With overlap, a prefill chunk is queued before abort() returns: a follower that looked for a new
    leader at once could pick one whose queued chunk already runs past the prefix they share."""
    engine = Engine(model, max_batch_size=4, prefill_chunk=128, overlap=True)
    other = PROMPT[:200] + b"; from here on another road entirely, " * 8
    engine.add_request("x", other, GREEDY)
    engine.add_request("lead", PROMPT, GREEDY)
    engine.add_request("f", PROMPT, GREEDY)
    engine.step()  # x's first chunk done, its second (positions 129-256) queued
    assert engine.sequences["lead"].leader is engine.sequences["x"]  # for the first 200 bytes
    assert engine.sequences["f"].leader is engine.sequences["lead"]  # for the whole prompt
    assert engine.sequences["x"].processed < 201 < 257
    engine.abort("lead")
    generated, final, _ = drain(engine)["f"]
    assert generated == alone(model, PROMPT)
    assert final.usage.shared_prompt_bytes == 0 and engine.slots.num_free == 4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_prefixes_joins_and_aborts(model, seed):
    """Prompts that share prefixes of every length with each other, joining at random steps, and short
    ones of their own arriving together (prefilled together); some aborted at random steps (leaders
    among them), some scoring their prompts, some guided by a pattern that forces bytes, and a few late,
    which start from copies of prefixes kept from the others; with priorities, so that more urgent requests
    preempt others (leaders, followers, requests keeping prefixes, requests whose forced bytes wait among
    them): every request that is not aborted ends with the bytes and the prompt scores that an engine
    without sharing, priorities or jump-forward, prefilling one prompt a step, gives it, and nothing waits
    forever."""
    rng, guides = random.Random(seed), random.Random(-1 - seed)  # (the guides drawn apart: the rest as it was)
    stems = [PARITY_TEXT[:rng.randrange(50, 400)] for _ in range(3)]
    requests, joins, aborts = {}, {}, {}
    for i in range(12):
        stem = rng.choice(stems)
        prompt = stem[:rng.randrange(1, len(stem) + 1)] + PARITY_TEXT[500:500 + rng.randrange(0, 3) * 40]
        params = GREEDY if i % 2 else replace(sampled(i), guide=guides.choice([None, FORCING]))
        requests[f"r{i}"] = (prompt, replace(params, max_bytes=rng.randrange(1, 16),
                                             prompt_logprobs=rng.choice([None, None, 1, 2])))
        joins[f"r{i}"] = rng.randrange(0, 12)
        if rng.random() < 0.3:
            aborts[f"r{i}"] = joins[f"r{i}"] + rng.randrange(0, 4)
    at = rng.randrange(0, 12)
    for j in range(4):  # short prompts of their own, arriving together: prefilled together
        start = 700 + 60 * j
        requests[f"b{j}"] = (PARITY_TEXT[start:start + rng.randrange(5, 40)],
                             replace(GREEDY, max_bytes=rng.randrange(1, 16), prompt_logprobs=rng.choice([None, 1])))
        joins[f"b{j}"] = at
    for j in range(4):  # late, once the others are done or nearly: from the copies kept of their prefixes
        stem = rng.choice(stems)
        requests[f"late{j}"] = (stem[:rng.randrange(len(stem) // 2, len(stem) + 1)] + PARITY_TEXT[900 + 20 * j:][:20],
                                replace(GREEDY, max_bytes=rng.randrange(1, 8)))
        joins[f"late{j}"] = rng.randrange(40, 80)
    priorities = {rid: rng.choice([0, 0, 1, 2]) for rid in requests}
    results, scores, shared, preempted, forced = {}, {}, 0, 0, 0
    for share in (False, True):
        engine = Engine(model, max_batch_size=6, prefill_chunk=48, overlap=bool(seed % 2), share_prompts=share,
                        jump_forward=2 if share else 0)
        if not share:
            engine.scheduler.batch_prompt = None  # and no prompts prefilled together
        out, done, scores[share] = {rid: bytearray() for rid in requests}, set(), {}
        for step in range(400):
            for rid, at in joins.items():
                if at == step:
                    engine.add_request(rid, *requests[rid], priority=priorities[rid] if share else 0)
            for rid, at in aborts.items():
                if at == step:
                    engine.abort(rid)
            for o in engine.step():
                out[o.request_id] += o.new_bytes
                if o.prompt_logprobs is not None:
                    assert o.request_id not in scores[share], "prompt scores reported twice"
                    scores[share][o.request_id] = o.prompt_logprobs
                if o.finished:
                    done.add(o.request_id)
                    shared += o.usage.shared_prompt_bytes
            preempted += len(engine.last_preempted)
            if len(done) == len(requests):
                break
        assert len(done) == len(requests), f"still waiting after 400 steps: {set(requests) - done}"
        assert engine.slots.num_free == 6 and not engine.sequences
        results[share], forced = out, forced + engine.forced_bytes
    assert shared > 0 and preempted > 0 and forced > 0
    for rid, (prompt, params) in requests.items():
        if rid not in aborts:
            assert results[True][rid] == results[False][rid], rid
            if params.prompt_logprobs is not None:
                got, want = scores[True][rid], scores[False][rid]
                assert len(got) == len(want) == len(prompt)
                assert all(abs(g[0] - w[0]) < 1e-4 and len(g[1]) == params.prompt_logprobs for g, w in zip(got, want))


@pytest.mark.parametrize("f_shares", [300, 551])
def test_a_leader_that_looks_again_keeps_its_followers_forks(model, f_shares):
    """A leader whose own leader is aborted looks for another; it must not take one whose fork lies
    past its followers' forks (its state would jump over them), and one whose fork is theirs hands
    its copy on. Here L follows X for 101 positions and F follows L for 300 or 551; X and X' are
    aborted, and s, which shares 551 with L, is free again."""
    engine = Engine(model, max_batch_size=8, prefill_chunk=64)
    prompts = {"x'": PROMPT, "s": PROMPT[:649], "x": PROMPT[:100] + b"#" * 50, "l": PROMPT[:550] + b"zzz",
               "f": PROMPT[:f_shares - 1] + b"q"}
    engine.add_request("x'", prompts["x'"], GREEDY)
    engine.add_request("s", prompts["s"], GREEDY)
    for _ in range(9):
        engine.step()
    seqs = engine.sequences
    assert seqs["s"].leader is seqs["x'"] and 551 < seqs["x'"].processed < 650
    for rid in ("x", "l", "f"):
        engine.add_request(rid, prompts[rid], GREEDY)
    engine.step()
    assert (seqs["l"].leader, seqs["l"].fork_at) == (seqs["x"], 101)
    assert (seqs["f"].leader, seqs["f"].fork_at) == (seqs["l"], f_shares)
    engine.abort("x'")
    engine.abort("x")
    out = drain(engine, max_steps=200)
    assert {rid: out[rid][0] for rid in ("s", "l", "f")} == {rid: alone(model, prompts[rid]) for rid in ("s", "l", "f")}


@pytest.mark.parametrize("shared_bytes", [MIN_SHARED_PREFIX - 1, MIN_SHARED_PREFIX])
def test_a_short_common_prefix_is_not_worth_a_cut(model, shared_bytes):
    engine = Engine(model, max_batch_size=4, prefill_chunk=128)
    engine.add_request("lead", PROMPT, GREEDY)
    engine.add_request("f", PROMPT[:shared_bytes] + b"\x00 and then something else", GREEDY)
    engine.step()  # the leader's first chunk, cut for the follower where their prompts part
    assert engine.sequences["f"].shared == (shared_bytes + 1 if shared_bytes >= MIN_SHARED_PREFIX else 0)


def generate_with_logprobs(engine: Engine, rid: str, prompt: bytes) -> tuple[bytes, list, object]:
    engine.add_request(rid, prompt, GREEDY)
    generated, final, logprobs = drain(engine)[rid]
    return generated, logprobs, final


def first_turn_bytes(model, last_closes: bool) -> int:
    """A max_bytes for PROMPT's greedy completion whose last byte closes its patch, or does not."""
    engine = Engine(model, share_prompts=False)
    engine.add_request("probe", PROMPT, GREEDY)
    outputs = []
    while engine.has_work():
        outputs += [o for o in engine.step() if o.new_bytes]
    for n in range(20, len(outputs)):  # the byte after the n-th begins a patch iff the n-th closes one
        if outputs[n - 1].new_bytes[0] < 0x80 and outputs[n].patch_start == last_closes:  # ASCII: ends a character
            return n
    raise AssertionError("no such completion length")


@pytest.mark.parametrize("static, overlap, last_closes", [(False, False, False), (False, False, True),
                                                          (True, True, True)])
def test_a_finished_request_leaves_its_slot_to_the_next_turn(model, static, overlap, last_closes):
    """The next turn of a conversation (the prompt, the completion, more) resumes from the slot the
    first turn finished in: past the 512-byte window; the completion's last byte closing its patch or
    not (the entropy model has seen that byte; nothing else has)."""
    engine = Engine(model, max_batch_size=4, prefill_chunk=128, static=static, overlap=overlap)
    engine.add_request("turn 1", PROMPT, replace(GREEDY, max_bytes=first_turn_bytes(model, last_closes)))
    first = drain(engine)["turn 1"][0]
    turn2 = PROMPT + first + b"\nand the next question"
    assert engine.sharing.retained[0].ids == encode(PROMPT + first)[:-1]  # the last byte never ran
    got, logprobs, final = generate_with_logprobs(engine, "turn 2", turn2)
    assert final.usage.shared_prompt_bytes == len(PROMPT + first) - 1  # resumed in slot 0, which now holds turn 2
    assert list(engine.sharing.retained) == [0] and engine.sharing.retained[0].ids == encode(turn2 + got)[:-1]
    fresh = Engine(model, max_batch_size=4, prefill_chunk=128, static=static, share_prompts=False)
    want, want_logprobs, want_final = generate_with_logprobs(fresh, "turn 2", turn2)
    assert got == want
    assert final.usage == replace(want_final.usage, shared_prompt_bytes=final.usage.shared_prompt_bytes)
    torch.testing.assert_close(logprobs, want_logprobs, rtol=0, atol=1e-4)
    replay_full_recompute(model, turn2, GREEDY, 0, got, engine_logprobs=logprobs)


def test_a_retained_slot_is_handed_out_when_needed(model):
    """A request that does not continue it takes the slot (lowest free first) and the state is gone;
    an aborted request leaves nothing."""
    engine = Engine(model, max_batch_size=2, prefill_chunk=128)
    first, _, _ = generate_with_logprobs(engine, "turn 1", PROMPT)
    assert list(engine.sharing.retained) == [0]
    generate_with_logprobs(engine, "other", PARITY_TEXT[100:300])
    assert list(engine.sharing.retained) == [0]  # now the other request's
    assert engine.sharing.retained[0].ids[:3] == encode(PARITY_TEXT[100:300])[:3]
    _, _, final = generate_with_logprobs(engine, "turn 2", PROMPT + first + b"?")
    assert final.usage.shared_prompt_bytes == 0
    engine.add_request("aborted", PROMPT, GREEDY)
    for _ in range(12):
        engine.step()
    engine.abort("aborted")
    drain(engine)
    assert 0 not in engine.sharing.retained
