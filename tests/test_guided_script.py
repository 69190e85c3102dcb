"""bench/guided.py, bench/guide_compile.py and bench/jump_forward.py stay runnable: guided streams against free
ones, what guides take to build, and forced bytes prefilled against sampled (the same outputs)."""

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
    assert guides["grammar JSON (json.gbnf)"]["states"] > 100 and guides["grammar arithmetic"]["states"] > 1


def test_jump_forward_script_runs():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "jump_forward.py"), "--streams", "2", "--rounds", "1"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["same_outputs"] is True
    for name in ("record_2", "tool_call_2", "choice_2"):
        off, on = result[name]["steps"]
        assert on < off and all(rate > 0 for rate in result[name]["bytes_per_s"]), result[name]
