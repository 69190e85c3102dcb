"""Numbers between bounds as regular expressions, for JSON Schema's minimum and maximum (json_guide.py).

`integer_range(lo, hi)`: the decimal integers in [lo, hi] (None: unbounded), written as JSON writes them
(no leading zeros, no "-0"), at most DIGITS digits. `number_range(lo, hi, lo_open, hi_open)`: the
JSON numbers between whole-number bounds, each bound inclusive or exclusive: the integers among them,
and numbers with a fraction that ends in a digit other than 0 (a fraction of zeros would be the
integer's value: where that integer is an excluded bound, it would fall outside) and with 15
significant digits at most (so that a reader's double lies where the text does: 39.99999999999999999
would be read as 40.0, outside an exclusive maximum of 40). No exponents.
"""

from __future__ import annotations

DIGITS = 18  # json_guide.INTEGER's most


def _same_length(a: str, b: str) -> list[str]:
    """Patterns for the digit strings of one length from a to b (a <= b; inner digits may be 0)."""
    if a == b:
        return [a]
    if len(a) == 1:
        return [f"[{a}-{b}]"]
    if a[0] == b[0]:
        return [a[0] + p for p in _same_length(a[1:], b[1:])]
    rest = len(a) - 1
    out, first, last = [], int(a[0]), int(b[0])
    if a[1:] != "0" * rest:  # a's first digit: from a's rest up
        out += [a[0] + p for p in _same_length(a[1:], "9" * rest)]
        first += 1
    tail = []
    if b[1:] != "9" * rest:  # b's first digit: up to b's rest
        tail = [b[0] + p for p in _same_length("0" * rest, b[1:])]
        last -= 1
    if first <= last:
        lead = str(first) if first == last else f"[{first}-{last}]"
        out.append(f"{lead}[0-9]{{{rest}}}")
    return out + tail


def _non_negative(lo: int, hi: int) -> list[str]:
    """0 <= lo <= hi <= 10**DIGITS - 1."""
    out, lo_len, hi_len = [], len(str(lo)), len(str(hi))
    for length in range(lo_len, hi_len + 1):
        a = lo if length == lo_len else 10 ** (length - 1)
        b = hi if length == hi_len else 10 ** length - 1
        out += _same_length(str(a), str(b))
    return out


def _alternation(options: list[str]) -> str:
    return options[0] if len(options) == 1 else "(?:" + "|".join(options) + ")"


def integer_range(lo: int | None, hi: int | None) -> str | None:
    """The pattern of the integers in [lo, hi] (None: unbounded, as far as DIGITS digits go), or None if
    there are none."""
    top = 10 ** DIGITS - 1
    lo, hi = max(-top if lo is None else lo, -top), min(top if hi is None else hi, top)
    if lo > hi:
        return None
    options = []
    if hi >= 0:
        options += _non_negative(max(lo, 0), hi)
    if lo < 0:
        options += ["-" + p for p in _non_negative(max(-hi, 1), -lo)]
    return _alternation(options)


SIGNIFICANT = 15  # digits of a number with a fraction, at most: a double holds it exactly (DBL_DIG)


def _with_fractions(lo: int, hi: int | None) -> list[str]:
    """n.f for 0 <= lo <= n <= hi (None: unbounded) and 0 < f < 1, SIGNIFICANT digits at most in all."""
    options = []
    for digits in range(1, SIGNIFICANT):
        widest = 10 ** digits - 1
        a, b = max(lo, 0 if digits == 1 else 10 ** (digits - 1)), widest if hi is None else min(hi, widest)
        if a <= b:
            options.append(integer_range(a, b) + rf"\.[0-9]{{0,{SIGNIFICANT - digits - 1}}}[1-9]")
    return options


def number_range(lo: int | None, hi: int | None, lo_open: bool = False, hi_open: bool = False) -> str | None:
    """The pattern of the JSON numbers v with lo <= v <= hi (< where open); None if there are none. The
    bounds are whole numbers (or None)."""
    options = []
    whole = integer_range(None if lo is None else lo + lo_open, None if hi is None else hi - hi_open)
    if whole is not None:
        options.append(whole)
    # n + f with 0 < f < 1 lies strictly between n and n + 1: inside wherever lo <= n and n + 1 <= hi
    options += _with_fractions(0 if lo is None else max(lo, 0), None if hi is None else hi - 1)
    # -(n + f) lies strictly between -(n + 1) and -n: inside wherever lo <= -(n + 1) and -n <= hi
    options += ["-" + p for p in _with_fractions(0 if hi is None else max(-hi, 0), None if lo is None else -lo - 1)]
    return _alternation(options) if options else None
