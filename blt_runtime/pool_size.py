"""The size of the global model's pool of pages, where it is given one instead of growing as sequences need it:
a byte budget (vLLM's kv_cache_memory_bytes) or a share of the GPU's memory (vLLM's gpu_memory_utilization).

Left to grow (the default), the pool doubles as the patches of all sequences together need it, until the
device refuses (paged_cache.py); then sequences take turns. A pool of a given size is allocated once, at
start-up, and never grows: the memory is the server's from the start, and nothing else on the device can
take it later (nor can the pool take what the steps' activations or another process need). Either way a
sequence that finds no pages waits its turn (Engine._plan).

A given size is checked against one sequence of the full context: max_model_len bytes take at most a patch
a byte (each byte whose entropy passes the threshold starts one), so a pool that holds that many patches
serves any request alone, and no request can fail for want of pages. A smaller one is refused, naming the
size that would do and the max_model_len that fits.

A share of the GPU (`use_device_share`) is what vLLM's is: of the device's total memory, the fraction less
what this process took since start-up (the weights, the local models' caches, the steps' activations and
graphs) is the pool's. It is measured, not estimated: after the engine's first steps (a server's warm-up,
which captures its CUDA graphs) and a prefill of a whole chunk of random bytes (about a patch a byte: the
most a chunk's activations take), from the device's free memory before the model was loaded and now.
"""

from __future__ import annotations

import random

import torch

from . import device as devices
from .errors import ConfigError
from .sampling import SamplingParams


def pages_for_budget(engine, nbytes: int) -> int:
    """Pages of the global model's cache that `nbytes` hold; ConfigError where they hold fewer patches than
    one sequence of the engine's max_model_len may take."""
    cache = engine.runner.global_kv
    per_page = cache.page_bytes
    pages = nbytes // per_page - 1  # (the null page, which no sequence holds, is the pool's too)
    needed = cache.pages_for(cache.max_len)
    if pages < needed:
        patches = max(0, pages) * cache.page
        fits = patches - (cache.max_len - engine.max_model_len)
        instead = f", or a max_model_len of {fits:,} or less" if fits >= 2 else ""
        raise ConfigError(
            f"a global model's cache of {nbytes / 2**20:,.1f} MiB holds {patches:,} patches (pages of "
            f"{cache.page} patches, {per_page / 2**10:,.1f} KiB each), fewer than one sequence of max_model_len "
            f"{engine.max_model_len:,} bytes may take ({cache.max_len:,}: a patch a byte at most): give it "
            f"{(needed + 1) * per_page / 2**20:,.1f} MiB or more{instead}")
    return pages


def fix_global_cache(engine, nbytes: int) -> int:
    """Give the engine's global cache a pool of `nbytes` that never grows (see the module's docstring): the
    pages it holds. Only while the engine has no work; the states kept for later prompts are forgotten."""
    if engine.has_work():
        raise RuntimeError("the global cache's pool is sized only while the engine has no work")
    pages = pages_for_budget(engine, nbytes)
    cache = engine.runner.global_kv
    for slot in engine.sharing.forget_retained():
        cache.trim(slot, 0)
    cache.fix(pages)
    return pages


def share_budget(fraction: float, total: int, free_at_start: int, free_now: int, pool_now: int) -> int:
    """Bytes for the pool of a `fraction` share of a device of `total` bytes: the share, less what the process
    took since `free_at_start` but for its pool now (`pool_now`, which the new one replaces); never more than
    the device has free with the old pool given back. ConfigError where the share was not free at start-up or
    leaves nothing for the pool."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"gpu_memory_utilization {fraction}: a fraction of the device's memory, in (0, 1]")
    wanted = fraction * total
    if free_at_start < wanted:
        raise ConfigError(f"the device had {free_at_start / 2**30:,.2f} GiB free at start-up, less than "
                          f"gpu_memory_utilization {fraction} of its {total / 2**30:,.2f} GiB ("
                          f"{wanted / 2**30:,.2f} GiB): lower it, or free the device")
    taken = free_at_start - free_now - pool_now  # the weights, the local caches, activations, graphs
    budget = min(int(wanted - taken), free_now + pool_now)
    if budget <= 0:
        raise ConfigError(f"gpu_memory_utilization {fraction} ({wanted / 2**30:,.2f} GiB) leaves nothing for the "
                          f"global model's cache: the model and its steps take {taken / 2**30:,.2f} GiB; raise it")
    return budget


def use_device_share(engine, fraction: float, free_at_start: int) -> int:
    """Give the engine's global cache a pool of what a `fraction` share of its GPU leaves (the module's
    docstring): the pages it holds. Call it after the engine's first steps and before serving; the graphs of
    the steps that read the old pool are captured again at their next use (static.py)."""
    device = engine.model.device
    if devices.memory_info(device) is None:
        raise ConfigError(f"gpu_memory_utilization: the model is on {device}, not a GPU (a byte budget sizes the "
                          "global cache there)")
    profile_chunk(engine)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    free_now, total = devices.memory_info(device)
    budget = share_budget(fraction, total, free_at_start, free_now, engine.runner.global_kv.pool.nbytes)
    return fix_global_cache(engine, budget)


def profile_chunk(engine) -> None:
    """Prefill a whole chunk of random bytes (about a patch a byte) and decode a byte: the largest activations
    a step makes, left in the device allocator's cache, where the free memory no longer counts them."""
    n = max(1, min(engine.scheduler.prefill_chunk, engine.max_model_len - 2))
    rng = random.Random(0)
    engine.add_request("memory-profile", bytes(rng.randrange(256) for _ in range(n)),
                       SamplingParams(max_bytes=1, temperature=0.0, ignore_eos=True))
    while engine.has_work():
        engine.step()
