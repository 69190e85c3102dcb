"""Shared fixtures: tiny random checkpoints written by transformers, and test text."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from factory import MODEL_SEED, PARITY_TEXT, make_hf_checkpoint

# two cores: two threads, or one for each of pytest-xdist's two workers (scripts/test.sh runs -n 2)
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
if not torch.cuda.is_available():
    # Triton kernels run in Triton's interpreter here (tests/test_attention.py); it must be chosen
    # before Triton is first imported, which is why it is set for the whole session.
    assert "triton" not in sys.modules, "Triton was imported before the tests could choose its interpreter"
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """(structure) -> (transformers model, native checkpoint dir); built once per session."""
    cache = {}

    def get(structure: str):
        if structure not in cache:
            directory = tmp_path_factory.mktemp(f"hf-{structure}")
            cache[structure] = make_hf_checkpoint(structure, directory, PARITY_TEXT, seed=MODEL_SEED)
        return cache[structure]

    return get
