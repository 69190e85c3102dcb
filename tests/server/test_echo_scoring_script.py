"""bench/echo_scoring.py stays runnable: blt-serve with the shipped model scores prompts (or computes
their patches) while a client streams, and every prompt byte gets its logprob (or entropy)."""

import json
import subprocess
import sys
from pathlib import Path

from serverkit import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_echo_scoring_script_runs():
    command = [sys.executable, str(ROOT / "bench" / "echo_scoring.py"), "--prompt-bytes", "300", "--requests", "2",
               "--endings", "2", "--max-tokens", "1", "--port", str(free_port())]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["requests"] == 2 and len(result["score_s"]) == 2 and result["endings"] == 2
    assert result["stream_events_during"] > 0 and result["stream_gap_max_s"] >= result["stream_gap_p99_s"] > 0


def test_it_times_patches_too():
    command = [sys.executable, str(ROOT / "bench" / "echo_scoring.py"), "--prompt-bytes", "300", "--requests", "2",
               "--patches", "--port", str(free_port())]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["endpoint"] == "/v1/patches" and len(result["score_s"]) == 2 and result["stream_events_during"] > 0
