"""Where the model runs: "auto" device and dtype, the CPU's intra-op threads for serving, and host
values sent to the device without waiting for it."""

from __future__ import annotations

import os

import torch

from .errors import ConfigError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16,
          "float": torch.float32, "half": torch.float16}  # (the last two: vLLM's names)


def resolve_device_dtype(device: str | torch.device = "auto",
                         dtype: str | torch.dtype = "auto") -> tuple[torch.device, torch.dtype]:
    """"auto" device: cuda when available, else cpu; "auto" dtype: bfloat16 on cuda, float32 on cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"device {device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r}: CUDA is not available here")
    if isinstance(dtype, str):
        if dtype == "auto":
            dtype = "bfloat16" if device.type == "cuda" else "float32"
        if dtype not in DTYPES:
            raise ConfigError(f"dtype {dtype!r}: expected auto, {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    return device, dtype


def serving_threads(device: torch.device, threads: int | None = None) -> int:
    """Set and return torch's intra-op threads. On the CPU the default leaves one core to the HTTP
    event loop and the clients: a decode step is hundreds of small kernels, and a thread pool that
    shares its cores with them waits on its slowest thread (measured in bench/RESULTS.md)."""
    if threads is None:
        if device.type != "cpu":
            return torch.get_num_threads()
        threads = max(1, (os.cpu_count() or 2) - 1)
    if threads < 1:
        raise ConfigError(f"threads {threads}: must be >= 1")
    torch.set_num_threads(threads)
    return threads


def free_memory(device: torch.device) -> int | None:
    """Bytes of the device's memory free now, on CUDA (None elsewhere)."""
    info = memory_info(device)
    return None if info is None else info[0]


def memory_info(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes of the device's memory now, on CUDA (None elsewhere): every process's use counts."""
    return torch.cuda.mem_get_info(device) if device.type == "cuda" else None


def spare_memory(device: torch.device) -> tuple[int, int] | None:
    """(spare, total) bytes on CUDA (None elsewhere): the device's free memory and the blocks PyTorch's allocator
    holds unused, which a new tensor may take either."""
    info = memory_info(device)
    if info is None:
        return None
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return info[0] + cached, info[1]


def host_tensor(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of host values on `device`. On CUDA it goes through pinned memory with a non-blocking
    copy: a plain copy from pageable memory waits for everything queued on the stream (a host sync);
    the pinned block is not reused before its copy has run (PyTorch's caching host allocator)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
