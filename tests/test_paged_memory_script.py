"""bench/paged_memory.py stays runnable: the pages held under mixed requests, choices and conversations, and
requests taking turns in a pool of a fixed size with the outputs of a pool left to grow (the script exits
non-zero where they differ)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_paged_memory_script_runs():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "paged_memory.py"), "--slots", "8", "--short", "2",
                          "--short-bytes", "40", "--long-bytes", "300", "--new-bytes", "8", "--n", "2", "--turns", "8",
                          "--turns-prompt", "200", "--turns-new", "64"], capture_output=True, text=True, timeout=300,
                         check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert 0 < result["choices"]["peak_mib_held"] < result["choices"]["unshared_mib"]  # the prompt's pages shared
    for name in ("mixed", "conversations"):
        assert 0 < result[name]["peak_mib_held"] <= result[name]["pool_mib"] < result[name]["rows_mib"], name
    grown, fixed = result["turns"]["grown"], result["turns"]["fixed"]
    assert fixed["pool_mib"] == result["turns"]["fixed_mib"] < grown["pool_mib"]
    assert fixed["peak_pages_held"] < grown["peak_pages_held"] and fixed["preemptions"] > 0 == grown["preemptions"]
