"""bench/host_overhead.py stays runnable (it times; nothing here asserts a speed)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("caller", ["none", "worker"])
def test_host_overhead_runs(caller):
    if caller == "worker":  # the server's worker: where the web stack is installed (always in CI)
        pytest.importorskip("fastapi", reason="--caller worker times blt-serve's worker, which needs the web stack")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "host_overhead.py"), "--batches", "1,4", "--steps",
                          "20", "--repeats", "1", "--caller", caller], capture_output=True, text=True, timeout=300,
                         check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result) == {f"{kind}_us_per_step_{b}{overlap}" for kind in ("host", "critical") for b in (1, 4)
                           for overlap in ("", "_no_overlap")}
    for key, value in result.items():
        assert value > 0, key
        if key.startswith("critical"):  # a part of the host's work
            assert value <= result[key.replace("critical", "host")] * 1.01, key
