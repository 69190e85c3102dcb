"""CUDA graphs for the static-shaped step pieces (see static.py): captured once per key, then replayed.

A piece is a function of preallocated buffers that returns nothing: it reads its inputs and writes
its results (caches, outputs) at fixed addresses, so replaying its recorded kernels is the same as
running it again. The first time a key is seen, the piece runs eagerly on a side stream (that run is
the step's real work, and it initialises cuBLAS, the caching allocator and every lazily built
constant outside the capture), then it is recorded without being run. All graphs share one memory
pool: pieces keep nothing alive between steps except in buffers allocated outside the capture, and
they run one after another on one stream.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch


class StepGraphs:
    def __init__(self, device: torch.device):
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self.device = device
        self.graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self.pool = None  # the graphs' memory pool, made at the first capture (and after clear())
        self.side = torch.cuda.Stream(device)  # where first runs go, outside the capture
        self.captures = 0  # how many graphs were recorded (a capture per new key, and again after forget())
        self.forgotten = 0  # how many forget() dropped

    def run(self, key: Hashable, piece: Callable[[], None]) -> None:
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        self._run_eagerly(piece)
        self.graphs[key] = self._record(key, piece)
        self.captures += 1

    def _run_eagerly(self, piece: Callable[[], None]) -> None:
        current = torch.cuda.current_stream(self.device)
        self.side.wait_stream(current)
        with torch.cuda.stream(self.side):
            piece()
        current.wait_stream(self.side)

    def _record(self, key: Hashable, piece: Callable[[], None]):
        """The piece's kernels, recorded (not run); `.replay()` runs them."""
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            piece()
        return graph

    def forget(self, stale: Callable[[Hashable], bool]) -> None:
        """Forget the graphs whose keys are `stale` (a buffer they were captured on has been replaced),
        counted in `forgotten`. With the last graph goes their memory pool: PyTorch frees a pool once no graph holds it,
        and refuses to capture into a freed one (an internal assertion, use_count > 0, seen on an H200 with
        torch 2.11)."""
        keys = [key for key in self.graphs if stale(key)]
        for key in keys:
            del self.graphs[key]
        self.forgotten += len(keys)
        if not self.graphs:
            self.pool = None

    def __len__(self) -> int:
        return len(self.graphs)
