"""The one device-to-host transfer of an engine step.

Every piece of a step that needs values on the host (sampled bytes, patch flags, logprobs, a prefill
chunk's patch boundaries) registers its device tensors here and queues its work; `fetch()` brings
everything over in one copy, which is the step's only wait for the device; each piece then reads its
own values. Knows nothing about what the values mean.
"""

from __future__ import annotations

import torch


class HostTransfer:
    def __init__(self):
        self._parts: list[torch.Tensor] = []
        self._values: list[list[float]] | None = None

    def add(self, tensor: torch.Tensor) -> int:
        """Register a device tensor (any shape, values exact in float64); returns its handle."""
        if self._values is not None:
            raise RuntimeError("add() after fetch()")
        self._parts.append(tensor.detach().flatten().double())
        return len(self._parts) - 1

    def fetch(self) -> None:
        sizes = [p.numel() for p in self._parts]
        flat = (self._parts[0] if len(self._parts) == 1 else torch.cat(self._parts)).tolist() if self._parts else []
        self._values, start = [], 0
        for size in sizes:
            self._values.append(flat[start:start + size])
            start += size

    def get(self, handle: int) -> list[float]:
        if self._values is None:
            raise RuntimeError("get() before fetch()")
        return self._values[handle]

    def __len__(self) -> int:
        return len(self._parts)
