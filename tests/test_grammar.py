"""GBNF grammars (blt_runtime/grammar.py, ByteGuide.grammar): each construct guides as the regular expression it
stands for does (Python's re decides, on random texts); a recursive grammar nests at any depth, and every text its
guide lets a random walk write is one the grammar derives (JSON: json.loads decides); what is not a grammar
is a GuideError that says where."""

from __future__ import annotations

import json
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blt_runtime.guide import ByteGuide, GuideError
from blt_runtime.pushdown import ProductGuide, PushdownGuide

# grammar -> the regular expression it stands for
CASES = [
    ('root ::= "ab" | "c"', r"ab|c"),
    ('root ::= a b\na ::= "x"+\nb ::= [0-9]{2,3}', r"x+[0-9]{2,3}"),
    ('root ::= ("a" | "b")* "c"?', r"[ab]*c?"),
    ('root ::= [^a-c\\n]{1,2}', r"[^a-c\n]{1,2}"),
    ('root ::= . "."', r"(?s:.)\."),
    ('root ::= "\\x41\\u00e9\\U0001F600\\t\\"\\\\"', "A\u00e9\U0001F600\t\"\\\\"),
    ('root ::= [\\[\\]\\-]+ "é"', r"[\[\]\-]+é"),
    ('root ::= x{2}\nx ::= "ab"{0,}', r"(ab)*(ab)*"),
    ("# a comment\nroot ::= (\n  \"a\"   # inside\n  | \"b\"\n) tail\ntail ::= | \"!\"  # empty or !\n",
     r"[ab]!?"),
    ('root ::= item ("," item)*\nitem ::= [a-z]+', r"[a-z]+(,[a-z]+)*"),
    # a rule inside itself at the end, or at the start, only: the repetition it stands for, one automaton
    ('root ::= list\nlist ::= item ("," list)?\nitem ::= [a-z]+', r"[a-z]+(,[a-z]+)*"),
    ('root ::= expr\nexpr ::= expr [-+] term | term | "(" ")"\nterm ::= [0-9]+', r"([0-9]+|\(\))([-+][0-9]+)*"),
    ('root ::= "a" root | "b" root | ""', r"[ab]*"),
]
ALPHABET = "abcxyz019!,.[]-\n\t\"\\éA\U0001F600"


@pytest.mark.parametrize("grammar, regex", CASES)
@settings(max_examples=150, deadline=None)
@given(texts=st.lists(st.text(alphabet=ALPHABET, max_size=8), min_size=5, max_size=5))
def test_a_grammar_guides_as_its_regular_expression(grammar, regex, texts):
    guide, pattern = ByteGuide.grammar(grammar), re.compile(regex)
    for text in texts:
        assert guide.matches(text.encode()) == bool(pattern.fullmatch(text)), (grammar, text)


@pytest.mark.parametrize("grammar, regex", CASES)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_a_grammar_guides_to_every_text_of_its_regular_expression(grammar, regex, data):
    text = data.draw(st.from_regex(regex, fullmatch=True))
    assert ByteGuide.grammar(grammar).matches(text.encode()), (grammar, text)


def test_the_grammar_examples_match():
    sql = ('root ::= select\nselect ::= "SELECT " column " from " table " where " condition\n'
           'column ::= "col_1 " | "col_2 "\ntable ::= "table_1 " | "table_2 "\ncondition ::= column "= " number\n'
           'number ::= "1 " | "2 "\n')
    guide = ByteGuide.grammar(sql)
    assert guide.matches(b"SELECT col_1  from table_2  where col_2 = 1 ")
    assert not guide.matches(b"SELECT col_3  from table_2  where col_2 = 1 ")


ARITHMETIC = """
root  ::= expr
expr  ::= term ([-+*/] term)*
term  ::= num | "(" space expr ")" space
num   ::= [0-9]+ space
space ::= [ \\t\\n]*
"""


def test_recursion_nests_at_any_depth():
    guide = ByteGuide.grammar(ARITHMETIC)
    assert isinstance(guide, PushdownGuide)  # brackets in brackets: followed with a stack
    nested = [b"1", b"(1)", b"((1+2)*3)", b"(((1)))", b"(" * 300 + b"1" + b")" * 300]
    assert all(guide.matches(t) for t in nested)
    assert not any(guide.matches(t) for t in (b"(1", b"1)", b"((1)", b"(" * 300 + b"1" + b")" * 299, b"()"))
    # a rule inside itself in the middle, even where it is at the end elsewhere
    middle = ByteGuide.grammar('root ::= "b" root | "c" | "d" root "e"')
    assert [middle.matches(t) for t in (b"bc", b"ddcee", b"dddceee", b"bbbc", b"dbdcee", b"ddce")] == \
        [True, True, True, True, True, False]
    # at the end or the start only: the repetition it stands for, one automaton
    for grammar in ('root ::= list\nlist ::= list "," "x" | "x"', 'root ::= "x" ("," root)?'):
        guide = ByteGuide.grammar(grammar)
        assert isinstance(guide, ByteGuide) and guide.matches(b",".join([b"x"] * 50))


def test_recursion_the_stack_cannot_follow_is_refused():
    with pytest.raises(GuideError, match="'a' can come first in itself"):
        ByteGuide.grammar('root ::= a\na ::= b "x" | "y"\nb ::= a "z"')
    with pytest.raises(GuideError, match="matches no text"):  # every alternative needs itself again
        ByteGuide.grammar('root ::= "(" root ")"')
    # a rule that derives nothing is left out where another alternative derives something
    guide = ByteGuide.grammar('root ::= "(" root ")" | "x" | never\nnever ::= "[" never "]"')
    assert guide.matches(b"((x))") and guide.allowed_bytes(guide.start) == [ord("("), ord("x")]


def test_a_pushdown_guide_within_allowed_bytes_and_its_bias_rows():
    import torch

    guide = ByteGuide.grammar(ARITHMETIC)
    within = guide.intersect(ByteGuide.of_bytes(set(b"(1)+")))  # no spaces, no other digits
    assert within.matches(b"((1)+1)") and not within.matches(b"(2)") and not within.matches(b"( 1)")
    assert within.allowed_bytes(within.state_after(b"((1")) == sorted(b")+1")
    avoiding = within.intersect(ByteGuide.avoiding([b"1+1"]))  # bad words too: a ProductGuide
    assert isinstance(avoiding, ProductGuide) and avoiding.matches(b"((1)+(1))") and not avoiding.matches(b"(1+1)")
    assert avoiding.matches(b"(" * 40 + b"1" + b")" * 40) and not avoiding.matches(b"( 1)")
    states = [guide.state_after(t) for t in (b"", b"(", b"(1", b"(1)", b"((1 ")]
    rows = [guide.mask(s) for s in states]
    table = guide.bias_rows(260, 4, 2, "cpu")  # rows for the masks met, grown as more are
    assert table.shape == (len(set(rows)), 260)
    for state, row in zip(states, rows):
        allowed = {i - 4 for i in torch.nonzero(table[row] == 0).flatten().tolist() if i != 2}
        assert allowed == set(guide.allowed_bytes(state)) and (table[row, 2] == 0) == guide.accepts(state)


JSON_GBNF = r'''
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws
array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? "]" ws
string ::=
  "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4}) # escapes
  )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9]{1,2})? ws
ws ::= | " " | "\n" [ \t]{0,20}
'''


def random_walk(guide, rng: random.Random, most: int = 400) -> bytes | None:
    """A text the guide allows, byte by byte at random, ending where it may (None: not ended in `most`)."""
    state, out = guide.start, bytearray()
    while len(out) < most:
        allowed = guide.allowed_bytes(state)
        if guide.accepts(state) and (not allowed or rng.random() < 0.15):
            return bytes(out)
        byte = rng.choice(list(allowed))
        out.append(byte)
        state = guide.step(state, byte)
    return None


def test_every_text_the_json_grammar_guides_to_is_json():
    guide, rng = ByteGuide.grammar(JSON_GBNF), random.Random(0)
    assert guide.matches(b'{"a": [1, {"b": null}], "c": "\\u00e9"}')
    assert guide.matches(b'{"a": [[[[[[1]]]]]]}') and guide.matches(b'{"a": ' * 40 + b"1" + b"}" * 40)
    assert not guide.matches(b'{"a": [[[1]]}')
    texts = [t for t in (random_walk(guide, rng) for _ in range(300)) if t is not None]
    assert len(texts) > 100
    for text in texts:
        assert isinstance(json.loads(text), dict), text


GBNF_ERRORS = [
    ("root ::= foo", "no rule named 'foo' (line 1, column 10)"),
    ('root ::= "a', "a literal not closed"),
    ('x ::= "a"', "no rule named 'root'"),
    ('root ::= "a"\nroot ::= "b"', "defined twice (line 2, column 1)"),
    ("root ::= [z-a]", "runs backwards"),
    ('root ::= "\\q"', "unknown escape \\q"),
    ('root ::= ("a"', "')' expected"),
    ('root ::= "a")', "unexpected ')'"),
    ("root ::= root \"a\"", "matches no text"),
    ('root ::= "a"{3,2}', "the most is less than the least"),
    ('root ::= "a"{2000}', "a repetition bound above 1000"),
    ('root ::= "\\xZZ"', "\\x takes 2 hex digits"),
    ('root ::= "\\uD800"', "is no character"),
    ("root ::= 'a'", "unexpected \"'\""),
    ("root = \"a\"", "'::=' expected"),
    ('root ::= "a"\n  "b"', "a rule name expected, not '\"' (line 2, column 3)"),
    ("", "no rules"),
    ('root ::= []', "an empty class"),
]


# ------------------------------------------------------------------------------------------- Lark's syntax
LARK_CASES = [
    ('start: "ab" | "c"', r"ab|c"),
    ("start: a b\na: \"x\"+\nb: DIGIT ~ 2..3\n%import common.DIGIT", r"x+[0-9]{2,3}"),
    ('start: ("a" | "b")* ["c"]', r"[ab]*c?"),
    ('?start: "a".."c" /[0-9]{2}/ "x"i', r"[a-c][0-9]{2}[xX]"),
    ("start: item (\",\" item)*  // a comment\n_item: /[a-z]+/\nitem: _item -> word", r"[a-z]+(,[a-z]+)*"),
    ("start: list\nlist: list \",\" WORD\n    | WORD\n%import common (WORD, WS)", r"[a-zA-Z]+(,[a-zA-Z]+)*"),
    ('start: "a" N\n%import common.SIGNED_INT -> N', r"a[+-]?[0-9]+"),
    ("start: SIGNED_NUMBER\n%import common.SIGNED_NUMBER", r"[+-]?([0-9]+[eE][+-]?[0-9]+|([0-9]+\.[0-9]*|\.[0-9]+)"
                                                             r"([eE][+-]?[0-9]+)?|[0-9]+)"),
    ('start: "x" ("y" "z")\n%ignore " "', r" *x *y *z *"),
    ('start: /a.b/s "\\n"', "a(?s:.)b\n"),
]


@pytest.mark.parametrize("grammar, regex", LARK_CASES)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_a_lark_grammar_guides_as_its_regular_expression(grammar, regex, data):
    guide, pattern = ByteGuide.grammar(grammar), re.compile(regex)
    text = data.draw(st.from_regex(regex, fullmatch=True))
    assert guide.matches(text.encode()), (grammar, text)
    for text in data.draw(st.lists(st.text(alphabet="abcxyzXYZ019 ,.+-eE\n", max_size=8), min_size=5, max_size=5)):
        assert guide.matches(text.encode()) == bool(pattern.fullmatch(text)), (grammar, text)


LARK_JSON = r'''
?start: value
?value: dict
      | list
      | string
      | SIGNED_NUMBER      -> number
      | "true"             -> true
      | "false"            -> false
      | "null"             -> null

list : "[" [value ("," value)*] "]"

dict : "{" [pair ("," pair)*] "}"
pair : string ":" value

string : ESCAPED_STRING

%import common.ESCAPED_STRING
%import common.SIGNED_NUMBER
%import common.WS
%ignore WS
'''
# the same with JSON's own terminals (common's take "+1", "\\k" and a form feed, which JSON does not)
STRICT_JSON = LARK_JSON.split("%import")[0].replace("ESCAPED_STRING", "STRING").replace("SIGNED_NUMBER",
                                                                                     "NUMBER") + r'''
STRING: /"([^"\\\x00-\x1f]|\\["\\\/bfnrt]|\\u[0-9a-fA-F]{4})*"/
NUMBER: /-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?/
%ignore /[ \t\r\n]+/
'''


def test_the_lark_examples_of_vllms_docs():
    sql = ('?start: select_statement\n?select_statement: "SELECT " column_list " FROM " table_name\n'
           '?column_list: column_name ("," column_name)*\n?table_name: identifier\n?column_name: identifier\n'
           '?identifier: /[a-zA-Z_][a-zA-Z0-9_]*/\n')
    guide = ByteGuide.grammar(sql)
    assert guide.matches(b"SELECT a,b_2 FROM t") and not guide.matches(b"SELECT a, b FROM t")
    guide = ByteGuide.grammar(LARK_JSON)
    assert guide.matches(b' {"a" : [1, -2.5e3, "x\\"y"] }\n') and guide.matches(b"[[[[1]]]]")
    assert not guide.matches(b"[[[[1]]]")
    guide, rng = ByteGuide.grammar(STRICT_JSON), random.Random(1)
    texts = [t for t in (random_walk(guide, rng) for _ in range(300)) if t is not None]
    assert len(texts) > 100
    for text in texts:
        json.loads(text)


LARK_ERRORS = [
    ("start: foo", "no rule named 'foo' (line 1, column 8)"),
    ('start: "a', "a string not closed"),
    ('x: "a"', "no rule named 'start'"),
    ('start: "a"\nstart: "b"', "'start' is defined twice (line 2, column 1)"),
    ("start: /a/m", "flags 'm': i and s are read"),
    ("start: /(?=a)/", "look-around"),
    ('%import os.path\nstart: "a"', "only Lark's common terminals"),
    ('%import common.NOPE\nstart: "a"', "common.NOPE is none of"),
    ('start: "a" ~ 3..2', "the most is less than the least"),
    ('start: "a" ~ 5000', "a repetition bound above 1000"),
    ('%declare X\nstart: "a"', "the directives read are"),
    ('start: ("a"', "')' expected"),
    ('start: "ab".."c"', "a range joins two strings of one character each"),
    ("start: start \"a\" start", "matches no text"),
]


@pytest.mark.parametrize("grammar, words, label", [(g, w, "grammar: ") for g, w in GBNF_ERRORS]
                         + [(g, w, "grammar (Lark): ") for g, w in LARK_ERRORS])
def test_what_is_not_a_grammar_is_a_guide_error_that_says_where(grammar, words, label):
    with pytest.raises(GuideError) as e:
        ByteGuide.grammar(grammar)
    assert words in str(e.value) and str(e.value).startswith(label), e.value


def test_a_grammar_that_expands_too_far_is_refused_at_once():
    """Rules that each use the next twice, 25 deep, stand for 2**24 copies of the last: refused in well under a
    second, not expanded until memory runs out."""
    import time

    grammar = "root ::= a1\n" + "".join(f"a{i} ::= a{i + 1} a{i + 1}\n" for i in range(1, 25)) + 'a25 ::= "x"\n'
    start = time.perf_counter()
    with pytest.raises(GuideError, match="grammar: too large"):
        ByteGuide.grammar(grammar)
    assert time.perf_counter() - start < 10


def test_nesting_past_the_pushdown_depth_is_not_allowed(monkeypatch):
    from blt_runtime import pushdown

    monkeypatch.setattr(pushdown, "MAX_DEPTH", 12)
    guide = ByteGuide.grammar('root ::= "(" root ")" | "x"')
    state, depth = guide.start, 0
    while ord("(") in guide.allowed_bytes(state) and depth < 20:
        state, depth = guide.step(state, ord("(")), depth + 1
    assert 5 < depth < 12 and guide.allowed_bytes(state) == [ord("x")]  # every allowed byte can be followed
    assert guide.matches(b"(" * depth + b"x" + b")" * depth)


def test_bad_words_with_a_stack_leave_no_dead_end():
    """A ProductGuide allows a byte only where both guides can still end: here the words rule out a third
    bracket, which the grammar alone would allow, and then every way but "ab"."""
    guide = ByteGuide.grammar('root ::= "(" root ")" | "ab"').intersect(ByteGuide.avoiding([b"((("]))
    assert guide.allowed_bytes(guide.start) == [ord("("), ord("a")]
    assert guide.allowed_bytes(guide.state_after(b"((")) == [ord("a")]  # "(((" is banned
    assert guide.matches(b"((ab))") and not guide.matches(b"(((ab)))")
    with pytest.raises(GuideError, match="matches no text"):
        ByteGuide.grammar('root ::= "(" root ")" | "ab"').intersect(ByteGuide.avoiding([b"ab"]))


@pytest.mark.parametrize("words", [[b"null", b"true"], [b'"a', b"}}", b"[["], [b"0", b"1", b",", b'""']])
def test_every_text_a_product_guide_allows_is_json_without_the_words(words):
    guide = ByteGuide.grammar(JSON_GBNF).intersect(ByteGuide.avoiding(words))
    rng = random.Random(repr(words))
    texts = [t for t in (random_walk(guide, rng) for _ in range(150)) if t is not None]
    assert len(texts) > 50
    for text in texts:
        assert isinstance(json.loads(text), dict) and not any(w in text for w in words), text
