"""Random texts a guide allows (ByteGuide or PushdownGuide), for the guide tests: bytes chosen at random among
those allowed, ending at a whole match, by the shortest way there once the text is long."""

from __future__ import annotations

import random

from blt_runtime.guide import ByteGuide
from blt_runtime.pushdown import PushdownGuide


def _distances(next_: list[list[int]], calls: list[dict[int, int]], accepting: list[bool], starts: list[int]
               ) -> list[float]:
    """Bytes from each automaton state to its rule's end at least (a rule named costs its start's distance)."""
    inf = float("inf")
    distance = [0.0 if a else inf for a in accepting]
    changed = True
    while changed:
        changed = False
        for s, row in enumerate(next_):
            best = min([distance[t] + 1 for t in set(row) - {-1}]
                       + [distance[starts[r]] + distance[t] for r, t in calls[s].items()], default=inf)
            if best < distance[s]:
                distance[s], changed = best, True
    return distance


_CACHE: dict[int, tuple[object, callable]] = {}


def shortest(guide) -> callable:
    """state -> the fewest bytes from it to a whole match (worked out once per guide)."""
    if id(guide) in _CACHE and _CACHE[id(guide)][0] is guide:
        return _CACHE[id(guide)][1]
    if isinstance(guide, ByteGuide):  # breadth first from the accepting states
        back = [[] for _ in guide.next]
        for s, row in enumerate(guide.next):
            for t in set(row) - {-1}:
                back[t].append(s)
        d = [0 if a else None for a in guide.accepting]
        queue = [s for s, a in enumerate(guide.accepting) if a]
        for s in queue:
            for p in back[s]:
                if d[p] is None:
                    d[p] = d[s] + 1
                    queue.append(p)
        assert all(x is not None for x in d), "a state from which no match can be reached"
        function = d.__getitem__
    else:
        assert isinstance(guide, PushdownGuide)
        d = _distances(guide.next, guide.calls, guide.accepting, guide.starts)
        function = lambda state: min(sum(d[s] for s in stack) for stack in state)  # noqa: E731
    _CACHE[id(guide)] = (guide, function)
    return function


def walk(guide, rng: random.Random, stop: float = 0.3, long: int = 200) -> bytes:
    """A random text the guide allows, ending at a whole match (the shortest way there after `long` bytes)."""
    distance = shortest(guide)
    state, out = guide.start, bytearray()
    while not (guide.accepts(state) and (not guide.allowed_bytes(state) or len(out) > long or rng.random() < stop)):
        choices = guide.allowed_bytes(state)
        if len(out) > long:
            choices = [b for b in choices if distance(guide.step(state, b)) < distance(state)]
        b = rng.choice(choices)
        out.append(b)
        state = guide.step(state, b)
    return bytes(out)
