"""The only code that builds tensors and launches kernels for a generation step (spec section 6), but
for the few callables that step_weights.py keeps beside the weights they read.

Two step kinds, both built from the same cached pieces:
- `prefill_start`/`prefill_finish`: T new positions in parallel of one sequence (a prompt, in chunks),
  or of several as the rows of one padded batch (the short rests of their prompts).
- `decode`: B sequences, one position each.
Per position: an entropy-model step, a local-encoder step, and a local-decoder step; when a patch
completes, its bytes are pooled and cross-attended, and the global model takes one step for that
sequence alone. The entropy model runs one position ahead: right after a byte is sampled it is fed to
the entropy model, so the next step already knows whether that byte closes a patch. Values the host
needs (sampled bytes, patch flags, logprobs, a prefill chunk's boundaries) are registered with the
step's HostTransfer, which brings them over in one copy (transfer.py).
Knows nothing about requests, stops or queues (see engine.py and scheduler.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import ChunkBand, RotationTable, band_attention, decode_attention, sdpa_attention
from .byte_embedding import embed_new_bytes
from .cache import KVCache, RowBuffer
from .cpu_gemm import linear_for
from .device import host_tensor
from .fused import StepOps
from .model.blt import BltModel
from .model.hashing import power_matrix
from .model.layers import Block, BoundNorm, Stack
from .model.local_decoder import attend_gathered
from .paged_cache import PagedKVCache
from .patcher import starts_next
from .positions import Positions, consecutive, positions_for
from .sample_kernel import sample_pick
from .sampling import SamplingBatch, SamplingParams, bias_row, never_sampled, ranked, sample, top_logprobs
from .step_weights import BlockStep, CrossStep, SlotKeysValues, wide_layout
from .tail_kernels import greedy_pick
from .tokenizer import EOS_ID, OFFSET
from .transfer import HostTransfer


@dataclass
class ChunkResult:
    closes: list[bool]  # per position: does it complete its patch
    completed: int  # patches completed in the chunk (= global steps taken)
    open_len: int  # bytes of the still-open patch after the chunk
    last_logits: torch.Tensor  # (1, V) logits of the chunk's last position
    scores: PromptScores | None = None  # of the bytes that follow its positions, when asked for


@dataclass
class PromptScores:
    """Log-probabilities of prompt bytes given the bytes before them, on the device: what `echo` with
    `logprobs` shows for a prompt (rows in order of position; chunks concatenate)."""

    chosen: torch.Tensor  # (t,) of each byte
    values: torch.Tensor  # (t, n) the top n of each row, ranked (sampling.ranked)
    ids: torch.Tensor  # (t, n) their ids

    @classmethod
    def join(cls, parts: list[PromptScores]) -> PromptScores:
        return cls(*(torch.cat(tensors) for tensors in zip(*((p.chosen, p.values, p.ids) for p in parts))))

    def rows(self, start: int, end: int, top_n: int) -> PromptScores:
        """Rows [start, end), with their top `top_n` alternatives (of at least as many)."""
        return PromptScores(self.chosen[start:end], self.values[start:end, :top_n], self.ids[start:end, :top_n])


@dataclass
class PrefillStart:
    """Prefill chunks of one or more sequences, the rows of one batch, between the two halves of their
    prefill (Runner.prefill_start): each row is right-padded to the longest, and causal attention
    keeps every real position from seeing the padding after it."""

    slots: torch.Tensor  # (B,)
    read_slots: slice | None  # the same as a slice when they are consecutive
    starts: list[int]  # each row's first new position
    lengths: list[int]  # each row's new positions
    closes: torch.Tensor  # (B, T) bool on the device, False on padding
    byte_states: torch.Tensor  # (B, T, d)
    positions: Positions
    handle: int  # of `closes` in the step's transfer


@dataclass
class Sampled:
    """What a step hands back to the host, in one transfer."""

    ids: list[int]
    closes: list[bool]  # does each new byte close its patch
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None  # (chosen, [(id, logprob)...]) per row


def block_step(block: Block, h: torch.Tensor, delta: torch.Tensor | None, cache: KVCache, layer: int,
               p: Positions, ops: StepOps, kernels: str = "torch",
               double: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One pre-norm block over new positions, attending to the cache and storing the new keys. Its
    input is h + delta (delta None: h), or with `double` BLT's cross-attention residual
    h + (delta + h), and its output is h + delta: the last residual add is left to the next norm,
    with which `ops` can fuse it (fused.py), and each norm to the projection after it (gemv.py).
    `kernels`: "triton" or "triton-gemv" attends one new position to the cache with attention.py's
    kernel, which also rotates and stores (kernels.py)."""
    b: BlockStep = block.decode_step
    if double:
        h, qkv = ops.double_residual_norm_linear(h, delta, b.norm1, b.qkv)
    else:
        h, qkv = ops.add_norm_linear(h, delta, b.norm1, b.qkv)
    if p.write_first and kernels != "torch":
        # rotate, store, then read the rows' entries where they are: one kernel, fed views of qkv
        q, k, v = qkv.unflatten(-1, (-1, b.head_dim)).transpose(1, 2).split([b.heads, b.kv_heads, b.kv_heads], 1)
        o = decode_attention(q, cache.kv, layer, p.read_slots or p.slots, p.span, p.mask,
                             store=(k, v, p.write_rows, p.write_index), rotation=p.rotation, counts=cache.split_counts,
                             pages=cache.pages)
        return _block_rest(b, h, o, ops)
    q, k, v, kv = ops.heads(qkv, p.rotation, b.heads, b.kv_heads, b.head_dim)  # (B, H, T, D), (B, H_kv, T, D) x 2
    new_k, new_v = k[:, :, k.shape[2] - p.kept:], v[:, :, v.shape[2] - p.kept:]
    new_kv = None if kv is None else kv[:, kv.shape[1] - p.kept:]  # for one cache copy, not two
    if p.write_first:
        cache.write(layer, p.write_rows, p.write_index, new_k, new_v, p.write_at, new_kv)
        o = sdpa_attention(q, *cache.read(layer, p.read_slots or p.slots, p.span), p.mask)
    elif isinstance(p.mask, ChunkBand):  # all read before the write, which overwrites ring entries
        o = band_attention(q, *cache.read(layer, p.read_slots or p.slots, p.span), k, v, p.mask)
        cache.write(layer, p.write_rows, p.write_index, new_k, new_v, None, new_kv)
    else:
        cached_k, cached_v = cache.read(layer, p.read_slots or p.slots, p.span)
        keys, values = torch.cat([cached_k, k], dim=2), torch.cat([cached_v, v], dim=2)
        cache.write(layer, p.write_rows, p.write_index, new_k, new_v, None, new_kv)
        o = sdpa_attention(q, keys, values, p.mask)
    return _block_rest(b, h, o, ops)


def _block_rest(b: BlockStep, h: torch.Tensor, o: torch.Tensor, ops: StepOps) -> tuple[torch.Tensor, torch.Tensor]:
    """A block after its attention o (B, T, H * D): output projection, residual, MLP (block_step)."""
    h, gated = ops.add_norm_swiglu(h, ops.linear(o, b.o), b.norm2, b.gate_up)
    return h, ops.linear(gated, b.down)


class Runner:
    def __init__(self, model: BltModel, slots: int, max_len: int, ops: StepOps | None = None,
                 kernels: str = "torch", sample_kernel: bool | None = None, kept: int = 0):
        """Per-sequence state for `slots` sequences, then `kept` rows that only hold copies of states
        (`kept_slots`: kept prefixes, sharing.py), then one scratch row (`scratch`) that the padding
        rows of a static-shaped step read and write (see static.py). `ops`: how the element-wise
        stretches of a step run (fused.py; eager by default); `kernels`: "triton" attends one new
        position to a cache with attention.py's kernel, "torch" with SDPA (kernels.py);
        `sample_kernel`: rows that sample choose their bytes with sample_kernel.py (default: where
        the kernels are Triton's)."""
        self.model, self.cfg = model, model.config
        self.ops = ops or StepOps()
        if ops is None:  # on a CPU in fp32, products of many rows by oneDNN (cpu_gemm.py)
            self.ops.linear = linear_for(model.device, model.dtype)
        self.kernels = kernels
        self.sample_kernel = kernels != "torch" if sample_kernel is None else sample_kernel
        self.num_slots, self.kept_slots, self.scratch = slots, range(slots, slots + kept), slots + kept
        cfg, dev, dt = model.config, model.device, model.dtype
        slots += kept + 1
        cpu = dev.type == "cpu"
        for stack in (model.patcher, model.local_encoder, model.global_transformer, model.local_decoder):
            for block in stack.layers:
                if not hasattr(block, "decode_step"):
                    block.decode_step = BlockStep.of(block, dev, transposed=cpu)
        dec = model.local_decoder
        if not hasattr(dec, "slot_keys_values"):  # a decoder has one cross-attention layer at least
            dec.slot_keys_values = SlotKeysValues.of(list(dec.cross_attn_layers), dev)
        self.slot_keys_values = dec.slot_keys_values
        if cpu:
            wide_layout(model)  # idempotent: a weight already laid out is no longer contiguous
        # the per-byte pieces outside the blocks, gathered once (no module calls on the hot path)
        self.cross_steps = [CrossStep.of(ca, dev) for ca in model.local_decoder.cross_attn_layers]
        self.decoder_norm = model.local_decoder.norm.bound(dev)
        self.entropy_norm = model.patcher.norm.bound(dev)
        self.entropy_embed = model.patcher.embed_tokens.weight
        self.entropy_head = model.patcher.lm_head.weight.float()  # fp32 entropies; converted once, not per step
        self.lm_head = model.lm_head.weight

        def kv(stack_cfg, window):
            return KVCache(stack_cfg.num_layers, slots, stack_cfg.num_kv_heads, stack_cfg.head_dim, window,
                           max_len, dev, dt, heads=stack_cfg.num_heads)

        self.entropy_kv = kv(cfg.patcher, cfg.patcher.window)
        self.encoder_kv = kv(cfg.encoder, cfg.encoder.window)
        self.decoder_kv = kv(cfg.decoder, cfg.decoder.window)
        g = cfg.global_model  # its patches in pages, taken as each sequence needs them
        self.global_kv = PagedKVCache(g.num_layers, slots, g.num_kv_heads, g.head_dim, max_len, dev, dt,
                                      heads=g.num_heads)
        if kernels != "torch":
            self.make_rotation_tables()
        self.open_patch = RowBuffer(slots, cfg.encoder.hidden_size, dev, dt)
        self.history = torch.zeros(slots, cfg.max_hash_group - 1, dtype=torch.long, device=dev)
        self.hash_powers = power_matrix(cfg.hash_group_sizes, cfg.hash_functions, dev)
        geometry = [(c.head_dim, c.rope_theta, c.window) for c in (cfg.encoder, cfg.decoder)]
        self.decoder_shares_positions = geometry[0] == geometry[1]
        n_cross = len(model.local_decoder.cross_attn_layers)
        d = cfg.decoder
        # keys and values of the newest patch's decoder slots, for every cross-attention layer, in one
        # tensor: a step gathers (or stores) its rows of all of them with one kernel
        self.latest = torch.zeros(2, n_cross, slots, d.num_heads, cfg.cross_attn_k, d.head_dim, device=dev, dtype=dt)
        self.output_counts = torch.zeros(slots, cfg.vocab_size, device=dev)  # generated bytes per id
        self.seen = torch.zeros(slots, cfg.vocab_size, dtype=torch.bool, device=dev)  # prompt or output
        self.logit_bias = torch.zeros(slots, cfg.vocab_size, device=dev)  # each slot's request's, per id
        self.guides: dict[int, tuple] = {}  # slot -> its guided request's (guide, own logit bias or None)
        # per slot, how many times a call other than a static decode step (static.py) wrote its state: what
        # such a step left in a slot (a byte decoded ahead) is its to use only while this has not changed
        self.slot_epochs = [0] * slots

    def touched(self, slots) -> None:
        """The state of these slots is being written outside a static decode step (slot_epochs)."""
        for slot in slots:
            self.slot_epochs[slot] += 1

    def make_rotation_tables(self) -> None:
        """Give each cache the RoPE rotation of every position it can hold (attention.RotationTable), which
        the Triton attention kernel reads at each row's length: a decode step then computes no
        rotation, mask or cache index (7 small kernels per stack). 4 x max_len x head_dim fp32 values."""
        cfg = self.cfg
        for cache, stack_cfg in ((self.entropy_kv, cfg.patcher), (self.encoder_kv, cfg.encoder),
                                 (self.decoder_kv, cfg.decoder), (self.global_kv, cfg.global_model)):
            cache.rotations = RotationTable.of(cache.max_len, stack_cfg.head_dim, stack_cfg.rope_theta,
                                               self.model.device)

    def admit(self, slot: int, prompt_ids: list[int], params: SamplingParams, resumed: bool = False,
              num_patches: int = 0, generated: bytes | bytearray = b"", guide_state=None) -> None:
        """Clear a slot's per-sequence state (caches are overwritten position by position; the global cache's
        pages past what it keeps go back) and give it the request's logit bias. `resumed`: the slot holds the
        state after a prefix of the prompt already (sharing.py), hash history included, with `num_patches`
        patches. A sequence readmitted after a preemption: `prompt_ids` end with the bytes it `generated`
        (counted for the penalties), and its guide is in `guide_state`."""
        self.touched([slot])
        self.global_kv.trim(slot, num_patches if resumed else 0)
        if not resumed:
            self.history[slot] = 0
        self.output_counts[slot] = 0
        if generated:
            counts = torch.bincount(self._tensor([b + OFFSET for b in generated]), minlength=self.cfg.vocab_size)
            self.output_counts[slot] = counts.to(self.output_counts.dtype)
        self.seen[slot] = False
        self.seen[slot, self._tensor(prompt_ids[1:])] = True
        self.guides.pop(slot, None)
        if params.guide is not None:  # the guide's bias row of its state, with the request's own bias added
            own = self._tensor(bias_row(params, self.cfg.vocab_size), torch.float32) if params.logit_bias else None
            self.guides[slot] = (params.guide, own)
            self.follow_guides([slot], [params.guide.start if guide_state is None else guide_state])
        elif params.logit_bias:
            self.logit_bias[slot].copy_(self._tensor(bias_row(params, self.cfg.vocab_size), torch.float32))
        else:
            self.logit_bias[slot] = 0

    def count_forced(self, slot: int, forced: bytes | bytearray) -> None:
        """Bytes a guide forced (Sequence.force) are generated bytes that no sampling step counted: count them
        for the penalties of the bytes sampled after them."""
        self.touched([slot])
        ids = self._tensor([b + OFFSET for b in forced])
        self.output_counts[slot] += torch.bincount(ids, minlength=self.cfg.vocab_size).to(self.output_counts.dtype)
        self.seen[slot, ids] = True

    def follow_guides(self, slots: list[int], states: list) -> None:
        """Each slot's guided request reached its state: its next byte is biased by that state's row (guide.py's
        `mask`, a row of its `bias_rows`). Device copies, queued before the next step's work: one per slot, or for
        the slots that share a guide (the `n` choices of a request, requests with the same pattern) one gather
        and one copy; a request's own logit bias is added to the row."""
        groups: dict[int, tuple[object, list[int], list[int]]] = {}
        for slot, state in zip(slots, states):
            guide, own = self.guides[slot]
            row = guide.mask(state)  # (first: a PushdownGuide makes the rows of the masks it meets)
            if own is not None:
                rows = guide.bias_rows(self.cfg.vocab_size, OFFSET, EOS_ID, self.model.device)
                torch.add(rows[row], own, out=self.logit_bias[slot])
                continue
            _, group_slots, group_rows = groups.setdefault(id(guide), (guide, [], []))
            group_slots.append(slot)
            group_rows.append(row)
        for guide, group_slots, group_rows in groups.values():
            rows = guide.bias_rows(self.cfg.vocab_size, OFFSET, EOS_ID, self.model.device)
            if len(group_slots) == 1:
                self.logit_bias[group_slots[0]].copy_(rows[group_rows[0]])
            else:
                self.logit_bias.index_copy_(0, self._tensor(group_slots), rows[self._tensor(group_rows)])

    def share_prompt(self, source: int, target: int, length: int, num_patches: int, open_len: int) -> None:
        """Give slot `target` the state that slot `source` holds after its first `length` positions, with
        `num_patches` completed patches and `open_len` bytes in the open one: what prefilling those
        positions in `target` would compute, since every piece of it depends on them alone (the
        patches of a prefix never change when bytes follow). The local caches are copied; the global
        cache's pages are shared (paged_cache.py). The sampling counts stay `target`'s own (admit)."""
        self.touched([target])
        for cache in (self.entropy_kv, self.encoder_kv, self.decoder_kv):
            n = cache.span(length)  # a ring buffer holds the last `window` positions at p % window
            cache.kv[:, :, target, :, :n].copy_(cache.kv[:, :, source, :, :n])
        self.global_kv.share(source, target, num_patches)
        self.latest[:, :, target].copy_(self.latest[:, :, source])
        self.open_patch.data[target, :open_len].copy_(self.open_patch.data[source, :open_len])
        self.history[target].copy_(self.history[source])

    # ------------------------------------------------------------------ per-stack pieces
    def _run_stack(self, stack: Stack, cache: KVCache, h, slots, lengths, max_length, read_slots=None,
                   min_length=None, final_norm: BoundNorm | None = None,
                   real: torch.Tensor | None = None) -> tuple[torch.Tensor, Positions]:
        """The stack's blocks over new positions -> (output states, or their `final_norm`; positions).
        `real`: see positions_for."""
        cache.reserve(max_length + h.shape[1])
        p = positions_for(stack, cache, slots, lengths, h.shape[1], max_length, read_slots, min_length, self.ops,
                          self.kernels, real, self.scratch)
        delta = None
        for i, block in enumerate(stack.layers):
            h, delta = block_step(block, h, delta, cache, i, p, self.ops, self.kernels)
        if final_norm is not None:
            return self.ops.add_norm(h, delta, final_norm)[1], p
        return (h if delta is None else h + delta), p

    def entropies(self, ids: torch.Tensor, slots, lengths, max_length: int, read_slots=None,
                  min_length=None, real=None) -> torch.Tensor:
        """(B, T) ids at positions lengths.. -> (B, T) fp32 entropies; extends the entropy cache."""
        return self.ops.entropy(self.entropy_logits(F.embedding(ids, self.entropy_embed), slots, lengths, max_length,
                                                    read_slots, min_length, real))

    def entropy_logits(self, embedded: torch.Tensor, slots, lengths, max_length: int, read_slots=None,
                       min_length=None, real=None) -> torch.Tensor:
        """(B, T, d) embedded ids at positions lengths.. -> (B, T, V) fp32 logits of the entropy model;
        extends the entropy cache."""
        normed, _ = self._run_stack(self.model.patcher, self.entropy_kv, embedded, slots, lengths, max_length,
                                    read_slots, min_length, self.entropy_norm, real)
        # EntropyModel.head: the output head in fp32, so that entropies are fp32 end to end
        return self.ops.linear(normed.float(), self.entropy_head)

    def encode(self, ids: torch.Tensor, slots, lengths, max_length: int, read_slots=None, min_length=None,
               ends: torch.Tensor | None = None, history_out: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, Positions]:
        """(B, T) ids -> (B, T, d_enc) byte states and their positions; extends the encoder cache and the
        hash history (`ends` (B,): the rows' real new positions, padding after them: each row's history
        ends at its own; `history_out`: where the moved history goes instead, a table like `history`)."""
        m = self.model
        history_out = self.history if history_out is None else history_out
        if self.kernels != "torch" and ids.shape[1] == 1:  # one kernel (byte_embedding.py)
            e = embed_new_bytes(ids, self.history, slots, self.hash_powers, m.encoder_hash_tok_embedding.weight,
                                m.local_encoder.embed_tokens.weight, self.cfg.hash_vocab, history_out)
        else:
            context = torch.cat([self.history[slots], ids], dim=1)
            e = m.embed_new_bytes(context, ids.shape[1], self.hash_powers)
            H = self.history.shape[1]
            history_out[slots] = context[:, -H:] if ends is None else \
                context.gather(1, ends[:, None] + torch.arange(H, device=ids.device)[None, :])
        return self._run_stack(m.local_encoder, self.encoder_kv, e, slots, lengths, max_length, read_slots,
                               min_length, real=None if ends is None else
                               torch.arange(ids.shape[1], device=ids.device)[None, :] < ends[:, None])

    def global_step(self, patches: torch.Tensor, slots, num_patches, max_patches: int, min_patches=None,
                    read_slots=None, real=None):
        """(B, T, k*d_enc) completed patches after `num_patches` earlier ones -> the decoder slots' keys
        and values for every cross-attention layer, (2, n_cross, B, H, T*k, D); extends the global cache.
        `real`: see positions_for."""
        m = self.model
        x = m.global_transformer.project_input(patches)
        g, _ = self._run_stack(m.global_transformer, self.global_kv, x, slots, num_patches, max_patches,
                               read_slots, min_patches, real=real)
        return self.slot_keys_values(m.local_decoder.slots(g), self.ops)

    def decode_bytes(self, byte_states, encoder_positions: Positions, tables, slot_patch, max_length: int,
                     logits: bool = False):
        """Decoder over new positions; byte t reads the k slots at table entry slot_patch[t] (None: each
        row's table holds exactly the k slots all its bytes read). -> (B, T, d) normed, or with
        `logits` the byte head's (B, T, V) in the model's dtype (the final norm and the head as one
        pair, which StepOps may fuse)."""
        dec = self.model.local_decoder
        p = encoder_positions  # same rows and positions; rebuilt below if the geometry differs
        if not self.decoder_shares_positions:
            p = positions_for(dec, self.decoder_kv, p.slots, p.lengths, byte_states.shape[1], max_length,
                              p.read_slots, p.min_length, self.ops, self.kernels, p.real, p.scratch)
        h, delta = byte_states, None  # the states are h + delta (see block_step)
        for i, block in enumerate(dec.layers):
            if i < len(dec.cross_attn_layers):
                ca, (keys, values) = dec.cross_attn_layers[i], tables[i]
                if slot_patch is None:  # every byte reads the k slots given: plain attention over them
                    cross = self.cross_steps[i]
                    h, q = self.ops.add_norm_linear(h, delta, cross.q_norm, cross.q)
                    attended = cross(q, keys, values, self.ops.linear)
                else:
                    h = h if delta is None else h + delta
                    attended = attend_gathered(ca, h, keys, values, slot_patch, dec.k)
                h, delta = block_step(block, h, attended, self.decoder_kv, i, p, self.ops, self.kernels, double=True)
            else:
                h, delta = block_step(block, h, delta, self.decoder_kv, i, p, self.ops, self.kernels)
        if logits:
            return self.ops.add_norm_linear(h, delta, self.decoder_norm, self.lm_head)[1]
        return self.ops.add_norm(h, delta, self.decoder_norm)[1]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(h, self.lm_head).float()

    def store_latest(self, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """Keep the k decoder slots of each row's newest completed patch (kv from global_step)."""
        self.latest[:, :, slots] = kv[:, :, :, :, -self.cfg.cross_attn_k:]

    def latest_tables(self, slots: torch.Tensor | slice):
        """[(keys, values)] per cross-attention layer, each (B, H, k, D), of the rows `slots`."""
        both = self.latest[:, :, slots]
        return list(zip(both[0], both[1]))

    def boundary_flags(self, entropy: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return starts_next(entropy, positions, self.cfg.patching_threshold)

    # ------------------------------------------------------------------ step kinds
    def _tensor(self, values, dtype=torch.long) -> torch.Tensor:
        return host_tensor(values, dtype, self.model.device)

    def score(self, h: torch.Tensor, targets: list[int], top_n: int) -> PromptScores:
        """(t, d) normed decoder states, the ids that follow them -> their PromptScores."""
        return self.score_logits(self.logits(h), targets, top_n)

    def score_logits(self, logits: torch.Tensor, targets: list[int], top_n: int) -> PromptScores:
        logp = torch.log_softmax(logits.float(), dim=-1)
        values, ids = ranked(logp, top_n)
        return PromptScores(logp.gather(1, self._tensor(targets)[:, None])[:, 0], values, ids)

    def fork_scores(self, leader: list[PromptScores], at: int, last_logits: torch.Tensor, target: int | None,
                    top_n: int) -> list[PromptScores]:
        """The scores of a follower that copies a leader's state after `at` positions (sharing.py): the
        leader's first at - 1 rows (the same bytes; the leader's top n is at least the follower's), and
        the row of position at - 1, from its logits, scored against the follower's own next byte,
        `target` (none where the follower's prompt ends there)."""
        parts = []
        if at > 1:
            s = PromptScores.join(leader)
            parts.append(PromptScores(s.chosen[:at - 1], s.values[:at - 1, :top_n], s.ids[:at - 1, :top_n]))
        if target is not None:
            parts.append(self.score_logits(last_logits, [target], top_n))
        return parts

    def cache_bytes(self) -> dict[str, int]:
        """Device memory the rows' state takes now: "local", the entropy model's and the local models' ring
        buffers and the per-row tables (bounded by the windows, and the open patch by the longest one);
        "global", the global model's pool of pages (paged_cache.py), which grows with the patches of all
        sequences together (doubling: `global_bytes_per_patch` a patch) and stays, or was given its size
        (pool_size.py); "global_held", the pages of it that slots hold now (sequences, and states kept for
        later prompts), each page once."""
        local = [self.entropy_kv.kv, self.encoder_kv.kv, self.decoder_kv.kv, self.latest, self.open_patch.data,
                 self.history, self.output_counts, self.seen, self.logit_bias]
        pool = self.global_kv
        return {"local": sum(t.nbytes for t in local), "global": pool.kv.nbytes,
                "global_held": pool.page_bytes * pool.pages_held()}

    def global_bytes_per_patch(self) -> int:
        """What a patch of one sequence takes in the global model's cache (keys and values, every layer)."""
        return self.global_kv.page_bytes // self.global_kv.page

    def batch_window(self) -> int | None:
        """The most positions a row of a padded batch (prefill_start) takes: more would wrap a ring buffer
        onto the row's own new entries (None: no stack has a window)."""
        windows = [c.window for c in (self.entropy_kv, self.encoder_kv, self.decoder_kv) if c.window is not None]
        return min(windows) if windows else None

    def prefill_start(self, slots: list[int], chunks: list[list[int]], starts: list[int],
                      transfer: HostTransfer) -> PrefillStart:
        """Positions starts[b] .. starts[b] + len(chunks[b]) - 1 of each sequence, in parallel: the entropy
        model and the encoder. Several rows are right-padded with their last id (each at most
        batch_window() positions): causal attention keeps every real position from seeing the padding
        after it, and the padding's cache entries go to the scratch slot. The patch boundaries come to
        the host with the step's transfer; then `prefill_finish` runs the global steps and the decoder."""
        self.touched(slots)
        T = max(len(c) for c in chunks)
        x = self._tensor([c + c[-1:] * (T - len(c)) for c in chunks])
        s, n, rs = self._tensor(slots), self._tensor(starts), consecutive(slots)
        padded = any(len(c) < T for c in chunks)
        ends = self._tensor([len(c) for c in chunks]) if padded else None
        real = torch.arange(T, device=x.device)[None, :] < ends[:, None] if padded else None
        entropy = self.entropies(x, s, n, max(starts), rs, min(starts), real)
        closes = self.boundary_flags(entropy, n[:, None] + torch.arange(T, device=x.device)[None, :])
        byte_states, positions = self.encode(x, s, n, max(starts), rs, min(starts), ends=ends)
        return PrefillStart(s, rs, starts, [len(c) for c in chunks], closes if real is None else closes & real,
                            byte_states, positions, transfer.add(closes))

    def prefill_finish(self, batch: PrefillStart, transfer: HostTransfer, num_patches: list[int],
                       open_lens: list[int], targets: list[list[int] | None], top_n: list[int]) -> list[ChunkResult]:
        """Each row's completed patches, its open patch's earlier bytes first, through the global model
        (rows padded to the most patches of a row), then the decoder. -> a ChunkResult per row.
        `targets[b]`: the ids that follow row b's first len(targets[b]) positions, to score
        (PromptScores, with the top `top_n[b]` of each position), or None."""
        s, lengths, byte_states, closes = batch.slots, batch.lengths, batch.byte_states, batch.closes
        B, T, d = byte_states.shape
        k, dev = self.cfg.cross_attn_k, s.device
        values = transfer.get(batch.handle)
        flags = [[v > 0 for v in values[b * T:b * T + n]] for b, n in enumerate(lengths)]
        counts = [sum(row) for row in flags]
        lasts = [max((i for i, f in enumerate(row) if f), default=-1) for row in flags]  # each row's last close
        closed_before = closes.long().cumsum(1)  # (B, T): byte t reads the newest patch closed at or before it
        tables = self.latest_tables(s)
        most = max(counts)
        if most:
            # each row: the open patch's earlier bytes, its chunk's bytes, then padding (a patch of its own)
            held = max(open_lens)
            opened, length = self._tensor(open_lens)[:, None], self._tensor(lengths)[:, None]
            j = torch.arange(held + T, device=dev)[None, :]
            states = torch.cat([self.open_patch.data[s, :held], byte_states], 1) if held else byte_states
            source = torch.where(j < opened, j, held + j - opened).clamp(max=held + T - 1)
            states = states.gather(1, source[..., None].expand(-1, -1, d))
            in_chunk = (closed_before - closes.long()).gather(1, (j - opened).clamp(0, T - 1))
            pids = torch.where(j < opened, 0, torch.where(j < opened + length, in_chunk, most))
            vecs = self.model.local_encoder.patch_slots(states, pids, most + 1, blocked=False)[:, :most]
            done = self._tensor(counts)
            new = self.global_step(vecs, s, self._tensor(num_patches), max(num_patches), min(num_patches),
                                   batch.read_slots, torch.arange(most, device=dev)[None, :] < done[:, None])
            tables = [(torch.cat([lk, nk], 2), torch.cat([lv, nv], 2))
                      for (lk, lv), nk, nv in zip(tables, new[0], new[1])]
            last = ((done[:, None] - 1).clamp(min=0)) * k + torch.arange(k, device=dev)[None, :]  # (B, k)
            newest = new.gather(4, last[None, None, :, None, :, None].expand(*new.shape[:4], k, new.shape[-1]))
            keep = (done > 0)[None, None, :, None, None, None]
            self.latest[:, :, s] = torch.where(keep, newest, self.latest[:, :, s])  # rows that closed none keep theirs
        after = []  # each row's open patch after its chunk
        for b, (n, close, o) in enumerate(zip(lengths, lasts, open_lens)):
            start, kept = (close + 1, 0) if close >= 0 else (0, o)
            self.open_patch.reserve(kept + n - start)
            if n > start:
                self.open_patch.write(s[b:b + 1], self._tensor([kept]), byte_states[b:b + 1, start:n])
            after.append(kept + n - start)
        h = self.decode_bytes(byte_states, batch.positions, tables, closed_before, max(batch.starts))
        last_logits = self.logits(h[torch.arange(B, device=dev), self._tensor(lengths) - 1])  # (B, V)
        return [ChunkResult(flags[b], counts[b], after[b], last_logits[b:b + 1],
                            self.score(h[b, :len(targets[b])], targets[b], top_n[b]) if targets[b] else None)
                for b in range(B)]

    def decode(self, slots: list[int], lengths: list[int], ids: list[int], closes: list[bool],
               num_patches: list[int], open_lens: list[int]) -> torch.Tensor:
        """One position for each of B sequences: byte ids[b] at position lengths[b]; closes[b] says
        whether it completes its patch (known from the entropy model's look-ahead). -> (B, V) logits."""
        self.touched(slots)
        s, n, rs = self._tensor(slots), self._tensor(lengths), consecutive(slots)
        byte_states, positions = self.encode(self._tensor(ids)[:, None], s, n, max(lengths), rs, min(lengths))
        self.open_patch.reserve(max(open_lens) + 1)
        self.open_patch.write(s, self._tensor(open_lens), byte_states)
        rows = [i for i, c in enumerate(closes) if c]
        if rows:
            closing = s[self._tensor(rows)]
            counts = self._tensor([open_lens[i] + 1 for i in rows])
            states = self.open_patch.data[closing, :max(open_lens[i] + 1 for i in rows)]
            padding = torch.arange(states.shape[1], device=s.device)[None, :] >= counts[:, None]
            # the padding is patch 1
            vecs = self.model.local_encoder.patch_slots(states, padding.long(), 2, blocked=False)[:, :1]
            before = [num_patches[i] for i in rows]
            new = self.global_step(vecs, closing, self._tensor(before), max(before), min(before),
                                   consecutive([slots[i] for i in rows]))  # in-place cache reads when it can
            self.store_latest(closing, new)
        tables = self.latest_tables(rs if rs is not None else s)
        return self.decode_bytes(byte_states, positions, tables, None, max(lengths), logits=True)[:, 0].float()

    def look_ahead(self, embedded: torch.Tensor, slots: list[int], positions: list[int]) -> torch.Tensor:
        """Feed freshly sampled bytes, embedded for the entropy model (B, 1, d), at `positions` to it ->
        (B,) bool: does each close its patch (does the byte after it start a new one)."""
        pos = self._tensor(positions)
        logits = self.entropy_logits(embedded, self._tensor(slots), pos, max(positions), consecutive(slots),
                                     min(positions))
        return self.boundary_flags(self.ops.entropy(logits)[:, 0], pos)

    def choose(self, logits: torch.Tensor, batch: SamplingBatch, positions: torch.Tensor, slots: torch.Tensor,
               out: torch.Tensor, reads=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's byte for `positions` from its logits (B, V) and its slot's logit bias, counted in its
        slot's output counts and seen flags, to out[:, 0] (float64) -> (ids (B,), their entropy-model
        embeddings (B, 1, d)). With Triton kernels a greedy step without penalties takes one kernel
        (tail_kernels.py), and so does any other where `sample_kernel` (sample_kernel.py); else
        sampling.sample and its bookkeeping eagerly, the counts read at `reads` (a view of consecutive slots)
        or else at `slots`."""
        never = never_sampled(logits.shape[1], logits.device)
        if self.kernels != "torch" and batch.all_greedy and not batch.any_penalty:
            return greedy_pick(logits, batch.allow_eos, never, self.output_counts, self.seen, slots,
                               self.entropy_embed, EOS_ID, out)
        if self.sample_kernel:
            return sample_pick(logits, batch, positions, never, self.output_counts, self.seen, self.logit_bias,
                               slots, self.entropy_embed, EOS_ID, out)
        reads = slots if reads is None else reads
        ids = sample(logits, batch, positions, self.output_counts[reads], self.seen[reads], EOS_ID,
                     self.logit_bias[reads])
        self.output_counts[slots, ids] += 1
        # a tensor on the device, not True: a Python scalar would be copied from the host, which a CUDA
        # graph's capture refuses
        self.seen[slots, ids] = torch.ones_like(ids, dtype=torch.bool)
        out[:, 0].copy_(ids)
        return ids, F.embedding(ids[:, None], self.entropy_embed)

    def sample_and_look_ahead(self, logits: list[torch.Tensor], slots: list[int], positions: list[int],
                              params: list[SamplingParams], seeds: list[int], allow_eos: list[bool],
                              transfer: HostTransfer) -> Callable[[], Sampled]:
        """Choose each row's byte for `positions` from the rows of `logits` (blocks of (B, V)), feed it
        to the entropy model, and register the ids, their patch flags and any logprobs with the step's
        transfer; the function returned reads them after the transfer."""
        self.touched(slots)
        logits = logits[0] if len(logits) == 1 else torch.cat(logits)
        s = self._tensor(slots)
        batch = SamplingBatch.build(params, seeds, s.device, allow_eos)
        out = torch.empty(len(slots), 2, dtype=torch.float64, device=s.device)  # column 0: the ids
        ids, embedded = self.choose(logits, batch, self._tensor(positions), s, out)
        out[:, 1].copy_(self.look_ahead(embedded, slots, positions))
        n_top = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        parts = [out[:, 0], out[:, 1]]  # the ids, then the flags
        if n_top is not None:
            chosen, top_values, top_ids = top_logprobs(logits, ids, n_top)
            parts += [chosen.double(), top_values.double().flatten(), top_ids.double().flatten()]
        handle = transfer.add(torch.cat(parts))
        B = len(slots)

        def result() -> Sampled:
            host = transfer.get(handle)
            sampled = Sampled([int(x) for x in host[:B]], [x > 0 for x in host[B:2 * B]], None)
            if n_top is not None:
                k = max(n_top, 1)
                values, top = host[3 * B:3 * B + B * k], host[3 * B + B * k:]
                sampled.logprobs = [(host[2 * B + b], [(int(top[b * k + j]), values[b * k + j])
                                                       for j in range(min(n_top, params[b].logprobs or 0))])
                                    for b in range(B)]
            return sampled
        return result
