"""What a JSON string may hold under JSON Schema's `format` and `pattern`, as regular expressions over its
text between the quotes (json_guide.py puts them there).

Formats (the texts of each are a subset of what the format allows, so every one validates):
- `date`: years 1000 to 9999, days within their month, February's 29th in leap years only (a year's last
  two digits a multiple of 4 but not 00, or a multiple of 400);
- `time`: RFC 3339's full-time, HH:MM:SS with up to 6 fractional digits, then Z or an offset (no leap second);
- `date-time`: a date, "T", a time;
- `uuid`: 8-4-4-4-12 hex digits; `ipv4`: four decimal octets without leading zeros;
- `email`: a local part of letters, digits and ._%+- (1 to 64), "@", 2 to 5 domain labels of letters,
  digits and - (1 to 63 each);
- `uri`: an http or https URL: a host of up to 4 labels of lowercase letters and digits (the last one
  beginning with a letter), then a path and query of characters that no URL parser escapes.
`password` (pydantic's SecretStr) constrains nothing: any string. `minLength` and `maxLength` with a
format are taken where they leave its texts as they are, and for `uri` a maxLength of 279 or more (it
bounds the path; pydantic's HttpUrl says 2083); else refused.

`pattern` is searched for, as JSON Schema says: a pattern without ^ matches anywhere after any
characters, one without $ before any. It is read in Python's syntax (regex_syntax.py; JSON Schema's is
ECMA 262's, alike in what it supports here). A character the pattern allows that JSON writes escaped is
written so: `"` as \\", a backslash as \\\\, tab, newline and carriage return as \\t, \\n and \\r; other
control characters are left out. With `minLength` or `maxLength` it is refused (a pattern and a length
make no one regular expression here).
"""

from __future__ import annotations

from .errors import GuideError
from .regex_syntax import Alt, Cat, Chars, Repeat, parse_search, to_regex

STRING_CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'  # any character, as JSON writes it
DAY = ("(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
       "|02-(?:0[1-9]|1[0-9]|2[0-8]))")
MULTIPLE_OF_4 = "(?:[2468][048]|[13579][26])"  # of two digits, the first not 0 (with 0[48]: all but 00)
LEAP_YEAR = f"(?:[1-9][0-9](?:0[48]|{MULTIPLE_OF_4})|{MULTIPLE_OF_4}00)"
DATE = f"(?:[1-9][0-9]{{3}}-{DAY}|{LEAP_YEAR}-02-29)"
HOUR = "(?:[01][0-9]|2[0-3])"
TIME = rf"{HOUR}:[0-5][0-9]:[0-5][0-9](?:\.[0-9]{{1,6}})?(?:Z|[+-]{HOUR}:[0-5][0-9])"
OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
HEX = "[0-9a-fA-F]"
LABEL = "[A-Za-z0-9-]{1,63}"
# a URL's host: up to 4 labels of letters and digits, the last beginning with a letter (WHATWG's parser reads a
# host that ends in a number as an IPv4 address); then a path and query of characters no parser escapes
HOST = "(?:[a-z0-9]{1,63}\\.){0,3}[a-z][a-z0-9]{0,62}"
HOST_MOST = 4 * 64 - 1
PATH_CHAR = r"[A-Za-z0-9\-._~:/?@!$&'()*+,;=]"
URI_SHORTEST = len("http://a")
URI_HEAD_MOST = len("https://") + HOST_MOST  # the longest scheme and host
URI_MOST_LEAST = URI_HEAD_MOST + 16  # the smallest maxLength taken: it leaves a path of 15 characters
# format -> (pattern, shortest, longest text; None: unbounded)
FORMATS = {
    "date": (DATE, 10, 10),
    "time": (TIME, 9, 21),
    "date-time": (f"{DATE}T{TIME}", 20, 32),
    "uuid": (f"{HEX}{{8}}-{HEX}{{4}}-{HEX}{{4}}-{HEX}{{4}}-{HEX}{{12}}", 36, 36),
    "ipv4": (rf"{OCTET}(?:\.{OCTET}){{3}}", 7, 15),
    "email": (rf"[A-Za-z0-9._%+\-]{{1,64}}@{LABEL}(?:\.{LABEL}){{1,4}}", 5, 64 + 1 + 5 * 63 + 4),
}


ANNOTATION_FORMATS = {"password"}  # formats that say what a string is for, not what it holds


def _fail(why: str):
    raise GuideError(f"JSON schema: {why}")


def _uri(least: int, most: int | None) -> str:
    """http(s) URLs of `least` to `most` characters: a host, then a path of at most what `most` leaves."""
    if least > URI_SHORTEST or (most is not None and most < URI_MOST_LEAST):
        _fail(f"format 'uri' with minLength above {URI_SHORTEST} or a maxLength under {URI_MOST_LEAST} not supported")
    path = f"{PATH_CHAR}*" if most is None else f"{PATH_CHAR}{{0,{most - URI_HEAD_MOST - 1}}}"
    return f"https?://{HOST}(?:/{path})?"


def format_content(name: str, least: int = 0, most: int | None = None) -> str:
    """The text between the quotes of a string in format `name`, `least` to `most` characters long."""
    if name == "uri":
        return _uri(least, most)
    if name not in FORMATS:
        _fail(f"format {name!r} not supported (supported: {', '.join(sorted([*FORMATS, 'uri']))})")
    pattern, shortest, longest = FORMATS[name]
    if least > shortest or (most is not None and most < longest):
        _fail(f"format {name!r} with minLength/maxLength that cut its texts ({shortest} to {longest} characters) "
              "not supported")
    return pattern


def _escaped(node):
    """The tree over a string's written form: the characters JSON escapes, escaped (module docstring)."""
    if isinstance(node, Chars):
        safe, escapes = [], []
        for lo, hi in node.ranges:
            for special, written in ((0x09, "\\t"), (0x0A, "\\n"), (0x0D, "\\r"), (0x22, '\\"'), (0x5C, "\\\\")):
                if lo <= special <= hi:
                    escapes.append(Cat([Chars([(ord(c), ord(c))]) for c in written]))
            start = lo
            for gap_lo, gap_hi in ((0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C)):
                if gap_hi < start or gap_lo > hi:
                    continue
                if gap_lo > start:
                    safe.append((start, gap_lo - 1))
                start = max(start, gap_hi + 1)
            if start <= hi:
                safe.append((start, hi))
        return Alt([Chars(safe), *escapes]) if escapes else Chars(safe)
    if isinstance(node, Cat):
        return Cat([_escaped(p) for p in node.parts])
    if isinstance(node, Alt):
        return Alt([_escaped(o) for o in node.options])
    return Repeat(_escaped(node.node), node.least, node.most)


def pattern_content(pattern: str) -> str:
    """The text between the quotes of a string in which a search for `pattern` finds a match."""
    if not isinstance(pattern, str):
        _fail("pattern must be a string")
    tree, at_start, at_end = parse_search(pattern)
    body = to_regex(_escaped(tree))
    return ("" if at_start else f"{STRING_CHAR}*") + f"(?:{body})" + ("" if at_end else f"{STRING_CHAR}*")
