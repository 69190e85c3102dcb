"""blt-convert: synthetic checkpoints with Meta's exact names and config fields, converted, must load
in this runtime and in transformers with identical logits."""

import json

import pytest
import torch
from factory import PARITY_TEXT
from safetensors.torch import load_file, save_file

from blt_runtime import ConversionError, encode, load_model
from blt_runtime.convert import convert, main

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

# Native name piece -> Meta name piece (written independently of the converter's table).
TO_META = {"self_attn": "attention", "mlp": "feed_forward", "input_layernorm": "attention_norm",
           "post_attention_layernorm": "ffn_norm", "embed_tokens": "tok_embeddings",
           "q_norm": "cross_attn_norm_q", "k_norm": "cross_attn_norm_kv", "gate_proj": "w1",
           "up_proj": "w3", "down_proj": "w2", "q_proj": "wq", "k_proj": "wk", "v_proj": "wv",
           "o_proj": "wo", "lm_head": "output"}


class NotATensor:
    """A pickled object that a weights_only load must refuse to build."""


def _meta_key(key: str) -> str:
    return ".".join(TO_META.get(part, part) for part in key.split("."))


def meta_state(native: dict, n_tables: int) -> tuple[dict, dict]:
    """Native tensors -> (BLT state dict, entropy-model state dict) under Meta's names."""
    blt, entropy = {}, {}
    for key, tensor in native.items():
        if key == "lm_head.weight":
            blt["local_decoder.output.weight"] = tensor
        elif key == "model.encoder_hash_tok_embedding.weight":
            for j, table in enumerate(tensor.chunk(n_tables)):
                blt[f"encoder_hash_tok_embedding.{j}.weight"] = table.clone()
        elif key.startswith("model.patcher."):
            entropy[_meta_key(key.removeprefix("model.patcher."))] = tensor
        else:
            blt[_meta_key(key.removeprefix("model."))] = tensor
    return blt, entropy


def meta_args(hf_cfg) -> tuple[dict, dict]:
    """The Meta model args and entropy-model params.json for a transformers config."""
    enc, dec, glob, pat = hf_cfg.encoder_config, hf_cfg.decoder_config, hf_cfg.global_config, hf_cfg.patcher_config
    assert enc.num_key_value_heads == dec.num_key_value_heads
    args = {
        "seed": 777, "vocab_size": 260, "dim": 512, "n_layers": 8, "n_heads": 8, "patch_in_forward": True,
        "dim_token": None, "dim_global": glob.hidden_size, "dim_local_decoder": dec.hidden_size,
        "dim_local_encoder": enc.hidden_size, "n_layers_global": glob.num_hidden_layers,
        "n_layers_local_decoder": dec.num_hidden_layers, "n_layers_local_encoder": enc.num_hidden_layers,
        "patch_size": 4.5, "patching_mode": "entropy", "patching_threshold": hf_cfg.patching_threshold,
        "patching_threshold_add": None, "monotonicity": False, "max_patch_length": None,
        "cross_attn_encoder": True, "cross_attn_decoder": True, "cross_attn_k": hf_cfg.cross_attn_k,
        "cross_attn_nheads": enc.num_attention_heads, "cross_attn_all_layers_decoder": dec.cross_attn_all_layers,
        "cross_attn_all_layers_encoder": False, "cross_attn_init_by_pooling": True,
        "encoder_hash_byte_group_size": ",".join(map(str, hf_cfg.encoder_hash_byte_group_size)),
        "encoder_hash_byte_group_vocab": hf_cfg.encoder_hash_byte_group_vocab,
        "encoder_hash_byte_group_nb_functions": hf_cfg.encoder_hash_byte_group_nb_functions,
        "downsampling_by_pooling": "max", "n_heads_global": glob.num_attention_heads,
        "n_heads_local_decoder": dec.num_attention_heads, "n_heads_local_encoder": enc.num_attention_heads,
        "n_kv_heads": enc.num_key_value_heads, "n_kv_heads_global": glob.num_key_value_heads,
        "local_attention_window_len": hf_cfg.local_attention_window_len, "rope_theta": 500000.0,
        "norm_eps": 1e-5, "norm_type": "rmsnorm", "non_linearity": "swiglu", "use_rope": True,
        "multiple_of": 256, "max_seqlen": 4096, "pm_size": 0,
    }
    entropy_params = {
        "name": "entropy", "entropy_model": {
            "dim": pat.hidden_size, "n_layers": pat.num_hidden_layers, "n_heads": pat.num_attention_heads,
            "n_kv_heads": pat.num_key_value_heads, "max_seqlen": 8192, "norm_eps": 1e-5,
            "rope_theta": 10000.0, "sliding_window": 512, "attn_bias_type": "local_block_causal",
            "vocab_size": 260},
        "data": {"patcher_args": {"patching_mode": "entropy", "threshold": hf_cfg.patching_threshold,
                                  "max_patch_length": None, "monotonicity": False}},
    }
    return args, entropy_params


def write_meta_release(hf, native_dir, dst):
    """The facebook/blt-1b layout."""
    args, entropy_params = meta_args(hf.config)
    blt, entropy = meta_state(load_file(native_dir / "model.safetensors"), len(hf.config.encoder_hash_byte_group_size))
    (dst / "entropy_model").mkdir(parents=True)
    (dst / "config.json").write_text(json.dumps({"args": args}))
    save_file(blt, str(dst / "model.safetensors"))
    (dst / "entropy_model/params.json").write_text(json.dumps(entropy_params))
    torch.save({"model": entropy}, dst / "entropy_model/consolidated.pth")


def write_meta_training(hf, native_dir, dst, entropy_dst):
    """Training outputs: params.json + consolidated.pth, for the BLT and for the entropy model."""
    args, entropy_params = meta_args(hf.config)
    blt, entropy = meta_state(load_file(native_dir / "model.safetensors"), len(hf.config.encoder_hash_byte_group_size))
    for d in (dst, entropy_dst):
        d.mkdir(parents=True)
    (dst / "params.json").write_text(json.dumps({"name": "blt", "model": args, "data": entropy_params["data"]}))
    torch.save({"model": blt, "optim": {"step": 10}}, dst / "consolidated.pth")
    (entropy_dst / "params.json").write_text(json.dumps(entropy_params))
    torch.save({"model": entropy}, entropy_dst / "consolidated.pth")


def _check_converted(hf, out):
    from transformers import BltForCausalLM

    ids = torch.tensor([encode(PARITY_TEXT[:700])])
    ours = load_model(out).logits(ids)
    theirs = BltForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        want = hf(ids, use_cache=False).logits
        converted_hf = theirs(ids, use_cache=False).logits
    assert torch.equal(converted_hf, want)  # transformers reads the converted weights as the originals
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("structure", ["1b", "7b"])
def test_release_layout_round_trip(hf_checkpoint, tmp_path, structure):
    hf, native_dir = hf_checkpoint(structure)
    write_meta_release(hf, native_dir, tmp_path / "meta")
    assert main([str(tmp_path / "meta"), str(tmp_path / "out")]) == 0
    _check_converted(hf, tmp_path / "out")


def test_training_layout_round_trip(hf_checkpoint, tmp_path):
    hf, native_dir = hf_checkpoint("1b")
    write_meta_training(hf, native_dir, tmp_path / "run", tmp_path / "entropy_run")
    convert(tmp_path / "run", tmp_path / "out", entropy_model=tmp_path / "entropy_run")
    _check_converted(hf, tmp_path / "out")


def test_missing_entropy_model_is_one_line(hf_checkpoint, tmp_path, capsys):
    hf, native_dir = hf_checkpoint("1b")
    write_meta_training(hf, native_dir, tmp_path / "run", tmp_path / "entropy_run")
    capsys.readouterr()  # what building the checkpoint printed, if this test built it (transformers' progress bar)
    assert main([str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no entropy model found" in err and "--entropy-model" in err


def test_refuses_unsupported_meta_options(hf_checkpoint, tmp_path):
    hf, native_dir = hf_checkpoint("1b")
    write_meta_release(hf, native_dir, tmp_path / "meta")
    config = json.loads((tmp_path / "meta/config.json").read_text())
    config["args"]["monotonicity"] = True
    (tmp_path / "meta/config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="monotonicity"):
        convert(tmp_path / "meta", tmp_path / "out")


def test_refuses_pickled_objects(hf_checkpoint, tmp_path):
    """weights_only=True: a .pth holding arbitrary objects is rejected, never executed."""
    hf, native_dir = hf_checkpoint("1b")
    write_meta_release(hf, native_dir, tmp_path / "meta")
    torch.save({"model": NotATensor()}, tmp_path / "meta/entropy_model/consolidated.pth")
    with pytest.raises(ConversionError, match="weights_only=True"):
        convert(tmp_path / "meta", tmp_path / "out")


def test_wrong_hash_table_shape_is_reported(hf_checkpoint, tmp_path):
    hf, native_dir = hf_checkpoint("1b")
    write_meta_release(hf, native_dir, tmp_path / "meta")
    tensors = load_file(tmp_path / "meta/model.safetensors")
    tensors["encoder_hash_tok_embedding.5.weight"] = tensors["encoder_hash_tok_embedding.5.weight"][:-1]
    save_file(tensors, str(tmp_path / "meta/model.safetensors"))
    with pytest.raises(ConversionError, match="model.encoder_hash_tok_embedding.weight has shape"):
        convert(tmp_path / "meta", tmp_path / "out")
