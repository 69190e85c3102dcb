"""CUDA checks; skipped, and reported as skipped, where no GPU is present (CI has none)."""

import pytest
import torch
from factory import PARITY_TEXT

from blt_runtime import encode, load_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; CI machines have none")]


def test_cuda_matches_cpu(hf_checkpoint):
    _, directory = hf_checkpoint("1b")
    ids = torch.tensor([encode(PARITY_TEXT)])
    cpu = load_model(directory).logits(ids)
    gpu = load_model(directory, device="cuda").logits(ids)
    assert torch.equal(load_model(directory, device="cuda").patch_lengths(ids).cpu(),
                       load_model(directory).patch_lengths(ids))
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-3, rtol=0)
