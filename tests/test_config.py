"""config.json parsing: transformers' defaults for missing fields, refusals that name the field."""

import pytest
from factory import hf_config

from blt_runtime import BltConfig, ConfigError


def test_missing_fields_take_transformers_defaults():
    cfg = BltConfig.from_dict({"model_type": "blt"})
    assert (cfg.patcher.num_layers, cfg.patcher.hidden_size, cfg.patcher.num_heads) == (14, 768, 12)
    assert (cfg.global_model.num_layers, cfg.global_model.hidden_size) == (25, 2048)
    assert (cfg.decoder.num_layers, cfg.encoder.hidden_size, cfg.cross_attn_k) == (9, 1024, 2)
    assert cfg.patcher.window == cfg.encoder.window == cfg.decoder.window == 512
    assert cfg.global_model.window is None
    assert cfg.patcher.rope_theta == 10000.0
    assert cfg.encoder.rope_theta == cfg.global_model.rope_theta == cfg.decoder.rope_theta == 500000.0
    assert cfg.hash_group_sizes == (3, 4, 5, 6, 7, 8) and cfg.hash_vocab == 500002
    assert cfg.patching_threshold == pytest.approx(1.335442066192627)
    assert cfg.decoder_cross_attn_all_layers and not cfg.has_global_input_projection


def test_reads_what_transformers_writes():
    raw = hf_config("7b", window=300).to_dict()
    cfg = BltConfig.from_dict(raw)
    assert cfg.cross_attn_k == 4 and cfg.has_global_input_projection
    assert cfg.encoder.window == cfg.decoder.window == 300
    assert cfg.encoder.hidden_size == raw["encoder_config"]["hidden_size"]
    assert cfg.decoder.num_layers == raw["decoder_config"]["num_hidden_layers"]


def test_round_trip():
    cfg = BltConfig.from_dict(hf_config("gqa").to_dict())
    assert BltConfig.from_dict(cfg.to_dict()) == cfg


def test_old_transformers_config_without_windows():
    """transformers < 5.23 wrote no windows; the checkpoints were trained with 512."""
    raw = hf_config("1b").to_dict()
    del raw["local_attention_window_len"], raw["patcher_config"]["sliding_window"]
    raw["encoder_config"].pop("sliding_window", None)
    cfg = BltConfig.from_dict(raw)
    assert cfg.patcher.window == cfg.encoder.window == cfg.decoder.window == 512


@pytest.mark.parametrize("change, field", [
    (lambda d: d.update(model_type="llama"), "model_type"),
    (lambda d: d.update(max_patch_length=8), "max_patch_length"),
    (lambda d: d.update(monotonicity=True), "monotonicity"),
    (lambda d: d.update(patching_threshold_add=0.1), "patching_threshold_add"),
    (lambda d: d.update(patching_mode="space"), "patching_mode"),
    (lambda d: d["decoder_config"].update(cross_attn_k=3), "decoder_config.cross_attn_k"),
    (lambda d: d["encoder_config"].update(cross_attn_all_layers=True), "encoder_config.cross_attn_all_layers"),
    (lambda d: d["global_config"].update(rope_parameters={"rope_type": "linear", "factor": 2.0}),
     "global_config.rope_parameters.rope_type"),
    (lambda d: d["decoder_config"].update(num_attention_heads=5), "decoder_config.num_attention_heads"),
    (lambda d: d["decoder_config"].update(hidden_size_global=7), "decoder_config.hidden_size_global"),
    (lambda d: d.update(encoder_hash_byte_group_nb_functions=12), "encoder_hash_byte_group_nb_functions"),
])
def test_unsupported_options_name_the_field(change, field):
    raw = hf_config("1b").to_dict()
    change(raw)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as info:
        BltConfig.from_dict(raw)
    assert "\n" not in str(info.value)


def test_bad_json_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        BltConfig.from_file(tmp_path)
    with pytest.raises(ConfigError, match="no such file"):
        BltConfig.from_file(tmp_path / "absent")
