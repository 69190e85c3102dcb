"""bench/http_overhead.py stays runnable (it times; nothing here asserts a speed)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("api", ["completions", "responses"])
def test_http_overhead_runs(api):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "http_overhead.py"), "--streams", "4", "--bytes", "60",
                          "--rounds", "1", "--api", api], capture_output=True, text=True, timeout=300,
                         check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["api"] == api
    (figures,) = result["rounds"]
    assert figures["bytes_per_s"] > 0 and figures["server_cpu_us_per_byte"] > 0
    assert 0 < figures["events_per_byte"] <= 1
