"""The statistics behind a study's verdicts: t-intervals over seeds, slopes, and the
three tests a claim can be judged by.

Every interval here is a two-sided 95% Student-t interval over independent units
(seeds, or timing rounds): mean +- t(0.975, n-1) * sd / sqrt(n). A comparison of two
configurations uses the *paired* differences (same seed: same data order and, where the
shapes allow, the same initialization), so seed-to-seed variation common to both cancels.

A verdict compares the interval with a margin fixed before the runs (for equivalence a
95% interval is stricter than the 90% of the usual two one-sided tests):

    directional     the claim says estimate > margin
                    agrees: lo > margin; disagrees: hi < margin; else inconclusive
    equivalence     the claim says |estimate| < margin
                    agrees: -margin < lo and hi < margin; disagrees: lo > margin or
                    hi < -margin; else inconclusive
    noninferiority  the claim says estimate < margin (estimate: how much worse)
                    agrees: hi < margin; disagrees: lo > margin; else inconclusive

Equal units (``degenerate``: every unit the same value v, up to the rounding of their
mean and spread) give a t-interval of no width, which is no interval: n equal values
carry no spread to scale it by. Such units are judged by the distribution-free 95%
interval for their median instead, the sign test's, whose bounds are order statistics:
[x(k), x(n+1-k)] covers the median with probability 1 - 2 P(Binomial(n, 1/2) < k). With
every unit at v it is [v, v], judged against the margin by the rules above, but only
from n = 6 units (``SIGN_TEST_MIN_N``), where k = 1 already covers 1 - 2 * 0.5^6 =
96.9%; with 5 or fewer, even [min, max] covers less than 95% (1 - 2 * 0.5^5 = 93.8%),
so no order-statistic interval reaches 95% and the verdict is inconclusive.

A known limitation of the t-interval on counts (failures per seed) with few seeds: under
6 units, units that all tie cannot be judged (no width, and the sign test's interval
needs 6), while nearly tied units can pass, the one unit that differs giving the
interval its width: failures per seed [1, 1, 1, 1, 1] read inconclusive and
[1, 1, 1, 1, 2] agree (directional, margin 0). There, more consistent evidence reads
weaker; a row of equal units says so in a caveat (``claims``), and 6 seeds or more lift
the limitation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

TESTS = ("directional", "equivalence", "noninferiority")
VERDICTS = ("agrees", "disagrees", "inconclusive", "sanity")

# t(0.975, df) for df = 1..30 (the usual table); larger df interpolate towards 1.96 in 1/df
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (df >= 1)."""
    if df < 1:
        raise ValueError(f"t975: expected df >= 1, got {df}")
    if df <= 30:
        return _T975[df - 1]
    return 1.960 + (2.042 - 1.960) * 30 / df  # within 0.002 of the exact quantile for df > 30


@dataclass(frozen=True)
class Interval:
    """A mean and its 95% t-interval over ``n`` units; lo/hi are nan when n < 2."""

    estimate: float
    lo: float
    hi: float
    n: int

    @property
    def ci95(self) -> list[float | None]:
        return [_finite_or_none(self.lo), _finite_or_none(self.hi)]


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _fmean(xs: Sequence[float]) -> float:
    """The mean, its sum correctly rounded (math.fsum) where every value is finite, so
    that it does not depend on the values' order."""
    if all(math.isfinite(x) for x in xs):
        try:
            return math.fsum(xs) / len(xs)
        except OverflowError:  # (a sum past float's range, which ``sum`` reads as inf)
            pass
    return sum(xs) / len(xs)


def mean_ci(values: Sequence[float]) -> Interval:
    """Mean of ``values`` with its 95% t-interval (nan bounds for fewer than 2 values)."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    m = _fmean(xs)
    if n < 2 or not all(math.isfinite(x) for x in xs):
        return Interval(m, math.nan, math.nan, n)
    sd = math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return Interval(m, m - half, m + half, n)


# a jackknife interval narrower than this fraction of the t-interval over the same units
# has collapsed (delete-one means equal up to rounding while the units differ)
JACKKNIFE_COLLAPSE = 1e-6


def jackknife_ci(full: dict, without: dict) -> Interval:
    """The mean of ``full``'s units (one per seed) with a 95% interval from the
    delete-one-seed jackknife of the procedure that made them: ``without[k]`` holds the
    units the whole procedure gives with seed k deleted (the other seeds' settings chosen
    again without k). Where each unit is made from its own seed alone, this is
    ``mean_ci``'s t-interval exactly; where a seed's unit depends on the other seeds
    (each judged at a setting chosen on the others), the spread of the delete-one means
    carries that dependence, which the t-interval over the units would not. Where the
    delete-one means all agree but the units do not, the t-interval over the units. nan
    bounds for fewer than 2 units, a unit that is not finite, or a deletion that leaves
    none."""
    keys = sorted(full)
    n = len(keys)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    xs = [float(full[k]) for k in keys]
    m = _fmean(xs)
    if n < 2 or not all(math.isfinite(x) for x in xs):
        return Interval(m, math.nan, math.nan, n)
    thetas = []
    for k in keys:
        rest = [float(v) for kk, v in without.get(k, {}).items() if kk != k]
        if not rest or not all(math.isfinite(v) for v in rest):
            return Interval(m, math.nan, math.nan, n)
        thetas.append(_fmean(rest))
    tm = _fmean(thetas)
    se = math.sqrt((n - 1) / n * math.fsum((t - tm) ** 2 for t in thetas))
    half = t975(n - 1) * se
    jack = Interval(m, m - half, m + half, n)
    # every deletion giving the same mean while the units differ (ties: seeds whose value
    # moves with the choice, balanced by others that do not) leaves the jackknife no width,
    # which would read as equal units (``degenerate``) and judge a point: the units' own
    # spread, the t-interval over them, stands instead
    t = mean_ci(xs)
    collapsed = degenerate(jack) or jack.hi - jack.lo < JACKKNIFE_COLLAPSE * (t.hi - t.lo)
    return t if collapsed and not degenerate(t) else jack


def paired_units(a: dict, b: dict) -> dict:
    """a[k] - b[k] over the keys (seeds) both hold, in key order."""
    return {k: a[k] - b[k] for k in sorted(set(a) & set(b))}


def paired_ci(a: dict, b: dict) -> Interval:
    """Mean of a[k] - b[k] over the keys (seeds) both hold, with its 95% t-interval."""
    return mean_ci(list(paired_units(a, b).values()))


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys on xs."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError(f"slope: expected two equally long sequences of >= 2 points, got {len(xs)} and {len(ys)}")
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("slope: the xs are all equal")
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


# an interval narrower than this fraction of its estimate (or than EQUAL_UNITS_ATOL, for
# estimates near 0) is the rounding of equal units
EQUAL_UNITS_RTOL = 1e-9
EQUAL_UNITS_ATOL = 1e-12
# the fewest equal units whose sign-test interval for the median reaches 95%
SIGN_TEST_MIN_N = 6


def degenerate(interval: Interval) -> bool:
    """Every unit equal: a finite interval of no width, up to the rounding of the units'
    mean and spread (1.0 - 0.9 and 2.0 - 1.9 differ in the last bit). The one test of
    it, for the verdict and for the caveat that explains the verdict."""
    lo, hi = interval.lo, interval.hi
    return (interval.n >= 2 and math.isfinite(lo) and math.isfinite(hi)
            and hi - lo <= max(EQUAL_UNITS_RTOL * abs(interval.estimate), EQUAL_UNITS_ATOL))


def sign_test_coverage(n: int) -> float:
    """The coverage of [min, max] of n units as an interval for their median: the most
    an order-statistic interval over n units can reach."""
    return 1.0 - 2.0 * 0.5 ** n


def verdict(test: str, interval: Interval, margin: float) -> str:
    """agrees | disagrees | inconclusive: where the interval lies against the margin."""
    if test not in TESTS:
        raise ValueError(f"verdict: unknown test {test!r}; expected one of: {', '.join(TESTS)}")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise ValueError(f"verdict: expected the margin to be a finite number, got {margin!r}")
    if test == "equivalence" and margin <= 0:
        # [-margin, margin] would be empty: "agrees" impossible, an interval on 0 "disagrees"
        raise ValueError(f"verdict: an equivalence test needs a margin > 0, got {margin!r}")
    lo, hi = interval.lo, interval.hi
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "inconclusive"  # fewer than 2 units, or a non-finite one: no interval
    if degenerate(interval) and interval.n < SIGN_TEST_MIN_N:
        # equal units: the t-interval has no width, and too few units for the sign test's
        # interval to reach 95%. From SIGN_TEST_MIN_N units that interval is [v, v], which
        # [lo, hi] is up to rounding: judged as any other
        return "inconclusive"
    if test == "directional":
        return "agrees" if lo > margin else "disagrees" if hi < margin else "inconclusive"
    if test == "equivalence":
        if -margin < lo and hi < margin:
            return "agrees"
        return "disagrees" if lo > margin or hi < -margin else "inconclusive"
    return "agrees" if hi < margin else "disagrees" if lo > margin else "inconclusive"


def bound_text(x: float, margin: float | None = None) -> str:
    """An interval bound to 3 decimals, to 5 within 5e-4 of the margin (or its negative):
    rounded there, a bound of 0.0496 (agrees, margin 0.05) and one of 0.0504
    (inconclusive) would both read +0.050."""
    near = [m for m in ((margin, -margin) if margin is not None else ()) if abs(x - m) < 5e-4]
    if not near:
        return f"{x:+.3f}"
    m = near[0]
    for digits in range(5, 16):  # as many as it takes for the text to stay on x's side of the margin
        text = f"{x:+.{digits}f}"
        if x == m or (float(text) - m) * (x - m) > 0:
            return text
    return repr(x)
