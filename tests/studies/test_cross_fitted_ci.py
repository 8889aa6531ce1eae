"""The interval of a row judged at cross-fitted best settings: the delete-one-seed
jackknife of the whole procedure, since each seed's setting is chosen on the others."""

from __future__ import annotations

import math
import random

import pytest

from normlab.studies.claims import _paired_units, best_ci, best_setting, cross_fitted_ci, judge_all
from normlab.studies.stats import jackknife_ci, mean_ci, paired_ci


def _run(seed, lr, select, test, **extra):
    return {"lr": lr, "seed": seed, "tags": {}, "final_val_loss_select": select, "final_val_loss_test": test,
            "final_val_loss": (select + test) / 2, "baseline_val_loss_select": 10.0,
            "baseline_val_loss_test": 10.0, "baseline_val_loss": 10.0, "diverged": False, **extra}


def test_the_jackknife_of_independent_units_is_the_t_interval():
    units = {0: 0.3, 1: -0.1, 2: 0.25, 3: 0.05}
    without = {k: {s: v for s, v in units.items() if s != k} for k in units}
    j, t = jackknife_ci(units, without), mean_ci(list(units.values()))
    assert (j.estimate, j.n) == (t.estimate, t.n)
    assert j.lo == pytest.approx(t.lo, abs=1e-12) and j.hi == pytest.approx(t.hi, abs=1e-12)
    assert math.isnan(jackknife_ci({0: 1.0}, {}).lo)  # one unit: no interval
    assert math.isnan(jackknife_ci(units, {k: {} for k in units}).lo)  # a deletion that leaves none


def test_one_setting_gives_the_paired_t_interval():
    # nothing to choose: each seed's unit is its own, and the jackknife is the t-interval
    a = [_run(s, 1e-3, 2.5 + 0.01 * s, 2.5 + 0.02 * s) for s in range(4)]
    b = [_run(s, 1e-3, 2.6 - 0.01 * s, 2.6 + 0.03 * (s % 2)) for s in range(4)]
    ba, bb = best_setting(a), best_setting(b)
    j, t = cross_fitted_ci([ba, bb], _paired_units), paired_ci(ba.by_seed, bb.by_seed)
    assert j.lo == pytest.approx(t.lo) and j.hi == pytest.approx(t.hi)
    assert best_ci(ba).hi == pytest.approx(mean_ci(list(ba.by_seed.values())).hi)


def test_best_setting_keeps_each_deletions_cross_fit():
    # select halves: lr 1e-2 is better on seeds 0 and 1 (by 0.2), lr 1e-3 on seed 2 (by 0.4):
    # seeds 0 and 1 are judged at 1e-3 (chosen on the other two), seed 2 at 1e-2. Deleting
    # seed 0 leaves seed 1 judged at seed 2's choice (1e-3) and seed 2 at seed 1's (1e-2)
    runs = []
    for s, (low, high) in enumerate([(2.6, 2.4), (2.6, 2.4), (2.3, 2.7)]):
        runs += [_run(s, 1e-3, low, low + 0.01 * s), _run(s, 1e-2, high, high + 0.01 * s)]
    best = best_setting(runs)
    assert best.chosen == {0: (1e-3, None), 1: (1e-3, None), 2: (1e-2, None)}
    assert best.without[0] == {1: pytest.approx(2.61), 2: pytest.approx(2.72)}
    assert set(best.without) == {0, 1, 2} and all(k not in w for k, w in best.without.items())


@pytest.mark.parametrize("n", [3, 6])
def test_the_interval_covers_where_settings_differ_by_noise_alone(n):
    # two configurations, four lrs, every run's loss 2.5 plus its training noise (shared by
    # its select and test halves, as one model's are): the seeds' choices lean on each
    # other's noise. The t-interval over the seeds' units missed the true difference (0)
    # 10% (3 seeds) and 13% (6 seeds) of the time; the jackknife stays under 5%
    rng = random.Random(n)
    reps, miss_t, miss_j = 300, 0, 0
    for _ in range(reps):
        sides = []
        for _config in range(2):
            runs = []
            for s in range(n):
                for lr in (1e-3, 3e-3, 1e-2, 3e-2):
                    e = rng.gauss(0, 0.05)
                    runs.append(_run(s, lr, 2.5 + e + rng.gauss(0, 0.01), 2.5 + e + rng.gauss(0, 0.01)))
            sides.append(best_setting(runs))
        t, j = paired_ci(sides[0].by_seed, sides[1].by_seed), cross_fitted_ci(sides, _paired_units)
        miss_t += not t.lo <= 0 <= t.hi
        miss_j += not j.lo <= 0 <= j.hi
    assert miss_t / reps > 0.07, miss_t / reps  # (the defect the jackknife mends)
    assert miss_j / reps < 0.05, miss_j / reps


def test_a_row_at_best_settings_takes_the_jackknife_interval():
    # every seed chooses lr 1e-2 for both norms, but with a seed deleted a lone seed's
    # select half picks another lr: the paired t-interval hid that the choice is fragile
    from tests.studies.test_claims_review import _train

    runs = []
    for s in range(3):
        for lr, rms, ln in ((1e-2, 2.50, 2.52), (3e-2, 2.51 - 0.02 * (s == 0), 2.53 + 0.05 * (s == 1))):
            runs.append(_train("norms", s, lr, rms + 0.001 * s, norm="rmsnorm", n_layers=4))
            runs.append(_train("norms", s, lr, ln + 0.002 * s, norm="layernorm", n_layers=4))
    (row,) = judge_all(["rmsnorm-matches-layernorm"], runs)
    rms = best_setting([r for r in runs if r["norm"] == "rmsnorm"])
    ln = best_setting([r for r in runs if r["norm"] == "layernorm"])
    t = paired_ci(rms.by_seed, ln.by_seed)
    j = cross_fitted_ci([rms, ln], _paired_units)
    assert row["ci95"] == [pytest.approx(j.lo), pytest.approx(j.hi)]
    assert j.hi - j.lo > t.hi - t.lo


@pytest.mark.parametrize("test,margin", [("equivalence", -0.05), ("equivalence", 0.0), ("directional", math.nan),
                                         ("noninferiority", math.inf), ("directional", None)])
def test_a_margin_no_verdict_can_read_is_refused(test, margin):
    # a negative equivalence margin made "agrees" impossible and an interval on 0 "disagrees"
    from normlab.studies.stats import Interval, verdict

    with pytest.raises(ValueError, match="margin"):
        verdict(test, Interval(0.0, -0.01, 0.01, 6), margin)
    assert verdict("directional", Interval(0.2, 0.1, 0.3, 6), -0.05) == "agrees"  # (a negative one is fine there)


def test_two_seeds_take_the_wider_of_the_t_and_jackknife_intervals():
    # with two seeds each deletion leaves one, which chooses on itself: there the jackknife
    # covered less than the t-interval; the row takes the wider
    rng = random.Random(2)
    wider = 0
    for _ in range(40):
        sides = []
        for _config in range(2):
            runs = [_run(s, lr, 2.5 + (e := rng.gauss(0, 0.05)) + rng.gauss(0, 0.01), 2.5 + e + rng.gauss(0, 0.01))
                    for s in range(2) for lr in (1e-3, 1e-2, 3e-2)]
            sides.append(best_setting(runs))
        got, t = cross_fitted_ci(sides, _paired_units), paired_ci(sides[0].by_seed, sides[1].by_seed)
        full = _paired_units([b.by_seed for b in sides])
        jack = jackknife_ci(full, {k: _paired_units([b.without.get(k, {}) for b in sides]) for k in full})
        assert got.hi - got.lo == pytest.approx(max(t.hi - t.lo, jack.hi - jack.lo))
        wider += (t.hi - t.lo) > (jack.hi - jack.lo)
    assert 0 < wider < 40  # both happen


def test_two_runs_in_one_cell_of_the_sweep_are_named_in_a_caveat():
    # (a custom preset: two warm-up lengths at one lr and seed) only one can be read; it
    # was read silently
    runs = [_run(s, 1e-3, 2.5, 2.5) for s in range(3)] + [_run(0, 1e-3, 2.4, 2.4, warmup_steps=100)]
    best = best_setting(runs)
    assert best.duplicates and "2 runs at lr 0.001 with seed 0" in best.duplicates[0]
    assert any("only the last is read" in c for c in best.caveats("LayerNorm"))
    assert not best_setting(runs[:3]).duplicates


def test_a_bound_near_the_margin_is_shown_with_the_digits_that_tell_its_side():
    from normlab.studies.report import _ci, bound_text

    assert _ci([-0.02, 0.0496], 0.05) == "[-0.020, +0.04960]"  # (agrees: it was shown as +0.050)
    assert _ci([-0.02, 0.0504], 0.05) == "[-0.020, +0.05040]"  # (inconclusive)
    assert bound_text(0.0004, 0.0) == "+0.00040" and bound_text(-0.0496, 0.05) == "-0.04960"
    assert bound_text(0.123456, 0.05) == "+0.123" and _ci([None, 0.1], 0.05) == "-"
