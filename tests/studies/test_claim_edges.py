"""Claims at their edges, on hand-built results where the truth is known: equal units,
a failed arm, failed runs in the activation rows, seeds without a pair."""

import math

import pytest

from normlab.studies.claims import judge_all
from normlab.studies.stats import Interval, mean_ci, verdict

BASE = 3.2  # the unigram baseline (full, select and test halves)


def _train(study, seed, lr, loss, *, placement="pre", norm="layernorm", n_layers=6, warmup=30, diverged=False,
           **extra):
    nan = math.nan
    r = {"name": f"{study}-{placement}-{norm}-L{n_layers}-lr{lr}-w{warmup}-s{seed}", "kind": "train", "task": "lm",
         "placement": placement, "norm": norm, "n_layers": n_layers, "d_model": 32, "lr": lr,
         "warmup_steps": warmup, "seed": seed, "steps": 120, "tags": {"study": study, "lr": lr},
         "config": {"batch_size": 16, "seq_len": 64, "betas": [0.9, 0.98], "schedule": "constant"},
         "n_params": 1000, "final_val_loss": nan if diverged else loss,
         "final_val_loss_select": nan if diverged else loss, "final_val_loss_test": nan if diverged else loss,
         "diverged": diverged, "baseline_val_loss": BASE, "baseline_val_loss_select": BASE,
         "baseline_val_loss_test": BASE}
    r.update(extra)
    return r


@pytest.mark.parametrize("units", [[0.1] * 3, [0.7] * 5, [1.0 - 0.9, 2.0 - 1.9, 3.0 - 2.9], [0.0] * 3])
def test_equal_units_up_to_rounding_are_inconclusive(units):
    i = mean_ci(units)
    for test in ("directional", "equivalence", "noninferiority"):
        assert verdict(test, i, 0.0 if test == "directional" else 0.5) == "inconclusive"
    assert verdict("directional", Interval(0.1, 0.1 - 1e-6, 0.1 + 1e-6, 3), 0.0) == "agrees"  # real spread


def test_best_lr_warmup_row_with_post_ln_failed_everywhere_is_inconclusive():
    runs = []
    for s in range(3):
        for lr in (1e-3, 3e-3, 1e-2):
            for w in (0, 30):
                runs.append(_train("warmup", s, lr, 9.9, placement="post", warmup=w, diverged=True))
                # warm-up buys Pre-LN 0.1 nats: a fact about Pre-LN alone
                runs.append(_train("warmup", s, lr, 2.6 + (0.10 if w == 0 else 0.0) + 0.01 * s * (1 if w else -1),
                                   placement="pre", warmup=w))
    rows = judge_all(["postln-needs-warmup", "postln-needs-warmup-best-lr"], runs)
    assert {r["verdict"] for r in rows} == {"inconclusive"}
    (best,) = [r for r in rows if r["id"].endswith("best-lr")]
    assert "Pre-LN alone" in " ".join([best["measured"], *best["caveats"]])


def _activation_runs(seeds, blown_up):
    runs = []
    for s in seeds:
        for placement, final in (("pre", 1e4 if s in blown_up else 9.0 + 0.1 * s), ("peri", 10.0 + 0.3 * s)):
            runs.append(_train("activations", s, 3e-3, 2.5, placement=placement, n_layers=12,
                               diverged=placement == "pre" and s in blown_up,
                               activation_max_by_layer_init=[1.0] * 11 + [10.0],
                               activation_max_by_layer_final=[1.0] * 11 + [final],
                               activation_rms_by_layer_init=[1.0] * 12, activation_rms_by_layer_final=[1.0] * 12))
    return runs


def test_activation_rows_keep_failed_runs_and_name_them():
    rows = judge_all(["preln-activations-grow", "peri-bounds-max-activations"], _activation_runs(range(5), {0, 1, 2}))
    for r in rows:
        assert r["n_seeds"] == 5 and r["verdict"] != "disagrees"
        assert any("0, 1 and 2 failed" in c and "stay in" in c for c in r["caveats"])


def test_activation_rows_name_runs_without_finite_statistics():
    runs = _activation_runs(range(4), set())
    runs[0]["activation_max_by_layer_final"] = [1.0] * 11 + [math.inf]  # seed 0's Pre-LN stream overflowed
    (row,) = judge_all(["preln-activations-grow"], runs)
    assert row["n_seeds"] == 3
    assert any("seed 0 left out: no finite activation statistics" in c for c in row["caveats"])


def test_seeds_without_a_pair_are_named():
    runs = [_train("norms", s, 1e-3, 2.5 + 0.01 * s, norm="layernorm") for s in range(6)]
    runs += [_train("norms", s, 1e-3, 2.5 + 0.012 * s, norm="rmsnorm") for s in range(3)]
    (row,) = judge_all(["rmsnorm-matches-layernorm"], runs)
    assert row["n_seeds"] == 3
    assert any("seeds 3, 4 and 5 of layernorm left out: no pair" in c for c in row["caveats"])
    disjoint = [r for r in runs if r["norm"] == "layernorm" and r["seed"] < 3]
    disjoint += [_train("norms", s, 1e-3, 2.5, norm="rmsnorm") for s in (3, 4, 5)]
    (row,) = judge_all(["rmsnorm-matches-layernorm"], disjoint)
    assert row["verdict"] == "inconclusive" and any("no seed ran on both sides" in c for c in row["caveats"])


def test_a_sanity_row_with_nothing_measured_has_no_interval():
    (row,) = judge_all(["postln-stream-normalized"], [])
    assert row["ci95"] == [None, None]


def test_equal_units_near_zero_are_inconclusive():
    units = [0.1 + 0.2 - 0.3, 0.0, 0.3 - 0.2 - 0.1]  # zero, up to summation order
    i = mean_ci(units)
    assert verdict("equivalence", i, 0.05) == "inconclusive"
    assert verdict("directional", i, 0.0) == "inconclusive"
