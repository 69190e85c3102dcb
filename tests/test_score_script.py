"""bench/score.py stays runnable: it times the full forward that scores a prompt, at two short lengths."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_score_script_runs():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "score.py"), "--lengths", "300,1200", "--repeats", "1"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    for n in (300, 1200):
        assert result[f"prompt_logprobs_s_{n}"] > 0 and result[f"byte_patches_s_{n}"] > 0
