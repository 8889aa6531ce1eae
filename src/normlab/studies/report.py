"""The study report: PNG plots and one self-contained ``index.html``.

The HTML shows the provenance, the claims table (each claim's statistic, margin,
estimate, interval, verdict and scope; the interval is a 95% t-interval (or jackknife) over paired
seeds, over seeds or over timing rounds, or a sanity row's min to max, as each row
says), the plots (bands are 95% t-intervals over the seeds present at each step, on the
logs on a log axis) and every run, its status by the claims' own failure rule. Every
file is written whole through a temporary file (``write_atomic``, ``_save``).
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from normlab.studies.claims import (  # noqa: E402
    ERROR_METRIC,
    baseline,
    best_ci,
    best_setting,
    failed,
    failed_on,
    judged_error,
    judged_loss,
    names_by_why,
    runs_of,
)
from normlab.studies.spec import read_jsonl  # noqa: E402
from normlab.studies.stats import Interval, bound_text, degenerate, mean_ci  # noqa: E402, F401 (bound_text: the tables' too)
from normlab.studies.train import write_atomic  # noqa: E402

Result = dict[str, Any]
COLORS = {"post": "#d62728", "pre": "#1f77b4", "deepnorm": "#2ca02c", "peri": "#9467bd", "sandwich": "#8c564b",
          "subln": "#e377c2", "resi_dual": "#7f7f7f", "none": "#bcbd22", "layernorm": "#1f77b4",
          "rmsnorm": "#ff7f0e", "scalenorm": "#8c564b", "powernorm": "#2ca02c", "batchnorm": "#d62728",
          "dyt": "#9467bd", "post warm-up": "#d62728", "post no warm-up": "#ff9896", "pre warm-up": "#1f77b4",
          "pre no warm-up": "#9ecae1", "dyt a0=0.25": "#c5b0d5", "dyt a0=0.5": "#9467bd", "dyt a0=1": "#54278f"}
DPI = 150


def load_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """A run's logged records (``spec.read_jsonl``: damaged lines skipped with a warning)."""
    return read_jsonl(run_dir / "metrics.jsonl")


def _group(r: Result) -> str:
    return str(r.get("tags", {}).get("group", r["name"]))


def _color(key: str, i: int):
    return COLORS.get(key, COLORS.get(key.split()[0], plt.cm.tab10(i % 10)))


def seed_interval(values: Sequence[float], log: bool = False) -> Interval:
    """Mean over seeds with its 95% t-interval, over the finite values (``n`` counts them:
    an overflowed or NaN seed has no place on an axis, and the plots mark it apart,
    ``_not_finite``); ``log``: computed on the logs and mapped back (the geometric mean),
    so that on a log axis the interval stays positive, where a linear one from few seeds
    (t = 12.7 for two) runs below zero. Values that are not all positive have no log:
    their plain mean, without an interval."""
    values = [v for v in values if math.isfinite(v)]
    if not log:
        return mean_ci(values)
    if not values or not all(v > 0 for v in values):
        return Interval(mean_ci(values).estimate, math.nan, math.nan, len(values))
    c = mean_ci([math.log(v) for v in values])
    return Interval(math.exp(c.estimate), math.exp(c.lo), math.exp(c.hi), c.n)


def _not_finite(ax, xs: Sequence[float], seeds: int, of: int, label: str, color) -> None:
    """Mark the x positions where ``seeds`` of ``of`` seeds have a value that is not
    finite (an overflow, which the claims count as the most extreme evidence, or a NaN):
    a triangle at the top edge of the axes, named in the legend."""
    if not seeds:
        return
    xs = sorted(set(xs))
    ax.plot(xs, [1.0] * len(xs), "^", color=color, ms=7, ls="none", transform=ax.get_xaxis_transform(),
            clip_on=False, label=f"{label}: not finite ({seeds} of {of}, at the top)")


def _band_fill(ax, xs: Sequence[float], cis: Sequence[Interval], color, alpha: float = 0.18) -> None:
    """The 95% band of ``cis`` over ``xs`` where each has one (two seeds or more, finite
    bounds): a point with fewer seeds breaks the band there, not everywhere."""
    shown = [c.n > 1 and math.isfinite(c.lo) and math.isfinite(c.hi) for c in cis]
    if any(shown):
        ax.fill_between(xs, [c.lo if ok else c.estimate for c, ok in zip(cis, shown)],
                        [c.hi if ok else c.estimate for c, ok in zip(cis, shown)], where=shown,
                        color=color, alpha=alpha, lw=0)


def _seeds(drawn: int, of: int) -> str:
    """How many seeds a curve draws: "n=3", or "2 of 3 seeds" where some had nothing to draw."""
    return f"n={drawn}" if drawn == of else f"{drawn} of {of} seeds"


def _band(ax, xs_list: list[list[float]], ys_list: list[list[float]], label: str, color,
          of: int | None = None, diverged: Sequence[int | None] = (), **kw) -> None:
    """Mean curve over seeds with its 95% t-interval band, each step over the seeds that
    reached it (a seed that stopped early leaves the later steps to the others; one with
    no points is not drawn). The label gets the number of seeds drawn, of ``of`` (default:
    the curves given). ``diverged``: per curve, the step it diverged at (None: it did
    not), marked with an x on its last point. On a log y axis (set before) the curve is
    the geometric mean (``seed_interval``)."""
    log = ax.get_yscale() == "log"
    # a point that is not finite (an overflowed activation is kept as inf) is no point of
    # the curve: the others' mean goes on there, and a triangle at the top marks it
    curves = [c for c in ({x: y for x, y in zip(xs, ys) if math.isfinite(y)}
                          for xs, ys in zip(xs_list, ys_list)) if c]
    bad = [[x for x, y in zip(xs, ys) if not math.isfinite(y)] for xs, ys in zip(xs_list, ys_list)]
    of = len(xs_list) if of is None else of
    text = f"{label} ({_seeds(len(curves), of)})"
    steps = sorted({x for c in curves for x in c})
    if steps:
        cis = [seed_interval([c[x] for c in curves if x in c], log) for x in steps]
        ax.plot(steps, [c.estimate for c in cis], label=text, color=color, lw=1.6, **kw)
        _band_fill(ax, steps, cis, color)
    else:
        gone = sum(step is not None for step in diverged)
        ax.plot([], [], color=color, lw=1.6,
                label=f"{label}: no seed has points" + (f" ({gone} of {of} diverged)" if gone else ""))
    marks = []
    for xs, ys, step in zip(xs_list, ys_list, diverged):
        if step is None:
            continue
        before = [(x, y) for x, y in zip(xs, ys) if x <= step and math.isfinite(y)]
        if before:
            marks.append((step, before[-1][1]))
        elif steps:  # nothing logged before it diverged: on the curve where it begins
            marks.append((step, cis[0].estimate))
    if marks:
        ax.plot([x for x, _ in marks], [y for _, y in marks], "x", color=color, ms=8, mew=2, ls="none",
                label=f"{label}: diverged ({len(marks)} of {of})")
    _not_finite(ax, [x for xs in bad for x in xs], sum(map(bool, bad)), of, label, color)


def _finish(ax, xlabel: str, ylabel: str, title: str) -> None:
    """Labels, grid, and the legend under the axes, where it covers no data."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=min(3, len(handles)),
                  handlelength=3, frameon=False)


def _save(fig, path: Path) -> Path:
    """Save ``fig`` as the PNG ``path`` through a temporary file beside it, swapped in: a
    report written while another reads (``--report-only`` beside a study) never sees half
    a PNG (one temporary file per process)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        fig.tight_layout()
        fig.savefig(tmp, dpi=DPI, format="png", bbox_inches="tight")  # the legend under the axes too
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def _trained(results: list[Result], study: str) -> list[Result]:
    return [r for r in runs_of(results, study) if r.get("kind") == "train"]


# ------------------------------------------------------------------ init probes


def plot_grad_by_layer(results: list[Result], path: Path, kinds=("ffn_w2", "ffn_w1")) -> Path | None:
    runs = [r for r in results if r.get("kind") == "probe" and r.get("grad_norms_by_layer")]
    if not runs:
        return None
    depths = sorted({r["n_layers"] for r in runs})
    depth = 6 if 6 in depths else depths[-1]
    runs = [r for r in runs if r["n_layers"] == depth]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.6 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        ax.set_yscale("log")
        groups: dict[str, list[list[float]]] = defaultdict(list)
        for r in runs:
            groups[r["placement"]].append(r["grad_norms_by_layer"].get(kind) or [])
        for i, (p, profiles) in enumerate(sorted(groups.items())):
            _band(ax, [list(range(1, len(v) + 1)) for v in profiles], profiles, p, _color(p, i))
        _finish(ax, "layer", f"|grad| of {kind}", f"{kind} gradient norm at init, {depth} layers")
    return _save(fig, path)


def _depth_errorbars(ax, cells: dict[str, dict[int, list[float]]], ref: dict[str, float] | None = None) -> None:
    """Per group: the geometric mean over seeds at each depth with its 95% t-interval on
    the logs (``seed_interval``), log-log; ``ref``: group -> exponent of a dotted
    reference line through the first point."""
    ax.set_yscale("log")
    for i, (group, by_depth) in enumerate(sorted(cells.items())):
        depths = sorted(by_depth)
        if not depths:
            continue
        cis = [seed_interval(by_depth[n], log=True) for n in depths]
        color = _color(group, i)
        counts = sorted({c.n for c in cis})  # (the seeds each point is the mean of: finite ones)
        seeds = f"n={counts[0]}" if len(counts) == 1 else f"n={counts[0]}-{counts[-1]} by depth"
        ax.errorbar(depths, [c.estimate for c in cis],
                    yerr=[[c.estimate - c.lo if math.isfinite(c.lo) else 0 for c in cis],
                          [c.hi - c.estimate if math.isfinite(c.hi) else 0 for c in cis]],
                    fmt="o-", color=color, label=f"{group} ({seeds})", capsize=3)
        bad = [n for n in depths if any(not math.isfinite(v) for v in by_depth[n])]
        _not_finite(ax, bad, max((sum(not math.isfinite(v) for v in by_depth[n]) for n in bad), default=0),
                    max(len(by_depth[n]) for n in depths), group, color)
        if ref and group in ref and len(depths) > 1:
            ax.plot(depths, [cis[0].estimate * (n / depths[0]) ** ref[group] for n in depths], ":", color=color,
                    label=f"{group}: L^{ref[group]:g}")
    ax.set_xscale("log", base=2)
    depths = sorted({n for by_depth in cells.values() for n in by_depth})
    ax.set_xticks(depths, [str(n) for n in depths])
    ax.minorticks_off()


def plot_residual_growth(results: list[Result], path: Path) -> Path | None:
    runs = [r for r in results if r.get("kind") == "probe" and r.get("activation_rms_by_layer")]
    if not runs:
        return None
    cells: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        cells[r["placement"]][r["n_layers"]].append(r["activation_rms_by_layer"][-1])
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    _depth_errorbars(ax, {p: c for p, c in cells.items() if len(c) >= 2}, {"pre": 0.5})
    ax.set_yscale("log", base=2)  # RMS from 1 to a few: powers of 2 label it
    _finish(ax, "layers L", "RMS of the last block's residual", "Residual stream at init vs depth")
    return _save(fig, path)


def plot_init_depth(results: list[Result], path: Path) -> Path | None:
    """Xiong et al.'s Theorem 1: the last layer's W2 gradient at init against depth."""
    runs = runs_of(results, "grad-at-init") + runs_of(results, "init-depth")
    cells: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        w2 = r.get("grad_norms_by_layer", {}).get("ffn_w2")
        if r["placement"] in ("post", "pre") and w2 and r["n_layers"] >= 6:
            cells[r["placement"]][r["n_layers"]].append(w2[-1])
    if not runs_of(results, "init-depth") or not cells:
        return None
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    _depth_errorbars(ax, cells, {"post": 0.0, "pre": -0.5})
    _finish(ax, "layers L", "last layer's |grad W2|", "Last-layer gradient at init vs depth (theory: dotted)")
    return _save(fig, path)


def plot_amplification(results: list[Result], path: Path) -> Path | None:
    """Liu et al.'s amplification: the output change after one Adam update, by depth."""
    cells: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in runs_of(results, "amplification"):
        if r.get("output_change_sq") is not None:
            cells[r["placement"]][r["n_layers"]].append(r["output_change_sq"])
    if not cells:
        return None
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    _depth_errorbars(ax, cells, {"post": 1.0, "deepnorm": 0.0})
    _finish(ax, "layers N", "||dF||^2 per coordinate", "Output change after one update at init (theory: dotted)")
    return _save(fig, path)


def plot_activations(results: list[Result], metrics: dict[str, list], path: Path) -> Path | None:
    """Kim et al.'s hidden-state growth: the last block's max |x| through training, and
    the residual RMS by layer at the last diagnostics step, per placement."""
    runs = [r for r in _trained(results, "activations") if r.get("activation_rms_by_layer_final")]
    if not runs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9.4, 4.4))
    for ax in axes:
        ax.set_yscale("log")
    groups: dict[str, list[Result]] = defaultdict(list)
    for r in runs:
        groups[r["placement"]].append(r)
    for i, (p, rs) in enumerate(sorted(groups.items())):
        color = _color(p, i)
        xs, ys = [], []
        for r in rs:
            pts = [(m["step"], m["activation_max_by_layer"][-1]) for m in metrics.get(r["name"], [])
                   if m.get("activation_max_by_layer")]
            xs.append([x for x, _ in pts])
            ys.append([y for _, y in pts])
        _band(axes[0], xs, ys, p, color, diverged=[r.get("diverged_step") if r.get("diverged") else None
                                                     for r in rs])
        profiles = [r["activation_rms_by_layer_final"] for r in rs]
        _band(axes[1], [list(range(1, len(v) + 1)) for v in profiles], profiles, p, color)
    _finish(axes[0], "step", "max |x| after the last block", "Largest activation through training")
    _finish(axes[1], "block", "residual RMS", "Residual RMS by block after training")
    return _save(fig, path)


def plot_gns(results: list[Result], metrics: dict[str, list], path: Path) -> Path | None:
    """Gray et al.: B_simple from the norm layers against every parameter's, through training."""
    runs = [r for r in _trained(results, "gns") if r.get("gns_total")]
    if not runs:
        return None
    norms = sorted({r["norm"] for r in runs})
    fig, axes = plt.subplots(1, len(norms), figsize=(4.6 * len(norms), 4.2), squeeze=False, sharey=True)
    sources = (("gns_trace", "gns_g_sq", "norm layers"), ("gns_total_trace", "gns_total_g_sq", "every parameter"))
    for ax, norm in zip(axes[0], norms):
        ax.set_yscale("log")
        mine = [r for r in runs if r["norm"] == norm]
        for i, (trace, g_sq, label) in enumerate(sources):
            xs, ys = [], []
            for r in mine:
                pts, num, den = [], 0.0, 0.0
                for m in metrics.get(r["name"], []):  # the claim's estimate up to each step: sums, divided last
                    if m.get(trace) is not None and m.get(g_sq) is not None:
                        num, den = num + m[trace], den + m[g_sq]
                        if den > 0 and num > 0:
                            pts.append((m["step"], num / den))
                xs.append([x for x, _ in pts])
                ys.append([y for _, y in pts])
            _band(ax, xs, ys, label, plt.cm.tab10(i),
                  diverged=[r.get("diverged_step") if r.get("diverged") else None for r in mine])
        _finish(ax, "step", "B_simple (sums up to the step)", f"Gradient noise scale, {norm}")
    return _save(fig, path)


def plot_expressivity(results: list[Result], metrics: dict[str, list], path: Path) -> Path | None:
    """Brody et al.: majority accuracy through training, each norm at its best lr; and the
    fraction of unselectable attention inputs by layer in the LM runs."""
    majority = [r for r in _trained(results, "expressivity") if r.get("task") == "majority"]
    keys = [r for r in _trained(results, "expressivity") if r.get("unselectable_by_layer")]
    if not majority and not keys:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9.4, 4.2))
    for i, norm in enumerate(sorted({r["norm"] for r in majority})):
        runs = [r for r in majority if r["norm"] == norm]
        best = best_setting(runs, judged_error)
        xs, ys = [], []
        chosen = [r for r in runs if r["lr"] == best.setting[0]]
        for r in chosen:
            pts = [(m["step"], m["val_accuracy"]) for m in metrics.get(r["name"], []) if "val_accuracy" in m]
            xs.append([x for x, _ in pts])
            ys.append([y for _, y in pts])
        _band(axes[0], xs, ys, f"{norm}, lr {best.setting[0]:g}", _color(norm, i),
              diverged=[r.get("diverged_step") if r.get("diverged") else None for r in chosen])
    if majority:
        axes[0].axhline(majority[0].get("chance_accuracy", 0.0), color="k", lw=0.8, ls=":", label="chance")
    for i, norm in enumerate(sorted({r["norm"] for r in keys})):
        profiles = [r["unselectable_by_layer"] for r in keys if r["norm"] == norm]
        _band(axes[1], [list(range(1, len(v) + 1)) for v in profiles], profiles, norm, _color(norm, i), marker="o")
    depth = max((len(r["unselectable_by_layer"]) for r in keys), default=0)
    axes[1].set_xticks(range(1, depth + 1))
    _finish(axes[0], "step", "validation accuracy", "Majority, one layer of width 8")
    _finish(axes[1], "layer", "fraction of attention inputs", "Unselectable attention inputs, byte-level LM of width 8")
    return _save(fig, path)


def plot_qk_logits(results: list[Result], path: Path) -> Path | None:
    """Wortsman et al.: the largest attention logit during training against lr, with and
    without QK-norm (geometric mean over seeds, 95% band)."""
    runs = [r for r in _trained(results, "qk-norm") if (r.get("attention_logit_max") or 0) > 0]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    for i, g in enumerate(sorted({_group(r) for r in runs})):
        mine = [r for r in runs if _group(r) == g]
        lrs = sorted({r["lr"] for r in mine})
        values = [[r["attention_logit_max"] for r in mine if r["lr"] == lr] for lr in lrs]
        cis = [seed_interval(v, log=True) for v in values]
        color = plt.cm.tab10(i)
        ax.plot(lrs, [c.estimate for c in cis], "o-", color=color, label=g, ms=3)
        _band_fill(ax, lrs, cis, color, alpha=0.15)
        bad = [lr for lr, v in zip(lrs, values) if any(not math.isfinite(x) for x in v)]
        _not_finite(ax, bad, max((sum(not math.isfinite(x) for x in v) for v in values), default=0),
                    max(map(len, values)), g, color)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _finish(ax, "peak learning rate", "largest attention logit during training", "Attention logit growth")
    return _save(fig, path)


# ------------------------------------------------------------------ training


def _depth_panels(results: list[Result], study: str, key) -> tuple[Any, list[tuple[Any, int, dict]]]:
    """A figure with one panel per depth of ``study``'s trained runs, and for each panel
    (axes, depth, {key(run): runs}); (None, []) without runs."""
    runs = _trained(results, study)
    if not runs:
        return None, []
    depths = sorted({r["n_layers"] for r in runs})
    fig, axes = plt.subplots(1, len(depths), figsize=(4.6 * len(depths), 4.4), squeeze=False, sharey=True)
    panels = []
    for ax, n in zip(axes[0], depths):
        groups: dict[str, list[Result]] = defaultdict(list)
        for r in runs:
            if r["n_layers"] == n:
                groups[key(r)].append(r)
        panels.append((ax, n, groups))
    return fig, panels


def plot_loss_curves(results: list[Result], metrics: dict[str, list], study: str, path: Path) -> Path | None:
    """Train loss per group at its best lr (mean and 95% band over seeds)."""
    fig, panels = _depth_panels(results, study, _group)
    if fig is None:
        return None
    for ax, n, groups in panels:
        for i, (g, rs) in enumerate(sorted(groups.items())):
            best = best_setting(rs)
            chosen = [r for r in rs if (r["lr"], r.get("tags", {}).get("alpha0")) == best.setting]
            xs_list, ys_list = [], []
            for r in chosen:
                recs = [m for m in metrics.get(r["name"], []) if math.isfinite(m.get("train_loss", math.nan))]
                xs_list.append([m["step"] for m in recs])
                ys_list.append([m["train_loss"] for m in recs])
            _band(ax, xs_list, ys_list, f"{g}, lr {best.setting[0]:g}", _color(g, i),
                  diverged=[r.get("diverged_step") if r.get("diverged") else None for r in chosen])
        _finish(ax, "step", "train loss (nats/byte)", f"{study}: {n} layers, each at its best lr")
    return _save(fig, path)


def plot_loss_vs_lr(results: list[Result], study: str, path: Path) -> Path | None:
    """Final test-half validation loss against lr per configuration, 95% band over seeds."""

    def label(r: Result) -> str:
        alpha = r.get("tags", {}).get("alpha0")
        return _group(r) + (f" a0={alpha:g}" if alpha is not None else "")

    fig, panels = _depth_panels(results, study, label)
    if fig is None:
        return None
    for ax, n, groups in panels:
        for i, (g, rs) in enumerate(sorted(groups.items())):
            lrs = sorted({r["lr"] for r in rs})
            cis = [mean_ci([judged_loss(r) for r in rs if r["lr"] == lr]) for lr in lrs]
            color = _color(g, i)
            ax.plot(lrs, [c.estimate for c in cis], "o-", color=color, label=g, ms=3)
            _band_fill(ax, lrs, cis, color, alpha=0.15)
        # where judged_loss puts a failed run: the unigram baseline on the test half
        for floor in sorted({baseline(r, "test") for rs in groups.values() for r in rs}):
            ax.axhline(floor, color="k", lw=0.8, ls=":", label="unigram, test half (failed)")
        ax.set_xscale("log")
        lrs_swept = sorted({r["lr"] for rs in groups.values() for r in rs})
        ax.set_xticks(lrs_swept, [f"{x:g}" for x in lrs_swept])
        ax.minorticks_off()
        _finish(ax, "peak learning rate", "final val loss (test half)", f"{study}: {n} layers")
    return _save(fig, path)


def plot_depth(results: list[Result], path: Path) -> Path | None:
    runs = _trained(results, "depth")
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    placements = sorted({r["placement"] for r in runs})
    depths_all = sorted({r["n_layers"] for r in runs})
    for i, p in enumerate(placements):
        depths = sorted({r["n_layers"] for r in runs if r["placement"] == p})
        shift = 1 + 0.03 * (i - (len(placements) - 1) / 2)  # side by side, not on top of each other
        xs, cis, failed_at = [], [], []
        for n in depths:
            best = best_setting([r for r in runs if r["placement"] == p and r["n_layers"] == n])
            if best.all_failed:
                failed_at.append(n * shift)
                continue
            xs.append(n * shift)
            cis.append(best_ci(best))
        color = _color(p, i)
        if xs:
            ax.errorbar(xs, [c.estimate for c in cis],
                        yerr=[[c.estimate - c.lo if math.isfinite(c.lo) else 0 for c in cis],
                              [c.hi - c.estimate if math.isfinite(c.hi) else 0 for c in cis]],
                        fmt="o-", color=color, label=p, capsize=3)
        if failed_at:  # where the claims count a failed run: the test half's baseline
            top = max(baseline(r, "test") for r in runs)
            ax.plot(failed_at, [top] * len(failed_at), "x", color=color, ms=9, mew=2,
                    label=f"{p}: every run failed")
    ax.set_xscale("log", base=2)
    ax.set_xticks(depths_all, [str(n) for n in depths_all])
    ax.minorticks_off()
    _finish(ax, "layers", "test loss, cross-fitted best lr", "Depth (95% jackknife CI over seeds)")
    return _save(fig, path)


def plot_norms(results: list[Result], path: Path) -> Path | None:
    runs = _trained(results, "norms")
    if not runs:
        return None
    names = sorted({r["norm"] for r in runs})
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for i, n in enumerate(names):
        mine = [r for r in runs if r["norm"] == n]
        best = best_setting(mine)
        if best.all_failed:  # as plot_depth: an x at the unigram baseline, not a point with an interval
            top = max(baseline(r, "test") for r in mine)
            ax.plot([i], [top], "x", color=_color(n, i), ms=9, mew=2, label=f"{n}: every run failed")
            continue
        c = best_ci(best)
        ax.errorbar([i], [c.estimate], yerr=[[c.estimate - c.lo if math.isfinite(c.lo) else 0],
                                            [c.hi - c.estimate if math.isfinite(c.hi) else 0]],
                    fmt="o", color=_color(n, i), capsize=5, ms=6)
    ax.set_xticks(range(len(names)), names, rotation=30)
    ax.set_xlim(-0.6, len(names) - 0.4)
    _finish(ax, "norm", "test loss, cross-fitted best setting", "Norms at Pre-LN (mean, 95% jackknife CI over seeds)")
    if ax.get_legend() is not None:  # below the rotated norm names and the axis label
        ax.get_legend().set_bbox_to_anchor((0.5, -0.38))
    return _save(fig, path)


def make_plots(out: Path, results: list[Result], metrics: dict[str, list]) -> dict[str, Path]:
    """Draw every plot the runs allow; returns {title: path}."""
    plots = {
        "Gradient norm by layer at initialization": plot_grad_by_layer(results, out / "grad_by_layer.png"),
        "Residual stream RMS against depth at initialization": plot_residual_growth(results, out / "activation_rms.png"),
        "Last layer's gradient at initialization against depth": plot_init_depth(results, out / "init_depth.png"),
        "Output change after one update at initialization against depth":
            plot_amplification(results, out / "amplification.png"),
        "Activations study: the residual stream through training":
            plot_activations(results, metrics, out / "activations.png"),
        "GNS study: the noise scale from the norm layers and from every parameter":
            plot_gns(results, metrics, out / "gns.png"),
        "Expressivity study: majority, and the keys no query can select":
            plot_expressivity(results, metrics, out / "expressivity.png"),
        "QK-norm study: final loss against learning rate": plot_loss_vs_lr(results, "qk-norm", out / "lr_qk.png"),
        "QK-norm study: the largest attention logit against learning rate":
            plot_qk_logits(results, out / "qk_logits.png"),
        "Warm-up study: final loss against learning rate": plot_loss_vs_lr(results, "warmup", out / "lr_warmup.png"),
        "Warm-up study: loss curves": plot_loss_curves(results, metrics, "warmup", out / "loss_warmup.png"),
        "Depth study: final loss against learning rate": plot_loss_vs_lr(results, "depth", out / "lr_depth.png"),
        "Depth study: final loss by depth": plot_depth(results, out / "depth.png"),
        "Norms study: final loss against learning rate": plot_loss_vs_lr(results, "norms", out / "lr_norms.png"),
        "Norms study: loss curves": plot_loss_curves(results, metrics, "norms", out / "loss_norms.png"),
        "Norms study: final loss by norm": plot_norms(results, out / "norms.png"),
    }
    return {k: v for k, v in plots.items() if v is not None}


MEASURES = {"loss": "test-half loss (nats/byte)",
            "error": "error: 1 - the test-half accuracy averaged over training (the majority claims' statistic)"}


def _cell(r: Result) -> tuple:
    """The configuration a trained run belongs to: (study, group, depth, task). A missing
    run's record (``missing_runs``) written from its spec as given may lack the depth: the
    model's default then, as the run would have been built with."""
    n = r.get("n_layers")
    if n is None:
        from normlab.models import TransformerConfig

        n = TransformerConfig.n_layers
    return r.get("tags", {}).get("study", ""), _group(r), n, r.get("task", "lm")


def configurations(results: list[Result], missing: Iterable[Result] = ()) -> list[dict[str, Any]]:
    """One row per trained configuration (study, group, depth, task): its best setting and
    the cross-fitted value there with its 95% interval, the largest stable lr, failures.
    A configuration is ranked and judged as its claims judge it, so the report names one
    best lr per configuration: the majority task by its error (``judged_error``: 1 - the
    accuracy averaged over training), every other run by its test-half loss. ``measure``
    says which ("error" | "loss").

    ``missing``: the planned runs that left no result (``missing_runs``); a configuration
    none of whose runs finished still gets a row (after the others), its best "none: no
    run finished (raised: ...; not finished: ...)", its value nan and ``none_finished``
    True, so that a reader sees it was planned."""
    cells: dict[tuple, list[Result]] = defaultdict(list)
    for r in results:
        if r.get("kind") == "train":
            cells[_cell(r)].append(r)
    lacking: dict[tuple, list[Result]] = defaultdict(list)
    for r in missing:
        if r.get("kind") == "train" and _cell(r) not in cells:
            lacking[_cell(r)].append(r)
    rows = []
    for (study, group, n, task), runs in cells.items():
        majority = task == "majority"
        best = best_setting(runs, judged_error, ERROR_METRIC) if majority else best_setting(runs)
        ci = best_ci(best)
        lr, alpha0 = best.setting
        rows.append({"study": study, "configuration": group, "layers": n,
                     "best": "none: every run failed" if best.all_failed else
                     f"lr {lr:g}" + (f", alpha0 {alpha0:g}" if alpha0 is not None else "")
                     + (" (edge)" if best.at_edge else ""),
                     "all_failed": best.all_failed, "measure": "error" if majority else "loss",
                     "value": ci.estimate, "ci95": ci.ci95, "seeds": best.seeds,
                     "largest_stable_lr": best.largest_stable_lr,
                     "failed": f"{sum(best.failures.values())}/{len(runs)}",
                     "lrs": sorted({r['lr'] for r in runs}), "none_finished": False})
    for (study, group, n, task), runs in lacking.items():
        rows.append({"study": study, "configuration": group, "layers": n,
                     "best": f"none: no run finished ({names_by_why(runs)})", "all_failed": False,
                     "measure": "error" if task == "majority" else "loss", "value": math.nan,
                     "ci95": [None, None], "seeds": 0, "largest_stable_lr": None,
                     "failed": f"{len(runs)} missing", "lrs": sorted({r["lr"] for r in runs if r.get("lr") is not None}),
                     "none_finished": True})
    return rows


# ------------------------------------------------------------------ HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} .sub{color:#666;margin-top:0}
table{border-collapse:collapse;width:100%;font-size:13px;margin:1em 0}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top} th{background:#f4f4f4}
.verdict{display:inline-block;padding:2px 10px;border-radius:10px;color:#fff;font-weight:600;font-size:12px;white-space:nowrap}
.agrees{background:#2e7d32} .disagrees{background:#c62828} .inconclusive{background:#9e9e9e} .sanity{background:#5c6bc0}
.src{color:#666;font-size:12px} figure{margin:1.2em 0} img{max-width:100%;border:1px solid #eee}
.caveat{color:#a15c00;font-size:12px} td.name{white-space:nowrap}
figcaption{font-size:13px;color:#555} td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
details{margin:.4em 0} summary{cursor:pointer}
"""


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _num(v: Any, fmt: str = "{:.3f}") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return fmt.format(v)
    return html.escape(str(v))


def judged_margin(row: dict[str, Any]) -> float | None:
    """The margin a row's interval is judged against (none for a sanity row's min to max)."""
    return None if row.get("test") == "sanity" else row.get("margin")


def _ci(ci: list, margin: float | None = None) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return "-"
    return f"[{bound_text(ci[0], margin)}, {bound_text(ci[1], margin)}]"


def _config_ci(c: dict[str, Any]) -> str:
    """A configuration's 95% interval, or "every seed equal" where every seed's value is
    the same (most often each at the failure baseline): an interval of no width there
    says nothing about the noise."""
    lo, hi = c["ci95"] if c["ci95"] else (None, None)
    if lo is not None and hi is not None and degenerate(Interval(c["value"], lo, hi, c["seeds"])):
        return "every seed equal"
    return _ci(c["ci95"])


def interval_label(row: dict[str, Any]) -> str:
    """What a claims row's interval is: "95% CI over paired seeds" (or over seeds, over
    timing rounds), or "min to max (not a CI)" for a sanity row."""
    kind = row.get("interval_kind") or ("min to max" if row.get("test") == "sanity" else "")
    if row.get("test") == "sanity" or kind.startswith("min to max"):
        return "min to max (not a CI)"
    return f"95% CI over {kind}" if kind else "95% CI"


_TEST_WORDS = {"directional": "> margin", "equivalence": "|x| < margin", "noninferiority": "< margin",
               "sanity": "by construction"}


def error_line(text: str) -> str:
    """The line of a traceback (or a job's log) that names the error: the last line that
    starts with an exception's name, else the last line (a job's error ends with where
    its log is)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Died|Failed|Busy|Exit)\b:?", line):
            return line
    return lines[-1] if lines else ""


def write_html(out: Path, study_name: str, description: str, rows: list[dict[str, Any]],
               results: list[Result], plots: dict[str, Path], prov: dict[str, Any],
               failures: dict[str, str] | None = None, missing: Iterable[Result] = ()) -> Path:
    """``index.html`` (written whole, ``write_atomic``); ``missing``: the planned runs
    that left no result (``missing_runs``), for the configurations none of whose runs
    finished."""
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>normlab study: {esc(study_name)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>normlab study: {esc(study_name)}</h1><p class='sub'>{esc(description)}</p>",
             "<h2>Provenance</h2><table>"]
    for k, v in prov.items():
        parts.append(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>")
    parts.append("</table>")
    if failures:
        parts.append(f"<h2>Failed runs</h2><p class='caveat'>{len(failures)} run(s) raised; the claims are judged "
                     "on the runs that finished. Tracebacks are in summary.json.</p><table>"
                     "<tr><th>run</th><th>error</th></tr>")
        for name, text in failures.items():
            parts.append(f"<tr><td class='name'>{esc(name)}</td><td>{esc(error_line(text) or '?')}</td></tr>")
        parts.append("</table>")
    if rows:
        parts.append(
            "<h2>Claims</h2><p class='src'>Each row tests one half of a paper's claim. The estimate is a mean over "
            "seeds: of paired differences where the row compares two configurations (a seed fixes the data order "
            "and init of both), of a per-seed statistic (a slope, a ratio) where it reads one configuration, or "
            "over interleaved timing rounds for the speed row; the interval is its 95% Student-t interval (at "
            "each configuration's cross-fitted best lr, the delete-one-seed jackknife of the whole choice, with t "
            "quantiles: the seeds' values lean on each other through the choice), and "
            "the interval column says what it is over. A verdict "
            "compares the interval with the margin fixed before the runs: <b>agrees</b> when the whole "
            "interval is on the claim's side, <b>disagrees</b> when it is wholly on the other side, "
            "<b>inconclusive</b> when it straddles the margin, or where the runs cannot decide the row "
            "whatever its interval (the reason under the verdict). Where every seed gave the same value the "
            "t-interval has no width: the row is judged by the sign test's 95% interval for the median, which "
            "needs 6 seeds (inconclusive with fewer), and its caveat says so. <b>sanity</b> rows are true by "
            "construction and are not verdicts; their interval is the min to max, not a confidence interval. "
            "Losses are nats/byte on the test half of a fixed validation set; each "
            "configuration is taken at its own best lr, chosen on the other half.</p>"
            "<table><tr><th>claim</th><th>statistic</th><th>test</th><th>margin</th><th>estimate</th>"
            "<th>interval</th><th>n</th><th>verdict</th></tr>")
        for row in rows:
            caveats = "".join(f"<div class='caveat'>caveat: {esc(c)}</div>" for c in row.get("caveats", []))
            ci_cell = _ci(row["ci95"], judged_margin(row))
            if ci_cell != "-":
                ci_cell += f"<div class='src'>{esc(interval_label(row))}</div>"
            parts.append(
                f"<tr><td><b>{esc(row['title'])}</b><div class='src'>{esc(row['id'])} · "
                f"{esc('; '.join(row['papers']))}</div>{caveats}</td><td>{esc(row['statistic'])}</td>"
                f"<td>{esc(row['test'])} ({esc(_TEST_WORDS[row['test']])})</td>"
                f"<td class='num'>{_num(row['margin'], '{:g}')}</td><td class='num'>{_num(row['estimate'], '{:+.3f}')}</td>"
                f"<td class='num'>{ci_cell}</td>"
                f"<td class='num'>{row['n_seeds']}</td>"
                f"<td><span class='verdict {esc(row['verdict'])}'>{esc(row['verdict'])}</span>"
                + (f"<div class='src'>whatever the interval: {esc(row['inconclusive_why'])}</div>"
                   if row.get("inconclusive_why") else "") + "</td></tr>")
        parts.append("</table><h2>What each claim says, what was measured, and the scope</h2>")
        for row in rows:
            parts.append(
                f"<details><summary><b>{esc(row['id'])}</b> <span class='verdict {esc(row['verdict'])}'>"
                f"{esc(row['verdict'])}</span> {esc(row['title'])}</summary>"
                f"<p><i>Claim:</i> {esc(row['statement'])}</p><p><i>Measured:</i> {esc(row['measured'])}</p>"
                f"<p><i>Margin:</i> {_num(row['margin'], '{:g}')}: {esc(row['margin_why'])}</p>"
                f"<p><i>Interval:</i> {esc(row['interval'])}</p>"
                + "".join(f"<p class='caveat'>Caveat: {esc(c)}</p>" for c in row.get("caveats", []))
                + f"<p><i>Scope:</i> {esc(row['scope'])}</p></details>")
    configs = configurations(results, missing)
    if configs:
        parts.append("<h2>Configurations at their best setting</h2><p class='src'>Each configuration is ranked "
                     "and judged on the measure its claims use: the loss, or for the majority task the error "
                     "(1 - the accuracy averaged over training). Best setting: the lowest mean of that measure "
                     "over all seeds on the select half of the validation set. Value: cross-fitted, as the "
                     "claims judge it: each seed's test-half value at the setting the other seeds chose on their "
                     "select halves (it can differ from the best setting by seed), mean over seeds and the 95% "
                     "interval of the delete-one-seed jackknife of that choice. Largest stable lr: the largest lr of the sweep at which no "
                     "seed failed (non-finite, or no better than the unigram baseline).</p><table><tr>"
                     "<th>study</th><th>configuration</th><th>layers</th><th>lrs swept</th><th>best</th>"
                     "<th>measure</th><th>value</th><th>95% CI</th><th>seeds</th><th>largest stable lr</th>"
                     "<th>failed runs</th></tr>")
        for c in configs:
            parts.append(
                f"<tr><td>{esc(c['study'])}</td><td>{esc(c['configuration'])}</td><td class='num'>{c['layers']}</td>"
                f"<td>{esc(', '.join(f'{x:g}' for x in c['lrs']))}</td><td>{esc(c['best'])}</td>"
                f"<td>{esc(MEASURES[c['measure']])}</td>"
                + (f"<td colspan='2'>{'chance' if c['measure'] == 'error' else 'unigram baseline'}</td>"
                   if c["all_failed"] else "<td class='num'>—</td><td class='num'>—</td>" if c.get("none_finished")
                   else
                   f"<td class='num'>{_num(c['value'])}</td><td class='num'>{_config_ci(c)}</td>")
                + f"<td class='num'>{c['seeds']}</td><td class='num'>{_num(c['largest_stable_lr'], '{:g}')}</td>"
                f"<td class='num'>{esc(c['failed'])}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Plots</h2><p class='src'>Bands and error bars: 95% t-intervals over the seeds present at "
                 "each step (on a log axis over the logs: the geometric mean and its interval; a configuration at "
                 "its cross-fitted best lr, the delete-one-seed jackknife's, as its claims); an x marks a seed "
                 "that diverged, or a configuration whose every run failed; a triangle at the top edge a value that "
                 "is not finite (an overflow), which the mean beside it leaves out. Placements: "
                 "post = Post-LN, x + F(x) then a norm (Vaswani et al. 2017); pre = Pre-LN, x + F(norm(x)) "
                 "(Xiong et al. 2020); deepnorm = norm(alpha x + F(x)) with beta-scaled init (Wang et al. 2022); "
                 "peri = Peri-LN, norms on each sublayer's input and output and on the embeddings (Kim et al. 2025).</p>")
    for title, path in plots.items():
        parts.append(f"<figure>{_img(path)}<figcaption>{esc(title)} ({esc(path.name)})</figcaption></figure>")
    parts.append("<h2>Runs</h2><table><tr><th>run</th><th>placement</th><th>norm</th><th>layers</th><th>lr</th>"
                 "<th>warm-up</th><th>seed</th><th>steps</th><th>final train loss</th><th>final val loss</th>"
                 "<th>status</th><th>tokens/s</th></tr>")
    for r in results:
        kind = r.get("kind")
        if kind == "probe":
            status = "probe at init"
        elif kind == "update":
            status = f"one update at init: ||dF||^2 = {_num(r.get('output_change_sq'), '{:.3g}')}"
        elif kind == "speed":
            status = (f"timing vs {', '.join(f'{k}={v}' for k, v in r.get('speed_against', {}).items())}: "
                      f"{_num(r.get('baseline_tokens_per_s'), '{:,.0f}')} tokens/s")
        else:
            status = run_status(r)
        train = kind == "train"
        parts.append(
            f"<tr><td class='name'>{esc(r['name'])}</td><td>{esc(str(r['placement']))}</td>"
            f"<td>{esc(str(r['norm']))}</td><td class='num'>{_num(r.get('n_layers'))}</td>"
            f"<td class='num'>{_num(r['lr'], '{:g}') if train else '-'}</td>"
            f"<td class='num'>{_num(r['warmup_steps']) if train else '-'}</td><td class='num'>{_num(r['seed'])}</td>"
            f"<td class='num'>{_num(r['steps']) if train else '-'}</td>"
            f"<td class='num'>{_num(r.get('final_train_loss')) if train else '-'}</td>"
            f"<td class='num'>{_num(r.get('final_val_loss'))}</td><td>{esc(status)}</td>"
            f"<td class='num'>{_num(r.get('tokens_per_s'), '{:,.0f}')}</td></tr>")
    parts.append("</table></body></html>")
    path = out / "index.html"
    write_atomic(path, "\n".join(parts))
    return path


def run_status(r: Result) -> str:
    """A trained run's status by the claims' own rule (``claims.failed``, and ``failed_on``
    for each half of the validation set): "ok" only for a run the claims count as trained
    on the whole set and on both halves."""
    if r.get("diverged"):
        return f"diverged at step {r.get('diverged_step')}"
    loss = r.get("final_val_loss")
    if failed(r):
        if loss is None or not math.isfinite(loss):
            return "failed: no finite final loss"
        return "did not train (no better than the baseline)"
    halves = [h for h in ("select", "test") if failed_on(r, h)]
    if halves:
        return (f"failed on the {' and '.join(halves)} half (no finite loss there, or no better than the "
                "baseline there)")
    return "ok"


def _sentence(text: str) -> str:
    """``text`` ending in a full stop, so that the next one reads apart from it."""
    text = text.rstrip()
    return text if text.endswith(".") else text + "."


def _md(text: str) -> str:
    """Text for a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def write_markdown(out: Path, study_name: str, rows: list[dict[str, Any]], prov: dict[str, Any],
                   results: list[Result] | None = None, failures: dict[str, str] | None = None,
                   missing: Iterable[Result] = ()) -> Path:
    """``claims.md``: the provenance, the runs that raised (``failures``: name -> its
    traceback), the claims table, the configurations (``missing``: the planned runs that
    left no result, for those none of whose runs finished), and for each claim the
    paper's statement, its margin and why, and each row's measurement, caveats and scope:
    what a README or a results folder needs to read a verdict without the HTML. Written
    whole (``write_atomic``)."""
    lines = [f"# normlab study {study_name}", ""]
    lines += [f"- {k}: {v}" for k, v in prov.items()]
    if failures:
        lines += ["", "## Failed runs", "",
                  f"{len(failures)} run(s) raised; the claims are judged on the runs that finished, and each row "
                  "that would have read a failed run names it in a caveat. Tracebacks are in summary.json.", ""]
        lines += [f"- `{name}`: {error_line(text) or '?'}" for name, text in failures.items()]
    lines += ["", "Estimates are means over seeds (of paired differences where a row compares two configurations, "
              "of a per-seed statistic where it reads one; the speed row over interleaved timing rounds) with 95% "
              "Student-t intervals (at cross-fitted best lrs, the delete-one-seed jackknife's), the interval column "
              "saying which; a sanity row's interval is its min to max, "
              "not a confidence interval. Verdicts compare the interval with the margin fixed before the runs "
              "(where every seed gave the same value, the sign test's 95% interval for the median, from 6 seeds; "
              "inconclusive with fewer); † marks a row the runs cannot decide whatever its interval, the reason "
              "below the table.", "",
              "| claim | statistic | test | margin | estimate | interval | n | verdict |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        est = "-" if r["estimate"] is None else f"{r['estimate']:+.3f}"
        ci = _ci(r["ci95"], judged_margin(r))
        ci = ci if ci == "-" else f"{ci} {interval_label(r)}"
        mark = " †" if r.get("inconclusive_why") else ""
        lines.append(f"| `{_md(r['id'])}` | {_md(r['statistic'])} | {r['test']} | {r['margin']:g} | {est} | {ci} "
                     f"| {r['n_seeds']} | **{r['verdict']}**{mark} |")
    overridden = [r for r in rows if r.get("inconclusive_why")]
    if overridden:
        lines += ["", "† Inconclusive whatever the interval says against the margin:", ""]
        lines += [f"- `{_md(r['id'])}`: {_md(_sentence(r['inconclusive_why']))}" for r in overridden]
    configs = configurations(results or [], missing)
    if configs:
        lines += ["", "## Configurations at their best setting", "",
                  "Each configuration is ranked and judged on its claims' measure: the loss, or for the majority "
                  "task the error (1 - the accuracy averaged over training); its best setting is chosen on the "
                  "select half of the validation set, its value read on the test half.", "",
                  "| study | configuration | layers | best | measure | value (test half, cross-fitted) | 95% CI "
                  "| largest lr, no seed failed | failed |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in configs:
            stable = ("—" if c.get("none_finished") else "none" if c["largest_stable_lr"] is None
                      else f"{c['largest_stable_lr']:g}")
            floor = "chance" if c["measure"] == "error" else "unigram baseline"
            value = (f"{floor} | -" if c["all_failed"] else "— | —" if c.get("none_finished")
                     else f"{_num(c['value'])} | {_config_ci(c)}")
            lines.append(f"| {_md(c['study'])} | {_md(c['configuration'])} | {c['layers']} | {_md(c['best'])} "
                         f"| {c['measure']} "
                         f"| {value} | {stable} | {c['failed']} |")
    lines += ["", "## What each claim says, what was measured, and the scope"]
    claims: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        claims.setdefault(r["claim"], []).append(r)
    for cid, mine in claims.items():
        r0 = mine[0]
        lines += ["", f"### `{cid}`: {r0['title']}", "", f"Claim ({'; '.join(r0['papers'])}): {r0['statement']}", "",
                  f"Margin {r0['margin']:g} ({r0['test']}): {r0['margin_why']}", ""]
        for r in mine:
            lines.append(f"- `{r['id']}` (**{r['verdict']}**): {_sentence(r['measured'])}"
                         + "".join(f" Caveat: {_sentence(c)}" for c in r.get("caveats", []))
                         + f" Scope: {_sentence(r['scope'])}")
    path = out / "claims.md"
    write_atomic(path, "\n".join(lines) + "\n")
    return path
