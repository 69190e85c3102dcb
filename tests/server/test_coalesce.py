"""Outputs that wait in a stream's queue together go out as one event per choice: the same text,
logprobs and patch starts as an event per output, in fewer events (server/completions.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from blt_runtime import StepOutput, Usage
from blt_runtime.tokenizer import OFFSET
from server.completions import Completion, sampling_params
from server.schemas import CompletionRequest
from server.worker import Failure

TEXTS = ["héllo, wörld — 終わり", "ok 😀 then STOP and more"]


def outputs(completion: Completion) -> list[StepOutput]:
    """Both choices' bytes, interleaved as engine steps deliver them, each with a logprob and every
    third one starting a patch; the second choice ends on its stop string."""
    per_choice = []
    for index, text in enumerate(TEXTS):
        rid = f"{completion.id}-{index}"
        data = text.encode()
        cut = data.index(b"STOP") + len(b"STOP") if b"STOP" in data else len(data)
        outs = []
        for i, byte in enumerate(data[:cut]):
            last = i == cut - 1
            logprobs = (-0.1 * (i % 7), [(byte + OFFSET, -0.1 * (i % 7)), (OFFSET + 32, -3.0)])
            outs.append(StepOutput(rid, bytes([byte]), i % 3 == 0, logprobs, last,
                                   ("stop" if b"STOP" in data else "length") if last else None,
                                   b"STOP" if last and b"STOP" in data else None,
                                   Usage(4, cut, 1, 2, 3) if last else None))
        per_choice.append(outs)
    mixed = []
    for i in range(max(len(o) for o in per_choice)):
        mixed += [o[i] for o in per_choice if i < len(o)]
    return mixed


def completion() -> Completion:
    req = CompletionRequest(prompt="x", n=2, logprobs=1, return_patches=True, stream=True, stop=["STOP"],
                            max_tokens=100)
    return Completion(req, SimpleNamespace(model_name="tiny"), [b"x"], sampling_params(req, 0))


def choices_of(events: str) -> list[dict]:
    blocks = [b for b in events.split("\n\n") if b]
    assert all(b.startswith("data: ") for b in blocks)
    return [c for b in blocks for c in json.loads(b[len("data: "):])["choices"]]


def merged(choices: list[dict], index: int) -> dict:
    mine = [c for c in choices if c["index"] == index]
    assert all(c["finish_reason"] is None for c in mine[:-1]) and mine[-1]["finish_reason"] is not None
    lp = {key: [v for c in mine for v in c["logprobs"][key]] for key in mine[0]["logprobs"]}
    return {"text": "".join(c["text"] for c in mine), "logprobs": lp,
            "patch_starts": [s for c in mine for s in c["patch_starts"]], "events": len(mine),
            "finish": (mine[-1]["finish_reason"], mine[-1]["stop_reason"])}


@pytest.mark.parametrize("group", [4, 9, 1000])  # outputs per group: 2 or more per choice
def test_coalesced_events_carry_what_single_ones_do(group):
    one, many = completion(), completion()
    singly = [c for item in outputs(one) for c in choices_of(one._coalesce([item])[0])]
    items = outputs(many)
    together = [c for i in range(0, len(items), group) for c in choices_of(many._coalesce(items[i:i + group])[0])]
    for index, text in enumerate(TEXTS):
        want, got = merged(singly, index), merged(together, index)
        assert want["text"] == text.split("STOP")[0]  # the stop string is never sent
        assert got["text"] == want["text"] and got["logprobs"] == want["logprobs"]
        assert got["patch_starts"] == want["patch_starts"] and got["finish"] == want["finish"]
        assert got["events"] < want["events"]
        assert len(got["logprobs"]["tokens"]) == len(want["text"].encode())
    assert len(together) <= 2 * -(-len(items) // group)  # at most one event per choice per group
    assert not any(c.pieces for c in many.choices.values())  # a stream keeps no piece it has sent


def test_a_failure_ends_the_events_after_what_came_before():
    c = completion()
    items = outputs(c)
    events, failure = c._coalesce(items[:16] + [Failure(items[0].request_id, "boom")] + items[16:])
    assert failure is not None and failure.message == "boom"
    text = "".join(ch["text"] for ch in choices_of(events))
    assert text and len(choices_of(events)) <= 2
