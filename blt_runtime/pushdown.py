"""Guides whose texts nest without a bound: a grammar's rules that refer to themselves, followed with a stack.

Owns `PushdownGuide` and `ProductGuide`. A ByteGuide (guide.py) is one automaton, which holds no recursion but
repetition; here each rule is an automaton over bytes and the rules it names (guide.determinised), and a
guide's state is the set of stacks of automaton states that the text so far can be parsed into (one for the
grammars people write: more where a prefix is ambiguous, MAX_STACKS at most). A stack's last state is the
innermost rule's; naming a rule pushes its start, and where a rule's text may end the stack pops back to the
state after the name. A state's allowed bytes are those of its stacks' last states, and the text may end
where some stack is empty. Every automaton state can still reach the end of its rule (states that cannot are
removed, and so are names of rules that derive nothing), so every allowed byte keeps the text a prefix of a
match: the guide is exact, as ByteGuide is. Refused, with a GuideError: a rule that can name itself before
its first byte (left recursion through other rules; grammar.py rewrites a rule's direct left recursion as
repetition first), a grammar that derives nothing.

With a ByteGuide of bad words (vLLM's bad_words) the stacks alone no longer say whether a text can end: the
words may rule out every way on. A ProductGuide pairs the two guides' states and allows a byte only where the
pair can still end in a match of both (each rule's possible ends worked out once per pair of guides).

What the engine asks of a guide, as of a ByteGuide: `start`, `step(state, byte)` (None where the byte cannot
follow), `allowed_bytes`, `accepts`, `ends`, and `mask(state)`, the row of `bias_rows` that holds the state's
logit biases. States are frozensets of tuples, made as texts reach them; transitions are remembered (MEMO
of them, then forgotten and found again; not those of states deeper than MEMO_FRAMES, which are rarely met
twice), and rows of biases are made for the distinct masks met so far. Rules are followed MAX_DEPTH deep at
most (JSON nested 1,000 deep): past that a rule's name is not entered, and a byte that would need it is not
allowed (a text that then has no way on ends its request with an error).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from .errors import GuideError
from .guide import MAX_SECONDS, MAX_STATES, ByteGuide, _Nfa, determinised

__all__ = ["Guide", "ProductGuide", "PushdownGuide"]

MAX_STACKS = 256  # parses of one prefix at once (an ambiguous grammar); more is a GuideError at that byte
MAX_DEPTH = 1_000  # rules inside rules; a deeper name is not followed
MEMO = 20_000  # transitions remembered per guide (of states of MEMO_FRAMES frames at most), then forgotten: about
# 0.4 KB each on a random walk through json_object, 1 KB or so at most (blt-serve keeps 8 guides)
MEMO_FRAMES = 64  # a deeper state is worked out again when met again (its key alone would hold its whole stack)
_MISSING = object()


class _Followed:
    """What a PushdownGuide and its product with a ByteGuide share: states made as texts reach them, their
    transitions and masks remembered (MEMO of each, of states of MEMO_FRAMES frames at most), and rows of
    biases made for the distinct masks met. A subclass gives `start`, `_successor`, `_bits` (the allowed
    bytes, as bits), `accepts` and `_frames` (a state's size)."""

    def __init__(self):
        self._steps: dict = {}
        self._info: dict = {}  # state -> (allowed bytes, mask)
        self._masks: dict[tuple[int, bool], int] = {}
        self._mask_list: list[tuple[int, bool]] = []
        self._rows: dict = {}  # (vocab, offset, eos, device) -> (table, masks it holds)

    def _remember(self, memo: dict, key, value, state) -> None:
        if self._frames(state) <= MEMO_FRAMES:
            if len(memo) >= MEMO:
                memo.clear()
            memo[key] = value

    def step(self, state, byte: int):
        """The state after `byte`, or None where it cannot follow."""
        key = (state, byte)
        found = self._steps.get(key, _MISSING)
        if found is _MISSING:
            found = self._successor(state, byte)
            self._remember(self._steps, key, found, state)
        return found

    def _followed(self, state, byte: int) -> bool:
        """Whether `byte` leads somewhere (for the allowed bytes: a byte whose text would parse too many ways is
        not allowed, rather than an error where the engine asks for a mask)."""
        try:
            return self.step(state, byte) is not None
        except GuideError:
            return False

    def _facts(self, state) -> tuple[list[int], int]:
        found = self._info.get(state)
        if found is None:
            bits = self._bits(state)
            key = (bits, self.accepts(state))
            if key not in self._masks:
                self._masks[key] = len(self._mask_list)
                self._mask_list.append(key)
            found = ([b for b in range(256) if bits >> b & 1], self._masks[key])
            self._remember(self._info, state, found, state)
        return found

    def allowed_bytes(self, state) -> list[int]:
        return self._facts(state)[0]

    def ends(self, state) -> bool:
        """Nothing may follow: the completion is a whole match and is over."""
        return self.accepts(state) and not self.allowed_bytes(state)

    def mask(self, state) -> int:
        """The row of `bias_rows` with this state's biases."""
        return self._facts(state)[1]

    def state_after(self, data: bytes):
        """The state the bytes lead to from the start, or None where they are no prefix of a match."""
        state = self.start
        for b in data:
            state = self.step(state, b)
            if state is None:
                return None
        return state

    def matches(self, data: bytes) -> bool:
        state = self.state_after(data)
        return state is not None and self.accepts(state)

    def bias_rows(self, vocab: int, offset: int, eos_id: int, device):
        """(masks met so far, vocab) fp32 logit biases on a device, as ByteGuide.bias_rows; a new tensor where
        masks were met since the last call (ask `mask` first)."""
        import torch  # only the engine needs tensors

        key = (vocab, offset, eos_id, str(device))
        table, built = self._rows.get(key, (None, 0))
        n = len(self._mask_list)
        if table is None or built < n:
            new = torch.full((n - built, vocab), float("-inf"))
            for i, (bits, accepts) in enumerate(self._mask_list[built:n]):
                new[i, [offset + b for b in range(256) if bits >> b & 1]] = 0.0
                if accepts:
                    new[i, eos_id] = 0.0
            new = new.to(device)
            table = new if table is None else torch.cat([table, new])
            self._rows[key] = (table, n)
        return table


class PushdownGuide(_Followed):
    """A grammar's texts, its rules followed with a stack (the module's docstring). `rules`: name -> tree
    (regex_syntax's nodes, Ref for a rule's name); `root`: the whole text's rule; `allowed`: the only bytes
    that may occur (vLLM's allowed_token_ids), or None."""

    def __init__(self, rules: dict, root: str, source: str, allowed: frozenset[int] | None = None):
        self.rules, self.root, self.source, self.allowed_only = rules, root, source, allowed
        deadline = time.monotonic() + MAX_SECONDS
        names = [root] + sorted(set(rules) - {root})
        number = {name: i for i, name in enumerate(names)}
        self.names = names
        self.starts: list[int] = []  # each rule's start state (states numbered across the rules)
        next_: list[list[int]] = []
        calls: list[dict[int, int]] = []
        accepting: list[bool] = []
        for name in names:
            nfa = _Nfa()
            entry, exit_ = nfa.build(rules[name])
            rows, named, accepts = determinised(nfa, entry, exit_, f"{source} (rule {name!r})", deadline)
            base = len(next_)
            if base + len(rows) > 4 * MAX_STATES:
                raise GuideError(f"{source}: needs more than {4 * MAX_STATES} automaton states")
            self.starts.append(base)
            for row, call in zip(rows, named):
                if allowed is not None:
                    row = [t if b in allowed else -1 for b, t in enumerate(row)]
                next_.append([t + base if t >= 0 else -1 for t in row])
                for rule in call:
                    if rule not in number:
                        raise GuideError(f"{source}: no rule named {rule!r}")
                calls.append({number[rule]: t + base for rule, t in call.items()})
            accepting += accepts
        self.next, self.calls, self.accepting = next_, calls, accepting
        self._prune()
        self._refuse_left_recursion()
        self.bits = [sum(1 << b for b in range(256) if row[b] >= 0) for row in self.next]  # each state's bytes
        super().__init__()
        self.start = self._closure([(self.starts[0],)])

    @property
    def num_states(self) -> int:
        """Automaton states of all its rules (its bias rows are per distinct mask met, bias_rows)."""
        return len(self.next)

    def __repr__(self) -> str:
        return f"PushdownGuide({self.source}, {len(self.names)} rules, {len(self.next)} states)"

    # ------------------------------------------------------------------ construction
    def _live(self, productive: set[int]) -> set[int]:
        """The states that can reach their rule's end through bytes and the names of `productive` rules."""
        back: dict[int, set[int]] = {}
        for s, row in enumerate(self.next):
            for t in set(row) - {-1}:
                back.setdefault(t, set()).add(s)
            for rule, t in self.calls[s].items():
                if rule in productive:
                    back.setdefault(t, set()).add(s)
        live = {s for s, a in enumerate(self.accepting) if a}
        stack = list(live)
        while stack:
            for s in back.get(stack.pop(), ()):
                if s not in live:
                    live.add(s)
                    stack.append(s)
        return live

    def _prune(self) -> None:
        """Remove the names of rules that derive nothing and the states that cannot reach their rule's end."""
        productive = _least_fixed_point(lambda p: {r for r, start in enumerate(self.starts) if start in self._live(p)})
        live = self._live(productive)
        if 0 not in productive:
            raise GuideError(f"{self.source}: matches no text (every way through its rules needs one that derives "
                             "nothing)")
        self.next = [[t if t in live else -1 for t in row] if s in live else [-1] * 256
                     for s, row in enumerate(self.next)]
        self.calls = [{r: t for r, t in call.items() if r in productive and t in live} if s in live else {}
                      for s, call in enumerate(self.calls)]

    def _byte_free(self, start: int, nullable: set[int]) -> set[int]:
        """States reached from `start` through names of `nullable` rules alone (no byte)."""
        seen, stack = {start}, [start]
        while stack:
            for rule, t in self.calls[stack.pop()].items():
                if rule in nullable and t not in seen:
                    seen.add(t)
                    stack.append(t)
        return seen

    def _refuse_left_recursion(self) -> None:
        """A GuideError where a rule can name itself before any byte (following it would never end)."""
        nullable = _least_fixed_point(lambda n: {r for r, start in enumerate(self.starts)
                                                 if any(self.accepting[s] for s in self._byte_free(start, n))})
        first = {r: {c for s in self._byte_free(start, nullable) for c in self.calls[s]}
                 for r, start in enumerate(self.starts)}
        for r in range(len(self.starts)):
            seen, stack = set(), [r]
            while stack:
                for c in first[stack.pop()]:
                    if c == r:
                        raise GuideError(f"{self.source}: the rule {self.names[r]!r} can come first in itself "
                                         "(left recursion through other rules), which is not supported")
                    if c not in seen:
                        seen.add(c)
                        stack.append(c)

    # ------------------------------------------------------------------ following a text
    def _closure(self, stacks: Iterable[tuple[int, ...]]) -> frozenset:
        """The stacks `stacks` stand for once every rule named at their tops is entered and every rule that may
        end there has returned: those whose top can take a byte, and () where the text may end."""
        seen, work, out = set(stacks), list(stacks), []
        calls, accepting, bits, starts = self.calls, self.accepting, self.bits, self.starts
        while work:
            st = work.pop()
            if not st:
                out.append(st)
                continue
            top = st[-1]
            if bits[top]:
                out.append(st)
            if calls[top] and len(st) < MAX_DEPTH:
                base = st[:-1]
                for rule, after in calls[top].items():
                    new = base + (after, starts[rule])
                    if new not in seen:
                        seen.add(new)
                        work.append(new)
            if accepting[top] and st[:-1] not in seen:
                seen.add(st[:-1])
                work.append(st[:-1])
        if len(out) > MAX_STACKS:
            raise GuideError(f"{self.source}: ambiguous here, more than {MAX_STACKS} parses of the text so far")
        return frozenset(out)

    def _successor(self, state: frozenset, byte: int) -> frozenset | None:
        moved = [st[:-1] + (self.next[st[-1]][byte],) for st in state if st and self.next[st[-1]][byte] >= 0]
        after = self._closure(moved) if moved else None
        return after or None  # (empty: nesting past MAX_DEPTH only)

    def _bits(self, state: frozenset) -> int:
        bits = 0
        for st in state:
            if st:
                bits |= self.bits[st[-1]]
        if max(map(len, state)) + len(self.starts) >= MAX_DEPTH:  # the next rules entered may be cut
            bits = sum(1 << b for b in range(256) if bits >> b & 1 and self._followed(state, b))
        return bits

    def _frames(self, state: frozenset) -> int:
        return sum(map(len, state))

    def accepts(self, state: frozenset) -> bool:
        """The text so far is a whole match."""
        return () in state

    def intersect(self, other):
        """The texts both allow: with a set of bytes (ByteGuide.of_bytes), a PushdownGuide of those bytes alone;
        with another ByteGuide (bad words), a ProductGuide."""
        if not isinstance(other, ByteGuide):
            raise GuideError(f"{self.source} and {other.source}: two guides whose rules nest do not intersect")
        if other.num_states == 1 and other.accepting[0]:
            allowed = frozenset(other.allowed[0])
            if self.allowed_only is not None:
                allowed &= self.allowed_only
            return PushdownGuide(self.rules, self.root, f"{self.source} and {other.source}", allowed)
        return ProductGuide(self, other)


class ProductGuide(_Followed):
    """The texts a PushdownGuide and a ByteGuide (bad words) both allow. A state is the pair of theirs; a byte
    is allowed where both allow it and the pair it leads to can still end in a match of both, which the
    stacks alone cannot say (the words may rule out every way on). `ends[s][q]`: the ByteGuide's states
    (bits) in which the rule of automaton state s can reach its end from s with the ByteGuide in state q,
    worked out once (Bar-Hillel's construction, as a least fixed point); a stack is live where its frames,
    innermost first, lead from q to an accepting state of the ByteGuide."""

    def __init__(self, pushdown: PushdownGuide, other: ByteGuide):
        self.p, self.a = pushdown, other
        self.source = f"{pushdown.source} and {other.source}"
        self.accepting_bits = sum(1 << q for q, a in enumerate(other.accepting) if a)
        self.ends_in = self._ends(time.monotonic() + MAX_SECONDS)
        super().__init__()
        self.start = (pushdown.start, 0)
        if not self._live(*self.start):
            raise GuideError(f"{self.source}: matches no text")

    @property
    def num_states(self) -> int:
        return self.p.num_states * self.a.num_states

    def __repr__(self) -> str:
        return f"ProductGuide({self.source})"

    def _ends(self, deadline: float) -> list[list[int]]:
        p, a = self.p, self.a
        nq = a.num_states
        images: dict[tuple[int, ...], list[int]] = {}  # bytes -> per q, the states they lead to (bits)
        edges = []  # per automaton state: (target, images of the bytes that lead there)
        for row in p.next:
            by_target: dict[int, list[int]] = {}
            for b, t in enumerate(row):
                if t >= 0:
                    by_target.setdefault(t, []).append(b)
            out = []
            for t, group in by_target.items():
                key = tuple(group)
                if key not in images:
                    images[key] = [sum({1 << a.next[q][b] for b in group if a.next[q][b] >= 0}) for q in range(nq)]
                out.append((t, images[key]))
            edges.append(out)
        ends = [[(1 << q) if accepts else 0 for q in range(nq)] for accepts in p.accepting]
        changed = True
        while changed:
            if time.monotonic() > deadline:
                raise GuideError(f"{self.source}: too complex together (more than {MAX_SECONDS:.0f} s to build)")
            changed = False
            for s in range(len(ends) - 1, -1, -1):
                row = ends[s]
                for q in range(nq):
                    bits = row[q]
                    for t, image in edges[s]:
                        bits |= _union(ends[t], image[q])
                    for rule, t in p.calls[s].items():
                        bits |= _union(ends[t], ends[p.starts[rule]][q])
                    if bits != row[q]:
                        row[q], changed = bits, True
        return ends

    def _live(self, pstate: frozenset, q: int) -> bool:
        for stack in pstate:
            bits = 1 << q
            for s in reversed(stack):
                bits = _union(self.ends_in[s], bits) if bits else 0
            if bits & self.accepting_bits:
                return True
        return False

    def _successor(self, state: tuple, byte: int) -> tuple | None:
        pstate, q = state
        t = self.a.next[q][byte]
        if t < 0:
            return None
        after = self.p.step(pstate, byte)
        return (after, t) if after is not None and self._live(after, t) else None

    def _bits(self, state: tuple) -> int:
        """Bytes that lead to the same states of every stack's top and of the words' automaton lead to the same
        pair: one of them is followed for all."""
        pstate, q = state
        row, tops = self.a.next[q], [self.p.next[st[-1]] for st in pstate if st]
        alike: dict[tuple[int, ...], list[int]] = {}
        for b in self.p.allowed_bytes(pstate):
            if row[b] >= 0:
                alike.setdefault((row[b], *(top[b] for top in tops)), []).append(b)
        return sum(sum(1 << b for b in group) for group in alike.values() if self._followed(state, group[0]))

    def _frames(self, state: tuple) -> int:
        return sum(map(len, state[0]))

    def accepts(self, state: tuple) -> bool:
        return () in state[0] and self.a.accepting[state[1]]

    def intersect(self, other):
        """With another ByteGuide: the product of this one's PushdownGuide with both."""
        if not isinstance(other, ByteGuide):
            raise GuideError(f"{self.source} and {other.source}: two guides whose rules nest do not intersect")
        return ProductGuide(self.p, self.a.intersect(other))


def _least_fixed_point(grow) -> set[int]:
    """The least set that `grow` (monotone) leaves as it is, from the empty set up."""
    found: set[int] = set()
    while (now := grow(found)) != found:
        found = now
    return found


def _union(row: list[int], bits: int) -> int:
    """The union of row[q] (sets as bits) over the q in `bits`."""
    out = 0
    while bits:
        low = bits & -bits
        out |= row[low.bit_length() - 1]
        bits ^= low
    return out


Guide = ByteGuide | PushdownGuide | ProductGuide  # what guides a completion (SamplingParams.guide)
