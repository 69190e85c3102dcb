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
  prefills only the rest (`allocate`). Otherwise slots are handed out lowest first as before, what
  they held or not (dense batches read caches in place, static.py).
A common prefix shorter than MIN_SHARED_PREFIX bytes is not worth a cut chunk: it is shared only
where it is a whole earlier prompt. A request that scores its prompt (prompt_logprobs) follows only
a leader that scores its own, and takes the leader's scores up to the fork with the state
(`scores_cover`); it never resumes in a retained slot, which keeps no scores. Outputs do not change
(up to rounding where a follower's chunks would have been cut elsewhere). Pure bookkeeping but for
the copies, which the runner makes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import SlotAllocator
from .runner import Runner
from .scheduler import Scheduler, Sequence, Status

MIN_SHARED_PREFIX = 64  # bytes


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many ids `a` and `b` share from the start."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)


def scores_cover(leader: Sequence, seq: Sequence) -> bool:
    """May `seq` follow `leader`: unless it scores its prompt (prompt_logprobs), whose scores up to the fork
    it then takes from the leader's, which must hold as many alternatives."""
    if not seq.scores_prompt:
        return True
    return leader.scores_prompt and leader.params.prompt_logprobs >= seq.params.prompt_logprobs


@dataclass
class Retained:
    """What a finished sequence left in its slot: the state after `ids` (positions, BOS included)."""

    ids: list[int]
    num_patches: int
    open_len: int
    patch_starts: list[int]


class PromptSharing:
    def __init__(self, scheduler: Scheduler, slots: SlotAllocator, runner: Runner,
                 first_logits: dict[str, torch.Tensor]):
        self.scheduler, self.slots, self.runner = scheduler, slots, runner
        self.first_logits = first_logits  # the engine's: logits a PREFILLED sequence samples its first byte from
        self.unled: list[Sequence] = []  # followers whose leader was aborted: they look again in `look_again`
        self.retained: dict[int, Retained] = {}  # by slot (free in the allocator)

    # ------------------------------------------------------------------ retained slots
    def allocate(self, seq: Sequence, resume: bool = True) -> int | None:
        """A slot for a sequence being admitted: with `resume`, a retained one whose state begins its prompt
        (the longest; the sequence resumes from it), else the lowest free slot."""
        best = None
        for slot, kept in self.retained.items() if resume else ():
            n = len(kept.ids)
            if (n < seq.prompt_len and n - 1 >= MIN_SHARED_PREFIX and (best is None or n > len(best[1].ids))
                    and seq.ids[:n] == kept.ids):
                best = slot, kept
        if best is not None:
            slot, kept = best
            del self.retained[slot]
            seq.resume(len(kept.ids), kept.num_patches, kept.open_len, kept.patch_starts)
            return self.slots.take(slot)
        slot = self.slots.allocate()
        self.retained.pop(slot, None)
        return slot

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
        sequence that has followers already (whose leader left) must not jump past theirs."""
        leader, fork_at = None, seq.processed
        limit = min([f.fork_at for f in seq.followers] + [seq.prompt_len])
        for s in self.scheduler.active:
            if s is seq:
                break
            if s.status is not Status.PREFILLING or not scores_cover(s, seq):
                continue
            shared = common_prefix(s.ids, seq.ids)  # positions, BOS included; s.ids is its prompt alone yet
            # a whole earlier prompt of some bytes, or a long enough prefix (BOS alone is not worth a copy)
            worth = shared == s.prompt_len > 1 or shared - 1 >= MIN_SHARED_PREFIX
            if worth and limit >= shared > max(s.processed, s.fork_at, fork_at):
                leader, fork_at = s, shared
        if leader is not None:
            seq.leader, seq.fork_at = leader, fork_at
            leader.followers.append(seq)

    def prefilled(self, seq: Sequence, last_logits: torch.Tensor) -> None:
        """A prefill chunk of `seq` is done (its fields updated): the followers whose fork it reached
        take their copies. `last_logits`: the chunk's at its last position."""
        for follower in [f for f in seq.followers if f.fork_at == seq.processed]:
            self._fork(seq, follower, last_logits)

    def _fork(self, leader: Sequence, seq: Sequence, last_logits: torch.Tensor) -> None:
        at = seq.fork_at
        self.runner.share_prompt(leader.slot, seq.slot, at, leader.num_patches, leader.open_len)
        leader.followers.remove(seq)
        seq.leader, seq.fork_at = None, 0
        seq.resume(at, leader.num_patches, leader.open_len, leader.patch_starts)
        if seq.scores_prompt:
            seq.prompt_scores = self.runner.fork_scores(leader.prompt_scores, at, last_logits,
                                                        seq.ids[at] if at < seq.prompt_len else None,
                                                        seq.params.prompt_logprobs)
        if at == seq.prompt_len:  # its first byte is sampled with the next step's work
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
