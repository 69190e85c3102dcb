"""bench/burst.py stays runnable: short prompts arriving together, prefilled together and one per step."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_burst_script_runs():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "burst.py"), "--requests", "4", "--prompt-bytes", "20",
                          "--bytes", "4", "--rounds", "1"], capture_output=True, text=True, timeout=300,
                         check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    together, alone = result["together_20"], result["one_per_step_20"]
    assert together["steps"] < alone["steps"]  # 4 prompts in one step, against one a step
    assert 0 < together["first_ms"] <= together["last_ms"] <= together["all_done_ms"]
