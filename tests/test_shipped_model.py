"""The model shipped in weights/: loads in transformers with the same logits and patches, and meets
its held-out quality (bits per byte) and patch-size targets."""

import math
from pathlib import Path

import pytest
import torch

from blt_runtime import encode, load_model

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "weights" / "blt-shakespeare"
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

pytestmark = [
    pytest.mark.skipif(not (SHIPPED / "model.safetensors").is_file(), reason="weights/blt-shakespeare missing"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


def held_out() -> bytes:
    if not CORPUS.is_file():
        pytest.skip(f"{CORPUS} (the training corpus, outside the repository) is not present")
    data = CORPUS.read_bytes()
    return data[int(len(data) * 0.9):]  # the last 10%, never trained on


@pytest.fixture(scope="module")
def model():
    return load_model(SHIPPED)


def test_size_limit():
    assert (SHIPPED / "model.safetensors").stat().st_size <= 40 * 1024 * 1024


def test_transformers_gives_the_same_logits_and_patches(model):
    from transformers import BltForCausalLM

    passage = held_out()[5000:6200]
    ids = torch.tensor([encode(passage)])
    hf = BltForCausalLM.from_pretrained(SHIPPED).eval()
    with torch.no_grad():
        want = hf(ids, use_cache=False).logits
        _, want_lengths, _ = hf.model.patcher(ids, patch_size=4, threshold=hf.config.patching_threshold)
    assert torch.equal(model.patch_lengths(ids), want_lengths.long())
    torch.testing.assert_close(model.logits(ids), want, atol=1e-4, rtol=0)


def test_held_out_bits_per_byte_and_patch_size(model):
    """Over the whole held-out 10%, in chunks of 1,024 bytes each led by BOS."""
    data = held_out()
    nats = n_bytes = n_patches = 0
    for start in range(0, len(data), 1023):
        ids = torch.tensor([encode(data[start:start + 1023])])
        with torch.inference_mode():
            out = model(ids)
        nats += torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, 1:], reduction="sum").item()
        n_bytes += ids.shape[1] - 1
        n_patches += int((out.layout.lengths[0] > 0).sum()) - 1  # BOS's own patch holds no text
    bits_per_byte = nats / n_bytes / math.log(2)
    assert bits_per_byte <= 2.6
    assert 3.0 <= n_bytes / n_patches <= 5.0
