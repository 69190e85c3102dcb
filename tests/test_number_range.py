"""Numbers between bounds as patterns (number_range.py), against arithmetic: every text a pattern takes
lies inside its bounds, read exactly and read as a double; every integer inside, and every number inside
written with a fraction of at most 15 significant digits that ends in a digit other than 0, is taken."""

import random
import re
from decimal import Decimal

import pytest

from blt_runtime.number_range import integer_range, number_range


def inside(v, lo, hi, lo_open=False, hi_open=False) -> bool:
    return (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi))


@pytest.mark.parametrize("seed", range(3))
def test_integer_ranges(seed):
    rng = random.Random(seed)
    texts = [str(v) for v in range(-1100, 1100)] + ["-0", "007", "10" * 9, str(10**17), str(-(10**17) + 3)]
    for _ in range(300):
        lo = rng.choice([None, 0, rng.randint(-1000, 1000), rng.randint(-9, 9)])
        hi = rng.choice([None, 0, rng.randint(-1000, 1000), rng.randint(-9, 9)])
        pattern = integer_range(lo, hi)
        if pattern is None:
            assert lo is not None and hi is not None and lo > hi
            continue
        compiled = re.compile(pattern)
        for t in texts:
            canonical = t == str(int(t)) and len(t.lstrip("-")) <= 18
            assert bool(compiled.fullmatch(t)) == (canonical and inside(int(t), lo, hi)), (lo, hi, t, pattern)


@pytest.mark.parametrize("seed", range(3))
def test_number_ranges(seed):
    rng = random.Random(seed)
    texts = [str(i) for i in range(-25, 26)] + ["39.99999999999999999", "-2.000000000000001", "0.5e3", "-0"]
    texts += [f"{s}{i}.{f}" for s in ("", "-") for i in range(25) for f in ("5", "05", "0", "99", "10", "0001")]
    texts += ["9.99999999999999", "-9.9999999999999", "123456789012.345"]
    for _ in range(400):
        lo, hi = rng.choice([None, rng.randint(-20, 20)]), rng.choice([None, rng.randint(-20, 20)])
        lo_open, hi_open = rng.random() < 0.5, rng.random() < 0.5
        pattern = number_range(lo, hi, lo_open, hi_open)
        for t in texts:
            taken = pattern is not None and re.fullmatch(pattern, t) is not None
            exact = inside(Decimal(t), lo, hi, lo_open, hi_open)
            if taken:
                assert exact and inside(float(t), lo, hi, lo_open, hi_open), (lo, hi, lo_open, hi_open, t)
            canonical = t != "-0" and "e" not in t and not ("." in t and t.endswith("0")) \
                and len(t.lstrip("-").replace(".", "")) <= 15
            if exact and canonical:
                assert taken, (lo, hi, lo_open, hi_open, t, pattern)
