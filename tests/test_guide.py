"""ByteGuide: the automaton over bytes matches exactly the texts Python's re.fullmatch does (under re.ASCII,
whose \\d, \\w and \\s the guide takes), every path it allows is valid UTF-8 that matches, and what it
cannot do is refused with a message.

The oracle is the `regex` module (re's syntax and matching, with a timeout): a backtracking matcher can take
exponential time on a random pattern (nested quantifiers), which the automaton never does; a text it gives
up on is left out.
"""

import random
import re

import pytest
import regex
from guidewalk import walk
from hypothesis import given, settings
from hypothesis import strategies as st

from blt_runtime.guide import ByteGuide, GuideError, utf8_sequences

CHARS = ["a", "b", "c", "A", "C", "1", "7", " ", "\n", "_", "-", ".", "é", "É", "ß", "中", "\u2028", "😀", "\x00",
         "\x7f"]


def literal() -> st.SearchStrategy[str]:
    return st.sampled_from(CHARS).map(re.escape)


CLASSES = ["[ab]", "[^a]", "[a-c]", "[^\\n]", "[0-9]", "[é-中]", "[^a-zé]", "\\d", "\\w", "\\s", "\\D", "\\W", "\\S",
           ".", "[\\d_]", "[\\s.]", "[^\\w]", "[-a]", "[a-]"]


def atoms() -> st.SearchStrategy[str]:
    return st.one_of(literal(), st.sampled_from(CLASSES))


def quantify(x: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.tuples(x, st.sampled_from(["", "", "*", "+", "?", "{2}", "{0,2}", "{1,}", "*?", "{,2}"])).map(
        lambda t: f"(?:{t[0]}){t[1]}" if t[1] else t[0])


patterns = st.tuples(st.sampled_from(["", "", "", "(?i)", "(?s)", "(?is)"]), st.recursive(
    quantify(atoms()),
    lambda inner: st.one_of(
        st.lists(quantify(inner), min_size=1, max_size=3).map("".join),
        st.lists(inner, min_size=2, max_size=3).map("|".join),
        quantify(inner.map(lambda p: f"({p})")),
        quantify(st.tuples(st.sampled_from(["i", "s", "-i", "i-s"]), inner).map(lambda t: f"(?{t[0]}:{t[1]})")),
    ),
    max_leaves=6,
)).map("".join)  # flags for the whole pattern, and for groups: Python's, under re.ASCII


@settings(max_examples=300, deadline=None)
@given(patterns, st.lists(st.lists(st.sampled_from(CHARS), max_size=6).map("".join), min_size=1, max_size=12))
def test_the_guide_matches_what_re_fullmatch_matches(pattern, texts):
    compiled = regex.compile(pattern, regex.ASCII)
    try:
        guide = ByteGuide.regex(pattern)
    except GuideError as e:  # one that matches nothing, or one too large to build (refused, as documented)
        if too_large(e):
            return
        assert "matches no text" in str(e)
        assert not any(fullmatch(compiled, text) for text in texts)
        return
    for text in texts:
        want = fullmatch(compiled, text)
        if want is not None:
            assert guide.matches(text.encode()) == want, (pattern, text)


def too_large(e: GuideError) -> bool:
    """A pattern refused for the size or the time its automaton takes (hypothesis nests repeats of `.`)."""
    return "needs more than" in str(e) or "too complex" in str(e)


def fullmatch(compiled, text: str) -> bool | None:
    """Whether the oracle matches the whole text; None where it gave up (a backtracking blow-up). Where `regex`
    says no, Python's re is asked too (it has no timeout, so only then): `regex` 2026.5.9 does not match "B" to
    "(?i:a)a|[^a-zé]", and re does."""
    try:
        if compiled.fullmatch(text, timeout=0.2) is not None:
            return True
    except TimeoutError:
        return None
    return re.fullmatch(compiled.pattern, text, re.ASCII) is not None


@settings(max_examples=150, deadline=None)
@given(patterns, st.integers(0, 2**32))
def test_every_path_the_guide_allows_is_utf8_that_matches(pattern, seed):
    """Random walks: bytes chosen among those allowed, ending where a state accepts (always reachable)."""
    try:
        guide = ByteGuide.regex(pattern)
    except GuideError as e:  # a pattern that matches nothing (e.g. "[^\\W\\w]"), if hypothesis finds one
        if too_large(e):
            return
        assert not any(fullmatch(regex.compile(pattern, regex.ASCII), t) for t in CHARS + [""])
        return
    rng = random.Random(seed)
    compiled = regex.compile(pattern, regex.ASCII)
    for _ in range(5):
        out = walk(guide, rng, stop=0.3, long=19)  # (every state can reach a match: guidewalk.shortest checks)
        assert fullmatch(compiled, out.decode("utf-8")) in (True, None), (pattern, bytes(out))


@given(st.integers(0, 0x10FFFF), st.integers(0, 0x10FFFF), st.lists(st.integers(0, 0x10FFFF), max_size=30))
def test_utf8_sequences_cover_a_range_exactly(a, b, probes):
    lo, hi = min(a, b), max(a, b)
    sequences = utf8_sequences(lo, hi)
    for c in probes + [lo, hi, lo - 1, hi + 1, 0xD800, 0xE000]:
        if not 0 <= c <= 0x10FFFF or 0xD800 <= c <= 0xDFFF:
            continue
        data = chr(c).encode()
        inside = any(len(s) == len(data) and all(x <= y <= z for (x, z), y in zip(s, data)) for s in sequences)
        assert inside == (lo <= c <= hi), hex(c)


def test_choices_end_where_nothing_can_follow():
    guide = ByteGuide.choice(["yes", "no", "not sure"])
    state = 0
    for b in b"no":
        state = guide.next[state][b]
    assert guide.accepting[state] and not guide.ends(state)  # "not sure" may still follow
    for b in b"t sure":
        state = guide.next[state][b]
    assert guide.ends(state)
    assert guide.matches(b"yes") and not guide.matches(b"ye") and not guide.matches(b"yess")


@pytest.mark.parametrize("pattern, why", [
    ("(?=a)b", "look-around"), ("(?m)a", "the flag m is not supported"), ("a(?i)b", "at its start"),
    ("(?x:a)", "the flag x"), (r"(a)\1", "back references"),
    ("a**", "multiple repeat"), ("a*+", "possessive"), ("(a", "missing"), ("a)", "unbalanced"),
    (r"\bword", r"\\b"), ("[z-a]", "bad character range"), ("a{3,2}", "min repeat"), ("a^b", "start"),
    ("a$b", "end"), ("*a", "nothing to repeat"), ("[^\\s\\S]", "matches no"), (r"\q", "bad escape"),
    ("a{1000}{2}", "multiple repeat"), ("(a|b){20}(c|d){20}.{0,4000}", "more than"),
])
def test_what_cannot_guide_is_refused_with_the_reason(pattern, why):
    with pytest.raises(GuideError, match=why):
        ByteGuide.regex(pattern)


def test_anchors_at_the_ends_are_the_whole_match():
    for pattern in ("^abc$", r"\Aabc\Z", "abc"):
        guide = ByteGuide.regex(pattern)
        assert guide.matches(b"abc") and not guide.matches(b"abcd")
    assert ByteGuide.regex(r"a\$").matches(b"a$")  # an escaped "$" is a dollar


def test_bias_rows_allow_the_next_bytes_and_eos_where_a_match_ends():
    import torch

    guide = ByteGuide.regex("ab?")
    rows = guide.bias_rows(260, 4, 2, "cpu")
    assert rows.shape == (guide.num_states, 260)
    assert torch.isfinite(rows[0]).nonzero().flatten().tolist() == [4 + ord("a")]
    after_a = guide.next[0][ord("a")]
    assert torch.isfinite(rows[after_a]).nonzero().flatten().tolist() == [2, 4 + ord("b")]
    assert guide.bias_rows(260, 4, 2, "cpu") is rows  # built once


def test_a_pattern_too_deep_or_too_slow_to_build_is_refused(monkeypatch):
    with pytest.raises(GuideError, match="nested too deeply"):
        ByteGuide.regex("(" * 5000 + "a" + ")" * 5000)
    import blt_runtime.guide as guide_module

    monkeypatch.setattr(guide_module, "MAX_SECONDS", 0.0)
    with pytest.raises(GuideError, match="too complex"):
        ByteGuide.regex("[a-z]{1,1000}")


# ---------------------------------------------------------------------- bytes, bad words, intersections
WORDS = st.lists(st.binary(min_size=1, max_size=4).map(lambda b: bytes(x % 3 + 97 for x in b)), min_size=1,
                 max_size=4)
TEXTS = st.binary(max_size=12).map(lambda b: bytes(x % 4 + 97 for x in b))  # "a".."d": "d" is in no word


def prefix_ok(guide: ByteGuide, text: bytes) -> bool:
    """Does the guide let the text be generated (each byte allowed where it comes)?"""
    return guide.state_after(text) is not None


@settings(max_examples=300, deadline=None)
@given(words=WORDS, text=TEXTS)
def test_bad_words_never_occur_and_nothing_else_is_kept_out(words, text):
    guide = ByteGuide.avoiding(words)
    assert prefix_ok(guide, text) == (not any(w in text for w in words))
    assert guide.matches(text) == prefix_ok(guide, text)  # every text without them may end anywhere
    assert all(guide.allowed[s] for s in range(guide.num_states))  # never a dead end: "d" is always allowed


@settings(max_examples=300, deadline=None)
@given(words=WORDS, text=TEXTS, pattern=st.sampled_from(["[a-c]*d?", "(ab|c)+d", "a*b*c*d*", "[abd]{2,6}"]),
       allowed=st.sets(st.sampled_from(b"abcd"), min_size=1))
def test_an_intersection_takes_what_both_take(words, text, pattern, allowed):
    regex_guide, bad, only = ByteGuide.regex(pattern), ByteGuide.avoiding(words), ByteGuide.of_bytes(allowed)
    for a, b in ((regex_guide, bad), (regex_guide, only), (bad, only)):
        try:
            both = a.intersect(b)
        except GuideError:  # they share no text
            assert not any(a.matches(t) and b.matches(t) for t in (text, b"", b"d", b"abd", b"cd"))
            continue
        assert both.matches(text) == (a.matches(text) and b.matches(text))
        if prefix_ok(both, text):
            assert prefix_ok(a, text) and prefix_ok(b, text)
        state = both.state_after(text)  # every state it reaches can still end in a match (pruned)
        assert state is None or both.accepting[state] or both.allowed[state]


def test_bytes_and_bad_words_are_checked():
    only = ByteGuide.of_bytes({0x41, 0xFF})
    assert only.matches(b"A\xffA") and not only.matches(b"AB") and only.num_states == 1
    with pytest.raises(GuideError, match="0..255"):
        ByteGuide.of_bytes({256})
    with pytest.raises(GuideError, match="non-empty"):
        ByteGuide.avoiding([b""])
    with pytest.raises(GuideError, match="matches no text"):
        ByteGuide.regex("a+").intersect(ByteGuide.of_bytes({0x62}))


@pytest.mark.parametrize("pattern", ["(ab|cd)*e?", "[0-9]{1,6}(\\.[0-9]{1,3})?", "(x|xy|xyz)+", "é+|[^a]{2}"])
def test_a_guide_is_the_smallest_automaton_of_its_language(pattern):
    """No two states of a compiled guide take the same texts: minimizing again changes nothing, and grouping
    the states by their rows alone (as where hashes meet) gives the same automaton."""
    import numpy as np

    from blt_runtime.guide import _minimal

    guide = ByteGuide.regex(pattern)
    rows, accepting = np.asarray(guide.next, dtype=np.int64), np.asarray(guide.accepting)
    assert _minimal(rows, accepting) == (guide.next, guide.accepting)
    assert _minimal(rows, accepting, weights=np.zeros(257, dtype=np.int64)) == (guide.next, guide.accepting)
    doubled = np.concatenate([rows, np.where(rows >= 0, rows + len(rows), -1)])  # two copies of every state
    doubled[0] = rows[0]  # the start leads into the first copy; the second is reached from nowhere, but alike
    smallest = _minimal(doubled, np.concatenate([accepting, accepting]))
    assert len(smallest[0]) == guide.num_states
