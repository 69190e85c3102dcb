"""A step's weights, gathered once per model: what the runner's hot path reads instead of modules.

Owns:
- `fuse_projections`: one weight for q, k and v and one for gate and up per block (4 matmuls a block,
  not 7), the modules' parameters becoming views of them;
- `wide_layout`: on a CPU, weights stored (in, out) under their (out, in) views;
- `BlockStep`, `CrossStep`, `SlotKeysValues`: a block's, a decoder cross-attention's and all the
  cross-attentions' slot keys and values' weights, with the few callables that use them.
Module attribute lookups cost more than the small kernels a decode step launches, so the runner
reads these instead. Weights only: no caches, positions or requests (runner.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .fused import StepOps
from .model.layers import Block, BoundNorm, CrossAttention, RMSNorm


def fuse_projections(block: Block, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One weight for q, k and v and one for gate and up, so a step does 4 matmuls per block, not 7.

    The block's own parameters become views into the fused tensors: no weight is stored twice. With
    `transposed`, the fused (out, in) weights are views of (in, out) storage (see wide_layout)."""
    attn, mlp = block.self_attn, block.mlp
    fused = []
    for linears in ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)):
        weight = torch.cat([lin.weight.detach() for lin in linears])
        if transposed:
            weight = weight.t().contiguous().t()
        offset = 0
        for lin in linears:
            rows = lin.weight.shape[0]
            lin.weight.data = weight[offset:offset + rows]
            offset += rows
        fused.append(weight)
    return fused[0], fused[1]


def wide_layout(model: torch.nn.Module) -> None:
    """Store every weight with at least as many outputs as inputs as (in, out), the parameter staying an
    (out, in) view of it: same values and shapes, no copy kept. On the CPU, MKL's one-row product
    x @ W.T reads W 2-3x faster that way for such shapes (bench/RESULTS.md); F.linear finds the
    contiguous (in, out) matrix by itself. Fused weights are laid out by fuse_projections."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            weight = module.weight.data
            out_features, in_features = weight.shape
            alone = weight.untyped_storage().nbytes() == weight.numel() * weight.element_size()  # not fused
            if alone and out_features >= in_features and weight.is_contiguous():
                module.weight.data = weight.t().contiguous().t()


@dataclass(frozen=True)
class BlockStep:
    """What one block's decode step reads, gathered once: module attribute lookups cost more than
    the small kernels they feed."""

    norm1: BoundNorm
    qkv: torch.Tensor  # fused (see fuse_projections)
    o: torch.Tensor
    norm2: BoundNorm
    gate_up: torch.Tensor
    down: torch.Tensor
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, block: Block, device: torch.device, transposed: bool) -> BlockStep:
        attn = block.self_attn
        qkv, gate_up = fuse_projections(block, transposed)
        return cls(block.input_layernorm.bound(device), qkv, attn.o_proj.weight,
                   block.post_attention_layernorm.bound(device), gate_up, block.mlp.down_proj.weight,
                   attn.num_heads, attn.num_kv_heads, attn.head_dim)


@dataclass(frozen=True)
class CrossStep:
    """A decoder cross-attention whose bytes all read the same k slots (a decode step), from weights
    gathered once: CrossAttention.merge(SDPA(CrossAttention.queries(h), keys, values))."""

    q_norm: BoundNorm
    q: torch.Tensor
    o: torch.Tensor
    heads: int
    head_dim: int

    @classmethod
    def of(cls, ca: CrossAttention, device: torch.device) -> CrossStep:
        return cls(ca.q_norm.bound(device), ca.q_proj.weight, ca.o_proj.weight, ca.num_heads, ca.head_dim)

    def __call__(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, linear=F.linear) -> torch.Tensor:
        """`q`: the queries of the bytes' states (their q_norm times the q weight), (B, T, H * D); `linear`: the
        output projection's product (cpu_gemm.py)."""
        q = q.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, keys, values)
        return linear(o.transpose(1, 2).flatten(2), self.o)


@dataclass(frozen=True)
class SlotKeysValues:
    """The decoder slots' keys and values for every cross-attention layer at once. The layers' k_norms
    differ only by their weights, applied last, so the slots are normed once (weight 1) and each
    layer's weight multiplies that, as RMSNorm itself does; then one batched product with the
    layers' k and v weights side by side. The modules' weights become views of the stacked ones
    (no weight stored twice). About 6 kernels per layer and 2 to keep the newest slots become about
    7 in all (bench/step_kernels.py: 49 fewer per patch step at the 1B layer counts)."""

    unit_norm: BoundNorm  # RMSNorm with weight 1
    norm_weights: torch.Tensor  # (n_cross, 1, 1, d)
    kv: torch.Tensor  # (n_cross, d, 2 * H_kv * D): a transposed view of (n_cross, 2 * H_kv * D, d)
    kv_heads: int
    groups: int
    head_dim: int

    @classmethod
    def of(cls, layers: list[CrossAttention], device: torch.device) -> SlotKeysValues:
        norms = torch.stack([ca.k_norm.weight.detach() for ca in layers])
        stacked = torch.stack([torch.cat([ca.k_proj.weight.detach(), ca.v_proj.weight.detach()]) for ca in layers])
        n_kv = layers[0].k_proj.weight.shape[0]
        for i, ca in enumerate(layers):
            ca.k_norm.weight.data = norms[i]
            ca.k_proj.weight.data, ca.v_proj.weight.data = stacked[i, :n_kv], stacked[i, n_kv:]
        unit = RMSNorm(norms.shape[1], layers[0].k_norm.eps).to(device=device, dtype=norms.dtype)
        first = layers[0]
        return cls(unit.bound(device), norms[:, None, None, :], stacked.transpose(1, 2), first.num_kv_heads,
                   first.num_heads // first.num_kv_heads, first.head_dim)

    def __call__(self, slots: torch.Tensor, ops: StepOps) -> torch.Tensor:
        """(B, S, d) decoder slots -> (2, n_cross, B, H, S, D) keys and values (kv heads repeated)."""
        normed = self.norm_weights * ops.add_norm(slots, None, self.unit_norm)[1]  # (n_cross, B, S, d): k_norm's
        kv = torch.matmul(normed.flatten(1, 2), self.kv).unflatten(1, slots.shape[:2])  # (n_cross, B, S, 2*H_kv*D)
        kv = kv.unflatten(-1, (2, self.kv_heads, self.head_dim)).permute(3, 0, 1, 4, 2, 5)  # (2, n, B, H_kv, S, D)
        return kv if self.groups == 1 else kv.repeat_interleave(self.groups, dim=3)
