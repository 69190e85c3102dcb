"""Single-query attention over a KV cache's rows: what every decode step's self-attention layers do.

A decode step attends one new position per row to that row's cached keys and values (a 512-entry
ring for the local models, the patches so far for the global one). Two ways to run it:
- "sdpa": the rows are read from the cache (in place when they are consecutive slots, otherwise as a
  gathered copy of every row's keys and values) and handed to F.scaled_dot_product_attention;
- "triton": one Triton kernel per layer (`decode_attention`), one program per row and query head,
  stores the row's new key and value, reads the row's entries where they lie in the cache (a slot
  index per row, or consecutive slots), adds the step's additive mask, and keeps a running softmax
  in fp32. Nothing is gathered or copied:
  a patch step's closing rows are scattered over the slots, and SDPA's gathered copy of their global
  cache is 8 MB per row and layer at the 1B widths and 1,024 patches of context (3.4 GB written per
  patch step for 16 closing rows of 64 streams).
"auto" is "triton" on CUDA where Triton imports and passes a check against SDPA on this device at
start-up (`resolve`), else "sdpa". On a CPU, "triton" runs Triton's interpreter (TRITON_INTERPRET=1
set before Triton is imported): slow, for tests only.
Used by runner.py's block_step; knows nothing about requests or patches.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .model.layers import repeat_kv

try:  # on CUDA machines it comes with torch; the kernel's body reads `tl` as a module global
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

log = logging.getLogger(__name__)
BACKENDS = ("auto", "sdpa", "triton")
Store = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # see decode_attention


def triton_importable() -> bool:
    return triton is not None


def _attention_program(Q, KV, Rows, Mask, Out, KNew, VNew, WRows, WIndex, row_offset, span, scale,
                       sq_b, sq_h, skv_kv, skv_row, skv_head, skv_entry, sm_b, so_b, so_h,
                       skn_b, skn_h, svn_b, svn_h, swr_b, swi_b,
                       GROUPS: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
                       GATHER: tl.constexpr, HAS_MASK: tl.constexpr, STORE: tl.constexpr):
    """One (row, query head): a running softmax over the row's first `span` cache entries, BLOCK at a
    time, in fp32 (decode_attention). With STORE, the row's new key and value are first stored (by
    the first query head of their kv head) and, where the row reads that entry, taken from registers:
    what other programs of the kv head store there meanwhile is never read."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    if GATHER:
        row = tl.load(Rows + b).to(tl.int64)
    else:
        row = (b + row_offset).to(tl.int64)
    d = tl.arange(0, D_PAD)
    in_head = d < D
    kvh = h // GROUPS
    q = tl.load(Q + b * sq_b + h * sq_h + d, mask=in_head, other=0.0).to(tl.float32) * scale
    k_base = KV + row * skv_row + kvh * skv_head
    v_base = k_base + skv_kv
    if STORE:
        w_row = tl.load(WRows + b * swr_b).to(tl.int64)
        w_index = tl.load(WIndex + b * swi_b).to(tl.int64)
        k_new = tl.load(KNew + b * skn_b + kvh * skn_h + d, mask=in_head, other=0.0)
        v_new = tl.load(VNew + b * svn_b + kvh * svn_h + d, mask=in_head, other=0.0)
        first = d < tl.where(h % GROUPS == 0, D, 0)  # the kv head's first query head stores it
        at = KV + w_row * skv_row + kvh * skv_head + w_index * skv_entry + d
        tl.store(at, k_new, mask=first)
        tl.store(at + skv_kv, v_new, mask=first)
        new_at = tl.where(w_row == row, w_index, -1)  # the entry this row reads from registers, if any
    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros([D_PAD], dtype=tl.float32)
    for start in tl.range(0, span, BLOCK):
        n = start + tl.arange(0, BLOCK)
        inside = n < span
        where = n[:, None] * skv_entry + d[None, :]
        both = inside[:, None] & in_head[None, :]
        k = tl.load(k_base + where, mask=both, other=0.0)
        if STORE:
            k = tl.where((n == new_at)[:, None], k_new[None, :], k)
        s = tl.sum(k.to(tl.float32) * q[None, :], 1)
        if HAS_MASK:
            s += tl.load(Mask + b * sm_b + n, mask=inside, other=0.0).to(tl.float32)
        s = tl.where(inside, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet: sums stay 0
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe)
        v = tl.load(v_base + where, mask=both, other=0.0)
        if STORE:
            v = tl.where((n == new_at)[:, None], v_new[None, :], v)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        l_i = l_i * alpha + tl.sum(p, 0)
        m_i = m_new
    tl.store(Out + b * so_b + h * so_h + d, (acc / l_i).to(Out.dtype.element_ty), mask=in_head)


_kernel = triton.jit(_attention_program) if triton is not None else None


def decode_attention(q: torch.Tensor, kv: torch.Tensor, layer: int, rows: torch.Tensor | slice, span: int,
                     mask: torch.Tensor | None, block: int | None = None, store: Store | None = None) -> torch.Tensor:
    """q (B, H, 1, D); kv a cache's (2, layers, slots, H_kv, capacity, D) keys and values; `rows` the
    cache row of each query (a tensor of slots, or consecutive slots as a slice); the first `span`
    entries are read; mask (B, 1, 1, span) additive or None -> (B, 1, H * D), SDPA's result (scale
    1/sqrt(D); query head h reads kv head h // (H / H_kv)) with its heads side by side. `block`:
    entries per loop iteration (a power of two); by default 8192 values of K at a time on a GPU, and
    the whole span at once in the interpreter, whose cost is per operation, not per value.
    `store`: (k, v, write_rows, write_index), each row's new key and value (B, H_kv, 1, D) and where
    they go (B, 1), stored by the same kernel, with the result of storing them first and then
    attending (KVCache.write, then the read): one kernel less per layer."""
    B, H, T, D = q.shape
    if T != 1:
        raise ValueError(f"decode_attention takes one query position per row, not {T}")
    if q.stride(3) != 1:
        q = q.contiguous()
    cache = kv[:, layer]  # (2, slots, H_kv, capacity, D), a view
    if cache.stride(4) != 1 or (mask is not None and mask.stride(3) != 1):
        raise ValueError("the cache's head dimension and the mask's entries must be contiguous")
    out = torch.empty(B, 1, H * D, device=q.device, dtype=q.dtype)
    gather = not isinstance(rows, slice)
    d_pad = next_power_of_2(D)
    if block is None:
        block = max(16, min(128, 8192 // d_pad)) if q.device.type == "cuda" else next_power_of_2(max(span, 16))
    k_new, v_new, w_rows, w_index = store if store is not None else (q, q, q, q)
    if store is not None and (k_new.stride(3) != 1 or v_new.stride(3) != 1 or k_new.shape[2] != 1):
        raise ValueError("new keys and values must be one position with a contiguous head dimension")
    _kernel[(B, H)](
        q, cache, rows if gather else q, mask if mask is not None else q, out, k_new, v_new, w_rows, w_index,
        0 if gather else rows.start, span, D ** -0.5,
        q.stride(0), q.stride(1), cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3),
        mask.stride(0) if mask is not None else 0, out.stride(0), D,
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1), w_rows.stride(0), w_index.stride(0),
        GROUPS=H // cache.shape[2], D=D, D_PAD=d_pad, BLOCK=block, GATHER=gather,
        HAS_MASK=mask is not None, STORE=store is not None)
    return out


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def sdpa_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   mask: torch.Tensor | None) -> torch.Tensor:
    """The reference: q (B, H, T, D) over keys and values (B, H_kv, S, D) -> (B, T, H * D)."""
    groups = q.shape[1] // keys.shape[1]
    o = F.scaled_dot_product_attention(q, repeat_kv(keys, groups), repeat_kv(values, groups), attn_mask=mask)
    return o.transpose(1, 2).flatten(2)


@functools.cache
def self_check(device: torch.device, dtype: torch.dtype) -> str | None:
    """Run the kernel against KVCache.write and SDPA on random inputs with every feature a step uses
    (masks, gathered and consecutive rows, grouped heads, a head size that is not a power of two, a
    span that is not a multiple of the block, storing the new entries or not); None if they agree,
    else what went wrong."""
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        for H, H_kv, D, span in ((4, 4, 64, 300), (4, 2, 48, 70)):
            kv = torch.randn(2, 2, 5, H_kv, 320, D, generator=g).to(device, dtype)
            q = torch.randn(3, H, 1, D, generator=g).to(device, dtype)
            k_new, v_new = (torch.randn(3, H_kv, 1, D, generator=g).to(device, dtype) for _ in range(2))
            where = torch.tensor([[0], [span - 1], [7]], device=device)
            mask = torch.zeros(3, 1, 1, span, device=device, dtype=dtype)
            mask[1, ..., span // 2:] = float("-inf")
            gathered, consecutive = torch.tensor([4, 0, 2], device=device), torch.arange(1, 4, device=device)
            for rows, m, store in ((gathered, mask, None), (slice(1, 4), None, None),
                                   (gathered, mask, (k_new, v_new, gathered[:, None], where)),
                                   (slice(1, 4), None, (k_new, v_new, consecutive[:, None], where))):
                expected = kv.clone()
                if store is not None:
                    expected[:, 1][:, store[2], :, store[3]] = torch.stack(store[:2], dim=1).permute(0, 3, 1, 2, 4)
                got = decode_attention(q, kv, 1, rows, span, m, store=store)
                picked = expected[:, 1, rows, :, :span]
                want = sdpa_attention(q, picked[0], picked[1], m)
                tolerance = 1e-4 if dtype == torch.float32 else 2e-2
                if not torch.equal(kv, expected):
                    return "the new keys and values were not stored where asked"
                if not torch.allclose(got.float(), want.float(), atol=tolerance, rtol=tolerance):
                    return f"differs from SDPA by {float((got.float() - want.float()).abs().max()):.3g}"
    except Exception as e:  # noqa: BLE001 - any failure means: do not use the kernel
        return f"{type(e).__name__}: {e}"
    return None


def resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """"sdpa" or "triton" for `backend` on this device (see the module docstring)."""
    if backend not in BACKENDS:
        raise ConfigError(f"attention {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "sdpa" or (backend == "auto" and device.type != "cuda"):
        return "sdpa"
    if not triton_importable():
        if backend == "triton":
            raise ConfigError("attention 'triton': Triton is not installed (pip install triton)")
        return "sdpa"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("attention 'triton' on a CPU runs Triton's interpreter, for tests: set "
                          "TRITON_INTERPRET=1 before Triton is imported")
    if backend == "auto":
        problem = self_check(device, dtype)
        if problem is not None:
            log.warning("Triton decode attention disabled, using SDPA: %s", problem)
            return "sdpa"
    return backend
