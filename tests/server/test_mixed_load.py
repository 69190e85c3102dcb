"""Many clients at once, every feature mixed: prompts that share prefixes, n choices, streams and whole
bodies, priorities (so requests are preempted), guides, stop strings, bad words, seeded sampling and
greedy choice, and clients that leave mid-stream. Whatever the load did, each request that was answered
must be answered exactly as it is when it is sent alone afterwards: batching, prompt sharing, overlapped
steps and preemption change nothing a client sees."""

from __future__ import annotations

import random
import threading

import httpx
import pytest
from factory import PARITY_TEXT
from serverkit import metric_value, metrics_text, sse_events, wait_until

from blt_runtime import Engine, load_model

TEXT = PARITY_TEXT.decode("utf-8", "replace")


def bodies(rng: random.Random, count: int) -> list[dict]:
    stems = [TEXT[:rng.randrange(70, 200)] for _ in range(3)]
    out = []
    for _ in range(count):
        body = {"prompt": rng.choice(stems) + TEXT[300:300 + rng.randrange(0, 40)],
                "max_tokens": rng.randrange(4, 40), "n": rng.choice([1, 1, 2]), "stream": rng.random() < 0.5,
                "priority": rng.choice([0, 1, 2]), "ignore_eos": rng.random() < 0.7}
        if rng.random() < 0.5:
            body |= {"temperature": 0.9, "seed": rng.randrange(1000)}
        else:
            body["temperature"] = 0
        extra = rng.choice([{}, {}, {"stop": ["th", "e "]}, {"guided_regex": "[a-z ]{3,30}\\."},
                            {"bad_words": ["e", "the"]}, {"logprobs": 2}, {"allowed_token_ids": list(range(97, 123))}])
        out.append(body | extra)
    return out


def answer(client: httpx.Client, url: str, body: dict) -> list[tuple[str, str]]:
    """(text, finish_reason) of each choice, in index order, streamed or not."""
    r = client.post(f"{url}/v1/completions", json=body)
    assert r.status_code == 200, r.text
    if not body["stream"]:
        return [(c["text"], c["finish_reason"]) for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
    texts, reasons = {}, {}
    for e in sse_events(r.text)[:-1]:
        for c in e["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            reasons[c["index"]] = c["finish_reason"] or reasons.get(c["index"])
    return [(texts[i], reasons[i]) for i in sorted(texts)]


@pytest.mark.parametrize("overlap, seed", [(False, 0), (True, 1)])
def test_a_mixed_load_changes_no_answer(serve, tiny, overlap, seed):
    engine = Engine(load_model(tiny), max_batch_size=3, overlap=overlap, prefill_chunk=64, kept_prefixes=2)
    url, _ = serve(engine, scheduling_policy="priority")
    rng = random.Random(seed)
    requests = bodies(rng, 16)
    got: dict[int, list] = {}

    def send(i: int) -> None:
        with httpx.Client(timeout=180) as client:
            got[i] = answer(client, url, requests[i])

    def leave(i: int) -> None:  # gone after a few events: aborted, whatever state it is in
        body = {"prompt": TEXT[i * 30:i * 30 + 90], "max_tokens": 2000, "ignore_eos": True, "stream": True,
                "priority": i % 3}
        with httpx.Client(timeout=60) as c, c.stream("POST", f"{url}/v1/completions", json=body) as r:
            for n, _ in enumerate(r.iter_lines()):
                if n >= 2 * i + 4:
                    break

    for body in requests[:3]:  # the first to come fill the slots, and are the least urgent: they are preempted
        body |= {"priority": 2, "max_tokens": 40, "ignore_eos": True}
    first = [threading.Thread(target=send, args=(i,)) for i in range(3)]
    for t in first:
        t.start()
    wait_until(lambda: engine.num_running == 3)
    threads = [threading.Thread(target=send, args=(i,)) for i in range(3, len(requests))]
    threads += [threading.Thread(target=leave, args=(i,)) for i in range(3)]
    rng.shuffle(threads)
    for t in threads:
        t.start()
    for t in first + threads:
        t.join(180)
    assert len(got) == len(requests)
    wait_until(lambda: not engine.has_work())
    preempted = metric_value(metrics_text(url), "blt_num_preemptions_total")
    with httpx.Client(timeout=180) as client:
        for i, body in enumerate(requests):
            assert got[i] == answer(client, url, body), (i, body)
    assert metric_value(metrics_text(url), "blt_client_disconnects_total") == 3
    assert preempted > 0
