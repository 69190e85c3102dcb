"""bench/guided.py and bench/guide_compile.py stay runnable: guided streams against free ones, and what guides
take to build."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_guided_script_runs():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "guided.py"), "--streams", "2", "--bytes", "16",
                          "--rounds", "1"], capture_output=True, text=True, timeout=300, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert all(result[f"bytes_per_s_{name}"] > 0 for name in ("free", "any_text", "words"))
    assert result["states"]["any_text"] > 16 and result["states"]["words"] > 16


def test_guide_compile_script_runs():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "guide_compile.py"), "--repeats", "1"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    guides = json.loads(out.strip().splitlines()[-1])["guides"]
    assert guides["json pydantic model, 10 fields"]["states"] > 100 and all(g["seconds"] >= 0 for g in guides.values())
