"""bench/step_kernels.py runs, and the compiled stretches, the Triton kernels, the attention kernel and
the projections with their norms and gate (gemv.py) keep a decode step's kernel count (and the
memory it writes) down.

The count is exact (operators that write memory), not a timing: it guards the launch count that a
GPU step's latency scales with, on a machine without a GPU.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_compiled_stretches_launch_fewer_kernels():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "step_kernels.py"), "--steps", "12"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    eager, compiled = result["eager"], result["compiled"]
    # a 1,024-byte prompt to its first byte: two prefill chunks of 512 (BOS rides with the first), then
    # the step that samples the first byte; the Triton kernels' norms and gates count there too
    prefill, prefill_triton = result["prefill_eager"], result["prefill_triton"]
    assert prefill["prompt_bytes"] == 1024 and len(prefill["per_step"]) == len(prefill_triton["per_step"]) == 3
    assert prefill_triton["total"] < prefill["total"], result
    assert set(eager["per_piece"]) == {"encode", "patch", "finish"} == set(compiled["per_piece"])
    # 24 blocks run per byte (14 entropy, 1 encoder, 9 decoder): each saves at least 10 launches
    assert eager["byte_step"] - compiled["byte_step"] >= 24 * 10, result
    assert result["byte_step_ratio"] >= 1.5
    # the attention kernel stores each layer's new keys and values itself (24 blocks per byte), and
    # reads a patch step's closing rows of the global cache where they lie (25 layers, each of which
    # also stores): no cache write, no gathered copy
    triton = result["compiled_triton"]
    assert triton["byte_step"] <= compiled["byte_step"] - 24, result
    assert triton["per_piece"]["patch"] <= compiled["per_piece"]["patch"] - 2 * 25, result
    assert triton["mb_written_per_byte_with_patches"] < compiled["mb_written_per_byte_with_patches"], result
    # the CUDA default, nothing compiled: RoPE and the mask inside the attention kernel, one kernel per
    # norm and gate; each of the 24 blocks of a byte step saves at least 12 launches over eager
    # PyTorch, and the step launches no more than with torch.compile's stretches and SDPA
    default = result["triton"]
    assert eager["byte_step"] - default["byte_step"] >= 24 * 12, result
    assert default["byte_step"] <= compiled["byte_step"], result
    # around the encoder's one block (8 launches), the new bytes' hash embeddings in one kernel, then
    # the open patch's write, the residual add and the copy out; the greedy choice with its
    # bookkeeping and the entropy with its patch flag in one kernel each
    assert default["per_piece"]["encode"] <= 8 + 4, result
    finish = default["finish_ops"]
    assert finish.get("greedy kernel") == finish.get("entropy kernel") == 1, result
    assert not {"argmax", "log_softmax", "index_put_"} & set(finish), result
    # triton-gemv: each norm inside the projection after it and SwiGLU's gate inside the gate/up
    # product, 3 launches fewer per block (24 per byte step, 25 per patch step; a decoder block's first
    # norm is the double residual's), the cross-attention query norm inside the query product (9) and
    # the decoder's final norm inside the byte head (1)
    gemv = result["triton_gemv"]
    assert gemv["byte_step"] <= default["byte_step"] - 24 * 3 - 9 - 1, result
    assert gemv["per_piece"]["patch"] <= default["per_piece"]["patch"] - 25 * 3, result
    assert gemv["mb_written_per_byte_with_patches"] < default["mb_written_per_byte_with_patches"], result
    # sampling with temperature and top-p: the choice of byte (filters, noise, draw) with its bookkeeping
    # is sample_kernel.py's one kernel, so such a step launches what a greedy one does (eagerly, the
    # sampler alone is about 110 kernels more)
    sampled, sampled_eager = result["sampled_triton"], result["sampled_eager"]
    assert sampled["finish_ops"].get("sampling kernel") == 1 and "greedy kernel" not in sampled["finish_ops"], result
    assert not {"sort", "cumsum", "scatter_", "bitwise_xor"} & set(sampled["finish_ops"]), result
    assert sampled["byte_step"] == default["byte_step"], result
    assert sampled_eager["byte_step"] >= eager["byte_step"] + 100, result
    # decoding ahead (static.py): where no patch closes, a step samples from the logits decoded ahead and
    # its entropy look-ahead (about 115 launches) runs beside the next byte's encoder and decoder steps
    # (about 125): the launches a byte waits for fall (by 21% over these 12 steps, 29% over 40), though
    # more run (a closing byte's decoder runs twice)
    ahead = result["lookahead_triton"]
    assert ahead["steps_ahead"] >= 12 // 2, result
    assert ahead["critical_per_byte"] <= 0.85 * default["per_byte_with_patches"], result
    assert ahead["per_byte_with_patches"] > default["per_byte_with_patches"], result
