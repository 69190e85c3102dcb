"""Lark grammars (the EBNF of the Lark parsing toolkit, which vLLM's guided_grammar takes too) -> the rules that
grammar.py expands, as a GBNF grammar's are.

Owns Lark's syntax, the part that says which texts a grammar derives:
- Definitions `name: expansions` (rules; `?name` and `!name` alike) and `NAME: expansions` (terminals), a
  priority (`NAME.2`) ignored; alternatives `|`, also at the start of a following line; `-> alias` ignored.
  `start` is the whole completion. Comments `//` (and `#`) to the end of the line.
- Items: strings `"..."` (Python's escapes; `"..."i` either case, ASCII), ranges `"a".."z"`, regular
  expressions `/.../` with the flags `i` and `s` (Python's syntax, regex_syntax.py), names, groups `( )`,
  optional `[ ]`, and `?` `*` `+` `~ n` `~ n..m`.
- `%import common.NAME` (or `common (A, B)`, `-> ALIAS`) of Lark's common terminals (COMMON), and `%ignore`:
  what it names may come before and after any terminal of the rules (Lark's lexer skips it between
  tokens), so `%ignore WS` lets spaces and newlines in anywhere between tokens.
What Lark has beyond that (templates, `%declare`, other imports, look-around in regular expressions) is a
GuideError that says where.
"""

from __future__ import annotations

import ast
import re

from .errors import GuideError
from .grammar import MAX_REPEAT, skip_space, where
from .regex_syntax import Alt, Cat, Chars, Repeat, _either_case, parse

# Lark's common.lark terminals, as Python regular expressions (a "." in Lark's is any character but a newline)
_INT, _EXP = r"[0-9]+", r"[eE][+-]?[0-9]+"
_DECIMAL = rf"{_INT}\.[0-9]*|\.{_INT}"
_FLOAT = rf"{_INT}{_EXP}|(?:{_DECIMAL})(?:{_EXP})?"
COMMON = {
    "DIGIT": r"[0-9]", "HEXDIGIT": r"[a-fA-F0-9]", "INT": _INT, "SIGNED_INT": rf"[+-]?{_INT}", "DECIMAL": _DECIMAL,
    "FLOAT": _FLOAT, "SIGNED_FLOAT": rf"[+-]?(?:{_FLOAT})", "NUMBER": rf"{_FLOAT}|{_INT}",
    "SIGNED_NUMBER": rf"[+-]?(?:{_FLOAT}|{_INT})", "ESCAPED_STRING": r'"(?:[^"\\\n]|\\.)*"',
    "LCASE_LETTER": r"[a-z]", "UCASE_LETTER": r"[A-Z]", "LETTER": r"[a-zA-Z]", "WORD": r"[a-zA-Z]+",
    "CNAME": r"[_a-zA-Z][_a-zA-Z0-9]*", "WS_INLINE": r"[ \t]+", "WS": r"[ \t\f\r\n]+", "CR": r"\r", "LF": r"\n",
    "NEWLINE": r"(?:\r?\n)+",
}
DEFINITION = re.compile(r"[ \t]*[?!]?([A-Za-z_][A-Za-z0-9_]*)(?:\.-?[0-9]+)?[ \t]*:(?!:)")
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
NUMBER = re.compile(r"[0-9]+")


def _is_terminal(name: str) -> bool:
    """Lark's terminals are named in capitals (a leading _ aside), its rules in small letters."""
    return name.lstrip("_")[:1].isupper()


def is_lark(text: str) -> bool:
    """Whether a grammar is Lark's (a definition `name:`) rather than GBNF (`name ::=`)."""
    lines = [re.sub(r"(//|#).*", "", line) for line in text.splitlines()]
    return not any("::=" in line for line in lines) and any(DEFINITION.match(line) for line in lines)


class Token:
    """A terminal in a rule (a string, a range, a regular expression, a terminal's name): what `%ignore` names
    may follow it."""

    def __init__(self, node):
        self.node = node


class _Parser:
    def __init__(self, text: str, ref):
        self.text, self.i, self.ref = text, 0, ref  # ref(name, at): a reference to a definition
        self.rules: dict[str, object] = {}
        self.ignore: list = []
        self.in_terminal = False

    def fail(self, why: str):
        raise GuideError(f"grammar (Lark): {why} ({where(self.text, self.i)})")

    def peek(self, k: int = 1) -> str:
        return self.text[self.i:self.i + k]

    def space(self, newlines: bool = False) -> None:
        self.i = skip_space(self.text, self.i, newlines, ("//", "#"))

    def parse(self) -> tuple[dict[str, object], list]:
        self.space(True)
        while self.i < len(self.text):
            if self.peek() == "%":
                self.directive()
            else:
                self.definition()
            self.space()
            if self.i < len(self.text) and self.peek() not in "\r\n":
                self.fail(f"unexpected {self.peek()!r}")
            self.space(True)
        return self.rules, self.ignore

    def definition(self) -> None:
        match = DEFINITION.match(self.text, self.i)
        if match is None:
            self.fail("a definition (name: ...) or a directive (%import, %ignore) expected")
        name = match.group(1)
        if name in self.rules:
            self.fail(f"{name!r} is defined twice")
        self.i = match.end()
        self.space()
        self.in_terminal = _is_terminal(name)
        self.rules[name] = self.expansions()

    def directive(self) -> None:
        for word in ("%import", "%ignore"):
            if self.text.startswith(word, self.i) and not self.text[self.i + len(word):][:1].isalnum():
                self.i += len(word)
                self.space()
                if word == "%ignore":
                    self.in_terminal = True
                    self.ignore.append(self.expansions())
                else:
                    self.imports()
                return
        self.fail("the directives read are %import (of Lark's common terminals) and %ignore")

    def imports(self) -> None:
        if not self.text.startswith("common", self.i):
            self.fail("only Lark's common terminals can be imported (%import common.NAME)")
        self.i += len("common")
        names: list[tuple[str, str]] = []
        if self.peek() == ".":
            self.i += 1
            name = self.name()
            self.space()
            alias = name
            if self.peek(2) == "->":
                self.i += 2
                self.space()
                alias = self.name()
            names.append((name, alias))
        else:
            self.space()
            if self.peek() != "(":
                self.fail("%import common.NAME or %import common (NAME, ...) expected")
            self.i += 1
            while True:
                self.space()
                name = self.name()
                names.append((name, name))
                self.space()
                if self.peek() == ")":
                    self.i += 1
                    break
                if self.peek() != ",":
                    self.fail("',' or ')' expected")
                self.i += 1
        for name, alias in names:
            if name not in COMMON:
                self.fail(f"common.{name} is none of Lark's common terminals read here ({', '.join(COMMON)})")
            self.rules.setdefault(alias, parse(COMMON[name]))

    def name(self) -> str:
        match = NAME.match(self.text, self.i)
        if match is None:
            self.fail("a name expected")
        self.i = match.end()
        return match.group(0)

    def expansions(self):
        options = [self.sequence()]
        while True:
            save = self.i
            self.space(True)
            if self.peek() != "|":
                self.i = save
                break
            self.i += 1
            self.space()
            options.append(self.sequence())
        return options[0] if len(options) == 1 else Alt(options)

    def sequence(self):
        parts = []
        while self.i < len(self.text) and self.peek() not in "|)]\r\n":
            if self.peek(2) == "->":  # an alias: the tree's, not the text's
                self.i += 2
                self.space()
                self.name()
                self.space()
                continue
            parts.append(self.quantified(self.atom()))
            self.space()
        return parts[0] if len(parts) == 1 else Cat(parts)

    def atom(self):
        c = self.peek()
        if c in "\"'":
            node = self.string()
            self.space()
            if self.peek(2) == "..":
                self.i += 2
                self.space()
                lo, hi = node, self.string()
                if not (isinstance(lo, Cat) and isinstance(hi, Cat) and len(lo.parts) == len(hi.parts) == 1):
                    self.fail("a range joins two strings of one character each")
                node = Chars([(lo.parts[0].ranges[0][0], hi.parts[0].ranges[0][0])])
            return node if self.in_terminal else Token(node)
        if c == "/":
            node = self.regex()
            return node if self.in_terminal else Token(node)
        if c in "([":
            self.i += 1
            self.space(True)
            node = self.expansions()
            self.space(True)
            if self.peek() != {"(": ")", "[": "]"}[c]:
                self.fail(f"{ {'(': ')', '[': ']'}[c]!r} expected")
            self.i += 1
            return node if c == "(" else Repeat(node, 0, 1)
        if NAME.match(self.text, self.i):
            at = self.i
            name = self.name()
            ref = self.ref(name, at)
            return ref if self.in_terminal or not _is_terminal(name) else Token(ref)
        self.fail(f"unexpected {c!r}" if c else "unexpected end")

    def string(self):
        quote, start = self.peek(), self.i
        self.i += 1
        while self.peek() != quote:
            if self.peek() in ("", "\n"):
                self.fail("a string not closed")
            self.i += 2 if self.peek() == "\\" else 1
        self.i += 1
        try:
            value = ast.literal_eval(self.text[start:self.i])
        except (ValueError, SyntaxError):
            self.i = start
            self.fail("a string Python cannot read")
        fold = self.peek() == "i" and not NAME.match(self.text, self.i + 1)
        if fold:
            self.i += 1
        chars = [Chars(_either_case([(ord(ch), ord(ch))]) if fold else [(ord(ch), ord(ch))]) for ch in value]
        return Cat(chars)

    def regex(self):
        start = self.i
        self.i += 1
        body = []
        while self.peek() != "/":
            if self.peek() in ("", "\n"):
                self.fail("a regular expression not closed by '/'")
            if self.peek(2) == "\\/":
                body.append("/")
                self.i += 2
            else:
                body.append(self.peek(2) if self.peek() == "\\" else self.peek())
                self.i += len(body[-1])
        self.i += 1
        flags = ""
        while self.peek() and self.peek() in "imsxlu":
            flags += self.peek()
            self.i += 1
        if set(flags) - set("is"):
            self.i = start
            self.fail(f"the regular expression's flags {flags!r}: i and s are read")
        pattern = "".join(body)
        try:
            return parse(f"(?{flags}:{pattern})" if flags else pattern)
        except GuideError as e:
            self.i = start
            self.fail(str(e))

    def quantified(self, node):
        while True:
            self.space()
            c = self.peek()
            if c in ("?", "*", "+"):
                self.i += 1
                node = Repeat(node, 1 if c == "+" else 0, 1 if c == "?" else None)
            elif c == "~":
                self.i += 1
                self.space()
                least = self.number()
                most = least
                if self.peek(2) == "..":
                    self.i += 2
                    most = self.number()
                if most < least:
                    self.fail(f"~ {least}..{most}: the most is less than the least")
                if most > MAX_REPEAT:
                    self.fail(f"a repetition bound above {MAX_REPEAT}")
                node = Repeat(node, least, most)
            else:
                return node

    def number(self) -> int:
        match = NUMBER.match(self.text, self.i)
        if match is None:
            self.fail("a number expected")
        self.i = match.end()
        return int(match.group(0))


def lark_rules(text: str, ref) -> tuple[dict[str, object], str]:
    """(rules, the root's name: start) of a Lark grammar, their terminals followed by what `%ignore` names;
    `ref(name, at)` makes a reference."""
    rules, ignore = _Parser(text, ref).parse()
    if "start" not in rules:
        raise GuideError("grammar (Lark): no rule named 'start' (the whole completion)")
    skip = Repeat(Alt(ignore), 0, None) if ignore else None

    def tokens(node):
        if isinstance(node, Token):
            return node.node if skip is None else Cat([node.node, skip])
        if isinstance(node, Cat):
            return Cat([tokens(p) for p in node.parts])
        if isinstance(node, Alt):
            return Alt([tokens(o) for o in node.options])
        if isinstance(node, Repeat):
            return Repeat(tokens(node.node), node.least, node.most)
        return node

    rules = {name: tokens(node) for name, node in rules.items()}
    if skip is None:
        return rules, "start"
    rules[" start"] = Cat([skip, ref("start", 0)])  # before the first token too (a name no grammar can write)
    return rules, " start"
