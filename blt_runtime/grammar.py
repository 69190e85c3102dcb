"""Grammars -> the syntax tree guide.py compiles: GBNF (llama.cpp's format) here, or Lark's (lark_grammar.py,
told apart by its `name:` definitions), the two that vLLM's `guided_grammar` takes.

Owns GBNF's syntax and the expansion of either's rules:
- Rules `name ::= alternatives`, one after another; `root` is the whole completion. Names of letters, digits,
  `-` and `_`. A rule ends at a newline, but inside parentheses or after `::=` or `|`. `#` comments to the
  end of the line.
- Terminals are characters (Unicode code points, encoded as UTF-8): literals `"..."`, classes `[a-z]` and
  `[^...]`, and `.` (any character). Escapes in both: `\\n` `\\r` `\\t` `\\\\` `\\"` `\\[` `\\]` `\\-` `\\xHH`
  `\\uHHHH` `\\UHHHHHHHH`.
- Sequences, `|`, groups `( )`, and the quantifiers `*` `+` `?` `{m}` `{m,}` `{m,n}`.
A rule that refers to itself only at the end of what it derives (`list ::= item ("," list)?`), or only at the
start (`expr ::= expr "+" term | term`), is the repetition it stands for, exactly; rules are then copied where
they are named, so that a grammar without other recursion is one automaton (ByteGuide). Any other recursion,
direct or through other rules (nested brackets), is followed with a stack, at any depth (pushdown.py: its
rules that name themselves stay rules). Errors (syntax, a rule defined twice, a rule never defined, no
root, nothing to derive, left recursion through other rules) are GuideErrors that say where.
"""

from __future__ import annotations

from .errors import GuideError
from .regex_syntax import ANY, MAX_CHAR, Alt, Cat, Chars, Ref, Repeat, _complement, _normalised

ESCAPES = {"n": 0x0A, "r": 0x0D, "t": 0x09, "\\": 0x5C, '"': 0x22, "[": 0x5B, "]": 0x5D, "-": 0x2D}
HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
MAX_REPEAT = 1000  # a {m,n} bound beyond this is refused (each repetition is a copy in the automaton)
MAX_NODES = 200_000  # parts of the expanded tree (its automaton would pass guide.MAX_NFA_STATES long before)


class _Parser:
    def __init__(self, text: str):
        self.text, self.i = text, 0
        self.rules: dict[str, object] = {}

    def fail(self, why: str):
        raise GuideError(f"grammar: {why} ({where(self.text, self.i)})")

    def peek(self) -> str | None:
        return self.text[self.i] if self.i < len(self.text) else None

    def space(self, newlines: bool) -> None:
        """Skip spaces, tabs and comments; newlines too where a rule goes on past them."""
        self.i = skip_space(self.text, self.i, newlines, ("#",))

    def parse(self) -> dict[str, object]:
        self.space(True)
        while self.peek() is not None:
            start = self.i
            name = self.name()
            self.space(False)
            if not self.text.startswith("::=", self.i):
                self.fail(f"'::=' expected after the rule name {name!r}")
            self.i += 3
            self.space(True)
            if name in self.rules:
                self.i = start
                self.fail(f"the rule {name!r} is defined twice")
            self.rules[name] = self.alternatives(nested=False)
            if self.peek() not in (None, "\n", "\r"):
                self.fail(f"unexpected {self.peek()!r}")
            self.space(True)
        if not self.rules:
            self.fail("no rules")
        return self.rules

    def name(self) -> str:
        start = self.i
        while self.peek() is not None and self.peek() in NAME_CHARS:
            self.i += 1
        if self.i == start:
            self.fail(f"a rule name expected, not {self.peek()!r}" if self.peek() else "a rule name expected")
        return self.text[start:self.i]

    def alternatives(self, nested: bool):
        options = [self.sequence(nested)]
        while self.peek() == "|":
            self.i += 1
            self.space(True)
            options.append(self.sequence(nested))
        return options[0] if len(options) == 1 else Alt(options)

    def sequence(self, nested: bool):
        parts = []
        while (c := self.peek()) is not None and c not in "|)\r\n":
            parts.append(self.quantified(self.element()))
            self.space(nested)
        return parts[0] if len(parts) == 1 else Cat(parts)

    def element(self):
        c = self.peek()
        if c == '"':
            self.i += 1
            chars = []
            while self.peek() != '"':
                if self.peek() is None or self.peek() in "\r\n":
                    self.fail("a literal not closed by '\"'")
                c = self.char()
                chars.append(Chars([(c, c)]))
            self.i += 1
            return Cat(chars)
        if c == "[":
            return self.char_class()
        if c == ".":
            self.i += 1
            return Chars(ANY)
        if c == "(":
            self.i += 1
            self.space(True)
            node = self.alternatives(nested=True)
            if self.peek() != ")":
                self.fail("')' expected")
            self.i += 1
            return node
        if c is not None and c in NAME_CHARS:
            at = self.i
            return Ref(self.name(), at)
        self.fail(f"unexpected {c!r}")

    def char(self) -> int:
        """One character of a literal or a class, escapes read."""
        c = self.text[self.i]
        self.i += 1
        if c != "\\":
            return ord(c)
        e = self.peek()
        if e is None:
            self.fail("an escape at the end")
        self.i += 1
        if e in ESCAPES:
            return ESCAPES[e]
        if e in HEX_ESCAPES:
            digits = self.text[self.i:self.i + HEX_ESCAPES[e]]
            if len(digits) != HEX_ESCAPES[e] or any(d not in "0123456789abcdefABCDEF" for d in digits):
                self.fail(f"\\{e} takes {HEX_ESCAPES[e]} hex digits")
            self.i += len(digits)
            value = int(digits, 16)
            if value > MAX_CHAR or 0xD800 <= value <= 0xDFFF:
                self.fail(f"\\{e}{digits} is no character")
            return value
        self.i -= 1
        self.fail(f"unknown escape \\{e}")

    def char_class(self) -> Chars:
        self.i += 1
        negated = self.peek() == "^"
        if negated:
            self.i += 1
        ranges = []
        while self.peek() != "]":
            if self.peek() is None or self.peek() in "\r\n":
                self.fail("a class not closed by ']'")
            lo = self.char()
            hi = lo
            if self.peek() == "-" and self.text[self.i + 1:self.i + 2] not in ("]", ""):
                self.i += 1
                hi = self.char()
                if hi < lo:
                    self.fail(f"the range {chr(lo)!r}-{chr(hi)!r} runs backwards")
            ranges.append((lo, hi))
        self.i += 1
        if not ranges and not negated:
            self.fail("an empty class")
        ranges = _normalised(ranges)
        return Chars(_complement(ranges) if negated else ranges)

    def quantified(self, node):
        c = self.peek()
        if c in ("*", "+", "?"):
            self.i += 1
            return Repeat(node, 1 if c == "+" else 0, 1 if c == "?" else None)
        if c != "{":
            return node
        start = self.i
        self.i += 1
        least = self.number()
        most: int | None = least
        if self.peek() == ",":
            self.i += 1
            most = None if self.peek() == "}" else self.number()
        if self.peek() != "}":
            self.fail("'}' expected")
        self.i += 1
        if most is not None and most < least:
            self.i = start
            self.fail(f"{{{least},{most}}}: the most is less than the least")
        if max(least, most or 0) > MAX_REPEAT:
            self.i = start
            self.fail(f"a repetition bound above {MAX_REPEAT}")
        return Repeat(node, least, most)

    def number(self) -> int:
        start = self.i
        while self.peek() is not None and self.peek().isdigit():
            self.i += 1
        if self.i == start:
            self.fail("a number expected")
        return int(self.text[start:self.i])


def skip_space(text: str, i: int, newlines: bool, comments: tuple[str, ...]) -> int:
    """The offset past spaces, tabs, comments (each of `comments` begins one, to the end of its line) and, with
    `newlines`, newlines, from offset i."""
    while i < len(text):
        if text.startswith(comments, i):
            end = text.find("\n", i)
            i = len(text) if end < 0 else end
        elif text[i] in " \t" or newlines and text[i] in "\r\n":
            i += 1
        else:
            break
    return i


def where(text: str, i: int) -> str:
    """Offset i of the text as "line L, column C" (both from 1), for an error."""
    return f"line {text.count(chr(10), 0, i) + 1}, column {i - (text.rfind(chr(10), 0, i) + 1) + 1}"


def grammar_rules(text: str) -> tuple[dict, str, str]:
    """(rules, the whole text's rule, a label for errors) of a GBNF grammar (its `root`) or a Lark grammar (its
    `start`, lark_grammar.py), each rule's tree with a Ref where it names a rule, and a rule that names itself
    only at its end or only at its start as the repetition it stands for; a GuideError for one that cannot
    guide."""
    from .lark_grammar import is_lark, lark_rules

    if not isinstance(text, str):
        raise GuideError("a grammar must be a string")
    if is_lark(text):
        label = "grammar (Lark)"
        rules, root = lark_rules(text, Ref)
    else:
        label, root = "grammar", "root"
        rules = _Parser(text).parse()
        if "root" not in rules:
            raise GuideError("grammar: no rule named 'root' (the whole completion)")
    for node in rules.values():  # every reference names a rule
        for ref in _refs(node):
            if ref.name not in rules:
                raise GuideError(f"{label}: no rule named {ref.name!r} ({where(text, ref.at)})")
    return {name: _linear(name, node) for name, node in rules.items()}, root, label


def recursive_rules(rules: dict, root: str) -> set[str]:
    """The rules reachable from `root` that name themselves, directly or through others (a guide follows them
    with a stack, pushdown.py; the others are copied where they are named)."""
    names = {name: {ref.name for ref in _refs(node)} for name, node in rules.items()}
    reachable, stack = {root}, [root]
    while stack:
        for name in names[stack.pop()] - reachable:
            reachable.add(name)
            stack.append(name)
    out = set()
    for name in reachable:
        seen, stack = set(), [name]
        while stack and name not in seen:
            for other in names[stack.pop()] - seen:
                seen.add(other)
                stack.append(other)
        if name in seen:
            out.add(name)
    return out


def inline(rules: dict, node, keep: set[str], label: str, left: list[int] | None = None):
    """`node` with each name of a rule not in `keep` replaced by that rule's tree (rules not in `keep` must not
    name themselves: recursive_rules). A GuideError past MAX_NODES parts."""
    left = [MAX_NODES] if left is None else left
    left[0] -= 1
    if left[0] < 0:
        raise GuideError(f"{label}: too large (its rules expand to more than {MAX_NODES:,} parts: rules that use "
                         "others several times, many levels deep?)")
    if isinstance(node, Ref):
        return node if node.name in keep else inline(rules, rules[node.name], keep, label, left)
    if isinstance(node, Cat):
        return Cat([inline(rules, part, keep, label, left) for part in node.parts])
    if isinstance(node, Alt):
        return Alt([inline(rules, option, keep, label, left) for option in node.options])
    if isinstance(node, Repeat):
        return Repeat(inline(rules, node.node, keep, label, left), node.least, node.most)
    return node


class _NotLinear(Exception):
    """A rule refers to itself elsewhere than at the end (or the start) of what it derives."""


def _linear(name: str, node):
    """A rule that refers to itself only at the end of its alternatives (`list ::= item ("," list)?`), or only at
    their start (`expr ::= expr "+" term | term`), as the repetition it stands for (Arden's lemma: R = A R | B is
    A* B; R = R A | B is B A*), so that it needs no stack; any other rule as it is."""
    if not any(ref.name == name for ref in _refs(node)):
        return node
    for last in (True, False):
        try:
            more, stop = _split(name, node, last)
        except _NotLinear:
            continue
        if stop is None:  # every alternative needs the rule again: nothing to derive (its guide will say so)
            return node
        if more is None:
            return stop
        again = Repeat(more, 0, None)
        return Cat([again, stop]) if last else Cat([stop, again])
    return node


def _split(name: str, node, last: bool):
    """(what comes before the rule's reference at the end of `node` (after it, at the start, where not `last`),
    what `node` derives without one): None for nothing; _NotLinear where the reference is elsewhere."""
    if isinstance(node, Ref) and node.name == name:
        return Cat([]), None
    if not any(ref.name == name for ref in _refs(node)):
        return None, node
    if isinstance(node, Cat):
        at = len(node.parts) - 1 if last else 0
        rest = node.parts[:at] if last else node.parts[1:]
        if any(ref.name == name for part in rest for ref in _refs(part)):
            raise _NotLinear
        more, stop = _split(name, node.parts[at], last)
        join = (lambda x: Cat(rest + [x])) if last else (lambda x: Cat([x] + rest))
        return (None if more is None else join(more)), (None if stop is None else join(stop))
    if isinstance(node, Alt):
        splits = [_split(name, option, last) for option in node.options]
        mores = [m for m, _ in splits if m is not None]
        stops = [s for _, s in splits if s is not None]
        return (Alt(mores) if mores else None), (Alt(stops) if stops else None)
    if isinstance(node, Repeat) and node.least == 0 and node.most == 1:  # optional: its end is the end
        more, stop = _split(name, node.node, last)
        return more, Alt([stop, Cat([])]) if stop is not None else Cat([])
    raise _NotLinear


def _refs(node):
    if isinstance(node, Ref):
        yield node
    elif isinstance(node, (Cat, Alt)):
        for part in node.parts if isinstance(node, Cat) else node.options:
            yield from _refs(part)
    elif isinstance(node, Repeat):
        yield from _refs(node.node)
