"""Helpers shared by the engine tests: drive an engine, and check its bytes against full recompute."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from blt_runtime import encode
from blt_runtime.engine import Engine
from blt_runtime.model.blt import BltModel
from blt_runtime.sampling import SamplingBatch, SamplingParams, bias_row, sample
from blt_runtime.tokenizer import EOS_ID, OFFSET


def with_local_window(model: BltModel, window: int | None) -> BltModel:
    """The same weights with another sliding window for the entropy model, encoder and decoder."""
    cfg = model.config
    cfg = replace(cfg, patcher=replace(cfg.patcher, window=window), encoder=replace(cfg.encoder, window=window),
                  decoder=replace(cfg.decoder, window=window))
    other = BltModel(cfg).eval()
    other.load_state_dict(model.state_dict())
    return other


def assert_close_scores(got, want, label: str) -> None:
    """One byte's (logprob, top [(id, logprob)]), or None, as an output gives it: the same, to within fp32 noise
    (rows batched, chunked or stepped otherwise sum in another order), with the same alternatives in order."""
    assert (got is None) == (want is None), label
    if got is not None:
        assert got[0] == pytest.approx(want[0], abs=1e-4), label
        assert [i for i, _ in got[1]] == [i for i, _ in want[1]], label
        assert [v for _, v in got[1]] == pytest.approx([v for _, v in want[1]], abs=1e-4), label


def run_engine(engine: Engine, requests: dict[str, tuple[bytes, SamplingParams]], join_at: dict[str, int] = None):
    """Drive the engine; requests join at the given step numbers. -> {id: (bytes, final output)}."""
    join_at = join_at or {}
    out = {rid: bytearray() for rid in requests}
    final, step = {}, 0
    while len(final) < len(requests):
        for rid, (prompt, params) in requests.items():
            if join_at.get(rid, 0) == step:
                engine.add_request(rid, prompt, params)
        for o in engine.step():
            out[o.request_id] += o.new_bytes
            if o.finished:
                final[o.request_id] = o
        step += 1
    return {rid: (bytes(out[rid]), final[rid]) for rid in requests}


def replay_full_recompute(model, prompt: bytes, params: SamplingParams, seed: int, generated: bytes,
                          ended_by_eos: bool = False, engine_logprobs: list | None = None) -> list[int]:
    """Check engine output against what full-recompute generation computes at every step.

    Full recompute runs the whole model over each prefix; the model is causal and the patches of a
    prefix never change when bytes are appended (spec section 3), so its logits for the prefix that
    ends at byte t are row t of one full forward over the final sequence. The sampler is a pure
    function of (logits, seed, position, counts, bias), so replaying it row by row gives exactly the bytes
    full recompute would choose; they must be the engine's. A guide (params.guide) adds its row of biases
    for the state the bytes so far reach, and allows EOS only where they are a whole match. Returns the
    final ids.
    """
    ids = encode(prompt + generated)
    logits = model.logits(torch.tensor([ids]))[0]
    first = len(ids) - len(generated)
    counts = torch.zeros(1, 260)
    seen = torch.zeros(1, 260, dtype=torch.bool)
    seen[0, ids[1:first]] = True
    bias = torch.tensor([bias_row(params, 260)])
    guide = params.guide  # with a guide, a row of biases for the state reached: its allowed bytes, EOS if it accepts
    state = None if guide is None else guide.start
    for t in range(first, len(ids) + ended_by_eos):
        want = ids[t] if t < len(ids) else EOS_ID
        allow = not params.ignore_eos and t - first >= params.min_bytes and (guide is None or guide.accepts(state))
        batch = SamplingBatch.build([params], [seed], "cpu", [allow])
        row = bias
        if guide is not None:
            row = torch.full((1, 260), float("-inf"))
            row[0, [OFFSET + b for b in guide.allowed_bytes(state)]] = 0.0
            row[0, EOS_ID] = 0.0 if guide.accepts(state) else float("-inf")
            row = bias + row
        chosen = int(sample(logits[t - 1:t], batch, torch.tensor([t]), counts, seen, EOS_ID, row)[0])
        assert chosen == want, f"byte {t - first} differs"
        counts[0, chosen] += 1
        seen[0, chosen] = True
        if guide is not None and chosen != EOS_ID:
            state = guide.step(state, chosen - OFFSET)
    if engine_logprobs is not None:
        want = torch.log_softmax(logits, -1)[first - 1:-1].gather(1, torch.tensor(ids[first:])[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor([lp[0] for lp in engine_logprobs]), want, atol=1e-4, rtol=0)
    return ids
