"""bench/priority.py stays runnable: an urgent request with every slot taken, with and without priorities."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_priority_script_runs():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "priority.py"), "--slots", "2", "--prompt-bytes", "40",
                          "--bytes", "40", "--urgent-bytes", "4", "--after", "5", "--rounds", "1"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["outputs_equal"]
    assert result["urgent_first_ms_priority"] < result["urgent_first_ms_fcfs"]  # it waited for a slot without
    assert 0 < result["urgent_first_ms_priority"] <= result["urgent_done_ms_priority"] <= result["all_done_ms_priority"]
