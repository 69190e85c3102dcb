"""Static-shaped decode steps: the form CUDA graphs need, equal to the dynamic step in runner.py.

The dynamic step sizes everything by the batch of the moment. Here every shape is fixed per bucket:
- the batch is padded to a bucket (1, 2, 4, ..., max_batch_size). Where the bucket above the highest
  decoding slot is the batch's own bucket (the usual case: slots are handed out lowest first), row b
  is slot b and every cache is read in place: a gathered copy of each layer's window would move
  gigabytes per step at 64 streams on a GPU. A row whose slot is not decoding (free, prefilling) is
  then padding. Otherwise (a few sequences left on high slots) the rows are the sequences in order,
  and their cache rows are gathered, which reads less than every slot below the highest would.
  Padding rows write to the runner's scratch slot, whose contents nobody reads, and their results
  are dropped;
- a ring-buffer cache is read at its full window, with a mask, whatever the lengths (a cache without
  a window, such as the global one, is read at a power-of-two span that the bucket key names);
- every per-step input is copied into preallocated buffers in one transfer per kind, and every result
  lands in one preallocated output, read with the step's one device-to-host transfer.
A decode step is three pieces, each a pure function of those buffers and the caches:
- `encode`: the new bytes through the hash embeddings and the local encoder, into the open patch;
- `patch`, only when some row's byte closes its patch: pool and cross-attend the patch's bytes, one
  global step, the decoder slots of the new patch (bucketed by closing rows, patch bytes, global span);
- `finish`: the local decoder, sampling, the entropy look-ahead of the sampled bytes.
Decoding ahead (`lookahead_rows`, steps of that many rows at most; on CUDA 1 by default): at batch 1
each kernel fills a few of the GPU's multiprocessors, so work that does not depend on other work can
run beside it. The entropy look-ahead of a sampled byte says whether its patch closes; the byte's
encoder step does not depend on that, nor does its decoder step where the patch stays open (the
usual case: about 4 bytes in 5). So `finish` then runs, in a second CUDA stream beside the look-ahead,
the sampled bytes' encoder step (into their open patches; the hash history they move on to is kept
aside) and decoder step, into logits kept by slot. The next step, if it comes for the same slots with
those bytes at those positions and nothing else wrote the slots since (Runner.slot_epochs), runs no
`encode`: its `finish` takes the history over and samples from the logits decoded ahead (for the rows
whose patch closed, the patch step decodes their bytes again under the new patch first). Any other next
step starts over from the bytes, which is the same work done again (the encoder's writes the same
values), so outputs never change; only the hash history, which each step moves on, waited.
`StepGraphs` (graphs.py) captures each piece once per key and replays it; on CPU the pieces run as
they are. A cache or the open patch that grows is a new tensor: the graphs of the pieces that use it
(PIECE_BUFFERS) go, the others stay. Knows nothing about requests (engine.py) and builds no tensors
outside its buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .graphs import StepGraphs
from .positions import positions_for
from .runner import Runner, Sampled
from .sampling import SamplingBatch, SamplingParams, all_greedy, any_penalty, top_logprobs
from .tail_kernels import entropy_flags
from .tokenizer import BOS_ID
from .transfer import HostTransfer

MAX_LOGPROBS = 20  # a step that returns logprobs returns this many; the host keeps what each row asked for
# next: lengths + 1; next_open: where the sampled byte goes in its open patch (0 after a closing byte)
INT_FIELDS = ("slots", "lengths", "next", "ids", "open_lens", "next_open", "top_k", "seeds", "allow_eos")
FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence", "frequency", "repetition")
PATCH_FIELDS = ("rows", "counts", "before", "lengths")  # lengths: of the closing rows, for their decoder again
NUMPY = {torch.long: np.int64, torch.float32: np.float32}
# the growing buffers (StaticDecoder.growing_buffers) each piece reads or writes; every other buffer a piece
# touches is made once, with the runner
PIECE_BUFFERS = {"encode": ("encoder", "open_patch"), "patch": ("open_patch", "global", "decoder"),
                 "finish": ("decoder", "entropy", "encoder", "open_patch")}  # (encoder, open patch: decoding ahead)
# On CUDA, steps of up to this many rows decode their sampled bytes ahead (StaticDecoder.lookahead_rows)
LOOKAHEAD_ROWS_CUDA = 1


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... below max_batch, then max_batch itself."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


def bucket(n: int, sizes: list[int]) -> int:
    return next(s for s in sizes if s >= n)


def span_bucket(needed: int, floor: int = 64) -> int:
    """The power of two (at least `floor`) that holds `needed` cache entries."""
    size = floor
    while size < needed:
        size *= 2
    return size


class Staged:
    """Named (rows,) device tensors, views of one buffer, filled from the host in one copy."""

    def __init__(self, names: tuple[str, ...], rows: int, dtype: torch.dtype, device: torch.device):
        # filled through a NumPy view of the same memory: it takes a Python list faster than torch.tensor
        if device.type == "cuda":  # page-locked, so that the copy up does not wait for the device
            self.host = torch.zeros(len(names), rows, dtype=dtype, pin_memory=True)
            self._host = self.host.numpy()
        else:
            self._host = np.zeros((len(names), rows), dtype=NUMPY[dtype])
            self.host = torch.from_numpy(self._host)
        self.device = torch.zeros(len(names), rows, dtype=dtype, device=device)
        self.views = {name: self.device[i] for i, name in enumerate(names)}
        self.index = {name: i for i, name in enumerate(names)}

    def fill(self, columns: dict[str, list], padding: dict[str, float]) -> None:
        n = len(next(iter(columns.values())))
        self._host[:, :n] = [columns[name] for name in self.index]  # one NumPy call: 14 -> 4 us at 1 row
        if n < self._host.shape[1]:
            for name, i in self.index.items():
                self._host[i, n:] = padding.get(name, 0)
        self.device.copy_(self.host, non_blocking=True)


@dataclass
class ByteBuffers:
    """One bucket's inputs and outputs for the encode and finish pieces."""

    ints: Staged
    floats: Staged
    states: torch.Tensor  # (Bb, 1, d_enc) encoder output, handed from encode to finish
    out: torch.Tensor  # (Bb, 2) float64: id, closes (rows contiguous: the step's transfer copies no slice)
    logprobs: torch.Tensor  # (Bb, 1 + 2 * MAX_LOGPROBS) float64: logprob, top values, top ids

    @property
    def rows(self) -> slice:
        """The slots rows read when they read in place: row b is slot b (`slots`: where each writes)."""
        return slice(0, self.out.shape[0])

    def __getattr__(self, name: str) -> torch.Tensor:
        for staged in (self.ints, self.floats):
            if name in staged.views:
                return staged.views[name]
        raise AttributeError(name)

    def sampling(self, greedy: bool, penalty: bool) -> SamplingBatch:
        return SamplingBatch(self.temperature, self.top_p, self.top_k, self.min_p, self.presence, self.frequency,
                             self.repetition, self.seeds, self.allow_eos, greedy, penalty)  # 0 or 1: sample() takes it


@dataclass
class RequestColumns:
    """A step's per-request inputs by row (StaticDecoder._request_columns)."""

    key: tuple
    ints: dict[str, list]  # top_k, seeds, allow_eos (the floats went to the device when these were made)
    n_top: int | None  # logprobs asked for, at most
    mode: tuple[bool, bool, bool]  # all greedy, any penalty, any logprobs


class StaticDecoder:
    """Decode steps of a Runner at fixed shapes, optionally replayed from CUDA graphs."""

    def __init__(self, runner: Runner, graphs: bool = False, lookahead_rows: int | None = None):
        """`lookahead_rows`: steps of up to this many rows (their bucket's) decode their sampled bytes ahead
        (see the module's docstring); by default LOOKAHEAD_ROWS_CUDA on CUDA and none on a CPU, where the
        two branches would run one after the other and a closing byte's decoder twice."""
        self.r = runner
        self.sizes = batch_buckets(runner.num_slots)
        self.device = runner.model.device
        self.graphs = StepGraphs(self.device) if graphs else None
        cuda = self.device.type == "cuda"
        self.lookahead_rows = (LOOKAHEAD_ROWS_CUDA if cuda else 0) if lookahead_rows is None else lookahead_rows
        self._ahead: dict[int, tuple[int, int, int]] = {}  # slot -> its byte decoded ahead: (position, id, epoch)
        self._ahead_logits: torch.Tensor | None = None  # (slots, V) by slot: the logits after each one's byte ahead
        self._ahead_history: torch.Tensor | None = None  # by slot: the hash history that byte moves on to
        self._branch = torch.cuda.Stream(self.device) if cuda else None  # the second branch of a look-ahead
        self._bytes: dict[int, ByteBuffers] = {}
        self._patches: dict[int, Staged] = {}
        self.keys_seen: set[tuple] = set()  # every piece and shape run so far
        self._buffers: dict[str, int] = {}  # the address of each growing buffer the captured graphs were built on
        self._requests: RequestColumns | None = None  # the last step's
        if self.lookahead_rows:
            self._make_ahead_buffers()

    def _make_ahead_buffers(self) -> None:
        r = self.r
        self._ahead_logits = torch.zeros(r.history.shape[0], r.cfg.vocab_size, device=self.device, dtype=r.model.dtype)
        self._ahead_history = torch.zeros_like(r.history)

    # ------------------------------------------------------------------ host side
    def step(self, slots: list[int], lengths: list[int], ids: list[int], closes: list[bool],
             num_patches: list[int], open_lens: list[int], params: list[SamplingParams],
             seeds: list[int], allow_eos: list[bool], transfer: HostTransfer) -> Callable[[], Sampled]:
        """The dynamic `Runner.decode` + `Runner.sample_and_look_ahead` for B running sequences: byte
        ids[b] at position lengths[b], then the byte for position lengths[b] + 1 (EOS where
        allow_eos[b]). The results come with the step's transfer; the function returned reads them."""
        r, B = self.r, len(slots)
        Bb = bucket(B, self.sizes)
        in_place = bucket(max(slots) + 1, self.sizes) == Bb
        order = slots if in_place else list(range(B))  # the row of each sequence
        n = max(order) + 1
        rows = [i for i, c in enumerate(closes) if c]
        patch_bytes = span_bucket(max(open_lens[i] + 1 for i in rows), 16) if rows else 0
        global_span = self._global_span(max(num_patches[i] for i in rows) + 1) if rows else 0
        spans = self._local_spans(max(lengths))
        fork = Bb <= self.lookahead_rows
        if fork and self._ahead_logits is None:
            self._make_ahead_buffers()
        epochs = r.slot_epochs
        # every row's byte was decoded ahead by the last step, and nothing else has written its slot since
        ahead = bool(self._ahead) and all(self._ahead.get(slot) == (length, byte, epochs[slot])
                                          for slot, length, byte in zip(slots, lengths, ids))
        r.open_patch.reserve(max(max(open_lens) + 1 + fork, patch_bytes))  # (+1: the byte decoded ahead's entry)
        for cache, span in zip((r.entropy_kv, r.encoder_kv, r.decoder_kv, r.global_kv), spans + (global_span,)):
            cache.reserve(span)  # no-op for a ring buffer
        self._check_buffers()

        buf = self._byte_buffers(Bb)
        int_padding = {"slots": r.scratch, "ids": BOS_ID, "next": 1}
        in_order = order == list(range(B))  # rows already in order, none between them (the usual case)

        def by_row(columns: dict[str, list], padding: dict[str, float]) -> dict[str, list]:
            """Each column's values at their sequences' rows, padding between them."""
            if in_order:
                return columns
            out = {}
            for name, values in columns.items():
                out[name] = [padding.get(name, 0)] * n
                for row, value in zip(order, values):
                    out[name][row] = value
            return out

        requests = self._request_columns((Bb, tuple(order), tuple(params), tuple(seeds), tuple(allow_eos)), params,
                                         seeds, allow_eos, by_row, buf)
        buf.ints.fill(by_row({"slots": slots, "lengths": lengths, "next": [n + 1 for n in lengths], "ids": ids,
                              "open_lens": open_lens,
                              "next_open": [0 if c else o + 1 for c, o in zip(closes, open_lens)]}, int_padding)
                      | requests.ints, int_padding)
        if not ahead:
            self._run(("encode", Bb, spans, in_place), lambda: self._encode(buf, spans, in_place))
        if rows:
            Rb = bucket(len(rows), self.sizes)
            staged = self._patch_inputs(Rb)
            staged.fill({"rows": [slots[i] for i in rows], "counts": [open_lens[i] + 1 for i in rows],
                         "before": [num_patches[i] for i in rows], "lengths": [lengths[i] for i in rows]},
                        {"rows": r.scratch, "counts": 1})
            again = spans[2] if ahead else 0  # the decoder span of the closing rows' decoder step again
            self._run(("patch", Rb, patch_bytes, global_span, again),
                      lambda: self._patch(staged, patch_bytes, global_span, again))
        n_top, mode, way = requests.n_top, requests.mode, (ahead, fork)
        self._run(("finish", Bb, spans, mode, way, in_place), lambda: self._finish(buf, spans, in_place, *mode, *way))
        handle = transfer.add(buf.out[:n])
        logprobs = transfer.add(buf.logprobs[:n]) if n_top is not None else None
        marks = [epochs[slot] for slot in slots]

        def result() -> Sampled:
            flat = transfer.get(handle)
            sampled = Sampled([int(flat[2 * row]) for row in order], [flat[2 * row + 1] > 0 for row in order], None)
            if fork:  # what the next step finds decoded ahead, if it comes with these bytes at these positions
                for slot, length, byte, mark in zip(slots, lengths, sampled.ids, marks):
                    self._ahead[slot] = (length + 1, byte, mark)
            if logprobs is not None:
                lp, k = transfer.get(logprobs), MAX_LOGPROBS
                width = 1 + 2 * k
                sampled.logprobs = [(lp[i], [(int(lp[i + 1 + k + j]), lp[i + 1 + j])
                                             for j in range(params[b].logprobs or 0)])
                                    for b, i in enumerate(row * width for row in order)]
            return sampled
        return result

    def _request_columns(self, key: tuple, params: list[SamplingParams], seeds: list[int], allow_eos: list[bool],
                         by_row, buf: ByteBuffers) -> RequestColumns:
        """The step's per-request columns by row, and its sampling mode; when `key` (bucket, rows, the requests'
        parameters, seeds and whether EOS is allowed) is the last step's, the last step's, whose floats are
        still on the device: a batch of long generations builds them once, not at every byte."""
        if self._requests is not None and self._requests.key == key:
            return self._requests
        float_padding = {"top_p": 1.0, "repetition": 1.0}
        buf.floats.fill(by_row({"temperature": [p.temperature for p in params], "top_p": [p.top_p for p in params],
                                "min_p": [p.min_p for p in params], "presence": [p.presence_penalty for p in params],
                                "frequency": [p.frequency_penalty for p in params],
                                "repetition": [p.repetition_penalty for p in params]}, float_padding), float_padding)
        ints = by_row({"top_k": [max(p.top_k, 0) for p in params], "seeds": seeds,
                       "allow_eos": allow_eos}, {})
        n_top = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        self._requests = RequestColumns(key, ints, n_top, (all_greedy(params), any_penalty(params), n_top is not None))
        return self._requests

    def _run(self, key, piece) -> None:
        self.keys_seen.add(key)
        if self.graphs is None:
            piece()
        else:
            self.graphs.run(key, piece)

    def growing_buffers(self) -> dict[str, torch.Tensor]:
        """The buffers that grow (a new tensor each time), by the names PIECE_BUFFERS gives them."""
        r = self.r
        return {"open_patch": r.open_patch.data, "entropy": r.entropy_kv.kv, "encoder": r.encoder_kv.kv,
                "decoder": r.decoder_kv.kv, "global": r.global_kv.kv}

    def _check_buffers(self) -> None:
        """A grown buffer is a new tensor: the graphs of the pieces that use it were captured on the old one
        and must go; the others stay (the global cache grows as sequences lengthen, and only patch steps
        read it)."""
        buffers = {name: t.data_ptr() for name, t in self.growing_buffers().items()}
        grown = {name for name, address in buffers.items() if self._buffers.get(name, address) != address}
        if grown and self.graphs is not None:
            self.graphs.forget(lambda key: not grown.isdisjoint(PIECE_BUFFERS[key[0]]))
        self._buffers = buffers

    def _global_span(self, needed: int) -> int:
        """Entries of the global cache a patch step reads: a power of two (few shapes, few graphs), or the
        whole cache where that holds what is needed and the power of two would not fit (the engine grows the
        cache only as far as memory allows: CacheFull)."""
        span, capacity = span_bucket(needed), self.r.global_kv.capacity
        return capacity if needed <= capacity < span else span

    def _local_spans(self, max_length: int) -> tuple[int, int, int]:
        """Entries read by the entropy, encoder and decoder caches (lengths up to max_length + 1)."""
        r = self.r
        return tuple(c.window if c.window is not None else span_bucket(max_length + 2)
                     for c in (r.entropy_kv, r.encoder_kv, r.decoder_kv))

    def _byte_buffers(self, Bb: int) -> ByteBuffers:
        if Bb not in self._bytes:
            d = self.r.cfg.encoder.hidden_size
            self._bytes[Bb] = ByteBuffers(
                Staged(INT_FIELDS, Bb, torch.long, self.device), Staged(FLOAT_FIELDS, Bb, torch.float32, self.device),
                torch.zeros(Bb, 1, d, device=self.device, dtype=self.r.model.dtype),
                torch.zeros(Bb, 2, dtype=torch.float64, device=self.device),
                torch.zeros(Bb, 1 + 2 * MAX_LOGPROBS, dtype=torch.float64, device=self.device))
        return self._bytes[Bb]

    def _patch_inputs(self, Rb: int) -> Staged:
        if Rb not in self._patches:
            self._patches[Rb] = Staged(PATCH_FIELDS, Rb, torch.long, self.device)
        return self._patches[Rb]

    # ------------------------------------------------------------------ the pieces (device side only)
    def _encode(self, b: ByteBuffers, spans: tuple[int, int, int], in_place: bool) -> None:
        r = self.r
        states, _ = r.encode(b.ids[:, None], b.slots, b.lengths, spans[1] - 1, b.rows if in_place else None)
        r.open_patch.data[b.slots, b.open_lens] = states[:, 0]
        b.states.copy_(states)

    def _patch(self, p: Staged, patch_bytes: int, global_span: int, again: int = 0) -> None:
        """The closing rows' patches through the global model, and (`again`: the decoder's span) their bytes
        decoded ahead through the decoder again, under the new patch, into the logits kept by slot."""
        r, v = self.r, p.views
        states = r.open_patch.data[v["rows"], :patch_bytes]
        padding = torch.arange(patch_bytes, device=states.device)[None, :] >= v["counts"][:, None]
        vecs = r.model.local_encoder.patch_slots(states, padding.long(), 2, blocked=False)[:, :1]  # padding = patch 1
        r.store_latest(v["rows"], r.global_step(vecs, v["rows"], v["before"], global_span - 1))
        if again:  # the closing byte is its patch's last: its state at counts - 1
            closing = states.gather(1, (v["counts"] - 1)[:, None, None].expand(-1, 1, states.shape[2]))
            self._ahead_logits[v["rows"]] = self._decoder_logits(closing, v["rows"], v["lengths"], again, None,
                                                                 v["rows"])

    def _finish(self, b: ByteBuffers, spans: tuple[int, int, int], in_place: bool, greedy: bool, penalty: bool,
                logprobs: bool, ahead: bool = False, fork: bool = False) -> None:
        """The decoder (for bytes `ahead`, the logits decoded ahead instead: the patch step decoded the
        closing rows' again), sampling, then the entropy look-ahead of the sampled bytes, and with `fork`
        in a second branch beside it their encoder and decoder steps ahead of the next step."""
        r = self.r
        reads = b.rows if in_place else None  # None: gather each row's slot
        own = b.rows if in_place else b.slots
        if ahead:  # the bytes decoded ahead are the rows' now: so is the hash history they moved on to
            r.history[b.slots] = self._ahead_history[b.slots]
            logits = self._ahead_logits[b.slots]
        else:
            logits = self._decoder_logits(b.states, b.slots, b.lengths, spans[2], reads, own)
        position = b.next  # the sampled bytes' (staged: no kernel)
        ids, embedded = r.choose(logits, b.sampling(greedy, penalty), position, b.slots, b.out, own)
        if logprobs:
            chosen, values, top = top_logprobs(logits, ids, MAX_LOGPROBS)
            k = MAX_LOGPROBS
            b.logprobs[:, 0].copy_(chosen)
            b.logprobs[:, 1:1 + k].copy_(values)
            b.logprobs[:, 1 + k:].copy_(top)

        def look_ahead() -> None:
            entropy_logits = r.entropy_logits(embedded, b.slots, position, spans[0] - 1, reads)
            if r.kernels != "torch":  # the patch flag in one kernel (tail_kernels.py)
                entropy_flags(entropy_logits[:, 0], position, r.cfg.patching_threshold, b.out)
            else:
                b.out[:, 1].copy_(r.boundary_flags(r.ops.entropy(entropy_logits)[:, 0], position))

        if fork:
            self._branches(look_ahead, lambda: self._decode_ahead(b, ids, spans, in_place))
        else:
            look_ahead()

    def _decode_ahead(self, b: ByteBuffers, ids: torch.Tensor, spans: tuple[int, int, int], in_place: bool) -> None:
        """The sampled bytes through the encoder (into their open patches; the hash history they move on to
        kept aside until the next step takes them) and the decoder, under the rows' newest patches: the
        next step's logits, unless a patch closes before them (the entropy look-ahead beside this says)."""
        r = self.r
        reads = b.rows if in_place else None
        states, _ = r.encode(ids[:, None], b.slots, b.next, spans[1] - 1, reads, history_out=self._ahead_history)
        r.open_patch.data[b.slots, b.next_open] = states[:, 0]
        self._ahead_logits[b.slots] = self._decoder_logits(states, b.slots, b.next, spans[2], reads,
                                                           b.rows if in_place else b.slots)

    def _decoder_logits(self, states: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor, span: int, reads,
                        own) -> torch.Tensor:
        """One byte per row through the decoder, at `lengths`, reading `span` cache entries (at `reads`, or
        gathered at `slots`) under the newest patch of the rows `own` -> (B, V) byte logits."""
        r = self.r
        p = positions_for(r.model.local_decoder, r.decoder_kv, slots, lengths, 1, span - 1, reads, ops=r.ops,
                          kernels=r.kernels)
        return r.decode_bytes(states, p, r.latest_tables(own), None, span - 1, logits=True)[:, 0]

    def _branches(self, first: Callable[[], None], second: Callable[[], None]) -> None:
        """Two pieces of work that share no buffer: on CUDA the second on a stream of its own, joined before
        what follows (a CUDA graph records them as parallel branches); elsewhere one after the other."""
        if self._branch is None:
            first()
            second()
            return
        current = torch.cuda.current_stream(self.device)
        self._branch.wait_stream(current)
        with torch.cuda.stream(self._branch):
            second()
        first()
        current.wait_stream(self._branch)
