"""The report where a seed overflowed or a sweep is partial: an inf value no longer wipes
the mean of the finite seeds (it is marked at the top edge instead), one lr with one seed
no longer removes a whole curve's band, and the tables print no "nan", no interval of no
width as if it were one, and no unescaped '|'."""

from __future__ import annotations

import math

import pytest

from normlab.studies import report
from normlab.studies.claims import judge_all

STEPS = range(0, 100, 10)


def _labels(ax) -> list[str]:
    return [line.get_label() for line in ax.get_lines()]


def _train(name, group, lr, seed, loss, *, study="norms", base=3.2, **kw):
    r = {"name": name, "kind": "train", "task": "lm", "placement": "pre", "norm": group, "n_layers": 3, "lr": lr,
         "seed": seed, "steps": 120, "warmup_steps": 30, "tags": {"study": study, "group": group, "lr": lr},
         "final_val_loss": loss, "final_val_loss_select": loss, "final_val_loss_test": loss, "diverged": False,
         "baseline_val_loss": base, "baseline_val_loss_select": base, "baseline_val_loss_test": base,
         "d_model": 32, "config": {"batch_size": 16, "seq_len": 64, "betas": [0.9, 0.98]}, "n_params": 40000}
    r.update(kw)
    return r


def test_seed_interval_is_over_the_finite_seeds():
    c = report.seed_interval([1e-3, 2e-3, math.inf], log=True)
    assert c.n == 2 and c.estimate == pytest.approx(math.sqrt(2e-6))
    assert 0 < c.lo < c.estimate < c.hi < math.inf
    c = report.seed_interval([1.0, math.nan, 3.0])
    assert c.n == 2 and c.estimate == pytest.approx(2.0)
    assert math.isnan(report.seed_interval([math.nan], log=True).estimate)


def test_an_overflowed_depth_keeps_its_point_and_is_marked(drawn, tmp_path):
    amp = [{"name": f"a-{n}-{s}", "kind": "update", "placement": "post", "norm": "layernorm", "n_layers": n,
            "seed": s, "tags": {"study": "amplification", "group": "post"},
            "output_change_sq": math.inf if (n, s) == (24, 0) else 1e-3 * n * (s + 1)}
           for n in (6, 12, 24) for s in range(3)]
    report.plot_amplification(amp, tmp_path / "amp.png")
    (fig,) = drawn
    ax = fig.axes[0]
    (bars,) = ax.containers
    ys = bars.lines[0].get_ydata()
    assert all(math.isfinite(y) for y in ys)
    assert ys[-1] == pytest.approx(1e-3 * 24 * math.sqrt(6))  # seeds 1 and 2: 2 and 3 times 24e-3
    assert bars.get_label() == "post (n=2-3 by depth)"
    (mark,) = [line for line in ax.get_lines() if "not finite" in line.get_label()]
    assert mark.get_label() == "post: not finite (1 of 3, at the top)" and list(mark.get_xdata()) == [24]


def test_an_overflowed_activation_leaves_the_others_mean_and_marks_divergence_on_a_finite_point(drawn, tmp_path):
    runs = [_train(f"act-s{s}", "pre", 1e-3, s, 2.0, study="activations", diverged=s == 1,
                   diverged_step=20 if s == 1 else None, activation_rms_by_layer_final=[1.0, 2.0])
            for s in range(3)]
    metrics = {"act-s0": [{"step": k, "activation_max_by_layer": [1.0, 2.0]} for k in STEPS],
               "act-s1": [{"step": k, "activation_max_by_layer": [1.0, 8.0 if k < 20 else math.inf]}
                          for k in STEPS if k <= 20],
               "act-s2": [{"step": k, "activation_max_by_layer": [1.0, 2.0]} for k in STEPS]}
    report.plot_activations(runs, metrics, tmp_path / "act.png")
    (fig,) = drawn
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    curve = lines["pre (n=3)"]
    assert all(math.isfinite(y) for y in curve.get_ydata())
    assert curve.get_ydata()[2] == pytest.approx(2.0)  # step 20: seeds 0 and 2, seed 1 overflowed
    assert curve.get_ydata()[1] == pytest.approx((2 * 8 * 2) ** (1 / 3))
    div = lines["pre: diverged (1 of 3)"]
    assert list(div.get_xdata()) == [20] and div.get_ydata() == pytest.approx([8.0])  # its last finite point
    assert list(lines["pre: not finite (1 of 3, at the top)"].get_xdata()) == [20]


def test_one_lr_with_one_seed_breaks_the_band_there_only(drawn, tmp_path):
    runs = [_train(f"ln-{lr}-{s}", "layernorm", lr, s, 2.5 + 0.01 * s + lr)
            for lr in (1e-3, 3e-3) for s in range(3)] + [_train("ln-0.01-0", "layernorm", 1e-2, 0, 2.6)]
    report.plot_loss_vs_lr(runs, "norms", tmp_path / "lr.png")
    (fig,) = drawn
    ax = fig.axes[0]
    assert len(ax.collections) == 1
    xs = {float(x) for p in ax.collections[0].get_paths() for x, _ in p.vertices}
    assert {1e-3, 3e-3} <= xs and 1e-2 not in xs


def test_qk_logits_keep_the_overflowed_lrs_point_and_band_elsewhere(drawn, tmp_path):
    runs = [_train(f"qk-{lr}-{s}", "no-qk", lr, s, 2.5, study="qk-norm",
                   attention_logit_max=math.inf if (lr, s) == (3e-2, 0) else 10.0 * (s + 1) * lr / 1e-3)
            for lr in (1e-3, 3e-2) for s in range(3)]
    runs.append(_train("qk-0.1-0", "no-qk", 0.1, 0, 2.5, study="qk-norm", attention_logit_max=50.0))
    report.plot_qk_logits(runs, tmp_path / "qk.png")
    (fig,) = drawn
    ax = fig.axes[0]
    (curve,) = [line for line in ax.get_lines() if line.get_label() == "no-qk"]
    assert all(math.isfinite(y) for y in curve.get_ydata())
    assert curve.get_ydata()[1] == pytest.approx(300 * math.sqrt(6))
    assert len(ax.collections) == 1
    assert "no-qk: not finite (1 of 3, at the top)" in _labels(ax)


def test_tables_print_no_nan_and_name_an_interval_of_no_width(tmp_path):
    # every layernorm seed's cross-fitted setting has no run: its value is no number
    runs = [_train("ln-a", "layernorm", 1e-3, 0, 2.6), _train("ln-b", "layernorm", 3e-3, 1, 2.5)]
    runs += [_train(f"rms-{lr}-{s}", "rmsnorm", lr, s, 2.6 - 0.05 * s) for lr in (1e-3, 3e-3) for s in (0, 1)]
    # every seed of a group at the failure baseline: its interval has no width
    # (one run of it learned: seeds 1 and 2 choose its lr, where they failed; seed 0 an lr
    # where it failed too)
    runs += [_train(f"bad-{lr}-{s}", "post|x", lr, s, 2.9 if (lr, s) == (3e-3, 0) else math.nan,
                    diverged=(lr, s) != (3e-3, 0))
             for lr in (1e-3, 3e-3) for s in range(3)]
    rows = judge_all(["rmsnorm-matches-layernorm"], runs)
    md = report.write_markdown(tmp_path, "x", rows, {}, runs).read_text()
    page = report.write_html(tmp_path, "x", "d", rows, runs, {}, {}).read_text()
    assert "nan" not in md.replace("nats", "")
    table = [line for line in md.splitlines() if line.startswith("| norms |")]
    ln = next(line for line in table if "| layernorm |" in line)
    assert ln.split("|")[6].strip() == "-" and ln.split("|")[7].strip() == "-"
    bad = next(line for line in table if "post\\|x" in line)
    assert bad.count("|") - bad.count("\\|") == 10  # 9 cells: the '|' in the group is escaped
    assert "every seed equal" in bad and "[+3.200, +3.200]" not in bad
    assert "= none (n=0" in md and "no test loss" in md and "none judged" in md
    assert "every seed equal" in page and ">nan<" not in page
