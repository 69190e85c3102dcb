"""Shared fixtures: tiny random checkpoints written by transformers, and test text."""

from __future__ import annotations

import pytest
import torch
from factory import PARITY_TEXT, make_hf_checkpoint

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """(structure) -> (transformers model, native checkpoint dir); built once per session."""
    cache = {}

    def get(structure: str):
        if structure not in cache:
            directory = tmp_path_factory.mktemp(f"hf-{structure}")
            cache[structure] = make_hf_checkpoint(structure, directory, PARITY_TEXT)
        return cache[structure]

    return get
