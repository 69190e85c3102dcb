"""bench/gpu_check.py stays runnable: its --small mode on the CPU checks what it would check on a GPU."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from interpreter import interpreted

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_small_on_cpu():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--small", "--device", "cpu",
                          "--dtype", "float32", "--bytes", "96", "--streams", "2", "--hf-bytes", "2"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["deterministic"] and result["static_equal_dynamic"] and result["static_equal_dynamic_2_streams"]
    assert result["top1_agreement_full_recompute"] >= 0.99
    assert 3.0 <= result["bytes_per_patch"] <= 6.5  # threshold set for about 4.5 on English text
    assert result["overlap_equal_no_overlap"]  # the engines overlap their steps here too
    assert result["static_equal_dynamic_sampled"]  # seeded sampling: the same draws
    assert result["static_equal_dynamic_penalised"]  # with penalties and a logit bias too
    for key in ("batch1_bytes_per_s", "ttfb_1kb_prompt_ms", "aggregate_bytes_per_s_2", "batch1_bytes_per_s_no_overlap",
                "aggregate_bytes_per_s_2_no_overlap", "batch1_bytes_per_s_sampled", "aggregate_bytes_per_s_2_sampled"):
        assert result[key] > 0, key
    assert result["transformers"]["bytes"] == 2 and result["speedup_vs_transformers_batch1"] > 0
    shared = result["shared_prompts"]  # 8 choices of one prompt, prefilled once and each on its own
    assert shared["outputs_equal"] and shared["first_bytes_ms_8"] > 0 and shared["first_bytes_ms_8_unshared"] > 0
    assert shared["conversations_equal"] and shared["conversation_first_byte_ms"] > 0  # the kept instructions
    scores = result["prompt_scores"]  # echo's: the engine's prefill against the full forward
    assert scores["bytes"] == 1024 and scores["max_abs_diff"] < 1e-3 and scores["top1_agreement"] >= 0.99
    burst = result["burst"]  # short prompts arriving together: prefilled together, and one per step
    assert burst["requests"] == 2 and burst["together"]["steps"] < burst["one_per_step"]["steps"]
    for way in ("together_512_bytes", "together_2048_bytes"):
        assert burst[way]["steps"] == burst["together"]["steps"]  # 2 x 100 bytes fit in 512
    assert result["prefill_chunk"] == 512  # a CPU's default
    assert result["ttfb_1kb_prompt_ms_one_chunk"] > 0 and result["ttfb_1kb_prompt_ms_512_chunks"] > 0
    assert "skipped" not in result and set(result["parts_s"]) == {
        "build_and_primary", "bandwidth_floor", "transformers", "no_lookahead", "unsplit_attention", "compiled",
        "guided", "shared_prompts", "prompt_scores", "burst"}
    assert {"lookahead_rows_cuda", "max_splits_batch1"} <= set(result["decisions"])  # (bench/gpu_decisions.py)
    floors = result["bandwidth_floor"]  # tiny shapes: a floor far above what a CPU does
    assert set(floors) == {"tb_s", "batch_1", "streams_2"}
    assert all(0 < floors[k]["measured_share"] < 1 for k in ("batch_1", "streams_2")), floors
    unsplit = result["unsplit_attention"]  # one split is a CPU's default anyway: the same bytes
    assert unsplit["batch1_equal_primary"]
    assert unsplit["batch1_bytes_per_s"] > 0 and unsplit["aggregate_bytes_per_s_2"] > 0
    assert result["no_lookahead"]["batch1_equal_primary"] and result["no_lookahead"]["batch1_bytes_per_s"] > 0
    behind = burst["behind"]  # 2 short prompts a step after a long one: before its next chunk, and after it
    assert behind["short_first"]["last_ms"] < behind["short_first"]["long_first_ms"]
    assert behind["in_order"]["first_ms"] > 0 and behind["in_order"]["long_first_ms"] > 0
    guided = result["guided"]  # the largest stream count free and guided (guide.py)
    assert guided["bytes_per_s_free"] > 0 and guided["bytes_per_s_guided"] > 0
    assert guided["graphs_equal_eager"] and guided["within_guide"] and guided["states"] > 1
    compiled = result["compiled"]  # the engine again, its element-wise stretches compiled
    assert compiled["deterministic"] and compiled["static_equal_dynamic"] and compiled["static_equal_dynamic_2_streams"]
    assert compiled["top1_agreement_full_recompute"] >= 0.99
    assert compiled["batch1_bytes_per_s"] > 0 and compiled["aggregate_bytes_per_s_2"] > 0
    assert compiled["overlap_equal_no_overlap"] and compiled["static_equal_dynamic_sampled"]


@interpreted
def test_gpu_only_timings_run_their_cases(monkeypatch):
    """The per-call timings the GPU check runs only on CUDA (attention_us, stretch_us, gemv_us, sample_us) build and
    call every case on the CPU, in Triton's interpreter, with time_in_graph (CUDA graphs) replaced by
    one call: none reports an error, so the GPU run's minutes do not find one first."""
    from bench import gpu_check

    calls = []

    def once(fn) -> float:
        fn()
        calls.append(fn)
        return 1.0

    monkeypatch.setattr(gpu_check, "time_in_graph", once)
    monkeypatch.setattr(gpu_check, "SPLITS", (1, 4))  # the interpreter is slow: fewer variants of the kernel
    monkeypatch.setattr(gpu_check, "SWEEP_BLOCKS", (64,))
    model = gpu_check.build(True, torch.device("cpu"), torch.float32)
    swept = 0  # the attention cases' block and split variants
    for helper in (gpu_check.attention_us, gpu_check.stretch_us, gpu_check.gemv_us, gpu_check.sample_us):
        for case, figures in helper(model).items():
            assert "error" not in figures and figures, (helper.__name__, case, figures)
            swept += len(figures.get("block_x_splits", {}))
    engine = gpu_check.make_engine(model, graphs=False)  # the profile's own steps (the profiler itself is CUDA's)
    profiled = gpu_check.profile_steps(engine, [b"one", b"two streams" * 30, b"three"], steps=4)
    assert "error" not in profiled and profiled["device_ops_per_step"] == 0 and not engine.has_work()
    pieces = profiled["pieces"]  # each piece's time per step (here the clock's), every step a finish
    assert pieces["runs"]["finish"] >= 4 and 0 < pieces["us_per_step"]["finish"] < pieces["wall_us_per_step"]
    assert engine.static._run.__name__ == "_run"  # put back
    # per attention case its default, with two launches, an additive mask, SDPA and the sweep (every split
    # count at one block or more), and for the global cache's three the kernel and SDPA over pages; two ways
    # otherwise, two stretches or products per way (four products)
    assert swept >= len(gpu_check.SPLITS) * 5
    assert len(calls) == 4 * 5 + 2 * 3 + swept + 4 * 4 + 8 * 8 + 2 * 4
