"""What a GPU check's figures say about the defaults they were measured for (bench/gpu_check.py).

Several defaults of the CUDA path were set without a GPU and wait on a device run to confirm or
change them: decoding ahead at batch 1 (static.LOOKAHEAD_ROWS_CUDA), the attention kernel's splits
(attention.MAX_SPLITS, default_splits, default_block), the splits meeting in one kernel
(attention.ONE_LAUNCH), overlapped steps (Engine(overlap=)), and which kernels "auto" picks (the
projections of `triton-gemv`). `decide` reads a result of gpu_check (the dict its last JSON line
holds) and says, for each of those it has the figures for, what they favour and by how much, with
the figures. It changes nothing: the session that reads it sets the defaults, in a commit that
cites the run. A part that did not run, or failed, is left out; bytes that differ where they must
not are said first.

    python3 bench/gpu_decisions.py gpu_check.log     # the last JSON line of a gpu_check log
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

NOISE = 0.03  # a difference below this share of the figures is called a tie: keep the default


def _ratio(new: float, old: float) -> float:
    return new / old if old else float("inf")


def _compare(name: str, default: float | None, other: float | None, setting: str, keep: str, change: str,
             higher_is_better: bool = True) -> tuple[str, str] | None:
    """(name, advice) from the default's figure against the other way's; None where either is missing."""
    if not default or not other:
        return None
    ratio = _ratio(other, default) if higher_is_better else _ratio(default, other)
    figures = f"default {default:g}, other way {other:g}"
    if ratio > 1 + NOISE:
        return name, f"{change} ({setting}): the other way is {ratio:.2f}x as fast ({figures})"
    return name, f"{keep} ({setting}): {figures}" + (" (a tie)" if ratio > 1 - NOISE else "")


def decide(result: dict) -> dict[str, str]:
    """Advice by setting, from a gpu_check result; see the module's docstring."""
    out: dict[str, str] = {}
    streams = max((int(k.rsplit("_", 1)[1]) for k in result if k.startswith("aggregate_bytes_per_s_")
                   and k.rsplit("_", 1)[1].isdigit()), default=None)
    aggregate = result.get(f"aggregate_bytes_per_s_{streams}")
    batch1 = result.get("batch1_bytes_per_s")
    for part in ("no_lookahead", "unsplit_attention"):
        if isinstance(result.get(part), dict) and result[part].get("batch1_equal_primary") is False:
            out[f"{part}_bytes"] = "its greedy bytes at batch 1 differ from the primary engine's: find out why first"
    ahead = result.get("no_lookahead") or {}
    for advice in (
            _compare("lookahead_rows_cuda", batch1, ahead.get("batch1_bytes_per_s"), "static.LOOKAHEAD_ROWS_CUDA",
                     "keep 1", "set 0"),
            _compare("max_splits_batch1", batch1, (result.get("unsplit_attention") or {}).get("batch1_bytes_per_s"),
                     "attention.MAX_SPLITS", "keep the splits", "set 1"),
            _compare(f"max_splits_{streams}_streams", aggregate,
                     (result.get("unsplit_attention") or {}).get(f"aggregate_bytes_per_s_{streams}"),
                     "attention.MAX_SPLITS / default_splits", "keep", "split less at many rows"),
            _compare(f"overlap_{streams}_streams", aggregate, result.get(f"aggregate_bytes_per_s_{streams}_no_overlap"),
                     "Engine(overlap=) at many rows", "keep overlapped steps", "run them without overlap"),
            _compare("overlap_batch1", batch1, result.get("batch1_bytes_per_s_no_overlap"), "Engine(overlap=)",
                     "keep overlapped steps", "run them without overlap")):
        if advice is not None:
            out[advice[0]] = advice[1]
    gemv = result.get("triton_gemv") or {}
    for advice in (_compare("kernels_batch1", batch1, gemv.get("batch1_bytes_per_s"), "kernels.resolve, 'auto'",
                            "keep triton", "pick triton-gemv at batch 1"),
                   _compare(f"kernels_{streams}_streams", aggregate, gemv.get(f"aggregate_bytes_per_s_{streams}"),
                            "kernels.resolve, 'auto'", "keep triton", "pick triton-gemv")):
        if advice is not None:
            out[advice[0]] = advice[1]
    out.update(_attention(result.get("attention_us") or {}))
    out.update(_products(result.get("gemv_us") or {}))
    return out


def _attention(cases: dict) -> dict[str, str]:
    """The splits meeting in the kernel against a second kernel, summed over the cases, and each case's
    fastest block x splits against the default's (microseconds a call)."""
    out = {}
    pairs = [(c["triton"], c["triton_two_launches"]) for c in cases.values()
             if isinstance(c, dict) and c.get("triton") and c.get("triton_two_launches")]
    if pairs:
        one, two = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
        advice = _compare("one_launch", one, two, "attention.ONE_LAUNCH", "keep True", "set False",
                          higher_is_better=False)
        if advice is not None:
            out[advice[0]] = advice[1] + " (us a call, summed over the cases)"
    for name, c in cases.items():
        sweep = c.get("block_x_splits") if isinstance(c, dict) else None
        if not sweep or not c.get("triton"):
            continue
        best = min(sweep, key=sweep.get)
        if sweep[best] < c["triton"] * (1 - NOISE):
            out[f"attention_{name}"] = (f"{best} (entries a block x splits) takes {sweep[best]:g} us against the "
                                        f"default's {c['triton']:g} (attention.default_block / default_splits)")
    return out


def _products(cases: dict) -> dict[str, str]:
    """gemv.py's kernels against what `triton` runs in their place, per case (stack and rows), us a call."""
    out = {}
    for name, c in cases.items():
        if not isinstance(c, dict):
            continue
        faster = []
        for product, other in (("qkv", "triton"), ("gate_up", "triton"), ("o", "cublas"), ("down", "cublas")):
            fused, plain = c.get(f"{product}_gemv"), c.get(f"{product}_{other}")
            if fused and plain:
                faster.append(f"{product} {plain / fused:.2f}x")
        if faster:
            out[f"gemv_{name}"] = "gemv.py's kernel, times as fast as the default's: " + ", ".join(faster)
    return out


def main() -> None:
    lines = [line for line in Path(sys.argv[1]).read_text().splitlines() if line.startswith("{")]
    if not lines:
        sys.exit(f"{sys.argv[1]}: no JSON line")
    for key, advice in decide(json.loads(lines[-1])).items():
        print(f"{key}: {advice}")


if __name__ == "__main__":
    main()
