"""bench/burst.py stays runnable: short prompts arriving together, prefilled together and one per step; and
behind a long prompt, before its chunks and after them."""

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


def test_burst_script_behind_a_long_prompt():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "burst.py"), "--requests", "2", "--prompt-bytes", "20",
                          "--bytes", "4", "--rounds", "1", "--behind", "1500"], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    first, in_order = result["short_first_20"], result["in_order_20"]
    assert first["last_ms"] < first["long_first_ms"]  # the short prompts went before the long one's chunks
    assert 0 < in_order["first_ms"] <= in_order["last_ms"] and in_order["long_first_ms"] > 0
