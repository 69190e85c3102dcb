"""byte_embedding.py's kernel, in Triton's interpreter, against BltModel.embed_new_bytes and the eager
history shift: the released hash layout and a smaller one with several hash functions (a window
that is not a power of two), fp32 and bf16, gathered and consecutive rows, histories whose hashes
wrap past int64 and come out negative before the floor modulo."""

import pytest
import torch
from interpreter import interpreted

from blt_runtime.byte_embedding import embed_new_bytes
from blt_runtime.config import BltConfig
from blt_runtime.model.blt import BltModel
from blt_runtime.model.hashing import power_matrix

TINY = {"patcher_config": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2),
        "encoder_config": dict(hidden_size=40, num_hidden_layers=1, num_attention_heads=2),
        "global_config": dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2),
        "decoder_config": dict(hidden_size=40, num_hidden_layers=1, num_attention_heads=2)}


def model_with(groups: list[int], functions: int, vocab: int, dtype: torch.dtype) -> BltModel:
    cfg = BltConfig.from_dict({"model_type": "blt", **TINY, "encoder_hash_byte_group_size": groups,
                               "encoder_hash_byte_group_nb_functions": functions,
                               "encoder_hash_byte_group_vocab": vocab})
    torch.manual_seed(len(groups) * 10 + functions)
    return BltModel(cfg).to(dtype).eval().requires_grad_(False)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups, functions, vocab", [([3, 4, 5, 6, 7, 8], 1, 5003), ([2, 5], 3, 97)])
@pytest.mark.parametrize("gathered", [True, False])
def test_kernel_equals_eager_embedding_and_history(dtype, groups, functions, vocab, gathered):
    model = model_with(groups, functions, vocab, dtype)
    cfg, g = model.config, torch.Generator().manual_seed(vocab)
    powers = power_matrix(cfg.hash_group_sizes, cfg.hash_functions)
    history = torch.randint(0, 260, (6, max(groups) - 1), generator=g)
    history[0] = 0  # a sequence's first byte: nothing before it
    ids = torch.randint(0, 260, (4, 1), generator=g)
    rows = torch.tensor([3, 0, 5, 1]) if gathered else slice(1, 5)
    slots = rows if gathered else torch.arange(1, 5)

    context = torch.cat([history[slots], ids], dim=1)
    want = model.embed_new_bytes(context, 1, powers)
    want_history = history.clone()
    want_history[slots] = context[:, 1:]

    tables = (model.encoder_hash_tok_embedding.weight, model.local_encoder.embed_tokens.weight)
    before, elsewhere = history.clone(), torch.full_like(history, -1)
    aside = embed_new_bytes(ids, history, rows, powers, *tables, vocab, history_out=elsewhere)
    assert torch.equal(history, before)  # moved on into the other table only, at the same rows
    others = torch.ones(len(history), dtype=torch.bool)
    others[slots] = False
    assert torch.equal(elsewhere[slots], want_history[slots]) and (elsewhere[others] == -1).all()
    got = embed_new_bytes(ids, history, rows, powers, *tables, vocab)
    assert torch.equal(history, want_history) and torch.equal(got, aside)
    assert got.shape == want.shape and got.dtype == dtype
    if dtype == torch.bfloat16:
        assert torch.equal(got, want)
    else:  # the order of the sum over tables may move the last bit
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    hashes = (context.unfold(1, max(groups), 1)[:, 0, None, :] * powers).sum(-1)
    assert (hashes < 0).any(), "no hash wrapped negative: the floor modulo went untested"


@interpreted
def test_refuses_what_it_cannot_embed():
    model = model_with([3, 4], 1, 101, torch.float32)
    table, own = model.encoder_hash_tok_embedding.weight, model.local_encoder.embed_tokens.weight
    powers = power_matrix((3, 4), 1)
    with pytest.raises(ValueError, match="one new byte per row"):
        embed_new_bytes(torch.zeros(2, 3, dtype=torch.long), torch.zeros(4, 3, dtype=torch.long), slice(0, 2),
                        powers, table, own, 101)
    with pytest.raises(ValueError, match=r"\(slots, 3\)"):
        embed_new_bytes(torch.zeros(2, 1, dtype=torch.long), torch.zeros(4, 2, dtype=torch.long), slice(0, 2),
                        powers, table, own, 101)
    with pytest.raises(ValueError, match="share a dtype"):
        embed_new_bytes(torch.zeros(2, 1, dtype=torch.long), torch.zeros(4, 3, dtype=torch.long), slice(0, 2),
                        powers, table, own.bfloat16(), 101)
