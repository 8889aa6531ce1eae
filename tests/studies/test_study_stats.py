"""The statistics behind verdicts: t quantiles, intervals, slopes and the three tests."""

import math
import random

import pytest

from normlab.studies.stats import Interval, mean_ci, paired_ci, slope, t975, verdict

# 97.5% quantiles of Student's t (standard tables)
KNOWN_T = {1: 12.706, 2: 4.303, 4: 2.776, 9: 2.262, 29: 2.045, 40: 2.021, 60: 2.000, 120: 1.980, 10_000: 1.960}


@pytest.mark.parametrize("df,expected", sorted(KNOWN_T.items()))
def test_t975_matches_tables(df, expected):
    assert t975(df) == pytest.approx(expected, abs=2e-3)


def test_t975_rejects_zero_df():
    with pytest.raises(ValueError, match="df >= 1"):
        t975(0)


def test_mean_ci_by_hand():
    xs = [1.0, 2.0, 4.0]
    m = 7 / 3
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / 2)
    i = mean_ci(xs)
    assert i.estimate == pytest.approx(m) and i.n == 3
    assert i.hi - m == pytest.approx(4.303 * sd / math.sqrt(3))
    assert m - i.lo == pytest.approx(i.hi - m)


def test_mean_ci_covers_the_mean_about_95_percent_of_the_time():
    rng = random.Random(0)
    trials, covered = 4000, 0
    for _ in range(trials):
        i = mean_ci([rng.gauss(1.5, 2.0) for _ in range(3)])
        covered += i.lo < 1.5 < i.hi
    assert 0.935 < covered / trials < 0.965


def test_mean_ci_without_an_interval():
    assert mean_ci([]).n == 0 and math.isnan(mean_ci([]).estimate)
    one = mean_ci([2.0])
    assert one.estimate == 2.0 and math.isnan(one.lo) and one.ci95 == [None, None]
    assert math.isnan(mean_ci([1.0, math.inf]).lo)


def test_paired_ci_uses_common_seeds_only():
    i = paired_ci({0: 3.0, 1: 5.0, 2: 4.0, 7: 100.0}, {0: 1.0, 1: 2.0, 2: 2.0})
    assert i.n == 3 and i.estimate == pytest.approx((2 + 3 + 2) / 3)


def test_pairing_removes_shared_seed_noise():
    # each seed shifts both configurations alike: unpaired intervals overlap, the paired one does not
    shift = {0: 0.3, 1: -0.2, 2: 0.05, 3: -0.1}
    a = {s: 2.50 + v for s, v in shift.items()}
    b = {s: 2.45 + v + 0.001 * s for s, v in shift.items()}
    diff = paired_ci(a, b)
    assert diff.lo > 0
    ia, ib = mean_ci(list(a.values())), mean_ci(list(b.values()))
    assert ia.lo < ib.hi  # unpaired: overlapping


def test_slope():
    assert slope([1, 2, 3, 4], [3, 5, 7, 9]) == pytest.approx(2.0)
    with pytest.raises(ValueError, match=">= 2 points"):
        slope([1], [1])
    with pytest.raises(ValueError, match="all equal"):
        slope([2, 2], [1, 3])


def _iv(lo, hi):
    return Interval((lo + hi) / 2, lo, hi, 3)


@pytest.mark.parametrize("test,lo,hi,margin,expected", [
    ("directional", 0.1, 0.3, 0.0, "agrees"),
    ("directional", -0.3, -0.1, 0.0, "disagrees"),
    ("directional", -0.1, 0.3, 0.0, "inconclusive"),
    ("directional", 0.01, 0.04, 0.05, "disagrees"),       # real but smaller than the claimed effect
    ("equivalence", -0.02, 0.03, 0.05, "agrees"),
    ("equivalence", 0.06, 0.2, 0.05, "disagrees"),
    ("equivalence", -0.2, -0.06, 0.05, "disagrees"),
    ("equivalence", 0.01, 0.09, 0.05, "inconclusive"),
    ("noninferiority", -0.3, 0.04, 0.05, "agrees"),
    ("noninferiority", 0.06, 0.1, 0.05, "disagrees"),
    ("noninferiority", 0.0, 0.1, 0.05, "inconclusive"),
])
def test_verdicts(test, lo, hi, margin, expected):
    assert verdict(test, _iv(lo, hi), margin) == expected


def test_no_interval_is_inconclusive_and_unknown_test_is_an_error():
    assert verdict("directional", Interval(1.0, math.nan, math.nan, 1), 0.0) == "inconclusive"
    # every unit equal: a zero-width interval carries no spread to judge by
    assert verdict("directional", mean_ci([2.0, 2.0, 2.0]), 0.0) == "inconclusive"
    assert verdict("equivalence", mean_ci([0.0, 0.0, 0.0]), 0.05) == "inconclusive"
    with pytest.raises(ValueError, match="unknown test 'two-sided'"):
        verdict("two-sided", _iv(0, 1), 0.0)
