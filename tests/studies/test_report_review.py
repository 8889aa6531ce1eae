"""The study report as a reviewer found it: curves that vanished or stopped short where a
seed logged nothing or diverged, a norm whose every run failed drawn as a point, linear
intervals below zero on log axes, files written in place, and configurations none of
whose runs finished left out of the configurations table."""

from __future__ import annotations

import json
import math

import pytest
from matplotlib.figure import Figure

from normlab.studies import report
from normlab.studies.claims import missing_runs
from normlab.studies.stats import mean_ci
from tests.studies.helpers import micro_spec

STEPS = range(0, 100, 10)


def _lines(fig) -> dict:
    return {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}


def _band_at(ax, index: int, x: float) -> list[float]:
    """The y of the ``index``-th band's vertices at ``x``."""
    vertices = [p.vertices for p in ax.collections[index].get_paths()]
    return sorted({float(y) for v in vertices for xx, y in v if xx == x})


def _train(name, group, lr, seed, loss, *, study="norms", diverged_step=None, base=5.5, **kw):
    bad = diverged_step is not None
    r = {"name": name, "kind": "train", "task": "lm", "placement": "pre", "norm": group, "n_layers": 4, "lr": lr,
         "seed": seed, "steps": 100, "warmup_steps": 10, "tags": {"study": study, "group": group},
         "final_val_loss": math.nan if bad else loss, "final_val_loss_select": math.nan if bad else loss,
         "final_val_loss_test": math.nan if bad else loss, "diverged": bad, "diverged_step": diverged_step,
         "baseline_val_loss": base, "final_train_loss": loss}
    r.update(kw)
    return r


# ------------------------------------------------------------------ 1. curves over the seeds present


def _curve(offset, stop=None):
    """Train-loss records; ``stop``: the step it diverged at (logged non-finite, then none)."""
    out = []
    for k in STEPS:
        if stop is not None and k > stop:
            break
        out.append({"step": k, "train_loss": math.nan if k == stop else 5 - k / 50 + offset})
    return out


def test_loss_curves_keep_groups_with_empty_or_diverged_seeds(drawn, tmp_path):
    results, metrics = [], {}
    for s in range(3):
        for lr, loss in ((1e-3, 2.0), (1e-4, 3.0)):  # layernorm: seed 2's metrics.jsonl is missing at the best lr
            r = _train(f"ln-{lr}-s{s}", "layernorm", lr, s, loss + 0.01 * s)
            results.append(r)
            metrics[r["name"]] = [] if (lr, s) == (1e-3, 2) else _curve(0.1 * s)
        for lr, loss in ((1e-2, 1.5), (1e-3, 4.0)):  # rmsnorm: seed 1 diverges at step 30 at the best lr
            stop = 30 if (lr, s) == (1e-2, 1) else None
            r = _train(f"rms-{lr}-s{s}", "rmsnorm", lr, s, loss, diverged_step=stop)
            results.append(r)
            metrics[r["name"]] = _curve(0.1 * s * s, stop)
        for lr, loss in ((1e-2, 1.7), (1e-3, 4.5)):  # scalenorm: seed 0 diverges at step 0
            stop = 0 if (lr, s) == (1e-2, 0) else None
            r = _train(f"sn-{lr}-s{s}", "scalenorm", lr, s, loss, diverged_step=stop)
            results.append(r)
            metrics[r["name"]] = _curve(0.2 * s, stop)
    report.plot_loss_curves(results, metrics, "norms", tmp_path / "loss.png")
    (fig,) = drawn
    lines = _lines(fig)
    ln = lines["layernorm, lr 0.001 (2 of 3 seeds)"]
    assert list(ln.get_xdata()) == list(STEPS)
    assert ln.get_ydata() == pytest.approx([5 - k / 50 + 0.05 for k in STEPS])
    rms = lines["rmsnorm, lr 0.01 (n=3)"]
    assert list(rms.get_xdata()) == list(STEPS)  # not cut short at the divergence
    # each step's mean over the seeds that reached it: 3 up to step 20, seeds 0 and 2 after
    assert rms.get_ydata() == pytest.approx([5 - k / 50 + (0.5 / 3 if k < 30 else 0.2) for k in STEPS])
    mark = lines["rmsnorm, lr 0.01: diverged (1 of 3)"]
    assert mark.get_marker() == "x"
    assert list(mark.get_xdata()) == [30] and mark.get_ydata() == pytest.approx([5 - 20 / 50 + 0.1])
    sn = lines["scalenorm, lr 0.01 (2 of 3 seeds)"]
    assert list(sn.get_xdata()) == list(STEPS) and sn.get_ydata()[0] == pytest.approx(5.3)
    sn_mark = lines["scalenorm, lr 0.01: diverged (1 of 3)"]
    assert list(sn_mark.get_xdata()) == [0] and sn_mark.get_ydata() == pytest.approx([5.3])
    # rmsnorm's band (the second drawn) at step 50: the interval of the two seeds left
    ci = mean_ci([5 - 1 + 0.0, 5 - 1 + 0.4])
    assert _band_at(fig.axes[0], 1, 50) == pytest.approx(sorted([ci.lo, ci.hi]))


def _activation_run(seed, stop=None):
    return _train(f"act-s{seed}", "pre", 1e-3, seed, 2.0, study="activations", diverged_step=stop,
                  activation_rms_by_layer_final=[1.0 * (seed + 1), 2.0 * (seed + 1)])


def test_activation_and_gns_curves_run_past_a_seed_that_stopped(drawn, tmp_path):
    runs = [_activation_run(0), _activation_run(1, stop=30), _activation_run(2)]
    metrics = {"act-s0": [{"step": k, "activation_max_by_layer": [1.0, 2.0]} for k in STEPS],
               "act-s1": [{"step": k, "activation_max_by_layer": [1.0, 8.0]} for k in STEPS if k <= 20],
               "act-s2": []}  # its metrics.jsonl is missing
    report.plot_activations(runs, metrics, tmp_path / "act.png")
    (fig,) = drawn
    lines = _lines(fig)
    (by_step,) = [line for line in fig.axes[0].get_lines() if "diverged" not in line.get_label()]
    assert list(by_step.get_xdata()) == list(STEPS)
    # log axis: the geometric mean of 2 and 8 while both seeds run, then seed 0's 2
    assert by_step.get_ydata() == pytest.approx([4.0 if k <= 20 else 2.0 for k in STEPS])
    assert by_step.get_label() == "pre (2 of 3 seeds)"
    assert list(lines["pre: diverged (1 of 3)"].get_xdata()) == [30]
    (profile,) = fig.axes[1].get_lines()
    assert profile.get_label() == "pre (n=3)"
    assert profile.get_ydata() == pytest.approx([6 ** (1 / 3), 2 * 6 ** (1 / 3)])

    drawn.clear()
    gns = [_train(f"gns-s{s}", "layernorm", 1e-3, s, 2.0, study="gns", gns_total=1.0) for s in range(2)]
    metrics = {f"gns-s{s}": [{"step": k, "gns_trace": 2.0 * (s + 1), "gns_g_sq": 1.0, "gns_total_trace": 3.0,
                              "gns_total_g_sq": 1.0} for k in STEPS if s == 0 or k <= 30] for s in range(2)}
    report.plot_gns(gns, metrics, tmp_path / "gns.png")
    (fig,) = drawn
    norm_layers = _lines(fig)["norm layers (n=2)"]
    assert list(norm_layers.get_xdata()) == list(STEPS)
    assert norm_layers.get_ydata() == pytest.approx([math.sqrt(8) if k <= 30 else 2.0 for k in STEPS])


# ------------------------------------------------------------------ 2. a norm whose every run failed


def _norm_runs():
    runs = [_train(f"ln-{lr}-{s}", "layernorm", lr, s, 2.0 + 0.05 * s, base=3.0 + 0.1 * s)
            for lr in (1e-3, 3e-3) for s in range(3)]
    runs += [_train(f"bn-{lr}-{s}", "batchnorm", lr, s, 0, diverged_step=5, base=3.0 + 0.1 * s)
             for lr in (1e-3, 3e-3) for s in range(3)]
    return runs


def test_norms_plot_marks_a_norm_whose_every_run_failed(drawn, tmp_path):
    report.plot_norms(_norm_runs(), tmp_path / "norms.png")
    (fig,) = drawn
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["batchnorm", "layernorm"]
    mark = _lines(fig)["batchnorm: every run failed"]
    assert mark.get_marker() == "x"
    assert list(mark.get_xdata()) == [0] and mark.get_ydata() == pytest.approx([3.2])  # the largest baseline
    # the one point with an interval is layernorm's
    assert [c.lines[0].get_xydata().tolist() for c in ax.containers] == [[[1.0, pytest.approx(2.05)]]]
    assert "batchnorm: every run failed" in [t.get_text() for t in ax.get_legend().get_texts()]


# ------------------------------------------------------------------ 4. intervals on log axes


def test_log_axis_bands_and_error_bars_are_geometric_and_positive(drawn, tmp_path):
    def probe(seed, scale):
        return {"name": f"post-{seed}", "kind": "probe", "placement": "post", "norm": "layernorm", "n_layers": 6,
                "seed": seed, "tags": {"study": "grad-at-init", "group": "post"},
                "grad_norms_by_layer": {"ffn_w2": [scale * v for v in (1.0, 2.0, 4.0)],
                                        "ffn_w1": [scale] * 3}}

    report.plot_grad_by_layer([probe(0, 1.0), probe(1, 0.1)], tmp_path / "g.png")
    (fig,) = drawn
    ax = fig.axes[0]
    (line,) = ax.get_lines()
    assert min(y for p in ax.collections[0].get_paths() for y in p.vertices[:, 1]) > 0
    assert line.get_ydata() == pytest.approx([math.sqrt(0.1) * v for v in (1.0, 2.0, 4.0)])
    logs = mean_ci([0.0, math.log(0.1)])  # a linear interval: 0.55 -/+ 5.7, below zero
    assert _band_at(ax, 0, 1) == pytest.approx([math.exp(logs.lo), math.exp(logs.hi)])
    assert line.get_label() == "post (n=2)"

    drawn.clear()
    amp = [{"name": f"a-{n}-{s}", "kind": "update", "placement": "post", "norm": "layernorm", "n_layers": n,
            "seed": s, "tags": {"study": "amplification", "group": "post"}, "output_change_sq": v * n}
           for n in (2, 4) for s, v in enumerate((1.0, 0.1))]
    report.plot_amplification(amp, tmp_path / "amp.png")
    (fig,) = drawn
    (bars,) = fig.axes[0].containers
    segments = bars.lines[2][0].get_segments()
    assert all(seg[0][1] > 0 for seg in segments)
    assert bars.lines[0].get_ydata() == pytest.approx([2 * math.sqrt(0.1), 4 * math.sqrt(0.1)])
    assert [float(seg[0][1]) for seg in segments] == pytest.approx([n * math.exp(logs.lo) for n in (2, 4)])
    assert bars.get_label() == "post (n=2)"


# ------------------------------------------------------------------ 3. files swapped in whole


def _half_then_fail(monkeypatch):
    """Path.write_text writes half its text, then fails as a full disk does."""
    from pathlib import Path

    def write_text(self, text, *a, **k):
        with open(self, "w") as f:
            f.write(text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", write_text)


def test_a_failed_write_leaves_the_last_report_files_whole(tmp_path, monkeypatch):
    for name in ("index.html", "claims.md", "norms.png"):
        (tmp_path / name).write_text("OLD")
    before = sorted(p.name for p in tmp_path.iterdir())
    with monkeypatch.context() as m:
        _half_then_fail(m)
        with pytest.raises(OSError):
            report.write_html(tmp_path, "t", "", [], _norm_runs(), {}, {})
        with pytest.raises(OSError):
            report.write_markdown(tmp_path, "t", [], {}, _norm_runs())

    def half_png(self, fname, *a, **k):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(Figure, "savefig", half_png)
        with pytest.raises(OSError):
            report.plot_norms(_norm_runs(), tmp_path / "norms.png")
    assert {name: (tmp_path / name).read_bytes() for name in ("index.html", "claims.md", "norms.png")} == {
        "index.html": b"OLD", "claims.md": b"OLD", "norms.png": b"OLD"}
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary file left behind
    report.plot_norms(_norm_runs(), tmp_path / "norms.png")
    assert (tmp_path / "norms.png").read_bytes().startswith(b"\x89PNG\r\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ------------------------------------------------------------------ 5. configurations none of whose runs finished


def test_configurations_list_a_configuration_none_of_whose_runs_finished(tmp_path):
    runs = _norm_runs()
    specs = [micro_spec(f"norms-{n}-lr{lr}-s{s}", lr=lr, seed=s, tags={"study": "norms", "group": n},
                        model={"d_model": 16, "n_heads": 2, "n_layers": 4 if n == "layernorm" else 2, "norm": n})
             for n in ("layernorm", "rmsnorm") for lr in (1e-3, 3e-3) for s in range(2)]
    finished = {s.name for s in specs if "layernorm" in s.name}
    raised = {"norms-rmsnorm-lr0.001-s0", "norms-rmsnorm-lr0.001-s1"}
    # one layernorm spec missing too: a configuration with a finished run gets no second row
    missing = missing_runs(specs, finished - {"norms-layernorm-lr0.001-s0"}, raised)
    rows = report.configurations(runs, missing)
    assert [(r["configuration"], r["layers"]) for r in rows] == [("layernorm", 4), ("batchnorm", 4), ("rmsnorm", 2)]
    rms = rows[-1]
    assert rms["best"] == ("none: no run finished (not finished: norms-rmsnorm-lr0.003-s0, "
                           "norms-rmsnorm-lr0.003-s1; raised: norms-rmsnorm-lr0.001-s0, norms-rmsnorm-lr0.001-s1)")
    assert math.isnan(rms["value"]) and rms["seeds"] == 0 and rms["lrs"] == [1e-3, 3e-3]
    assert rms["study"] == "norms" and rms["measure"] == "loss" and not rms["all_failed"]
    assert report.configurations(runs) == rows[:2]  # without the missing runs: as before
    md = report.write_markdown(tmp_path, "t", [], {}, runs, missing=missing).read_text()
    (line,) = [x for x in md.splitlines() if x.startswith("| norms | rmsnorm |")]
    assert line.startswith(f"| norms | rmsnorm | 2 | {rms['best']} | loss | — | — | — |")
    page = report.write_html(tmp_path, "t", "", [], runs, {}, {}, missing=missing).read_text()
    assert rms["best"] in page and "<td class='num'>—</td><td class='num'>—</td>" in page
    assert "nan" not in line and ">nan<" not in page


def test_a_study_reports_a_configuration_whose_every_run_raised_and_writes_whole_files(tmp_path, corpus,
                                                                                      monkeypatch):
    import torch
    from rich.console import Console

    from normlab.studies import runner
    from normlab.studies.spec import Study
    from normlab.studies.train import Env
    from tests.studies.helpers import one_thread

    runs = tuple(micro_spec(f"norms-{n}-s{s}", seed=s, lr=3e-3, steps=4, eval_every=2, diag_every=0,
                            model={"d_model": 16, "n_heads": 2 if n == "layernorm" else 3, "d_ff": 32,
                                   "dropout": 0.0, "n_layers": 2, "placement": "pre", "norm": n},
                            tags={"study": "norms", "group": n})
                 for n in ("layernorm", "rmsnorm") for s in range(2))
    study = Study("mini", "every rmsnorm run raises", runs, ("rmsnorm-matches-layernorm",))
    from pathlib import Path
    written, saved = [], []
    real_write, real_save = Path.write_text, Figure.savefig
    monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: written.append(self.name) or real_write(self, *a, **k))
    monkeypatch.setattr(Figure, "savefig", lambda self, f, *a, **k: saved.append(Path(f).name) or real_save(self, f, *a, **k))
    with one_thread():
        runner.run_study(study, tmp_path, Env(device=torch.device("cpu")), corpus=corpus, workers=1,
                         keep_weights=False, console=Console(quiet=True))
    folder = tmp_path / "mini"
    # written through a temporary file beside each and swapped in, never in place
    assert not {"claims.json", "claims.md", "index.html", "summary.json"} & set(written), written
    assert saved and not [n for n in saved if n.endswith(".png")], saved
    pngs = sorted(p.name for p in folder.glob("*.png"))
    assert pngs and all((folder / n).read_bytes().startswith(b"\x89PNG") for n in pngs)
    assert not list(folder.glob("*.tmp"))
    assert json.loads((folder / "claims.json").read_text())[0]["claim"] == "rmsnorm-matches-layernorm"
    best = "none: no run finished (raised: norms-rmsnorm-s0, norms-rmsnorm-s1)"
    md = (folder / "claims.md").read_text()
    assert f"| norms | rmsnorm | 2 | {best} | loss | — | — | — | 2 missing |" in md
    assert best in (folder / "index.html").read_text()
