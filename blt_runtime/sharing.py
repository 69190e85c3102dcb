"""Shared prompts: which sequence copies whose state instead of prefilling a prefix again (engine.py).

The state of a slot after a prefix of positions depends on that prefix alone (the patches of a prefix
never change when bytes follow), so it can be taken from wherever it already exists:
- from a sequence still prefilling a prompt that shares a prefix with a new one (the `n` choices of
  a completion, the same few-shot examples before different questions): the new one follows it,
  the leader's prefill chunk is cut where the prefix ends, and the follower's slot takes a copy of
  the state there (`follow`, `prefilled`). A leader may follow another itself.
- from a finished request's slot, which is left as it was (retained) until it is needed: a new
  prompt that begins with everything that sequence ran through its models (its prompt and its
  completion but for the last byte: the next turn of a conversation) takes that slot over and
  prefills only the rest (`allocate`).
- from a kept prefix: a slot of its own (`Runner.kept_slots`, beyond those of running sequences)
  that holds the state after a prefix that a new prompt shared with a request seen before but not
  all of it (the same system prompt before another conversation). A finished or running request's
  slot is past that prefix, and a ring buffer keeps only the last window of positions, so its state
  there is gone: the new prompt's own prefill is cut where the prefixes part, and a copy of its
  state there is kept (`keep`). A later prompt that begins with it takes a copy in turn, and the
  prefix stays for the next (`allocate`). With every kept slot taken, the one used longest ago
  gives way. Running sequences never take kept slots: a kept prefix lasts through any load.
Otherwise slots are handed out lowest first as before, what they held or not (dense batches read
caches in place, static.py).
A common prefix shorter than MIN_SHARED_PREFIX bytes is not worth a cut chunk: it is shared only
where it is a whole earlier prompt. A request that scores its prompt (prompt_logprobs) follows only
a leader that scores its own, and takes the leader's scores up to the fork with the state
(`scores_cover`); it never resumes in a retained slot, which keeps no scores. One whose guide forced
bytes that need logprobs (scheduler.Sequence.force) copies no state past the position before the first
of them: its own prefill scores them. Outputs do not change
(up to rounding where a follower's chunks would have been cut elsewhere). Where the global cache's
pages run short, every retained state and kept prefix is forgotten (`forget_retained`) and its pages go
back. Pure bookkeeping but for the copies, which the runner makes (the global cache's pages are shared,
not copied: paged_cache.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import SlotAllocator
from .runner import Runner
from .scheduler import Scheduler, Sequence, Status

MIN_SHARED_PREFIX = 64  # bytes


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many ids `a` and `b` share from the start. Slice comparisons, which run in C, over spans that
    double from 64 ids, then bisecting the span where they part: it is asked about every slot a new
    prompt could share with, on the engine's thread (about 1.5 us where they part at once, 30 at 8,000
    ids, on this project's CPU machine)."""
    n = min(len(a), len(b))
    lo, span = 0, 64  # a[:lo] == b[:lo]
    while lo < n:
        hi = min(lo + span, n)
        if a[lo:hi] != b[lo:hi]:
            break
        lo, span = hi, 2 * span
    else:
        return n
    hi -= 1  # they part in [lo, hi)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def scores_cover(leader: Sequence, seq: Sequence) -> bool:
    """May `seq` follow `leader`: unless it scores its prompt (prompt_logprobs), whose scores up to the fork
    it then takes from the leader's, which must hold as many alternatives."""
    if not seq.scores_prompt:
        return True
    return leader.scores_prompt and leader.params.prompt_logprobs >= seq.params.prompt_logprobs


@dataclass
class Retained:
    """The state after `ids` (positions, BOS included) that a slot holds: a free one, what a finished
    sequence left there; a kept slot, a kept prefix."""

    ids: list[int]
    num_patches: int
    open_len: int
    patch_starts: list[int]
    kept: bool = False  # a kept prefix (`keep`): copied into the slots of the prompts that begin with it
    used: int = 0  # when a kept prefix was made, last copied or asked for again (PromptSharing.clock)


class PromptSharing:
    def __init__(self, scheduler: Scheduler, slots: SlotAllocator, runner: Runner,
                 first_logits: dict[str, torch.Tensor]):
        self.scheduler, self.slots, self.runner = scheduler, slots, runner
        self.first_logits = first_logits  # the engine's: logits a PREFILLED sequence samples its first byte from
        self.unled: list[Sequence] = []  # followers whose leader was aborted: they look again in `look_again`
        self.retained: dict[int, Retained] = {}  # by slot: free in the allocator, or one of the kept slots
        self.clock = 0  # counts kept prefixes made, copied or asked for again, for `Retained.used`

    # ------------------------------------------------------------------ retained slots and kept prefixes
    def allocate(self, seq: Sequence, resume: bool = True) -> int | None:
        """A slot for a sequence being admitted. With `resume`, the sequence starts from the longest retained
        state that begins its prompt: it takes a finished request's slot over, or gets a copy of a kept
        prefix in the lowest free slot; and where its prompt shares more with a state seen before than
        that, its prefill will keep a copy of its own state there (`keep_at`). Else the lowest free slot."""
        best = None
        most = seq.prefill_len - 1 if seq.scores_forced_from is None else seq.scores_forced_from
        for slot, held in self.retained.items() if resume else ():
            n = len(held.ids)
            if (n <= most and n - 1 >= MIN_SHARED_PREFIX and (best is None or n > len(best[1].ids))
                    and seq.ids[:n] == held.ids):
                best = slot, held
        if best is not None and not best[1].kept:
            slot = self.slots.take(best[0])
        else:
            slot = self.slots.allocate()
            if slot is None:
                return None
            if best is not None:
                source, held = best
                self.runner.share_prompt(source, slot, len(held.ids), held.num_patches, held.open_len)
                self.clock += 1
                held.used = self.clock
        if best is not None:
            held = best[1]
            seq.resume(len(held.ids), held.num_patches, held.open_len, held.patch_starts)
        if resume and self.runner.kept_slots:
            self._plan_keep(seq)  # before the slot's own state is gone
        self.retained.pop(slot, None)
        return slot

    def _plan_keep(self, seq: Sequence) -> None:
        """Where its prompt shares more than it resumed with (MIN_SHARED_PREFIX bytes at least) with the state
        of a retained slot or of a request admitted before, its prefill is cut there and a copy kept. At
        most up to its prompt's last byte, which it prefills itself: a prompt the same as its own takes
        the copy, and prefills only that byte for the logits of its first."""
        at = max([common_prefix(held.ids, seq.ids) for held in self.retained.values()]
                 + [common_prefix(s.ids, seq.ids) for s in self.scheduler.active], default=0)
        at = min(at, seq.prefill_len - 1)
        if at - max(seq.processed, 1) >= MIN_SHARED_PREFIX:
            seq.keep_at = at

    def keep(self, seq: Sequence) -> None:
        """Its prefill has reached `keep_at`: copy its state into a kept slot. Not if a kept prefix begins it
        and falls short of it by less than MIN_SHARED_PREFIX bytes (requests arriving together fork from
        one leader one after another where their prompts part); in the place of a kept prefix that it
        begins and that is less than that longer (it serves more prompts). Else into an empty kept
        slot, or in the place of the kept prefix used longest ago."""
        at, seq.keep_at = seq.keep_at, 0
        ids, slot = seq.ids[:at], None
        kept = [s for s in self.runner.kept_slots if s in self.retained]
        for s in kept:
            held = self.retained[s].ids
            n = common_prefix(held, ids)
            if n == len(held) and at - n < MIN_SHARED_PREFIX:
                self.clock += 1
                self.retained[s].used = self.clock  # asked for again: the last to give way
                return
            if n == at and len(held) - at < MIN_SHARED_PREFIX:
                slot = s
        if slot is None:
            empty = [s for s in self.runner.kept_slots if s not in self.retained]
            slot = empty[0] if empty else min(kept, key=lambda s: self.retained[s].used)
        self.runner.share_prompt(seq.slot, slot, at, seq.num_patches, seq.open_len)
        self.clock += 1
        self.retained[slot] = Retained(ids, seq.num_patches, seq.open_len, [s for s in seq.patch_starts if s <= at],
                                       kept=True, used=self.clock)

    def forget_retained(self) -> list[int]:
        """Every state kept for a later prompt is forgotten (the global cache needs their pages back): their
        slots."""
        slots = list(self.retained)
        self.retained.clear()
        return slots

    def retain(self, seq: Sequence) -> None:
        """A sequence finishes (not aborted): keep what its slot holds for a prompt that begins with it.
        Positions run through the models: every id but a last one that was sampled and never fed."""
        if seq.status is not Status.RUNNING or seq.processed - 1 < MIN_SHARED_PREFIX:
            return
        self.retained[seq.slot] = Retained(seq.ids[:seq.processed], seq.num_patches, seq.open_len,
                                           [s for s in seq.patch_starts if s <= seq.processed])

    # ------------------------------------------------------------------ leaders and followers
    def look_again(self) -> None:
        """Followers of aborted leaders look for another. Not in abort() itself: with overlap a chunk
        queued before it may already run past the prefix they would share."""
        for seq in self.unled:
            if seq.status is Status.PREFILLING:
                self.follow(seq)
        self.unled.clear()

    def follow(self, seq: Sequence) -> None:
        """Make a sequence just admitted (or whose leader left) follow the one, among those admitted
        before it whose prefill has not passed the prefix it shares with them, with which it shares the
        longest prefix beyond what it holds already, if any is worth it. A leader may follow another
        itself: its state then jumps to its own fork, so a follower's fork must lie beyond that, and a
        sequence that has followers already (whose leader left) must not jump past theirs, nor one whose
        forced bytes need logprobs past the position from which its own prefill scores them (it forks there,
        where the prefix shared goes on)."""
        leader, fork_at = None, seq.processed
        limit = min([f.fork_at for f in seq.followers] + [seq.prefill_len])
        if seq.scores_forced_from is not None:  # its forced bytes are scored by its own prefill
            limit = min(limit, seq.scores_forced_from)
        for s in self.scheduler.active:
            if s is seq:
                break
            if s.status is not Status.PREFILLING or not scores_cover(s, seq):
                continue
            # positions, BOS included (s.ids is what it prefills), up to where it may take a copy
            shared = min(common_prefix(s.ids, seq.ids), limit)
            # a whole earlier prompt of some bytes, or a long enough prefix (BOS alone is not worth a copy)
            worth = shared == s.prefill_len > 1 or shared - 1 >= MIN_SHARED_PREFIX
            if worth and limit >= shared > max(s.processed, s.fork_at, fork_at):
                leader, fork_at = s, shared
        if leader is not None:
            seq.leader, seq.fork_at = leader, fork_at
            leader.followers.append(seq)

    def prefilled(self, seq: Sequence, last_logits: torch.Tensor) -> None:
        """A prefill chunk of `seq` is done (its fields updated): the followers whose fork it reached
        take their copies, and a copy is kept if it reached `keep_at`. `last_logits`: the chunk's at its
        last position."""
        if seq.keep_at and seq.keep_at == seq.processed:
            self.keep(seq)
        for follower in [f for f in seq.followers if f.fork_at == seq.processed]:
            self._fork(seq, follower, last_logits)

    def _fork(self, leader: Sequence, seq: Sequence, last_logits: torch.Tensor) -> None:
        at = seq.fork_at
        self.runner.share_prompt(leader.slot, seq.slot, at, leader.num_patches, leader.open_len)
        leader.followers.remove(seq)
        seq.leader, seq.fork_at = None, 0
        seq.resume(at, leader.num_patches, leader.open_len, leader.patch_starts)
        if seq.keep_at == at:
            self.keep(seq)
        elif seq.keep_at < at:  # its state jumped past it
            seq.keep_at = 0
        if seq.scores_prompt:
            seq.prompt_scores = self.runner.fork_scores(leader.prompt_scores, at, last_logits,
                                                        seq.ids[at] if at < seq.prefill_len else None,
                                                        seq.params.prompt_logprobs)
        if at == seq.prefill_len:  # its first byte is sampled with the next step's work (or at once)
            seq.status = Status.PREFILLED
            self.first_logits[seq.request_id] = last_logits
        for follower in [f for f in seq.followers if f.fork_at == at]:  # its own followers forking there
            self._fork(seq, follower, last_logits)

    def release(self, seq: Sequence) -> None:
        """A sequence leaves (finished or aborted): off its leader's list; its followers look again."""
        if seq.leader is not None:
            seq.leader.followers.remove(seq)
            seq.leader, seq.fork_at = None, 0
        for follower in seq.followers:  # it was aborted while prefilling
            follower.leader, follower.fork_at = None, 0
        self.unled += seq.followers
        seq.followers = []
