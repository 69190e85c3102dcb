"""Guided generation: a completion held to a regular expression, or to one of a list of choices, byte by byte.

Owns `ByteGuide`: a deterministic automaton over bytes (a DFA), compiled from a regular expression in
Python's syntax (`ByteGuide.regex`), from choices (`ByteGuide.choice`) or from a grammar, GBNF or Lark's,
without recursion but repetition (`ByteGuide.grammar`, grammar.py; one with is a PushdownGuide, pushdown.py,
which answers the engine as a ByteGuide does: `start`, `step`, `allowed_bytes`, `accepts`, `mask`), or made
of a set of bytes (`of_bytes`) or of words that must not occur (`avoiding`); two guides intersect (`intersect`), and
each is the smallest automaton of its texts (`_minimal`). Since a byte-level model chooses bytes, the
automaton constrains each choice exactly: at every step the model may only take the bytes that keep
the text a prefix of some match, and may end (EOS) only where the text so far is a whole match. Where
nothing more can follow, the completion ends there. Character classes and `.` are Unicode: their
characters are encoded as UTF-8, so a completion a regex or choices guide is valid UTF-8 (a set of
bytes, or bad words alone, leave that to the model, as unguided generation does).

The syntax (regex_syntax.py): literals and escapes (`\\n`, `\\t`, `\\xHH`, `\\uHHHH`, escaped punctuation),
`.` (any character but a newline), classes (`[a-z]`, `[^"]`, with `\\d`, `\\w` and `\\s` inside, these
three in their ASCII sense, as under `re.ASCII`), groups (capturing, `(?:...)` and `(?P<name>...)`), `|`,
the quantifiers `*`, `+`, `?`, `{m}`, `{m,}`, `{m,n}` (lazy ones too: the same texts match), and the
flags `i` (ASCII letters in either case, as under `re.ASCII`), `s` and `a`, for the whole pattern or a
group (`(?i)...`, `(?i:...)`). The whole completion must match, as with `re.fullmatch`: `^` and `$` are
accepted only at the pattern's ends. Anything else (look-around, back references, word boundaries,
other flags, possessive quantifiers) is refused with a GuideError that says what, as is a pattern whose
automaton grows past MAX_STATES or takes more than MAX_SECONDS to build.

Pure Python: the engine turns a state into a row of logit biases (`bias_rows`) and follows the
sampled bytes (`next`).
"""

from __future__ import annotations

import time

from .errors import GuideError
from .regex_syntax import Alt, Cat, Chars, Ref, Repeat, parse

__all__ = ["ByteGuide", "GuideError", "utf8_sequences"]

MAX_NFA_STATES = 100_000
MAX_STATES = 20_000  # automaton states; each is a row of logit biases on the device (1 KB) while a request runs
MAX_SECONDS = 10.0  # to compile one: a pattern that takes longer is refused, not left to hold a thread


def _encoded(c: int) -> bytes:
    return chr(c).encode("utf-8", "surrogatepass")


def utf8_sequences(lo: int, hi: int) -> list[list[tuple[int, int]]]:
    """The characters lo..hi (surrogates left out) as UTF-8: a list of sequences of byte ranges, each
    sequence matching a set of whole encodings, together exactly those of lo..hi."""
    out, stack = [], [(lo, hi)]
    while stack:
        lo, hi = stack.pop()
        if lo > hi:
            continue
        if lo <= 0xDFFF and hi >= 0xD800:  # surrogates are no characters
            stack += [(lo, 0xD7FF), (0xE000, hi)]
            continue
        split = next((b for b in (0x7F, 0x7FF, 0xFFFF) if lo <= b < hi), None)
        if split is not None:  # encodings of one length at a time
            stack += [(lo, split), (split + 1, hi)]
            continue
        if hi <= 0x7F:
            out.append([(lo, hi)])
            continue
        for i in (1, 2, 3):  # until every continuation byte below the first that differs spans 0x80..0xBF
            m = (1 << (6 * i)) - 1
            if lo & ~m != hi & ~m:
                if lo & m:
                    stack += [(lo, lo | m), ((lo | m) + 1, hi)]
                    break
                if hi & m != m:
                    stack += [(lo, (hi & ~m) - 1), (hi & ~m, hi)]
                    break
        else:
            out.append(list(zip(_encoded(lo), _encoded(hi))))
    return out


# ---------------------------------------------------------------------- automata
class _Nfa:
    """Thompson's construction over bytes: each state has byte-range edges and empty edges."""

    def __init__(self):
        self.edges: list[list[tuple[int, int, int]]] = []
        self.empty: list[list[int]] = []
        self.calls: dict[int, list[tuple[str, int]]] = {}  # state -> (rule, state after it): a grammar's rules

    def state(self) -> int:
        if len(self.edges) >= MAX_NFA_STATES:
            raise GuideError(f"the pattern is too large (more than {MAX_NFA_STATES} automaton states before "
                             "determinisation)")
        self.edges.append([])
        self.empty.append([])
        return len(self.edges) - 1

    def build(self, node) -> tuple[int, int]:
        """-> (entry, exit) states of a fragment matching `node`."""
        if isinstance(node, Chars):
            entry, exit_ = self.state(), self.state()
            for lo, hi in node.ranges:
                for seq in utf8_sequences(lo, hi):
                    at = entry
                    for k, (blo, bhi) in enumerate(seq):
                        to = exit_ if k == len(seq) - 1 else self.state()
                        self.edges[at].append((blo, bhi, to))
                        at = to
            return entry, exit_
        if isinstance(node, Cat):
            entry, exit_ = self.build(node.parts[0]) if node.parts else self.epsilon()
            for part in node.parts[1:]:
                e, x = self.build(part)
                self.empty[exit_].append(e)
                exit_ = x
            return entry, exit_
        if isinstance(node, Alt):
            entry, exit_ = self.state(), self.state()
            for option in node.options:
                e, x = self.build(option)
                self.empty[entry].append(e)
                self.empty[x].append(exit_)
            return entry, exit_
        if isinstance(node, Repeat):
            entry = exit_ = self.state()
            for _ in range(node.least):
                e, x = self.build(node.node)
                self.empty[exit_].append(e)
                exit_ = x
            if node.most is None:
                e, x = self.build(node.node)
                self.empty[exit_].append(e)
                self.empty[x].append(e)
                end = self.state()
                self.empty[exit_].append(end)
                self.empty[x].append(end)
                return entry, end
            end = self.state()
            for _ in range(node.most - node.least):
                self.empty[exit_].append(end)
                e, x = self.build(node.node)
                self.empty[exit_].append(e)
                exit_ = x
            self.empty[exit_].append(end)
            return entry, end
        if isinstance(node, Ref):  # a rule's text here (pushdown.py): an edge that names it
            entry, exit_ = self.state(), self.state()
            self.calls.setdefault(entry, []).append((node.name, exit_))
            return entry, exit_
        raise AssertionError(node)

    def epsilon(self) -> tuple[int, int]:
        s = self.state()
        return s, s

    def closure(self, states) -> frozenset[int]:
        seen, stack = set(states), list(states)
        while stack:
            for t in self.empty[stack.pop()]:
                if t not in seen:
                    seen.add(t)
                    stack.append(t)
        return frozenset(seen)


def determinised(nfa: _Nfa, entry: int, exit_: int, source: str, deadline: float | None = None
                  ) -> tuple[list[list[int]], list[dict[str, int]], list[bool]]:
    """The subset construction from `entry`: (next[s][b], the state after byte b or -1; calls[s][rule], the
    state after the rule's text (a grammar's rules, pushdown.py); accepting[s], whether `exit_` is reached),
    state 0 the start. A GuideError past MAX_STATES states or past `deadline` (MAX_SECONDS from now)."""
    deadline = time.monotonic() + MAX_SECONDS if deadline is None else deadline
    start = nfa.closure([entry])
    index = {start: 0}
    sets: list[frozenset[int]] = [start]
    next_: list[list[int]] = []
    calls: list[dict[str, int]] = []

    def number(target: frozenset[int]) -> int:
        if target not in index:
            if len(sets) >= MAX_STATES:
                raise GuideError(f"the {source} needs more than {MAX_STATES} automaton states")
            index[target] = len(sets)
            sets.append(target)
        return index[target]

    while len(next_) < len(sets):
        if len(next_) % 64 == 0 and time.monotonic() > deadline:
            raise GuideError(f"the {source} is too complex: its automaton took more than {MAX_SECONDS:.0f} s "
                             "to build")
        current = sets[len(next_)]
        edges = [e for s in current for e in nfa.edges[s]]
        cuts = sorted({lo for lo, _, _ in edges} | {hi + 1 for _, hi, _ in edges})
        row = [-1] * 256
        for lo, hi in zip(cuts, cuts[1:]):
            targets = [t for a, b, t in edges if a <= lo and hi - 1 <= b]
            if targets:
                row[lo:hi] = [number(nfa.closure(targets))] * (hi - lo)
        next_.append(row)
        named: dict[str, list[int]] = {}
        for s in current:
            for rule, after in nfa.calls.get(s, ()):
                named.setdefault(rule, []).append(after)
        calls.append({rule: number(nfa.closure(after)) for rule, after in named.items()})
    return next_, calls, [exit_ in s for s in sets]


MOST_ROUNDS = 24  # of refinement; an automaton whose classes still split after them is kept as it is


def _distinct_columns(nxt, weights):
    """`nxt` without the columns (bytes) that repeat another: bytes that lead to the same state from every
    state (hashed, then checked)."""
    import numpy as np

    _, keep, inverse = np.unique(weights @ nxt, return_index=True, return_inverse=True)
    if (nxt[:, keep[inverse.reshape(-1)]] == nxt).all():
        return nxt[:, keep]
    return np.unique(nxt, axis=1)


def _minimal(nxt, accepting, weights=None) -> tuple[list[list[int]], list[bool]]:
    """The smallest automaton that takes the same texts as the one of rows `nxt` ((n, 256) int64 array, -1
    where a byte cannot follow; every state live) and `accepting` ((n,) bool array), its start still state
    0. Moore's refinement: states are told apart by whether they accept, then by the classes their bytes
    lead to, until no class splits. The subset construction leaves many states alike (any JSON value:
    8,484 states, 1,100 after 18 rounds), and each is a row of biases on the device. Where the classes
    still split after MOST_ROUNDS rounds (long chains of states, such as a string of up to 600
    characters, split one state a round), the automaton is kept as it is: the rounds would take longer
    than the compilation. Rows are grouped by a 64-bit hash (`weights`: its factors, random by default)
    of the columns of bytes that differ somewhere, and every class is checked to be one signature (else
    grouped by the rows themselves), so the result is exact."""
    import numpy as np

    rng = np.random.default_rng(0x5EED)
    columns = _distinct_columns(nxt, rng.integers(1, 2**62, size=len(nxt), dtype=np.int64))
    if weights is None:
        weights = rng.integers(1, 2**62, size=columns.shape[1] + 1, dtype=np.int64)
    _, classes = np.unique(accepting, return_inverse=True)  # classes are numbered 0 .. count - 1
    classes = classes.reshape(-1).astype(np.int64)
    count = int(classes.max()) + 1
    for _ in range(MOST_ROUNDS):
        sig = np.concatenate([classes[:, None], np.append(classes, -1)[columns]], axis=1)  # -1 stays -1
        _, new = np.unique(sig @ weights[:sig.shape[1]], return_inverse=True)  # (wrapping int64 sums)
        new = new.reshape(-1)
        first = np.zeros(new.max() + 1, dtype=np.int64)
        first[new[::-1]] = np.arange(len(new))[::-1]  # each class's first member
        if not (sig == sig[first[new]]).all():  # two signatures met in one hash: group by the rows themselves
            _, new = np.unique(sig, axis=0, return_inverse=True)
            new = new.reshape(-1)
        if new.max() + 1 == count:  # no class split (the new classes refine the old)
            break
        classes, count = new, int(new.max()) + 1
    else:
        return nxt.tolist(), accepting.tolist()
    first = np.full(count, len(classes), dtype=np.int64)
    np.minimum.at(first, classes, np.arange(len(classes)))
    order = np.argsort(first)  # classes by their first member: the start's class first
    number = np.empty(count + 1, dtype=np.int64)
    number[order], number[count] = np.arange(count), -1
    reps = first[order]
    rows = number[np.where(nxt[reps] >= 0, classes[nxt[reps]], count)]
    return rows.tolist(), accepting[reps].tolist()


class ByteGuide:
    """A DFA over bytes whose every state can still reach a match. `next[s][b]`: the state after byte b,
    or -1 where b cannot follow; `accepting[s]`: the bytes so far are a whole match."""

    def __init__(self, next_: list[list[int]], accepting: list[bool], source: str):
        self.next, self.accepting, self.source = next_, accepting, source
        self.allowed = [[b for b in range(256) if row[b] >= 0] for row in next_]
        self._rows: dict = {}  # (vocab, offset, eos, device) -> the bias rows on a device

    def __repr__(self) -> str:
        return f"ByteGuide({self.source}, {len(self.next)} states)"

    @property
    def num_states(self) -> int:
        return len(self.next)

    def ends(self, state: int) -> bool:
        """Nothing may follow: the completion is a whole match and is over."""
        return self.accepting[state] and not self.allowed[state]

    def state_after(self, data: bytes) -> int | None:
        """The state the bytes lead to from the start, or None where they are no prefix of a match."""
        state = 0
        for b in data:
            state = self.next[state][b]
            if state < 0:
                return None
        return state

    def matches(self, data: bytes) -> bool:
        state = self.state_after(data)
        return state is not None and self.accepting[state]

    # ------------------------------------------------------------------ what the engine asks of a guide
    # (a PushdownGuide, pushdown.py, answers the same)
    start = 0

    def step(self, state: int, byte: int) -> int | None:
        """The state after `byte`, or None where it cannot follow."""
        after = self.next[state][byte]
        return None if after < 0 else after

    def allowed_bytes(self, state: int) -> list[int]:
        return self.allowed[state]

    def accepts(self, state: int) -> bool:
        """The text so far is a whole match."""
        return self.accepting[state]

    def mask(self, state: int) -> int:
        """The row of `bias_rows` with this state's biases: its own."""
        return state

    def bias_rows(self, vocab: int, offset: int, eos_id: int, device):
        """(states, vocab) fp32 logit biases, built once per device: 0 where a byte (id offset + byte) may
        follow, and at EOS where the state accepts; -inf elsewhere."""
        import torch  # only the engine needs tensors

        key = (vocab, offset, eos_id, str(device))
        rows = self._rows.get(key)
        if rows is None:
            mask = torch.full((self.num_states, vocab), float("-inf"))
            for s, allowed in enumerate(self.allowed):
                mask[s, [offset + b for b in allowed]] = 0.0
                if self.accepting[s]:
                    mask[s, eos_id] = 0.0
            rows = self._rows[key] = mask.to(device)
        return rows

    # ------------------------------------------------------------------ construction
    @classmethod
    def regex(cls, pattern: str) -> ByteGuide:
        if not isinstance(pattern, str):
            raise GuideError("a regex must be a string")
        try:
            return cls._compile(parse(pattern), f"regex {pattern[:60]!r}")
        except RecursionError:
            raise GuideError(f"regex {pattern[:60]!r}: groups nested too deeply") from None

    @classmethod
    def grammar(cls, text: str):
        """A grammar's texts: GBNF's `root` or Lark's `start` (grammar.py; vLLM's guided_grammar). One automaton
        where no rule refers to itself but as repetition; else a PushdownGuide (pushdown.py) of its rules."""
        from .grammar import grammar_rules, inline, recursive_rules

        try:
            rules, root, label = grammar_rules(text)
            nested = recursive_rules(rules, root)
            if not nested:
                return cls._compile(inline(rules, rules[root], set(), label), label)
            from .pushdown import PushdownGuide

            return PushdownGuide({name: inline(rules, rules[name], nested, label) for name in nested | {root}},
                                 root, label)
        except RecursionError:
            raise GuideError("grammar: rules nested too deeply") from None

    @classmethod
    def choice(cls, choices: list[str]) -> ByteGuide:
        if not choices or not all(isinstance(c, str) for c in choices):
            raise GuideError("choices must be a non-empty list of strings")
        options = [Cat([Chars([(ord(ch), ord(ch))]) for ch in c]) for c in choices]
        return cls._compile(Alt(options), f"{len(choices)} choices")

    @classmethod
    def _compile(cls, tree, source: str) -> ByteGuide:
        nfa = _Nfa()
        entry, exit_ = nfa.build(tree)
        next_, _, accepting = determinised(nfa, entry, exit_, source)
        return cls._live(next_, accepting, source)

    @classmethod
    def _live(cls, next_: list[list[int]], accepting: list[bool], source: str) -> ByteGuide:
        """The smallest guide of an automaton (state 0 the start) without the states from which no match can
        be reached (a GuideError if the start is one)."""
        import numpy as np

        back: list[set[int]] = [set() for _ in next_]
        for s, row in enumerate(next_):
            for t in set(row) - {-1}:
                back[t].add(s)
        live = {s for s, a in enumerate(accepting) if a}
        stack = list(live)
        while stack:
            for s in back[stack.pop()]:
                if s not in live:
                    live.add(s)
                    stack.append(s)
        if 0 not in live:
            raise GuideError(f"the {source} matches no text")
        order = np.array(sorted(live), dtype=np.int64)  # the start state stays 0
        number = np.full(len(next_) + 1, -1, dtype=np.int64)  # and -1 (no state) stays -1
        number[order] = np.arange(len(order))
        rows = number[np.asarray(next_, dtype=np.int64)[order]]
        return cls(*_minimal(rows, np.asarray(accepting, dtype=bool)[order]), source)

    @classmethod
    def of_bytes(cls, allowed: set[int] | frozenset[int]) -> ByteGuide:
        """Any text of these bytes (vLLM's allowed_token_ids, the ids being bytes): one state, always a match.
        Bytes beyond them can make invalid UTF-8, as any byte can where nothing guides the completion."""
        if not all(isinstance(b, int) and 0 <= b <= 255 for b in allowed):
            raise GuideError("allowed bytes must be integers 0..255")
        return cls([[0 if b in allowed else -1 for b in range(256)]], [True], f"{len(allowed)} allowed bytes")

    @classmethod
    def avoiding(cls, words: list[bytes]) -> ByteGuide:
        """Any text in which none of `words` occurs (vLLM's bad_words, as bytes): an Aho-Corasick automaton over
        the words' prefixes, without the states where one has just been completed."""
        if not words or not all(isinstance(w, bytes) and w for w in words):
            raise GuideError("bad words must be non-empty")
        goto: list[dict[int, int]] = [{}]
        banned = [False]
        for word in words:
            s = 0
            for b in word:
                if b not in goto[s]:
                    goto[s][b] = len(goto)
                    goto.append({})
                    banned.append(False)
                s = goto[s][b]
            banned[s] = True
        fail, next_ = [0] * len(goto), [[0] * 256 for _ in goto]  # breadth first: a state's failure is shallower
        for b, t in goto[0].items():
            next_[0][b] = t
        queue = list(goto[0].values())
        for s in queue:
            banned[s] = banned[s] or banned[fail[s]]  # a word ends here, or a shorter one inside it
            next_[s] = list(next_[fail[s]])
            for b, t in goto[s].items():
                fail[t] = next_[fail[s]][b]
                next_[s][b] = t
                queue.append(t)
            if len(queue) > MAX_STATES:
                raise GuideError(f"bad words of {sum(map(len, words))} bytes need more than {MAX_STATES} states")
        rows = [[-1 if banned[t] else t for t in row] for row in next_]
        return cls._live(rows, [not b for b in banned], f"{len(words)} bad words")

    def intersect(self, other):
        """The texts both guides allow (a product automaton over the pairs of states reachable together; with a
        PushdownGuide, its own intersect)."""
        if not isinstance(other, ByteGuide):
            return other.intersect(self)
        index, pairs, next_ = {(0, 0): 0}, [(0, 0)], []
        source = f"{self.source} and {other.source}"
        while len(next_) < len(pairs):
            a, b = pairs[len(next_)]
            row, ra, rb = [-1] * 256, self.next[a], other.next[b]
            for byte in self.allowed[a]:
                if rb[byte] >= 0:
                    pair = (ra[byte], rb[byte])
                    if pair not in index:
                        if len(pairs) >= MAX_STATES:
                            raise GuideError(f"{source} need more than {MAX_STATES} automaton states together")
                        index[pair] = len(pairs)
                        pairs.append(pair)
                    row[byte] = index[pair]
            next_.append(row)
        return self._live(next_, [self.accepting[a] and other.accepting[b] for a, b in pairs], source)
