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


@pytest.mark.parametrize("group", [1, 3, 1000])
def test_an_echo_waits_for_its_prompts_scores_and_nothing_of_its_choice_passes_it(group):
    """echo with logprobs: the prompt's first choice scores it, so a sibling that runs ahead (one that
    resumed from a retained slot) holds its bytes, even its finish, until the scores arrive; then its
    echo goes first."""
    req = CompletionRequest(prompt="pré", n=2, logprobs=1, echo=True, stream=True, max_tokens=3)
    c = Completion(req, SimpleNamespace(model_name="tiny"), ["pré".encode()], sampling_params(req, 0))
    first, second = (f"{c.id}-{i}" for i in range(2))
    scores = [(-0.25 * (i + 1), [(b + OFFSET, -0.25 * (i + 1))]) for i, b in enumerate("pré".encode())]
    items = [StepOutput(second, b, False, (-1.0, [(b[0] + OFFSET, -1.0)]), b == b"c",
                        "length" if b == b"c" else None, None, Usage(4, 3, 1, 1, 1) if b == b"c" else None)
             for b in (b"a", b"b", b"c")]
    items.append(StepOutput(first, b"x", True, (-2.0, [(ord("x") + OFFSET, -2.0)]), False,
                            prompt_logprobs=scores))
    items += [StepOutput(first, b, False, (-2.0, [(b[0] + OFFSET, -2.0)]), b == b"z",
                         "length" if b == b"z" else None, None, Usage(4, 3, 1, 1, 1) if b == b"z" else None)
              for b in (b"y", b"z")]
    sent = []
    for i in range(0, len(items), group):
        events = choices_of(c._coalesce(items[i:i + group])[0])
        assert events or i + group <= 3  # nothing is sent before the scores (item 3), then everything
        sent += events
    for index, text in enumerate(["préxyz", "préabc"]):
        mine = [s for s in sent if s["index"] == index]
        assert mine[0]["text"] == "pré" and mine[0]["finish_reason"] is None
        assert "".join(s["text"] for s in mine) == text and mine[-1]["finish_reason"] == "length"
        logprobs = [v for s in mine for v in s["logprobs"]["token_logprobs"]]
        assert logprobs == [-0.25, -0.5, -0.75, -1.0] + [-2.0 if index == 0 else -1.0] * 3  # "pré" is 4 bytes
    assert not c.held


def test_held_choices_go_out_when_their_prompt_is_never_scored():
    """The prompt's first choice is aborted before its first output (a shutdown past its timeout): the
    sibling that finished meanwhile still gets its echo, without logprobs, and its bytes."""
    req = CompletionRequest(prompt="ab", n=2, logprobs=1, echo=True, stream=True, max_tokens=1)
    c = Completion(req, SimpleNamespace(model_name="tiny"), [b"ab"], sampling_params(req, 0))
    first, second = (f"{c.id}-{i}" for i in range(2))
    items = [StepOutput(second, b"c", False, (-1.0, [(ord("c") + OFFSET, -1.0)]), True, "length", None,
                        Usage(2, 1, 1, 1, 1)),
             StepOutput(first, b"", False, None, True, "abort", None, Usage(2, 0, 1, 0, 0))]
    assert choices_of(c._coalesce(items)[0]) == []
    sent = choices_of(c._flush_held())
    assert [(s["index"], s["text"], s["finish_reason"]) for s in sent] == [
        (0, "ab", None), (0, "", "abort"), (1, "ab", None), (1, "c", "length")]
    assert sent[0]["logprobs"] is None and sent[3]["logprobs"]["tokens"] == ["c"]
