"""Overlapped steps (Engine(overlap=True), the CUDA default): the next step is queued before a step's
outputs go back. Nothing a client sees may change but when a request added between two calls starts.

CPU, fp32, random tiny models: on a CPU the queued step runs at once, which changes no host path.
"""

import pytest
from enginekit import run_engine
from factory import PARITY_TEXT

from blt_runtime import load_model
from blt_runtime.engine import Engine
from blt_runtime.sampling import SamplingParams


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return load_model(hf_checkpoint("1b")[1])


KINDS = [dict(temperature=0.0, logprobs=2), dict(temperature=0.8, top_p=0.9), dict(temperature=0.0, max_bytes=0),
         dict(temperature=1.0, top_k=20, repetition_penalty=1.2), dict(temperature=0.0, stop=[b"e", b"t"]),
         dict(temperature=0.7, ignore_eos=False),
         dict(temperature=0.9, ignore_eos=False, min_bytes=12, stop=[b" ", b"e"], logit_bias={32: 1.5, 0: -3.0})]


def requests() -> dict[str, tuple[bytes, SamplingParams]]:
    """Prompts of 1 to 300 bytes (several prefill chunks of 64), every kind of ending."""
    out = {}
    for i, kind in enumerate(KINDS):
        kind = {"max_bytes": 30 + 7 * i, "ignore_eos": True, **kind}
        out[f"r{i}"] = (PARITY_TEXT[i * 41:i * 41 + 60 * i], SamplingParams(seed=i, **kind))
    return out


def outputs_by_request(engine: Engine, schedule) -> dict[str, list[tuple]]:
    """Drive the engine; `schedule(call, engine)` adds and aborts before each call. -> every output's
    fields, per request, in order. With overlap, a step must be queued after most calls."""
    seen: dict[str, list[tuple]] = {}
    call = queued = 0
    while True:
        schedule(call, engine)
        if not engine.has_work():
            break
        for o in engine.step():
            seen.setdefault(o.request_id, []).append((o.new_bytes, o.patch_start, o.logprobs, o.finished,
                                                      o.finish_reason, o.stop_reason, o.usage))
        queued += engine._queued is not None
        call += 1
    assert queued == 0 if not engine.overlap else queued >= call - 3
    return seen


def assert_same(got: dict[str, list[tuple]], want: dict[str, list[tuple]]) -> None:
    """Every field equal, but logprobs to within fp32 noise: a request that joins a step later shares
    its steps with other rows, and the dynamic step's batched sums run in another order."""
    assert got.keys() == want.keys()
    for rid in want:
        assert len(got[rid]) == len(want[rid]), rid
        for g, w in zip(got[rid], want[rid]):
            assert g[:2] + g[3:] == w[:2] + w[3:], rid
            if w[2] is None:
                assert g[2] is None
                continue
            assert g[2][0] == pytest.approx(w[2][0], abs=1e-4)
            assert [i for i, _ in g[2][1]] == [i for i, _ in w[2][1]]
            assert [v for _, v in g[2][1]] == pytest.approx([v for _, v in w[2][1]], abs=1e-4)


@pytest.mark.parametrize("static", [False, True])
def test_same_outputs_with_and_without_overlap(model, static):
    """Requests joining at different calls, of every sampling kind and ending: each request's outputs
    (bytes, patch starts, logprobs, finish, usage) are the same whether steps overlap or not."""
    reqs = requests()
    joins = {rid: (5 * i) % 17 for i, rid in enumerate(reqs)}
    runs = {}
    for overlap in (False, True):
        engine = Engine(model, max_batch_size=4, prefill_chunk=64, static=static, overlap=overlap)
        assert engine.overlap is overlap

        def schedule(call, engine):
            for rid, (prompt, params) in reqs.items():
                if joins[rid] == call:
                    engine.add_request(rid, prompt, params)
        runs[overlap] = outputs_by_request(engine, schedule)
        assert not engine.sequences and engine._queued is None
    assert_same(runs[True], runs[False])
    assert set(runs[True]) == set(reqs)
    assert runs[True]["r2"] == [(b"", False, None, True, "length", None, runs[True]["r2"][0][-1])]


@pytest.mark.parametrize("abort_at", range(3, 13))
def test_aborts_drop_the_queued_byte_and_free_the_slot(model, abort_at):
    """Aborted while its next byte is queued: the request's outputs are those it gets without overlap
    (the queued byte is never reported, nor a patch it would close in usage's global steps), and a
    request that takes its slot at once generates what it generates alone. Aborted at each of ten calls,
    so that some queued steps close a patch whatever the random model."""
    params = SamplingParams(max_bytes=40, temperature=0.0, ignore_eos=True)
    late = (PARITY_TEXT[200:260], SamplingParams(max_bytes=25, temperature=0.9, seed=7))

    def schedule(call, engine):
        if call == 0:
            engine.add_request("a", PARITY_TEXT[:50], params)
            engine.add_request("b", PARITY_TEXT[50:80], params)
        if call == abort_at:  # a is running and, with overlap, has a byte queued
            assert engine.abort("a")
            engine.add_request("c", *late)  # a's slot is the only free one

    runs = {}
    for overlap in (False, True):  # first bytes a step after the prefill both ways, as on CUDA
        engine = Engine(model, max_batch_size=2, overlap=overlap, first_byte_at_once=False)
        runs[overlap] = outputs_by_request(engine, schedule)
    assert_same(runs[True], runs[False])
    a = runs[True]["a"]
    assert a[-1][3:5] == (True, "abort") and a[-1][0] == b"" and len(a) < 40
    assert sum(len(o[0]) for o in a) == len(a) - 1 > 0  # a byte per output before the abort
    alone = run_engine(Engine(model, max_batch_size=2, overlap=True), {"c": late})["c"][0]
    assert b"".join(o[0] for o in runs[True]["c"]) == alone


def test_each_admission_reported_once(model):
    """`last_admitted` names each request once, in the call whose step admitted it (the worker times
    the queue wait from it)."""
    engine = Engine(model, max_batch_size=2, overlap=True)
    for i in range(5):
        engine.add_request(str(i), PARITY_TEXT[:10 * i], SamplingParams(max_bytes=5 + i, temperature=0.0))
    admitted = []
    while engine.has_work():
        engine.step()
        admitted += engine.last_admitted
    assert admitted == [str(i) for i in range(5)]


def test_a_failure_to_queue_comes_after_the_outputs(model, monkeypatch):
    """If queueing the next step fails, the step already done still returns its outputs (nothing is
    lost), and the next call raises the error."""
    engine = Engine(model, overlap=True)
    engine.add_request("a", PARITY_TEXT[:20], SamplingParams(max_bytes=10, temperature=0.0, ignore_eos=True))
    while not engine.sequences["a"].generated:
        engine.step()
    real = engine.runner.decode
    monkeypatch.setattr(engine.runner, "decode", lambda *a: (_ for _ in ()).throw(RuntimeError("device lost")))
    outputs = engine.step()
    assert [o.new_bytes for o in outputs] and outputs[0].new_bytes  # the completed step's byte
    assert engine.has_work()
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()
    monkeypatch.setattr(engine.runner, "decode", real)
    assert engine.abort("a")
    assert [(o.finished, o.finish_reason) for o in engine.step()] == [(True, "abort")]
    assert not engine.has_work()
