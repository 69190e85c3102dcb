"""blt_runtime: load Byte Latent Transformer checkpoints and run them. Depends on torch and
safetensors only; never imports the web stack."""

from .config import BltConfig, StackConfig
from .errors import BltError, ConfigError, ConversionError, WeightsError
from .model import BltModel
from .tokenizer import BOS_ID, EOS_ID, decode, encode, encode_tensor
from .weights import load_model, save_model

__all__ = [
    "BOS_ID", "EOS_ID", "BltConfig", "BltError", "BltModel", "ConfigError", "ConversionError",
    "StackConfig", "WeightsError", "decode", "encode", "encode_tensor", "load_model", "save_model",
]
