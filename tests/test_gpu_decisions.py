"""bench/gpu_decisions.py reads a GPU check's figures into advice on the defaults they were measured for:
the faster way by more than the noise, a tie kept, bytes that differ said first, missing parts left out."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_decisions import decide  # noqa: E402

RESULT = {
    "batch1_bytes_per_s": 400.0, "aggregate_bytes_per_s_8": 2000.0, "aggregate_bytes_per_s_64": 5000.0,
    "aggregate_bytes_per_s_64_sampled": 4000.0, "aggregate_bytes_per_s_64_no_overlap": 6000.0,
    "batch1_bytes_per_s_no_overlap": 395.0,
    "no_lookahead": {"batch1_bytes_per_s": 500.0, "batch1_equal_primary": True},
    "unsplit_attention": {"batch1_bytes_per_s": 300.0, "aggregate_bytes_per_s_64": 5050.0,
                          "batch1_equal_primary": False},
    "triton_gemv": {"batch1_bytes_per_s": 600.0, "aggregate_bytes_per_s_64": 4000.0},
    "attention_us": {"local_b1_in_place": {"triton": 5.0, "triton_two_launches": 7.0,
                                           "block_x_splits": {"128x4": 5.0, "64x8": 3.0}},
                     "global_b1": {"triton": 9.0, "triton_two_launches": 10.0, "block_x_splits": {"64x8": 9.0}},
                     "broken": {"error": "RuntimeError: ..."}},
    "gemv_us": {"entropy_b1": {"qkv_gemv": 2.0, "qkv_triton": 5.0, "o_gemv": 4.0, "o_cublas": 3.0},
                "global_b16": {"error": "x"}},
}


def test_decisions_from_figures():
    d = decide(RESULT)
    assert d["unsplit_attention_bytes"].startswith("its greedy bytes at batch 1 differ")
    assert "no_lookahead_bytes" not in d
    assert d["lookahead_rows_cuda"].startswith("set 0") and "1.25x" in d["lookahead_rows_cuda"]
    assert d["max_splits_batch1"].startswith("keep the splits") and "(a tie)" not in d["max_splits_batch1"]
    assert d["max_splits_64_streams"].startswith("keep") and "(a tie)" in d["max_splits_64_streams"]
    assert d["overlap_64_streams"].startswith("run them without overlap")
    assert "(a tie)" in d["overlap_batch1"]
    assert d["kernels_batch1"].startswith("pick triton-gemv at batch 1")
    assert d["kernels_64_streams"].startswith("keep triton")
    assert d["one_launch"].startswith("keep True") and "default 14, other way 17" in d["one_launch"]
    assert "64x8" in d["attention_local_b1_in_place"] and "attention_global_b1" not in d
    assert d["gemv_entropy_b1"].endswith("qkv 2.50x, o 0.75x")
    assert not any(k.startswith(("attention_broken", "gemv_global")) for k in d)


def test_missing_parts_are_left_out(tmp_path):
    assert decide({}) == {}
    assert set(decide({"batch1_bytes_per_s": 400.0})) == set()
    log = tmp_path / "gpu_check.log"
    log.write_text("a table line\n" + json.dumps({"batch1_bytes_per_s": 1.0}) + "\n" + json.dumps(RESULT) + "\n")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_decisions.py"), str(log)], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert out.splitlines()[0].startswith("unsplit_attention_bytes: ") and "lookahead_rows_cuda: set 0" in out
