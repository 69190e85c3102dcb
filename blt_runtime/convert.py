"""Meta checkpoint layouts -> the native (transformers) layout. Command: `blt-convert SRC DST`.

Reads (a) the `facebook/blt-1b` layout: `config.json` = {"args": {...}}, `model.safetensors` with Meta
names, and `entropy_model/params.json` + `entropy_model/consolidated.pth`; or (b) a training output:
`params.json` + `consolidated.pth` (weights under "model"), with the entropy model's training output
given by --entropy-model, found in SRC/entropy_model, or named by the run's
`entropy_model_checkpoint_dir`. `.pth` files are read with `torch.load(weights_only=True)` only.
Sizes are read from the tensors; the result is checked exactly as `load_model` checks a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import BltConfig
from .errors import BltError, ConversionError
from .hub import resolve_model_dir
from .weights import SINGLE_FILE, expected_shapes

# Meta name piece -> native name piece, applied in this order to every key.
RENAMES = (
    (".attention.", ".self_attn."), (".feed_forward.", ".mlp."),
    (".attention_norm.", ".input_layernorm."), (".ffn_norm.", ".post_attention_layernorm."),
    (".tok_embeddings.", ".embed_tokens."), (".cross_attn_norm_q.", ".q_norm."),
    (".cross_attn_norm_kv.", ".k_norm."), (".w1.", ".gate_proj."), (".w3.", ".up_proj."),
    (".w2.", ".down_proj."), (".wq.", ".q_proj."), (".wk.", ".k_proj."), (".wv.", ".v_proj."),
    (".wo.", ".o_proj."), (".output.", ".lm_head."),
)
META_FILES = ["*.json", "*.safetensors", "*.pth"]  # what read_meta reads, fetched for a Hub id
# Buffers Meta saves that are recomputed here, not weights.
SKIPPED_SUFFIXES = ("freqs_cis", "rope.inv_freq")


def rename(key: str) -> str:
    for old, new in RENAMES:
        key = key.replace(old, new)
    return key


# ---------------------------------------------------------------------- reading
def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def _read_pth(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConversionError(f"{path}: not found") from None
    except Exception as e:  # torch raises many types for a bad or unsafe pickle
        raise ConversionError(f"{path}: cannot be read with weights_only=True ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(f"{path}: expected a state dict of tensors (optionally under 'model')")
    return obj


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise ConversionError(f"{path}: not found") from None
    except (SafetensorError, OSError) as e:
        raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None


def read_meta(src: Path, entropy_dir: Path | None) -> tuple[dict, dict, dict, dict]:
    """-> (BLT args, BLT weights, entropy-model params file, entropy weights)."""
    if (src / "config.json").is_file() and (src / SINGLE_FILE).is_file():
        config = _read_json(src / "config.json")
        if "args" not in config:
            raise ConversionError(f"{src}/config.json has no 'args': not a Meta checkpoint (a native one "
                                  f"needs no conversion)")
        args, weights, run = config["args"], _read_safetensors(src / SINGLE_FILE), {}
    elif (src / "params.json").is_file() and (src / "consolidated.pth").is_file():
        run = _read_json(src / "params.json")
        args = run.get("model") or run.get("args")
        if not isinstance(args, dict):
            raise ConversionError(f"{src}/params.json has no 'model' section")
        weights = _read_pth(src / "consolidated.pth")
    else:
        raise ConversionError(f"{src}: expected config.json + {SINGLE_FILE} (Meta release layout) or "
                              f"params.json + consolidated.pth (Meta training output)")
    entropy_dir = entropy_dir or _find_entropy_dir(src, args, run)
    entropy_params = _read_json(entropy_dir / "params.json")
    if not isinstance(entropy_params.get("entropy_model"), dict):
        raise ConversionError(f"{entropy_dir}/params.json has no 'entropy_model' section")
    return args, weights, entropy_params, _read_pth(entropy_dir / "consolidated.pth")


def _find_entropy_dir(src: Path, args: dict, run: dict) -> Path:
    candidates = [src / "entropy_model"]
    for section in (args, run.get("data", {}).get("patcher_args", {}) if isinstance(run, dict) else {}):
        if isinstance(section, dict) and section.get("entropy_model_checkpoint_dir"):
            candidates.append(Path(section["entropy_model_checkpoint_dir"]))
    for c in candidates:
        if (c / "params.json").is_file():
            return c
    raise ConversionError(f"{src}: no entropy model found (looked in {', '.join(map(str, candidates))}); "
                          f"pass --entropy-model DIR")


# ---------------------------------------------------------------------- config
def _refuse(args: dict, entropy_params: dict) -> None:
    def bad(field: str, value: Any, why: str) -> None:
        raise ConversionError(f"{field}={value!r}: {why}")

    for field in ("cross_attn_encoder", "cross_attn_decoder", "cross_attn_init_by_pooling", "use_rope"):
        if args.get(field, True) is False:
            bad(field, False, "only the released BLT structure is supported")
    for field, allowed in (("norm_type", "rmsnorm"), ("non_linearity", "swiglu"), ("patching_mode", "entropy")):
        if args.get(field, allowed) not in (allowed, None):
            bad(field, args[field], f"only {allowed!r} is supported")
    if args.get("downsampling_by_pooling") not in (None, "max"):
        bad("downsampling_by_pooling", args["downsampling_by_pooling"], "patches are initialised by max-pooling")
    if args.get("encoder_enable_byte_ngrams") or args.get("encoder_ngram_to_size_str"):
        bad("encoder_ngram_to_size_str", args.get("encoder_ngram_to_size_str"), "n-gram tables are not supported")
    if args.get("pm_size", 0):
        bad("pm_size", args["pm_size"], "parameter mixing is not supported")
    if args.get("dim_token") not in (None, args.get("dim_local_encoder")):
        bad("dim_token", args["dim_token"], "must equal dim_local_encoder")
    for name in ("encoder", "decoder"):
        heads = args.get(f"n_heads_local_{name}")
        if args.get("cross_attn_nheads") not in (None, heads):
            bad("cross_attn_nheads", args["cross_attn_nheads"], f"must equal n_heads_local_{name}={heads}")
    patcher_args = entropy_params.get("data", {}).get("patcher_args", {}) or {}
    for field in ("monotonicity", "patching_threshold_add", "max_patch_length"):
        value = args.get(field, patcher_args.get(field.replace("patching_", "")))
        if value:
            bad(field, value, "changes patch boundaries in a way this runtime does not serve")


def _ffn(weights: dict[str, torch.Tensor], prefix: str) -> int:
    key = f"{prefix}.layers.0.mlp.gate_proj.weight"
    if key not in weights:
        raise ConversionError(f"missing {key}: cannot read the feed-forward size")
    return int(weights[key].shape[0])


def _stack(dim, layers, heads, kv_heads, ffn, eps, theta, **extra) -> dict[str, Any]:
    return dict(hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads or heads, intermediate_size=ffn, rms_norm_eps=eps,
                rope_parameters={"rope_type": "default", "rope_theta": theta}, **extra)


def native_config(args: dict, entropy_params: dict, weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The native config.json for Meta args; sizes that Meta derives are read from the tensors."""
    _refuse(args, entropy_params)
    em = entropy_params["entropy_model"]
    patcher_args = entropy_params.get("data", {}).get("patcher_args", {}) or {}
    threshold = args.get("patching_threshold", patcher_args.get("threshold"))
    if threshold is None:
        raise ConversionError("no patching_threshold in the model args nor the entropy model's patcher_args")
    groups = args.get("encoder_hash_byte_group_size") or [3, 4, 5, 6, 7, 8]
    if isinstance(groups, str):
        groups = [int(x) for x in groups.split(",") if x]
    eps, theta, k = args.get("norm_eps", 1e-5), args.get("rope_theta", 10000.0), args.get("cross_attn_k", 2)
    window = args.get("local_attention_window_len")
    g = args["dim_global"]
    local = dict(cross_attn_k=k, hidden_size_global=g)
    return {
        "model_type": "blt", "architectures": ["BltForCausalLM"], "vocab_size": args.get("vocab_size", 260),
        "patching_mode": "entropy", "patch_in_forward": True, "patching_threshold": float(threshold),
        "max_patch_length": None, "local_attention_window_len": window, "cross_attn_k": k,
        "encoder_hash_byte_group_size": groups,
        "encoder_hash_byte_group_vocab": args.get("encoder_hash_byte_group_vocab", 30000),
        "encoder_hash_byte_group_nb_functions": args.get("encoder_hash_byte_group_nb_functions", 3),
        "tie_word_embeddings": False,
        "patcher_config": _stack(em["dim"], em["n_layers"], em["n_heads"], em.get("n_kv_heads"),
                                 _ffn(weights, "model.patcher"), em.get("norm_eps", 1e-5),
                                 em.get("rope_theta", 10000.0), vocab_size=em.get("vocab_size", 260),
                                 sliding_window=em.get("sliding_window", 512)),
        "encoder_config": _stack(args["dim_local_encoder"], args["n_layers_local_encoder"],
                                 args["n_heads_local_encoder"], args.get("n_kv_heads"),
                                 _ffn(weights, "model.local_encoder"), eps, theta, sliding_window=window,
                                 cross_attn_all_layers=args.get("cross_attn_all_layers_encoder", False),
                                 **local),
        "decoder_config": _stack(args["dim_local_decoder"], args["n_layers_local_decoder"],
                                 args["n_heads_local_decoder"], args.get("n_kv_heads"),
                                 _ffn(weights, "model.local_decoder"), eps, theta,
                                 cross_attn_all_layers=args.get("cross_attn_all_layers_decoder", False),
                                 **local),
        "global_config": _stack(g, args["n_layers_global"], args["n_heads_global"],
                                args.get("n_kv_heads_global"), _ffn(weights, "model.global_transformer"),
                                eps, theta),
    }


# ---------------------------------------------------------------------- weights
def native_weights(weights: dict[str, torch.Tensor], entropy: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    hash_tables: dict[int, torch.Tensor] = {}
    for key, tensor in weights.items():
        if key.endswith(SKIPPED_SUFFIXES):
            continue
        parts = key.split(".")
        if parts[0] == "encoder_hash_tok_embedding" and len(parts) == 3 and parts[1].isdigit():
            hash_tables[int(parts[1])] = tensor
        elif key == "local_decoder.output.weight":
            out["lm_head.weight"] = tensor
        else:
            out["model." + rename("." + key)[1:]] = tensor
    if hash_tables:
        if sorted(hash_tables) != list(range(len(hash_tables))):
            raise ConversionError(f"hash tables are not numbered 0..n-1: {sorted(hash_tables)}")
        out["model.encoder_hash_tok_embedding.weight"] = torch.cat([hash_tables[j] for j in sorted(hash_tables)])
    for key, tensor in entropy.items():
        if not key.endswith(SKIPPED_SUFFIXES):
            out["model.patcher." + rename("." + key)[1:]] = tensor
    return out


def convert(src: str | Path, dst: str | Path, entropy_model: str | Path | None = None,
            dtype: torch.dtype | None = None, revision: str | None = None) -> BltConfig:
    """Convert a Meta checkpoint directory (or the Hugging Face Hub model a "org/name" id names, hub.py, at
    `revision`) to a native one; returns the parsed native config."""
    src, dst = resolve_model_dir(src, META_FILES, revision), Path(dst)
    args, weights, entropy_params, entropy = read_meta(src, Path(entropy_model) if entropy_model else None)
    state = native_weights(weights, entropy)
    try:
        raw_config = native_config(args, entropy_params, state)
    except KeyError as e:
        raise ConversionError(f"the Meta config lacks the field {e.args[0]}") from None
    cfg = BltConfig.from_dict(raw_config)
    expected = expected_shapes(cfg)
    problems = [f"missing {k} {list(v)}" for k, v in sorted(expected.items()) if k not in state]
    problems += [f"unexpected {k} (from the Meta checkpoint)" for k in sorted(set(state) - set(expected))]
    problems += [f"{k} has shape {list(state[k].shape)}, expected {list(expected[k])}"
                 for k in sorted(set(state) & set(expected)) if tuple(state[k].shape) != expected[k]]
    if problems:
        raise ConversionError("converted weights do not match the config: " + "; ".join(problems))
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n", encoding="utf-8")
    save_file({k: (v.to(dtype) if dtype else v).contiguous() for k, v in state.items()},
              str(dst / SINGLE_FILE), metadata={"format": "pt"})
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blt-convert", description=__doc__.split("\n")[0])
    parser.add_argument("src", help="Meta checkpoint directory, or a Hugging Face Hub id (facebook/blt-1b)")
    parser.add_argument("dst", help="output directory (native layout)")
    parser.add_argument("--entropy-model", help="the entropy model's params.json + consolidated.pth directory")
    parser.add_argument("--dtype", choices=["keep", "float32", "bfloat16"], default="keep")
    parser.add_argument("--revision", help="with a Hub id: the branch, tag or commit (default: main)")
    opts = parser.parse_args(argv)
    dtype = None if opts.dtype == "keep" else getattr(torch, opts.dtype)
    try:
        cfg = convert(opts.src, opts.dst, opts.entropy_model, dtype, opts.revision)
    except BltError as e:
        print(f"blt-convert: error: {e}", file=sys.stderr)
        return 2
    print(f"blt-convert: wrote {opts.dst} (global {cfg.global_model.num_layers}x{cfg.global_model.hidden_size}, "
          f"threshold {cfg.patching_threshold})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
