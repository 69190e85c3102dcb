"""The model's shape and patching settings, read from a native (transformers-layout) config.json.

Owns: parsing `config.json` (`model_type: "blt"`) into frozen dataclasses, the defaults for missing
fields (those of transformers 5.23+), refusing options the runtime cannot serve faithfully with a
message naming the field, and writing the same layout back. Knows nothing about weights or torch.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

logger = logging.getLogger(__name__)

VOCAB_SIZE = 260
DEFAULT_WINDOW = 512
PATCHER_ROPE_THETA = 10000.0
LOCAL_ROPE_THETA = 500000.0
DEFAULT_HASH_GROUP_SIZES = (3, 4, 5, 6, 7, 8)
HASH_PRIMES_AVAILABLE = 11

# transformers' defaults per sub-config, used where a field is missing (1B shapes).
_STACK_DEFAULTS: dict[str, dict[str, Any]] = {
    "patcher_config": dict(hidden_size=768, num_hidden_layers=14, num_attention_heads=12,
                           intermediate_size=2048, rope_theta=PATCHER_ROPE_THETA),
    "encoder_config": dict(hidden_size=1024, num_hidden_layers=1, num_attention_heads=16,
                           intermediate_size=None, rope_theta=LOCAL_ROPE_THETA),
    "global_config": dict(hidden_size=2048, num_hidden_layers=25, num_attention_heads=16,
                          intermediate_size=5632, rope_theta=LOCAL_ROPE_THETA),
    "decoder_config": dict(hidden_size=1024, num_hidden_layers=9, num_attention_heads=16,
                           intermediate_size=2816, rope_theta=LOCAL_ROPE_THETA),
}

# Fields that transformers writes but that do not change what the model computes.
_IGNORED_TOP = {
    "architectures", "bos_token_id", "eos_token_id", "pad_token_id", "dtype", "torch_dtype",
    "initializer_range", "transformers_version", "use_cache", "patch_size", "patching_batch_size",
    "patching_device", "realtime_patching", "rope_parameters", "rope_theta", "rope_scaling",
    "tie_word_embeddings", "max_position_embeddings", "pm_size", "model_type", "vocab_size",
    "patching_mode", "patch_in_forward", "max_patch_length", "monotonicity", "patching_threshold_add",
    "patching_threshold", "local_attention_window_len", "cross_attn_k", "encoder_hash_byte_group_size",
    "encoder_hash_byte_group_vocab", "encoder_hash_byte_group_nb_functions", "patcher_config",
    "encoder_config", "decoder_config", "global_config", "_name_or_path", "output_attentions",
    "output_hidden_states", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder",
    "id2label", "label2id", "problem_type", "_attn_implementation_autoset",
}


@dataclass(frozen=True)
class StackConfig:
    """One transformer stack: the entropy model, local encoder, global model or local decoder."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rope_theta: float
    norm_eps: float = 1e-5
    window: int | None = DEFAULT_WINDOW  # sliding self-attention window; None = fully causal

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def check(self, where: str) -> None:
        if min(self.hidden_size, self.num_layers, self.num_heads, self.num_kv_heads) <= 0:
            raise ConfigError(f"{where}: sizes must be positive, got {self}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"{where}.num_attention_heads={self.num_heads} does not divide "
                              f"hidden_size={self.hidden_size}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{where}.num_key_value_heads={self.num_kv_heads} does not divide "
                              f"num_attention_heads={self.num_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"{where}: head_dim={self.head_dim} must be even for RoPE")
        if self.window is not None and self.window <= 0:
            raise ConfigError(f"{where}: sliding window must be positive or null, got {self.window}")


@dataclass(frozen=True)
class BltConfig:
    """Everything the numerical contract needs; sizes of the four stacks plus patching and hashing."""

    patcher: StackConfig
    encoder: StackConfig
    global_model: StackConfig
    decoder: StackConfig
    cross_attn_k: int = 2
    decoder_cross_attn_all_layers: bool = True
    patching_threshold: float = 1.335442066192627
    hash_group_sizes: tuple[int, ...] = DEFAULT_HASH_GROUP_SIZES
    hash_functions: int = 1
    hash_vocab: int = 500002
    max_seq_len: int = 24576  # bytes; encoder_config.max_position_embeddings
    vocab_size: int = VOCAB_SIZE
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def global_input_size(self) -> int:
        """Width of a patch's concatenated encoder slots, the global model's input."""
        return self.cross_attn_k * self.encoder.hidden_size

    @property
    def has_global_input_projection(self) -> bool:
        return self.global_input_size != self.global_model.hidden_size

    @property
    def num_hash_tables(self) -> int:
        return self.hash_functions * len(self.hash_group_sizes)

    @property
    def max_hash_group(self) -> int:
        return max(self.hash_group_sizes)

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_file(cls, path: str | Path) -> BltConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no such file (a model directory needs config.json)")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BltConfig:
        _refuse_unsupported(d)
        local_window = _opt_int(d, "local_attention_window_len", DEFAULT_WINDOW)
        k = _int(d, "cross_attn_k", 2)
        enc_raw = _sub(d, "encoder_config")
        dec_raw = _sub(d, "decoder_config")
        for name, sub in (("encoder_config", enc_raw), ("decoder_config", dec_raw)):
            if "cross_attn_k" in sub and sub["cross_attn_k"] != k:
                raise ConfigError(f"{name}.cross_attn_k={sub['cross_attn_k']} disagrees with top-level "
                                  f"cross_attn_k={k}; transformers uses both copies, so the checkpoint is "
                                  f"ambiguous")
        if enc_raw.get("cross_attn_all_layers", False):
            raise ConfigError("encoder_config.cross_attn_all_layers=true is not supported: Meta's code pools "
                              "once and transformers re-pools at every layer, so there is no single "
                              "reference to be faithful to (released models use false)")
        patcher_raw = _sub(d, "patcher_config")
        patcher = _stack(patcher_raw, "patcher_config",
                         window=_opt_int(patcher_raw, "sliding_window", DEFAULT_WINDOW))
        encoder = _stack(enc_raw, "encoder_config", window=local_window)
        global_model = _stack(_sub(d, "global_config"), "global_config", window=None)
        decoder = _stack(dec_raw, "decoder_config", window=local_window)
        hidden_global = dec_raw.get("hidden_size_global", global_model.hidden_size)
        if hidden_global != global_model.hidden_size:
            raise ConfigError(f"decoder_config.hidden_size_global={hidden_global} differs from "
                              f"global_config.hidden_size={global_model.hidden_size}")
        groups = d.get("encoder_hash_byte_group_size") or list(DEFAULT_HASH_GROUP_SIZES)
        if not isinstance(groups, list) or not all(isinstance(g, int) and g >= 1 for g in groups):
            raise ConfigError(f"encoder_hash_byte_group_size must be a list of positive ints, got {groups!r}")
        n_func = _int(d, "encoder_hash_byte_group_nb_functions", 1)
        if not 1 <= n_func <= HASH_PRIMES_AVAILABLE:
            raise ConfigError(f"encoder_hash_byte_group_nb_functions={n_func}: must be 1..{HASH_PRIMES_AVAILABLE}")
        cfg = cls(
            patcher=patcher, encoder=encoder, global_model=global_model, decoder=decoder,
            cross_attn_k=k,
            decoder_cross_attn_all_layers=bool(dec_raw.get("cross_attn_all_layers", True)),
            patching_threshold=_float(d, "patching_threshold", 1.335442066192627),
            hash_group_sizes=tuple(groups), hash_functions=n_func,
            hash_vocab=_int(d, "encoder_hash_byte_group_vocab", 500002),
            max_seq_len=_int(enc_raw, "max_position_embeddings", 24576),
        )
        if cfg.cross_attn_k <= 0 or cfg.hash_vocab <= 0:
            raise ConfigError("cross_attn_k and encoder_hash_byte_group_vocab must be positive")
        unknown = sorted(set(d) - _IGNORED_TOP)
        if unknown:
            logger.warning("config.json: ignoring fields this runtime does not know: %s", ", ".join(unknown))
        return cfg

    # ------------------------------------------------------------------ writing
    def to_dict(self) -> dict[str, Any]:
        """The native layout, loadable by transformers' BltForCausalLM and by this runtime."""
        if self.encoder.window != self.decoder.window:
            raise ConfigError("the native layout has one local window for encoder and decoder")
        g = self.global_model.hidden_size
        local_extra = dict(cross_attn_k=self.cross_attn_k, hidden_size_global=g, vocab_size=self.vocab_size)
        return {
            "architectures": ["BltForCausalLM"],
            "model_type": "blt",
            "vocab_size": self.vocab_size,
            "patch_in_forward": True,
            "patching_mode": "entropy",
            "patching_threshold": self.patching_threshold,
            "max_patch_length": None,
            "local_attention_window_len": self.encoder.window,
            "cross_attn_k": self.cross_attn_k,
            "encoder_hash_byte_group_size": list(self.hash_group_sizes),
            "encoder_hash_byte_group_vocab": self.hash_vocab,
            "encoder_hash_byte_group_nb_functions": self.hash_functions,
            "tie_word_embeddings": False,
            "patcher_config": {**_stack_dict(self.patcher), "sliding_window": self.patcher.window,
                               "vocab_size": self.vocab_size},
            "encoder_config": {**_stack_dict(self.encoder), **local_extra, "cross_attn_all_layers": False,
                               "sliding_window": self.encoder.window,
                               "max_position_embeddings": self.max_seq_len},
            "decoder_config": {**_stack_dict(self.decoder), **local_extra,
                               "cross_attn_all_layers": self.decoder_cross_attn_all_layers,
                               "max_position_embeddings": self.max_seq_len},
            "global_config": _stack_dict(self.global_model),
        }

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


def ffn_hidden_size(dim: int, multiple_of: int = 256) -> int:
    """The SwiGLU width of the released models: 256 * ceil(int(8*d/3) / 256)."""
    return multiple_of * math.ceil(int(8 * dim / 3) / multiple_of)


# ---------------------------------------------------------------------- helpers
def _refuse_unsupported(d: dict[str, Any]) -> None:
    if "model_type" not in d and isinstance(d.get("args"), dict):
        raise ConfigError("a checkpoint in Meta's layout (its config holds 'args'): convert it to the native layout "
                          "first, with `blt-convert SRC DST`")
    if d.get("model_type") != "blt":
        raise ConfigError(f"model_type={d.get('model_type')!r}: this runtime serves only model_type 'blt'")
    if d.get("vocab_size", VOCAB_SIZE) != VOCAB_SIZE:
        raise ConfigError(f"vocab_size={d['vocab_size']}: BLT byte models have {VOCAB_SIZE} ids")
    if d.get("patching_mode", "entropy") != "entropy":
        raise ConfigError(f"patching_mode={d['patching_mode']!r}: only 'entropy' patching is supported")
    if d.get("patch_in_forward", True) is False:
        raise ConfigError("patch_in_forward=false: the runtime needs the entropy model to cut patches")
    if d.get("max_patch_length") is not None:
        raise ConfigError(f"max_patch_length={d['max_patch_length']}: not supported; transformers drops the "
                          "trailing empty patch when it splits patches, so the last byte's logits change "
                          "when bytes are appended and incremental generation could not be exact")
    if d.get("monotonicity"):
        raise ConfigError("monotonicity=true: monotonic entropy patching is not supported")
    if d.get("patching_threshold_add"):
        raise ConfigError(f"patching_threshold_add={d['patching_threshold_add']}: not supported")


def _sub(d: dict[str, Any], name: str) -> dict[str, Any]:
    sub = d.get(name) or {}
    if not isinstance(sub, dict):
        raise ConfigError(f"{name} must be an object")
    return sub


def _stack(sub: dict[str, Any], name: str, *, window: int | None) -> StackConfig:
    defaults = _STACK_DEFAULTS[name]
    hidden = _int(sub, "hidden_size", defaults["hidden_size"], name)
    heads = _int(sub, "num_attention_heads", defaults["num_attention_heads"], name)
    inter = sub.get("intermediate_size", defaults["intermediate_size"]) or int(8 * hidden / 3)
    if sub.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{name}.hidden_act={sub['hidden_act']!r}: only silu (SwiGLU) is supported")
    stack = StackConfig(
        hidden_size=hidden,
        num_layers=_int(sub, "num_hidden_layers", defaults["num_hidden_layers"], name),
        num_heads=heads,
        num_kv_heads=sub.get("num_key_value_heads") or heads,
        intermediate_size=int(inter),
        rope_theta=_rope_theta(sub, name, defaults["rope_theta"]),
        norm_eps=_float(sub, "rms_norm_eps", 1e-5, name),
        window=window,
    )
    stack.check(name)
    return stack


def _rope_theta(sub: dict[str, Any], name: str, default: float) -> float:
    params = sub.get("rope_parameters") or sub.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"{name}.rope_parameters.rope_type={rope_type!r}: only default RoPE is supported")
    theta = params.get("rope_theta", sub.get("rope_theta", default))
    return float(theta)


def _stack_dict(s: StackConfig) -> dict[str, Any]:
    return {
        "hidden_size": s.hidden_size,
        "num_hidden_layers": s.num_layers,
        "num_attention_heads": s.num_heads,
        "num_key_value_heads": s.num_kv_heads,
        "intermediate_size": s.intermediate_size,
        "rms_norm_eps": s.norm_eps,
        "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": s.rope_theta},
    }


def _int(d: dict[str, Any], key: str, default: int, where: str = "") -> int:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{where + '.' if where else ''}{key} must be an integer, got {v!r}")
    return v


def _opt_int(d: dict[str, Any], key: str, default: int | None) -> int | None:
    if key not in d:
        return default
    return None if d[key] is None else _int(d, key, 0)


def _float(d: dict[str, Any], key: str, default: float, where: str = "") -> float:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{where + '.' if where else ''}{key} must be a number, got {v!r}")
    return float(v)
