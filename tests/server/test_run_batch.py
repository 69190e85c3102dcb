"""blt-run-batch (server/run_batch.py): a file of requests in OpenAI's batch format answered in process by the
app blt-serve serves, in the input's order, every line answered, with the engine's bytes."""

import asyncio
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from blt_runtime import generate, load_model
from blt_runtime.engine import Engine
from server import Settings, create_app
from server import run_batch as run_batch_module
from server.run_batch import run_batch
from server.settings import SHIPPED_MODEL

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shipped():
    return load_model(SHIPPED_MODEL)


def line(custom_id, url="/v1/completions", **body) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def run(engine, lines: list[str], in_flight: int = 8, **settings) -> tuple[list[dict], dict]:
    app = create_app(Settings(model_dir=str(SHIPPED_MODEL), log_level="warning", **settings), engine)
    out = io.StringIO()
    counts = asyncio.run(run_batch(app, lines, out, in_flight))
    return [json.loads(text) for text in out.getvalue().splitlines()], counts


def test_every_line_is_answered_in_order_with_the_engines_bytes(shipped):
    prompts = ["ROMEO:", "KING HENRY:", "First Citizen:\nBefore we proceed", "JULIET:\nO Romeo"]
    lines = [line(f"p{i}", prompt=p, max_tokens=40, temperature=0) for i, p in enumerate(prompts)]
    lines.insert(2, "   ")  # blank: skipped
    lines += [line("n", prompt="QUEEN:", max_tokens=20, temperature=0, n=2),
              line("chat", url="/v1/chat/completions", messages=[{"role": "user", "content": "Hi"}]),
              line("stream", prompt="x", stream=True), "{not json", json.dumps(["a list"]),
              json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}),
              line("p0", prompt="again"), line("emb", url="/v1/embeddings", input="x"),
              line("bad", prompt="x", max_tokens=-3), line("patches", url="/v1/patches", text="To be, or not to be")]
    got, counts = run(Engine(shipped, max_batch_size=4), lines)
    assert counts == {"requests": len(lines) - 1, "failed": 8} and len(got) == len(lines) - 1
    assert [g["custom_id"] for g in got] == ["p0", "p1", "p2", "p3", "n", "chat", "stream", None, None, None, "p0",
                                             "emb", "bad", "patches"]
    assert len({g["id"] for g in got}) == len(got)
    for g, prompt in zip(got[:4], prompts):
        response = g["response"]
        assert g["error"] is None and response["status_code"] == 200
        assert response["request_id"] == response["body"]["id"]
        assert response["body"]["choices"][0]["text"] == generate(shipped, prompt, max_bytes=40, temperature=0.0).text
    assert [c["text"] for c in got[4]["response"]["body"]["choices"]] == [generate(shipped, "QUEEN:", max_bytes=20,
                                                                                   temperature=0.0).text] * 2
    assert got[13]["error"] is None and got[13]["response"]["body"]["object"] == "patches"
    errors = {g["custom_id"] or i: (g["response"]["status_code"], g["error"]) for i, g in enumerate(got)
              if g["error"] is not None}
    assert errors["chat"][0] == 400 and "no chat template" in errors["chat"][1]["message"]
    assert errors["stream"] == (400, "line 8: a request in a batch is not streamed (stream: true)")
    assert errors[7][1].startswith("line 9: not JSON") and errors[8][1] == "line 10: not a JSON object"
    assert errors[9][1] == "line 11: custom_id (a string) is missing"
    assert errors["p0"][1] == "line 12: custom_id 'p0' was used on a line before"
    assert errors["emb"][1].startswith("line 13: POST /v1/embeddings is not served in a batch")
    assert errors["bad"][0] == 400 and "max_tokens" in errors["bad"][1]["message"]
    assert all(g["response"]["body"] is None for g in got if g["error"] is not None)


def test_requests_the_queue_cannot_take_yet_are_sent_again(shipped, monkeypatch):
    """One slot and a queue of one: of six requests in flight at once, some are refused (429) at first, and
    answered when sent again after the Retry-After."""
    statuses, real = [], run_batch_module.post

    async def post(app, url, body):
        answer = await real(app, url, body)
        statuses.append(answer[0])
        return answer

    monkeypatch.setattr(run_batch_module, "post", post)
    lines = [line(f"r{i}", prompt=f"CITIZEN {i}:", max_tokens=8, temperature=0) for i in range(6)]
    # (with API keys, the batch sends the first)
    got, counts = run(Engine(shipped, max_batch_size=1, max_queue=1), lines, in_flight=6, api_key=("k1", "k2"))
    assert counts == {"requests": 6, "failed": 0} and statuses.count(200) == 6 and 429 in statuses, statuses
    assert [g["custom_id"] for g in got] == [f"r{i}" for i in range(6)]
    for i, g in enumerate(got):
        assert g["response"]["body"]["choices"][0]["text"] == generate(shipped, f"CITIZEN {i}:", max_bytes=8,
                                                                       temperature=0.0).text


def test_the_command_line(tmp_path):
    requests, results = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    requests.write_text("\n".join([line("a", prompt="ROMEO:", max_tokens=10), line("b", prompt="x", max_tokens=-1)])
                        + "\n")
    done = subprocess.run([sys.executable, "-m", "server.run_batch", "-i", str(requests), "-o", str(results),
                           "--max-batch-size", "2", "--log-level", "warning"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    got = [json.loads(text) for text in results.read_text().splitlines()]
    assert [(g["custom_id"], g["response"]["status_code"]) for g in got] == [("a", 200), ("b", 400)]
    missing = subprocess.run([sys.executable, "-m", "server.run_batch", "-i", str(tmp_path / "none.jsonl"), "-o",
                              str(results)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "none.jsonl" in missing.stderr
