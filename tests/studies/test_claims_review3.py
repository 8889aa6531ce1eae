"""Claims, from a review: one failure rule for what is judged and for the notes on it, the
warm-up rows guarded on both sides, rows whose every value overflowed name their runs,
the two-seed interval named for what it is, all-failed sweeps with gaps, order-free
means, and the report's edges (an empty failure text, a bound next to the margin)."""

import math
import random

from normlab.studies.claims import best_setting, judge_all
from normlab.studies.report import bound_text, write_html
from normlab.studies.stats import mean_ci
from tests.studies.test_claim_edges import BASE, _train
from tests.studies.test_study_claims import _act_run


def _stuck(norm, seed, lr):
    """At the unigram baseline: under it on the whole set, over it on the test half, judged."""
    return _train("norms", seed, lr, BASE - 0.0004, norm=norm, final_val_loss_select=BASE - 0.001,
                  final_val_loss_test=BASE + 0.0002, tags={"study": "norms", "group": norm, "lr": lr})


def test_both_sides_failed_on_the_judged_half_is_a_difference_between_baselines():
    runs = [_stuck(n, s, lr) for n in ("rmsnorm", "layernorm") for s in range(6) for lr in (1e-3, 3e-3)]
    (row,) = judge_all(["rmsnorm-matches-layernorm"], runs)
    assert row["verdict"] == "inconclusive"
    assert "between two baselines" in row["measured"]
    assert "every run of the sweep failed" in row["measured"]


def _warmup(fail):
    out = []
    for s in range(6):
        for lr in (1e-3, 1e-2):
            for p in ("post", "pre"):
                for w in (0, 30):
                    loss = 2.6 + (0.2 if (w == 0 and lr == 1e-2) else 0.0) + 0.013 * s * (w == 0)
                    out.append(_train("warmup", s, lr, loss, placement=p, warmup=w, diverged=p == fail and lr == 1e-2))
    return out


def test_warmup_rows_refuse_a_statistic_of_post_ln_alone_too():
    for fail, alone in (("post", "Pre-LN alone"), ("pre", "Post-LN alone")):
        rows = judge_all(["postln-needs-warmup", "postln-needs-warmup-best-lr"], _warmup(fail))
        (at) = [r for r in rows if r["id"].endswith("0.01")][0]
        assert at["verdict"] == "inconclusive" and alone in at["measured"], fail


def test_a_row_whose_every_value_overflowed_names_its_runs():
    runs = [_act_run("pre", s, 1.0, math.inf) for s in range(6)] + [_act_run("peri", s, 1.0, 4.0) for s in range(6)]
    for row in judge_all(["preln-activations-grow", "peri-bounds-max-activations"], runs):
        assert row["verdict"] == "inconclusive" and row["n_seeds"] == 0
        assert "6 run(s) it would read finished with values not finite" in row["measured"], row["measured"]
        assert runs[0]["name"] in row["measured"] and runs[6]["name"] not in row["measured"]


def test_two_seed_jackknife_rows_say_they_may_be_the_t_interval():
    runs = [_train("norms", s, lr, 2.5 + 0.3 * s * (lr == 1e-3) + (0.01 if n == "rmsnorm" else 0) * (s + 1),
                   norm=n, tags={"study": "norms", "group": n, "lr": lr})
            for n in ("rmsnorm", "layernorm") for s in range(2) for lr in (1e-3, 3e-3)]
    (row,) = judge_all(["rmsnorm-matches-layernorm"], runs)
    assert row["n_seeds"] == 2 and row["interval"].startswith("95%, the wider of")


def test_every_run_failed_with_a_gap_in_the_sweep():
    runs = [_train("norms", s, lr, 9.9, diverged=True) for s in range(3) for lr in (1e-3, 1e-2)]
    best = best_setting([r for r in runs if not (r["seed"] == 2 and r["lr"] == 1e-2)])
    assert best.all_failed and "every run of the sweep failed" in best.text("LayerNorm")
    runs.append(_train("norms", 0, 1e-3, 9.9, diverged=True, warmup=99))  # a second run in one cell
    caveats = best_setting(runs, lrs=(1e-3, 1e-2, 3e-2)).caveats("LayerNorm")
    assert any("only the last is read" in c for c in caveats)
    assert any("no run at lr 0.03" in c for c in caveats)
    assert any("compared as the unigram baseline" in c for c in caveats)


def test_mean_ci_does_not_depend_on_order():
    xs = [0.1, 0.2, 0.3, 1e-17, 0.04, 0.7, -0.3]
    want = mean_ci(xs)
    for seed in range(20):
        ys = xs[:]
        random.Random(seed).shuffle(ys)
        assert mean_ci(ys) == want


def test_report_edges(tmp_path):
    for x, m in ((0.0499996, 0.05), (0.0500004, 0.05), (-0.0500004, 0.05), (0.05, 0.05)):
        text = bound_text(x, m)
        assert (float(text) - m) * (x - m) > 0 or x == m == float(text), (x, text)
    assert bound_text(0.3, 0.05) == "+0.300"
    write_html(tmp_path, "quick", "a study", [], [], {}, {"p": 1}, failures={"run-a": ""})
    assert "run-a" in (tmp_path / "index.html").read_text()
