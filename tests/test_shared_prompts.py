"""Shared prompts (Engine(share_prompts=True), the default): a request whose prompt begins with one
still being prefilled copies that state instead of computing it, and its outputs do not change.

CPU, fp32, random tiny models; prompts past the 512-byte window, so that the ring buffers are copied
whole, prefilled in several chunks, so that requests join a leader in the middle of its prompt.
"""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from enginekit import replay_full_recompute, run_engine
from factory import PARITY_TEXT

from blt_runtime import load_model
from blt_runtime.engine import Engine
from blt_runtime.runner import Runner
from blt_runtime.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
PROMPT = PARITY_TEXT[:697]  # its last patch is still open: bytes of it are copied too
GREEDY = SamplingParams(max_bytes=60, temperature=0.0, ignore_eos=True, logprobs=1)


def sampled(seed: int, **extra) -> SamplingParams:
    return SamplingParams(max_bytes=60, temperature=0.9, top_p=0.95, seed=seed, ignore_eos=True, logprobs=1, **extra)


# the n choices of one prompt, a longer prompt that begins with it, a shorter one that only it begins
# with, and one that shares nothing; some join while the first is still prefilling
REQUESTS = {
    "a": (PROMPT, GREEDY),
    "b": (PROMPT, sampled(1)),
    "c": (PROMPT, sampled(2, presence_penalty=0.5)),
    "longer": (PROMPT + b" and then some more", GREEDY),
    "shorter": (PROMPT[:300], sampled(3)),
    "other": (PARITY_TEXT[100:400], GREEDY),
}
JOINS = {"a": 0, "b": 0, "c": 2, "longer": 3, "shorter": 1, "other": 0}


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


def counting_prefill(monkeypatch) -> tuple[list[int], list[int]]:
    """Record the number of positions each prefill chunk runs, and the open patch's bytes at each copy."""
    chunks, open_lens = [], []
    prefill_start, share_prompt = Runner.prefill_start, Runner.share_prompt

    def counted_prefill_start(self, slot, ids, start, transfer):
        chunks.append(len(ids))
        return prefill_start(self, slot, ids, start, transfer)

    def counted_share_prompt(self, source, target, length, num_patches, open_len):
        open_lens.append(open_len)
        share_prompt(self, source, target, length, num_patches, open_len)

    monkeypatch.setattr(Runner, "prefill_start", counted_prefill_start)
    monkeypatch.setattr(Runner, "share_prompt", counted_share_prompt)
    return chunks, open_lens


@pytest.mark.parametrize("static, overlap", [(False, False), (True, False), (True, True)])
def test_shared_prompts_change_no_output(model, monkeypatch, static, overlap):
    chunks, open_lens = counting_prefill(monkeypatch)
    results = {}
    for share in (False, True):
        engine = Engine(model, max_batch_size=8, prefill_chunk=128, static=static, overlap=overlap,
                        share_prompts=share)
        chunks.clear()
        results[share] = run_with_logprobs(engine)
        assert not engine.sequences and engine.slots.num_free == 8 and not engine._followers
    prompt_positions = sum(len(p) + 1 for p, _ in REQUESTS.values())
    shared = {rid: final.usage.shared_prompt_bytes for rid, (_, _, final) in results[True].items()}
    n = len(PROMPT)
    assert shared == {"a": 0, "b": n, "c": n, "longer": n, "shorter": 0, "other": 0}
    assert sum(chunks) == prompt_positions - 3 * (n + 1), "the followers' prompts should not be prefilled again"
    assert len(open_lens) == 3 and open_lens[0] > 0, "the prompt should end inside a patch"
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
    assert engine.sequences["f1"].leader is None and engine.sequences["f2"].leader is engine.sequences["f1"]
    out = {rid: bytearray() for rid in ("f1", "f2")}
    finals = {}
    while engine.has_work():
        for o in engine.step():
            if o.request_id in out:
                out[o.request_id] += o.new_bytes
                if o.finished:
                    finals[o.request_id] = o
    alone = run_engine(Engine(model), {"x": (PROMPT, GREEDY)})["x"][0]
    assert bytes(out["f1"]) == bytes(out["f2"]) == alone
    assert finals["f1"].usage.shared_prompt_bytes == 0 and finals["f2"].usage.shared_prompt_bytes == len(PROMPT)
    assert engine.slots.num_free == 4 and not engine._followers


def test_an_aborted_follower_leaves_its_leader_alone(model):
    engine = Engine(model, max_batch_size=4, prefill_chunk=128)
    engine.add_request("lead", PROMPT, GREEDY)
    engine.add_request("f", PROMPT, GREEDY)
    engine.step()
    assert engine.abort("f")
    assert engine.slots.num_free == 3 and not engine._followers
    out, final = bytearray(), None
    while engine.has_work():
        for o in engine.step():
            if o.request_id == "lead":
                out += o.new_bytes
                final = o if o.finished else final
    assert bytes(out) == run_engine(Engine(model), {"x": (PROMPT, GREEDY)})["x"][0]
    assert final.usage.shared_prompt_bytes == 0


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
