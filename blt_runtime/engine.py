"""The incremental generation engine: add_request / step / abort, joining scheduler and runner.

Every engine step advances each running sequence by one byte (batched), prefills one chunk of at
most one new prompt (or the short rests of several prompts together: scheduler.py), samples the first
byte of prompts prefilled in the step before, and reports what happened as StepOutputs; it waits
for the device once (transfer.py). With `first_byte_at_once` (a CPU's default, where a second wait
costs nothing) a prompt's first byte is sampled in the step that ends its prefill instead. Runs on
one thread; knows nothing about HTTP. Memory per sequence for the local models is bounded by their
windows; the global model's cache takes pages as a sequence's patches need them (paged_cache.py), made
ready before each step (`_plan`).

With `overlap` (the default on CUDA) a call to `step()` queues the next step's device work before it
returns this step's outputs, so that what the caller does with them (a server: metrics, delivery to
clients) runs while the device computes, not while it waits. A queued step was planned with the
requests known when it was queued: one added later joins the step after. An abort still ends a
request at once: the byte its row computes in the queued step is dropped.

Prompts are shared (`share_prompts`, on by default; sharing.py): a prefix whose state a slot already
holds, in a request still prefilling it, in a finished request's slot or in a prefix kept for later
prompts (where a prompt parted from one seen before), is copied, not prefilled again. Outputs do not
change.

A request with `prompt_logprobs` (echo with logprobs: an evaluation harness scoring text) has its
prompt's bytes scored by its prefill chunks, or up to a fork by its leader's (then only by a leader
that scores its own); the scores come with its first output, or its only one with max_bytes 0.
A request with max_bytes 0 is prefilled like any other (its state is then left for a prompt that
begins with it) and finishes without a byte.

Requests have priorities (vLLM's priority scheduling; lower values are more urgent). The waiting queue
is ordered by them, and a waiting request more urgent than a running one, with no slot free for it,
preempts it: the running one gives its slot up and waits again, in its place by priority and arrival.
Readmitted, it prefills its prompt and the bytes it generated again (what a slot holds of them already
is copied, as for any prompt: sharing.py) and goes on with the bytes it would have generated anyway:
greedy or seeded, its output is what it would have been without the preemption. Where the global cache's
pages run short (the device's memory), the least urgent running sequence is preempted the same way (`_plan`).

Guided jump-forward (`jump_forward`): where a request's guide allows a single byte (and no EOS) at each of
its next positions, sampling would choose those bytes whatever the logits, so they are appended at once
(Sequence.force) and prefilled as one chunk with the byte sampled before them, instead of a decode step
each; the byte after them is sampled from the chunk's last logits. They are reported once run through the
models (their patch starts known), each as an output of its own, before that byte: a request may have
several outputs in one step. Outputs do not change.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .cache import CacheFull, SlotAllocator
from .fused import CompiledOps
from .gemv import GemvOps
from .kernels import resolve, sampling_kernel
from .model.blt import BltModel
from .pool_size import fix_global_cache
from .runner import ChunkResult, PrefillStart, PromptScores, Runner, Sampled
from .sampling import SamplingParams
from .scheduler import Plan, PromptTooLong, Scheduler, Sequence, Status
from .sharing import PromptSharing
from .static import StaticDecoder
from .tokenizer import encode
from .transfer import HostTransfer
from .triton_ops import TritonOps


@dataclass(frozen=True)
class Usage:
    prompt_bytes: int
    generated_bytes: int
    prompt_patches: int
    completion_patches: int
    global_steps: int
    shared_prompt_bytes: int = 0  # prompt bytes whose prefill was copied from another request's


# Not frozen: one is made per running sequence per step, and a frozen dataclass's __init__ took 2.4 us
# against 0.5 with slots (timeit, this machine). Nothing changes one after the step makes it.
@dataclass(slots=True)
class StepOutput:
    request_id: str
    new_bytes: bytes  # zero or one byte (a request has several outputs in a step where its guide forced bytes)
    patch_start: bool  # the new byte begins a patch
    logprobs: tuple[float, list[tuple[int, float]]] | None  # (logprob of the byte, top [(byte id, logprob)])
    finished: bool
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    stop_reason: bytes | None = None  # the stop string matched, if any
    usage: Usage | None = None  # on the last output of a request
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None  # per prompt byte, as
    # `logprobs` (SamplingParams.prompt_logprobs): on the request's first output
    error: str | None = None  # with finish_reason "error": what stopped it (the caches ran out of memory, the
    # logits were not finite)
    error_code: str | None = None  # the same in a word: "out_of_memory", "not_finite" or "guide"


ONE_BYTE = [bytes([b]) for b in range(256)]


@dataclass
class Queued:
    """A step whose device work is queued: what `_complete` needs to read and apply its results."""

    plan: Plan
    transfer: HostTransfer
    chunk: PrefillStart | None
    decoded: Callable[[], Sampled] | None
    firsts: Callable[[], Sampled] | None
    scored: dict[str, tuple[int, int, int]]  # by request: transfer handles of its prompt's PromptScores
    forced: dict[str, tuple[int, int, int]]  # and of its forced bytes' (logprobs asked for)
    prefill_only: list[Sequence]  # prefilled requests with max_bytes=0: they finish without a byte (their
    # prompt scored, if asked, and their state left for a prompt that begins with it)


# Prompt bytes prefilled per step by default. On an H200 at the 1B shapes a 1 KB prompt's first byte came
# after 77 ms in two chunks of 512 and 47 ms in one, and 64 prompts of 100 bytes arriving together all had
# their first bytes after 375 ms at 2,048 bytes a step against 1,042 ms at 512 (bench/RESULTS.md, "GPU");
# on a CPU larger chunks are no faster and make every stream wait longer (the same file).
PREFILL_CHUNK_CUDA, PREFILL_CHUNK_CPU = 2048, 512


class Engine:
    def __init__(self, model: BltModel, max_batch_size: int = 16, max_model_len: int | None = None,
                 max_queue: int = 256, prefill_chunk: int | None = None, static: bool | None = None,
                 cuda_graphs: bool | None = None, compile: bool = False, kernels: str = "auto",
                 overlap: bool | None = None, share_prompts: bool = True, kept_prefixes: int = 4,
                 first_byte_at_once: bool | None = None, jump_forward: int | None = None, seed: int | None = None,
                 lookahead_rows: int | None = None, global_cache_bytes: int | None = None):
        """`static`: decode steps at fixed shapes (static.py); `cuda_graphs`: replay them from CUDA
        graphs. Both default to on for a CUDA model and off on CPU, where the dynamic step is faster.
        `compile`: the element-wise stretches of every step compiled into one kernel each (fused.py;
        off by default: compiling takes a while, and on a CPU it is slower). `kernels`: "torch",
        "triton" (the repository's Triton kernels for attention, RoPE, norms and SwiGLU's gate),
        "triton-gemv" (those, with the norms and the gate inside the projections' kernels) or "auto"
        (kernels.py: "triton" on CUDA when its kernels pass their start-up check). `overlap`: queue
        the next step before returning this one's outputs (module docstring); on by default on CUDA,
        off on a CPU, where nothing runs while the host works. `share_prompts`: the state of a prompt's
        prefix that a slot holds already (a request prefilling it, a finished request's slot, a kept
        prefix) is copied or taken over instead of computed (sharing.py); `kept_prefixes`: with
        share_prompts, slots of their own (beyond max_batch_size) that hold the states of prefixes kept
        for later prompts. `first_byte_at_once`: a prompt's first byte is sampled in the step that
        finishes its prefill, with a second wait for the device (on by default on a CPU without
        overlap, where that wait costs nothing); else with the next step's work, the step's one wait.
        `jump_forward`: where a guide forces that many bytes or more (one byte allowed at each, no EOS), they
        are prefilled as one chunk instead of sampled one step each (guided jump-forward: Sequence.force;
        outputs do not change); 0: never. By default 2 on a CPU, where a chunk of a few bytes takes about as
        long as two or three steps, and 0 on CUDA, where a decode step replays a graph and a chunk does not (not timed
        there yet). `seed`: of the generator that gives requests without a seed of their own theirs (vLLM's
        --seed): the same requests added in the same order then draw the same bytes in another engine.
        `prefill_chunk`: prompt bytes prefilled per step (and the most that prompts prefilled together
        take); by default 2,048 on CUDA and 512 elsewhere (PREFILL_CHUNK_CUDA, _CPU). `lookahead_rows`:
        static decode steps of up to this many rows decode their sampled bytes ahead, beside the entropy
        model (static.py; outputs do not change); by default 1 on CUDA, 0 (never) on a CPU. `global_cache_bytes`:
        the global model's pool of pages takes that much at once and never grows (vLLM's kv_cache_memory_bytes;
        ConfigError where it holds less than one sequence of max_model_len: pool_size.py); by default it grows
        as the sequences need it."""
        if kept_prefixes < 0:
            raise ValueError(f"kept_prefixes={kept_prefixes}: must be >= 0")
        if jump_forward is not None and jump_forward < 0:
            raise ValueError(f"jump_forward={jump_forward}: must be >= 0")
        if lookahead_rows is not None and lookahead_rows < 0:
            raise ValueError(f"lookahead_rows={lookahead_rows}: must be >= 0")
        self.model = model
        self.max_model_len = max_model_len or model.config.max_seq_len
        self.max_batch_size = max_batch_size
        if prefill_chunk is None:
            prefill_chunk = PREFILL_CHUNK_CUDA if model.device.type == "cuda" else PREFILL_CHUNK_CPU
        choice, kernels = kernels, resolve(kernels, model.device, model.dtype)
        ops = CompiledOps() if compile else GemvOps() if kernels == "triton-gemv" else \
            TritonOps() if kernels == "triton" else None
        self.runner = Runner(model, max_batch_size, self.max_model_len + 4, ops, kernels,  # +3: finish a character
                             sampling_kernel(choice, kernels, model.device, model.dtype),
                             kept=kept_prefixes if share_prompts else 0)
        on_cuda = model.device.type == "cuda"
        static = on_cuda if static is None else static
        cuda_graphs = static and on_cuda if cuda_graphs is None else cuda_graphs
        if cuda_graphs and not static:
            raise ValueError("cuda_graphs needs static=True: graphs replay static-shaped steps")
        if cuda_graphs and not on_cuda:
            raise ValueError(f"cuda_graphs needs a model on a CUDA device, not {model.device}")
        self.static = StaticDecoder(self.runner, cuda_graphs, lookahead_rows) if static else None
        self.slots = SlotAllocator(max_batch_size)
        self.scheduler = Scheduler(max_batch_size, max_queue, prefill_chunk, self.runner.batch_window())
        self.jump_forward = (0 if on_cuda else 2) if jump_forward is None else jump_forward
        # forced bytes at once at most: with the byte before them one chunk, which fits a row of a prefill batch
        self.most_forced = min(prefill_chunk, self.runner.batch_window() or prefill_chunk) - 1
        self.forced_bytes = 0  # bytes that guides forced so far (prefilled as chunks, not sampled a step each)
        self.sequences: dict[str, Sequence] = {}
        self._aborted: list[Sequence] = []
        self._first_logits: dict[str, torch.Tensor] = {}  # prompt's last logits of PREFILLED sequences
        self.share_prompts = share_prompts
        self.sharing = PromptSharing(self.scheduler, self.slots, self.runner, self._first_logits)
        self.last_admitted: list[str] = []  # request ids that left the waiting queue in the last step() call
        # (for the first time: not after a preemption)
        self.last_preempted: list[str] = []  # request ids that gave their slots up in the last step() call
        self.last_preempted_for_pages: list[str] = []  # of those, the ones preempted where the pages ran short
        self.admission_paused = False  # a sequence was preempted for the global cache's pages, and none left since
        self._rng = random.Random(seed)
        self.overlap = on_cuda if overlap is None else overlap
        self.first_byte_at_once = not on_cuda and not self.overlap if first_byte_at_once is None else first_byte_at_once
        self._queued: Queued | None = None
        self._failed: BaseException | None = None  # raised by the next step(): queueing failed after a step
        if global_cache_bytes is not None:
            fix_global_cache(self, global_cache_bytes)

    # ------------------------------------------------------------------ API
    def add_request(self, request_id: str, prompt: bytes, params: SamplingParams | None = None,
                    priority: int = 0) -> None:
        """Queue a request. `priority`: lower leaves the waiting queue first, before requests of higher values
        that came earlier, and preempts a running request of a higher value where no slot is free (vLLM's
        priority scheduling; module docstring)."""
        params = params or SamplingParams()
        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = encode(prompt)
        if len(ids) + params.max_bytes > self.max_model_len:
            raise PromptTooLong(f"prompt of {len(ids) - 1} bytes plus max_bytes={params.max_bytes} exceeds the "
                                f"model's context of {self.max_model_len} bytes (BOS included)")
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        seq = Sequence(request_id, ids, params, seed, priority=priority)
        self.scheduler.add(seq)
        self._force(seq)  # what its guide forces first is prefilled with its prompt (once the queue took it)
        self.sequences[request_id] = seq

    def abort(self, request_id: str) -> bool:
        """Stop a request; its slot is free at once and its last output (finish_reason "abort")
        comes with the next step. False if the request is unknown or already finished."""
        seq = self.sequences.get(request_id)
        if seq is None or seq.status is Status.FINISHED:
            return False
        seq.finish_reason = "abort"
        queued = self._queued
        if queued is not None and seq.closes_last and any(s is seq for s in queued.plan.decode):
            seq.num_patches -= 1  # the patch its queued step closes, never reported (as without overlap)
        self._release(seq)
        self._aborted.append(seq)
        return True

    def has_work(self) -> bool:
        return bool(self._queued or self.scheduler.num_waiting or self.scheduler.num_running or self._aborted
                    or self._failed)

    @property
    def kernels(self) -> str:
        """"torch", "triton" or "triton-gemv": whose kernels decode steps run (kernels.py)."""
        return self.runner.kernels

    @property
    def uses_cuda_graphs(self) -> bool:
        return self.static is not None and self.static.graphs is not None

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def capacity(self) -> int:
        """The most sequences it holds at once, running and waiting: more at once are never accepted."""
        return self.max_batch_size + self.scheduler.max_waiting

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    def cache_bytes(self) -> dict[str, int]:
        """Memory the caches take now, by part (Runner.cache_bytes); safe to call from another thread."""
        return self.runner.cache_bytes()

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Run one step (the one queued by the last call, with `overlap`) and return its outputs."""
        if self._failed is not None:
            failed, self._failed = self._failed, None
            raise failed
        self.last_admitted, self.last_preempted, self.last_preempted_for_pages = [], [], []
        queued, self._queued = self._queued or self._queue(), None
        outputs = self._complete(queued)
        if self.overlap and (self.scheduler.num_waiting or self.scheduler.num_running):
            try:
                self._queued = self._queue()
            except Exception as e:  # noqa: BLE001 - this step's outputs go back first; the next call raises
                self._failed = e
        return outputs

    def _queue(self) -> Queued:
        """Admit what can be admitted, plan, and queue all of the step's device work; bring what the
        host needs over in one transfer (`_complete` waits for it, the step's one wait for the device)."""
        sharing, share = self.sharing, self.share_prompts
        if share:
            sharing.look_again()
        # (while the global cache's pages are short, nobody is admitted: _plan)
        for _, running in [] if self.admission_paused else self.scheduler.preemptible():
            self._preempt(running)
        # a request that scores its prompt computes every byte's score: it follows only a leader that scores
        # its own (sharing.scores_cover), and never resumes from a finished request's slot
        admit = (lambda seq: None) if self.admission_paused else \
            (lambda seq: sharing.allocate(seq, resume=share and not seq.scores_prompt))
        for seq in self.scheduler.admit(admit):
            if not seq.preemptions:
                self.last_admitted.append(seq.request_id)
            self.runner.admit(seq.slot, seq.ids, seq.params, resumed=seq.processed > 0, num_patches=seq.num_patches,
                              generated=seq.generated,
                              guide_state=seq.guide_state)
            if share:
                sharing.follow(seq)
        plan = self._plan()
        transfer = HostTransfer()
        chunk = None
        if plan.prefill is not None:
            rows = self._prefill_rows(plan)
            chunk = self.runner.prefill_start([s.slot for s, _, _ in rows], [s.ids[a:b] for s, a, b in rows],
                                              [a for _, a, _ in rows], transfer)
        decoded = self._decode(plan.decode, transfer) if plan.decode else None
        return Queued(plan, transfer, chunk, decoded, *self._queue_firsts(plan, transfer))

    def _plan(self) -> Plan:
        """The scheduler's plan, with pages of the global model's cache (paged_cache.py) for the patches its
        rows may write: a closing row's one more, and a prefill row's one per byte at most. Where the pool
        of pages cannot grow that far (CacheFull: out of memory), the states kept for later prompts give
        their pages back first (sharing.py); then the prefill is cut to what the pages hold; where even a
        closing row's one patch and a byte of each prefill row do not fit, the least urgent sequence (of
        equal priorities, the one that came last) is preempted, as vLLM preempts where its cache is full: its
        pages go back, it waits again and goes on later where it was (its output unchanged), and nobody is
        admitted until a sequence leaves. A sequence alone that does not fit fails (finish_reason "error")."""
        cache = self.runner.global_kv
        while True:
            jumped = self.scheduler.jumped
            plan = self.scheduler.plan()
            closing = [s for s in plan.decode if s.closes_last]
            rows = self._prefill_rows(plan) if plan.prefill is not None else []
            try:
                cache.reserve_rows([(s.slot, s.num_patches, s.num_patches + 1) for s in closing]
                                   + [(s.slot, s.num_patches, s.num_patches + b - a) for s, a, b in rows])
                return plan
            except CacheFull:
                pass
            if self._reclaim():
                self.scheduler.jumped = jumped
                continue
            # what it cannot do without: a closing row's one more patch, and a byte of each prefill row
            needs = closing + [s for s, _, _ in rows]
            try:
                cache.reserve_rows([(s.slot, s.num_patches, s.num_patches + 1) for s in needs])
            except CacheFull as e:
                self.scheduler.jumped = jumped
                if len(self.scheduler.active) > 1:
                    self._preempt(self.scheduler.least_urgent(), retain=False)
                    self.admission_paused = True
                    continue
                alone = self.scheduler.active[0]
                self._fail(alone, f"{e}; this sequence alone ({alone.num_patches} patches) needs more than the "
                                  f"device holds. A shorter --max-model-len leaves it out at once")
                continue
            if rows:  # the prefill, cut to the bytes whose patches the pages surely hold
                seq, start, end = rows[0]
                plan.prefill, plan.batch = seq, []
                plan.chunk = (start, min(end, start + cache.room(seq.slot, seq.num_patches)))
                cache.reserve_rows([(seq.slot, seq.num_patches, seq.num_patches + plan.chunk[1] - start)])
            return plan

    def _reclaim(self) -> bool:
        """The pages of the states kept for later prompts (retained slots, kept prefixes) go back; whether any
        did."""
        cache = self.runner.global_kv
        freed = [slot for slot in self.sharing.forget_retained() if cache.held[slot]]
        for slot in freed:
            cache.trim(slot, 0)
        return bool(freed)

    def _queue_firsts(self, plan: Plan, transfer: HostTransfer):
        """The first bytes of the prefilled sequences in `plan.first` (those with max_bytes 0 leave it: they
        finish without one), their prompts' scores and their forced bytes' -> (firsts, scored, forced,
        prefill_only) of a Queued."""
        scored = {s.request_id: self._prompt_scores(s, transfer) for s in plan.first if s.scores_prompt}
        forced = {s.request_id: self._forced_scores(s, transfer) for s in plan.first if s.forced_scores}
        prefill_only = [s for s in plan.first if s.params.max_bytes == 0]
        if prefill_only:
            plan.first = [s for s in plan.first if s.params.max_bytes]
            for s in prefill_only:
                self._first_logits.pop(s.request_id, None)
        firsts = self._sample(plan.first, [self._first_logits.pop(s.request_id) for s in plan.first], transfer)
        return firsts, scored, forced, prefill_only

    def _first_bytes_now(self) -> list[StepOutput]:
        """With first_byte_at_once: the first bytes of the prompts whose prefill this step finished (followers
        that forked at their prompt's end among them), sampled and reported in this step."""
        ready = [s for s in self.scheduler.active if s.status is Status.PREFILLED]
        if not ready:
            return []
        plan, transfer = Plan([], None, first=ready), HostTransfer()
        return self._complete(Queued(plan, transfer, None, None, *self._queue_firsts(plan, transfer)))

    def _complete(self, q: Queued) -> list[StepOutput]:
        """Wait for a queued step, apply its bytes and stops, finish its prefill chunk on its patch
        boundaries; requests aborted since it was queued are reported as aborted, their bytes dropped."""
        outputs = [self._final(seq, b"", False) for seq in self._aborted]
        self._aborted.clear()
        q.transfer.fetch()
        if q.decoded is not None:
            outputs += self._report(q.plan.decode, q.decoded())
        if q.firsts is not None:
            for seq in q.plan.first:
                if seq.status is Status.PREFILLED:
                    seq.status = Status.RUNNING
            outputs += self._with_forced_logprobs(self._with_prompt_logprobs(self._report(q.plan.first, q.firsts()), q),
                                                  q)
        for seq in q.prefill_only:
            if seq.status is Status.PREFILLED:  # else aborted since, and reported
                seq.status, seq.finish_reason = Status.RUNNING, "length"
                outputs += self._with_prompt_logprobs([self._finish(seq, b"", False)], q)
        if q.chunk is not None:
            self._prefill_finish(q.plan, q.chunk, q.transfer)
            if self.first_byte_at_once:
                outputs += self._first_bytes_now()
        return outputs

    # ------------------------------------------------------------------ step kinds
    def _decode(self, seqs: list[Sequence], transfer: HostTransfer) -> Callable[[], Sampled]:
        inputs = ([s.slot for s in seqs], [s.processed for s in seqs], [s.ids[-1] for s in seqs],
                  [s.closes_last for s in seqs], [s.num_patches for s in seqs], [s.open_len for s in seqs])
        if self.static is not None:
            sampled = self.static.step(*inputs, [s.params for s in seqs], [s.seed for s in seqs],
                                       [s.eos_allowed(len(s.ids)) for s in seqs], transfer)
        else:
            sampled = self._sample(seqs, [self.runner.decode(*inputs)], transfer)
        for s in seqs:
            s.num_patches += s.closes_last
            s.open_len = 0 if s.closes_last else s.open_len + 1
            s.processed += 1
        return sampled

    @staticmethod
    def _prefill_rows(plan: Plan) -> list[tuple[Sequence, int, int]]:
        """(sequence, start, end) of each row of the step's prefill: the chunk, or the batch's rests."""
        if plan.batch:
            return [(s, s.processed, s.prefill_len) for s in plan.batch]
        return [(plan.prefill, *plan.chunk)]

    def _prefill_finish(self, plan: Plan, chunk: PrefillStart, transfer: HostTransfer) -> None:
        """Every row is finished: one aborted during the step leaves writes in its freed slot that no
        later reader sees (a new occupant's prefill starts over), and is not bookkept."""
        rows = self._prefill_rows(plan)
        scoring = [self._scored_rows(s, a, b) for s, a, b in rows]
        results = self.runner.prefill_finish(chunk, transfer, [s.num_patches for s, _, _ in rows],
                                             [s.open_len for s, _, _ in rows],
                                             [s.ids[a + 1:a + 1 + n] if n else None for (s, a, _), (n, _) in
                                              zip(rows, scoring)], [top for _, top in scoring])
        for (seq, start, end), result in zip(rows, results):
            if seq.status is Status.PREFILLING:  # else aborted during the step
                self._prefilled(seq, start, end, result)

    @staticmethod
    def _score_ranges(seq: Sequence, start: int, end: int) -> tuple[int, tuple[int, int] | None]:
        """Which rows of a chunk of positions [start, end) its prefill scores, counted from the chunk's first: the
        first n, before its prompt's bytes (prompt_logprobs), and [a, b), before its forced bytes (with
        logprobs) -> (n, (a, b) or None)."""
        prompt_rows = max(min(end, seq.prompt_len - 1) - start, 0) if seq.scores_prompt else 0
        first, last = seq.scores_forced_from, min(end, len(seq.ids) - 1)
        if first is None or last <= max(start, first):
            return prompt_rows, None
        return prompt_rows, (max(start, first) - start, last - start)

    def _scored_rows(self, seq: Sequence, start: int, end: int) -> tuple[int, int]:
        """How many of a chunk's first rows its prefill scores, and with how many alternatives (after a preemption
        the rows between its prompt's and its forced bytes', of bytes it reported, are scored too, and left out)."""
        prompt_rows, forced = self._score_ranges(seq, start, end)
        top = seq.params.prompt_logprobs if prompt_rows else 0
        return (prompt_rows, top) if forced is None else (forced[1], max(top, seq.params.logprobs))

    def _prefilled(self, seq: Sequence, start: int, end: int, result: ChunkResult) -> None:
        """A prefill chunk of positions [start, end) is done: its patches, scores and first logits."""
        if result.scores is not None:
            prompt_rows, forced = self._score_ranges(seq, start, end)
            if prompt_rows:
                seq.prompt_scores.append(result.scores.rows(0, prompt_rows, seq.params.prompt_logprobs))
            if forced is not None:
                seq.forced_scores.append(result.scores.rows(*forced, seq.params.logprobs))
        for i, closes in enumerate(result.closes):
            seq.record_close(start + i, closes)
        seq.processed, seq.num_patches, seq.open_len = end, seq.num_patches + result.completed, result.open_len
        # the pages reserved for a patch per byte (_plan) that the chunk's patches did not take go back
        self.runner.global_kv.trim(seq.slot, seq.num_patches)
        if end == seq.prefill_len:  # its first byte is sampled with the next step's work (or at once)
            seq.status = Status.PREFILLED
            self._first_logits[seq.request_id] = result.last_logits
        self.sharing.prefilled(seq, result.last_logits)

    def _prompt_scores(self, seq: Sequence, transfer: HostTransfer) -> tuple[int, int, int]:
        """Register a prefilled sequence's prompt scores with the step's transfer."""
        parts, seq.prompt_scores = seq.prompt_scores, []
        return self._register_scores(parts, seq.params.prompt_logprobs or 0, transfer)

    def _forced_scores(self, seq: Sequence, transfer: HostTransfer) -> tuple[int, int, int]:
        """Register the scores of a prefilled sequence's forced bytes with the step's transfer."""
        parts, seq.forced_scores = seq.forced_scores, []
        return self._register_scores(parts, seq.params.logprobs, transfer)

    def _register_scores(self, parts: list[PromptScores], n: int, transfer: HostTransfer) -> tuple[int, int, int]:
        empty = PromptScores(*(torch.zeros(0, *shape, device=self.model.device) for shape in ((), (n,), (n,))))
        s = PromptScores.join(parts) if parts else empty  # a prompt of no bytes
        return transfer.add(s.chosen), transfer.add(s.values), transfer.add(s.ids)

    @staticmethod
    def _scores_read(q: Queued, handles: tuple[int, int, int]) -> list[tuple[float, list[tuple[int, float]]]]:
        """Scores registered with a step's transfer (_register_scores), on the host: (logprob, top [(id, logprob)])
        per row, as StepOutput.logprobs."""
        chosen, values, ids = (q.transfer.get(h) for h in handles)
        n = len(values) // max(len(chosen), 1)
        return [(c, [(int(ids[i]), values[i]) for i in range(t * n, t * n + n)]) for t, c in enumerate(chosen)]

    def _with_prompt_logprobs(self, outputs: list[StepOutput], q: Queued) -> list[StepOutput]:
        """Attach the prompt scores that came with the step to their requests' first outputs (a request whose guide
        forced its first bytes has an output for each)."""
        scored = dict(q.scored)
        for out in outputs if scored else ():
            handles = scored.pop(out.request_id, None)
            if handles is not None:
                out.prompt_logprobs = self._scores_read(q, handles)
        return outputs

    def _with_forced_logprobs(self, outputs: list[StepOutput], q: Queued) -> list[StepOutput]:
        """Give the outputs of forced bytes that came with the step their logprobs, scored by their prefill: a
        request's first outputs, one per forced byte."""
        for rid, handles in q.forced.items():
            rows = iter(self._scores_read(q, handles))
            for out in outputs:
                if out.request_id == rid:
                    row = next(rows, None)
                    if row is None:
                        break
                    out.logprobs = row
        return outputs

    def _sample(self, seqs: list[Sequence], logits: list[torch.Tensor],
                transfer: HostTransfer) -> Callable[[], Sampled] | None:
        """Sample each sequence's next byte from `logits`, (B, V) blocks that stack to one row per
        sequence; the results come with the transfer."""
        if not seqs:
            return None
        return self.runner.sample_and_look_ahead(logits, [s.slot for s in seqs], [len(s.ids) for s in seqs],
                                                 [s.params for s in seqs], [s.seed for s in seqs],
                                                 [s.eos_allowed(len(s.ids)) for s in seqs], transfer)

    def _report(self, seqs: list[Sequence], sampled: Sampled) -> list[StepOutput]:
        """Accept each sequence's sampled byte, apply stops, report."""
        outputs, guided = [], []
        for b, seq in enumerate(seqs):
            if seq.status is Status.FINISHED:  # aborted after its step was queued: reported already
                continue
            if seq.pending:
                outputs += self._forced_outputs(seq)
            position = len(seq.ids)
            patch_start = seq.patch_starts[-1] == position
            seq.accept(sampled.ids[b], self.max_model_len)
            new = ONE_BYTE[seq.generated[-1]] if len(seq.ids) > position else b""
            if new:
                seq.closes_last = sampled.closes[b]
                seq.record_close(position, sampled.closes[b])
            logprobs = sampled.logprobs[b] if sampled.logprobs and seq.params.logprobs is not None else None
            if seq.finish_reason is not None:
                outputs.append(self._finish(seq, new, patch_start and bool(new), logprobs))
            else:
                if seq.params.guide is not None:
                    if self._force(seq):
                        self._jump(seq, position)
                    guided.append(seq)
                outputs.append(StepOutput(seq.request_id, new, patch_start, logprobs, False))
        if guided:  # the bytes their guides allow next
            self.runner.follow_guides([s.slot for s in guided], [s.guide_state for s in guided])
        return outputs

    # ------------------------------------------------------------------ guided jump-forward
    def _force(self, seq: Sequence) -> int:
        """Append the bytes its guide forces next, if enough (Sequence.force). With logprobs asked for, its
        prefill scores them (the model's distribution, as a sampled byte's are)."""
        p = seq.params
        if not self.jump_forward or p.guide is None:
            return 0
        n = seq.force(self.jump_forward, self.most_forced, self.max_model_len)
        self.forced_bytes += n
        return n

    def _jump(self, seq: Sequence, position: int) -> None:
        """A running sequence's guide forced bytes after the one it sampled for `position`: that byte and those are
        prefilled as one chunk (the scheduler plans it with other prompts' rests), and the byte after them is
        sampled from the chunk's last logits as a prompt's first byte is."""
        seq.status = Status.PREFILLING
        if seq.patch_starts[-1] == position + 1:  # its chunk records whether the sampled byte closes its patch
            seq.patch_starts.pop()
        seq.scores_prompt = False  # (reported with its first byte)
        self.runner.count_forced(seq.slot, seq.generated[-seq.pending:])

    @staticmethod
    def _forced_outputs(seq: Sequence) -> list[StepOutput]:
        """Report a sequence's forced bytes, run through the models now (their patch starts known), before the
        byte sampled after them: an output each, as if each had taken a step."""
        first = len(seq.ids) - seq.pending
        starts = set(seq.patch_starts[bisect.bisect_left(seq.patch_starts, first):])
        outputs = [StepOutput(seq.request_id, ONE_BYTE[b], first + i in starts, None, False)
                   for i, b in enumerate(seq.generated[-seq.pending:])]
        seq.pending = 0
        return outputs

    # ------------------------------------------------------------------ bookkeeping
    def _fail(self, seq: Sequence, message: str) -> None:
        """Stop a sequence the engine cannot go on with (nothing is queued for it): reported with the step's
        outputs, finish_reason "error"."""
        seq.finish_reason, seq.error, seq.error_code = "error", message, "out_of_memory"
        self._release(seq)
        self._aborted.append(seq)

    def _preempt(self, seq: Sequence, retain: bool = True) -> None:
        """A running sequence gives its slot up to a more urgent request (or the global cache's pages: `retain`
        False) and waits again (nothing is queued for it). What its slot holds is retained as a finished
        request's is, for a prompt that begins with it (its own, where nobody took the slot since)."""
        if self.share_prompts and retain:
            self.sharing.retain(seq)
        self._first_logits.pop(seq.request_id, None)
        self._release_slot(seq.slot)
        self.sharing.release(seq)
        self.scheduler.preempt(seq)
        self.last_preempted.append(seq.request_id)
        if not retain:
            self.last_preempted_for_pages.append(seq.request_id)

    def _release(self, seq: Sequence) -> None:
        self._first_logits.pop(seq.request_id, None)
        if seq.slot is not None:
            self._release_slot(seq.slot)
            seq.slot = None
            self.admission_paused = False  # pages went back: the waiting may come in again
        self.sharing.release(seq)
        self.scheduler.remove(seq)

    def _release_slot(self, slot: int) -> None:
        """A slot is free; its global cache pages go back unless its state is kept for a later prompt."""
        self.slots.release(slot)
        if slot not in self.sharing.retained:
            self.runner.global_kv.trim(slot, 0)

    def _finish(self, seq: Sequence, new: bytes, patch_start: bool, logprobs=None) -> StepOutput:
        if self.share_prompts and seq.finish_reason != "error":  # (a state that gave non-finite logits is no use)
            self.sharing.retain(seq)  # before its slot is released
        self._release(seq)
        return self._final(seq, new, patch_start, logprobs)

    def _final(self, seq: Sequence, new: bytes, patch_start: bool, logprobs=None) -> StepOutput:
        self.sequences.pop(seq.request_id, None)
        seq.drop_pending()  # aborted or failed before its forced bytes were reported
        prompt_patches, completion_patches = seq.patch_lengths()
        usage = Usage(seq.prompt_len - 1, len(seq.generated), len(prompt_patches), len(completion_patches),
                      seq.num_patches, max(min(seq.shared, seq.prompt_len) - 1, 0))  # BOS is not a prompt byte
        return StepOutput(seq.request_id, new, patch_start, logprobs, True, seq.finish_reason, seq.stop_reason, usage,
                          error=seq.error, error_code=seq.error_code)
