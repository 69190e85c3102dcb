"""blt_runtime: load Byte Latent Transformer checkpoints and generate from them, byte by byte.
Depends on torch and safetensors only; never imports the web stack."""

from .config import BltConfig, StackConfig
from .engine import Engine, StepOutput, Usage
from .errors import BltError, ConfigError, ConversionError, WeightsError
from .generate import Generation, generate, generate_batch
from .model import BltModel
from .sampling import SamplingParams
from .scheduler import PromptTooLong, QueueFull
from .tokenizer import BOS_ID, EOS_ID, decode, encode, encode_tensor
from .weights import load_model, save_model

__all__ = [
    "BOS_ID", "EOS_ID", "BltConfig", "BltError", "BltModel", "ConfigError", "ConversionError", "Engine",
    "Generation", "PromptTooLong", "QueueFull", "SamplingParams", "StackConfig", "StepOutput", "Usage",
    "WeightsError", "decode", "encode", "encode_tensor", "generate", "generate_batch", "load_model", "save_model",
]
