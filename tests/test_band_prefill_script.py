"""bench/band_prefill.py stays runnable: prefills timed with blocks of 64 queries and of a window, the same bytes."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_band_prefill_script_runs():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "band_prefill.py"), "--rounds", "1"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["same_bytes"] and result["window"] == 512
    for size in (200, 500, 1024, 8000):
        times = result[f"prefill_{size}_ms"]
        assert times["window"] > 0 and times["block_64"] > 0
    assert 0 < result["sdpa_share_of_1024"]["block_64"] < 1
