"""bench/startup.py stays runnable: it starts blt-serve with the shipped model and times /health."""

import json
import subprocess
import sys
from pathlib import Path

from serverkit import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_startup_script_runs():
    command = [sys.executable, str(ROOT / "bench" / "startup.py"), "--runs", "1", "--port", str(free_port())]
    out = subprocess.run(command, capture_output=True, text=True, timeout=180, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert len(result["startup_s"]) == 1 and 0 < result["median_s"] < 120
