"""Python's regular-expression syntax (the subset guide.py supports) -> a tree of character ranges.

Owns the parser: literals and escapes, `.`, classes with ranges and `\\d` `\\w` `\\s` (ASCII, as under
`re.ASCII`), groups, `|`, and quantifiers, as code points; `^` and `$` only at the pattern's ends; the
flags `i` (ASCII letters match either case, as under `re.ASCII`), `s` (`.` matches a newline too) and
`a`, for the whole pattern (`(?i)` at its start) or a group (`(?i:...)`, `(?-i:...)`). What it does not
support is a GuideError naming it. guide.py turns the tree into an automaton over bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import GuideError

MAX_CHAR = 0x10FFFF
DIGIT = [(0x30, 0x39)]
WORD = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
SPACE = [(0x09, 0x0D), (0x20, 0x20)]
NOT_NEWLINE = [(0, 0x09), (0x0B, MAX_CHAR)]
ANY = [(0, MAX_CHAR)]
FLAGS = re.compile(r"\(\?([a-zA-Z]*)(?:-([a-zA-Z]+))?([:)])")  # (?flags), (?flags:, (?flags-flags:
SUPPORTED_FLAGS = "ias"
REF = re.compile(r"\(\?&([A-Za-z0-9_-]+)\)")  # a rule, in the patterns of a grammar's rules
SIMPLE_ESCAPES = {"n": 0x0A, "t": 0x09, "r": 0x0D, "f": 0x0C, "v": 0x0B, "a": 0x07, "0": 0x00}


def _normalised(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _either_case(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ranges with the other case of every ASCII letter they hold (IGNORECASE under re.ASCII)."""
    out = list(ranges)
    for lo, hi in ranges:
        for start, end, shift in ((0x41, 0x5A, 0x20), (0x61, 0x7A, -0x20)):
            a, b = max(lo, start), min(hi, end)
            if a <= b:
                out.append((a + shift, b + shift))
    return _normalised(out)


def _complement(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out, start = [], 0
    for lo, hi in _normalised(ranges):
        if lo > start:
            out.append((start, lo - 1))
        start = hi + 1
    if start <= MAX_CHAR:
        out.append((start, MAX_CHAR))
    return out


# ---------------------------------------------------------------------- the pattern's syntax tree
@dataclass
class Chars:
    ranges: list[tuple[int, int]]


@dataclass
class Cat:
    parts: list


@dataclass
class Alt:
    options: list


@dataclass
class Repeat:
    node: object
    least: int
    most: int | None


class Ref:
    """A reference to a rule of a grammar, by name (pushdown.py): GBNF's and Lark's rule names, and `(?&name)` in
    the patterns of rules (json_guide.py's recursive schemas). `at`: where in the text, for an error."""

    def __init__(self, name: str, at: int = 0):
        self.name, self.at = name, at

    def __repr__(self) -> str:
        return f"Ref({self.name!r})"


class Parser:
    def __init__(self, pattern: str, refs: bool = False):
        self.p, self.i = pattern, 0
        self.refs = refs  # `(?&name)` is a Ref (the patterns of a grammar's rules), else refused
        self.flags = ""  # those in effect: "i" and "s" matter

    def set_flags(self, on: str, off: str) -> None:
        """Turn flags on and off (a GuideError for one not supported)."""
        bad = sorted(set(on + off) - set(SUPPORTED_FLAGS))
        if bad:
            self.fail(f"the flag{'s' if len(bad) > 1 else ''} {''.join(bad)} {'are' if len(bad) > 1 else 'is'} not "
                      "supported (i, s and a are)")
        self.flags = "".join(sorted(set(self.flags + on) - set(off)))

    def chars(self, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """A literal's or an escape's ranges under the flags in effect."""
        return _either_case(ranges) if "i" in self.flags else ranges

    def fail(self, why: str):
        raise GuideError(f"regex {self.p!r}: {why} (at offset {self.i})")

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def take(self) -> str:
        c = self.peek()
        if c is None:
            self.fail("unexpected end")
        self.i += 1
        return c

    def parse(self):
        """The tree; `self.anchored` then says whether the pattern began with ^ (or \\A) and ended with $ (or
        \\Z, \\z): matches are always whole texts here, but a search (JSON Schema's pattern) tells them apart."""
        pattern = self.p
        start, end = 0, len(pattern)
        while (flags := FLAGS.match(pattern, start)) and flags.group(3) == ")":  # the whole pattern's flags
            self.i = start
            self.set_flags(flags.group(1), flags.group(2) or "")
            start = flags.end()
        if pattern.startswith("^", start):
            start += 1
        elif pattern.startswith("\\A", start):
            start += 2
        for anchor in ("$", "\\Z", "\\z"):
            if pattern.endswith(anchor) and end - len(anchor) >= start and not _escaped(pattern, end - len(anchor)):
                end -= len(anchor)
                break
        self.anchored = (start > 0, end < len(pattern))
        self.p, self.i = pattern[:end], start
        node = self.alternation()
        if self.peek() is not None:
            self.fail("unbalanced ')'")
        self.p = pattern
        return node

    def alternation(self):
        options = [self.concatenation()]
        while self.peek() == "|":
            self.i += 1
            options.append(self.concatenation())
        return options[0] if len(options) == 1 else Alt(options)

    def concatenation(self):
        parts = []
        while self.peek() not in (None, "|", ")"):
            parts.append(self.quantified(self.atom()))
        return parts[0] if len(parts) == 1 else Cat(parts)

    def quantified(self, node):
        c = self.peek()
        if c in ("*", "+", "?"):
            self.i += 1
            least, most = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        elif c == "{" and (bounds := self.bounds()) is not None:
            least, most = bounds
        else:  # no quantifier (a "{" that opens none is a literal, as in Python)
            return node
        if self.peek() == "?":  # lazy: the same texts match
            self.i += 1
        elif self.peek() == "+":
            self.fail("possessive quantifiers are not supported")
        if self.peek() in ("*", "+", "?") or (self.peek() == "{" and self.bounds(consume=False) is not None):
            self.fail("multiple repeat")
        return Repeat(node, least, most)

    def bounds(self, consume: bool = True) -> tuple[int, int | None] | None:
        """{m}, {m,}, {,n}, {m,n} at the cursor (consumed unless `consume` is false), or None (nothing
        consumed)."""
        close = self.p.find("}", self.i)
        if close < 0:
            return None
        body = self.p[self.i + 1:close]
        lo_text, comma, hi_text = body.partition(",")
        if not (lo_text.isdigit() or (comma and not lo_text)) or not (hi_text.isdigit() or not hi_text):
            return None
        if not lo_text and not hi_text and comma:
            return None
        least = int(lo_text) if lo_text else 0
        most = int(hi_text) if hi_text else (None if comma else least)
        if most is not None and most < least:
            self.fail("min repeat greater than max repeat")
        if consume:
            self.i = close + 1
        return least, most

    def atom(self):
        if self.peek() == "{" and self.bounds(consume=False) is not None:
            self.fail("nothing to repeat")
        c = self.take()
        if c == "(":
            flags_before = self.flags
            scoped = FLAGS.match(self.p, self.i - 1)
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.p.startswith("?P<", self.i):
                close = self.p.find(">", self.i)
                if close < 0:
                    self.fail("unterminated group name")
                self.i = close + 1
            elif scoped and scoped.group(3) == ":":  # flags for this group alone
                self.set_flags(scoped.group(1), scoped.group(2) or "")
                self.i = scoped.end()
            elif scoped:
                self.fail("flags for the whole pattern go at its start ((?i)...); for a group, (?i:...)")
            elif self.refs and (call := REF.match(self.p, self.i - 1)):
                self.i = call.end()
                return Ref(call.group(1), call.start())
            elif self.peek() == "?":
                self.fail("look-around and other (?...) groups are not supported")
            node = self.alternation()
            if self.peek() != ")":
                self.fail("missing ')'")
            self.i += 1
            self.flags = flags_before
            return node
        if c == "[":
            return Chars(self.char_class())
        if c == ".":
            return Chars(ANY if "s" in self.flags else NOT_NEWLINE)
        if c == "\\":
            return Chars(self.chars(self.escape(in_class=False)))
        if c in "^$":
            self.fail(f"'{c}' is supported only at the pattern's {'start' if c == '^' else 'end'}")
        if c in "*+?":
            self.fail("nothing to repeat")
        if c == ")":
            self.fail("unbalanced ')'")
        return Chars(self.chars([(ord(c), ord(c))]))

    def escape(self, in_class: bool) -> list[tuple[int, int]]:
        c = self.take()
        classes = {"d": DIGIT, "w": WORD, "s": SPACE}
        if c in classes:
            return classes[c]
        if c.lower() in classes:
            return _complement(classes[c.lower()])
        if c in SIMPLE_ESCAPES and not (c == "0" and (self.peek() or "").isdigit()):
            return [(SIMPLE_ESCAPES[c],) * 2]
        if c in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[c]
            digits = self.p[self.i:self.i + width]
            if len(digits) != width or any(d not in "0123456789abcdefABCDEF" for d in digits):
                self.fail(f"\\{c} needs {width} hex digits")
            self.i += width
            code = int(digits, 16)
            if code > MAX_CHAR:
                self.fail("character out of range")
            return [(code, code)]
        if c == "b" and in_class:
            return [(0x08, 0x08)]
        if c.isdigit():
            self.fail("back references are not supported")
        if c in "bBAZz":
            self.fail(f"\\{c} is not supported here (anchors and word boundaries only at the pattern's ends, "
                      "\\A and \\Z)")
        if c.isascii() and c.isalnum():
            self.fail(f"bad escape \\{c}")
        return [(ord(c), ord(c))]

    def char_class(self) -> list[tuple[int, int]]:
        negate = self.peek() == "^"
        if negate:
            self.i += 1
        ranges: list[tuple[int, int]] = []
        first = True
        while True:
            c = self.take()
            if c == "]" and not first:
                break
            first = False
            if c == "\\":
                items = self.escape(in_class=True)
            else:
                items = [(ord(c), ord(c))]
            if len(items) == 1 and items[0][0] == items[0][1] and self.peek() == "-" \
                    and self.p[self.i + 1:self.i + 2] not in ("]", ""):
                self.i += 1
                c2 = self.take()
                high = self.escape(in_class=True) if c2 == "\\" else [(ord(c2), ord(c2))]
                if len(high) != 1 or high[0][0] != high[0][1]:
                    self.fail("bad character range")
                if high[0][0] < items[0][0]:
                    self.fail("bad character range")
                items = [(items[0][0], high[0][0])]
            ranges += items
        ranges = _normalised(self.chars(ranges))
        return _complement(ranges) if negate else ranges


def _escaped(pattern: str, at: int) -> bool:
    """Whether the character at `at` is escaped (an odd run of backslashes before it)."""
    n = 0
    while at - n - 1 >= 0 and pattern[at - n - 1] == "\\":
        n += 1
    return n % 2 == 1


def parse(pattern: str, refs: bool = False):
    """The tree of a pattern (Chars, Cat, Alt, Repeat; with `refs`, Ref for `(?&name)`); a GuideError for what
    is not supported."""
    return Parser(pattern, refs).parse()


def parse_search(pattern: str) -> tuple[object, bool, bool]:
    """(tree, anchored at the start, anchored at the end): a search for the pattern matches any text with a
    match of the tree inside, that begins or ends the text where anchored."""
    parser = Parser(pattern)
    node = parser.parse()
    return node, *parser.anchored


def _char(c: int) -> str:
    return f"\\U{c:08x}"


def to_regex(node) -> str:
    """A pattern (this module's syntax) for a tree: parse(to_regex(tree)) matches what the tree does."""
    if isinstance(node, Chars):
        if not node.ranges:
            return f"[^\\x00-{_char(MAX_CHAR)}]"  # matches nothing
        return "[" + "".join(_char(lo) if lo == hi else f"{_char(lo)}-{_char(hi)}" for lo, hi in node.ranges) + "]"
    if isinstance(node, Cat):
        return "".join(f"(?:{to_regex(p)})" for p in node.parts)
    if isinstance(node, Alt):
        return "(?:" + "|".join(to_regex(o) for o in node.options) + ")"
    if isinstance(node, Repeat):
        most = "" if node.most is None else node.most
        return f"(?:{to_regex(node.node)}){{{node.least},{most}}}"
    raise TypeError(f"not a pattern's tree: {node!r}")
