"""The study report: PNG plots and one self-contained ``index.html``.

The HTML embeds its plots (base64), states each published claim, what the runs
measured, and whether they agree.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from normlab.studies.claims import CLAIMS  # noqa: E402

Result = dict[str, Any]
COLORS = {"post": "#d62728", "pre": "#1f77b4", "deepnorm": "#2ca02c", "peri": "#9467bd", "sandwich": "#8c564b",
          "subln": "#e377c2", "resi_dual": "#7f7f7f", "none": "#bcbd22"}


def load_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _study_of(r: Result) -> str:
    return r.get("tags", {}).get("study", "")


def _group(r: Result) -> str:
    return str(r.get("tags", {}).get("group", r["name"]))


def _band(ax, xs_list: list[list[float]], ys_list: list[list[float]], label: str, color: str | None) -> None:
    """Mean curve with a min-max band over seeds (curves aligned on common steps)."""
    common = sorted(set.intersection(*[set(xs) for xs in xs_list])) if xs_list else []
    if not common:
        return
    rows = [[dict(zip(xs, ys))[x] for x in common] for xs, ys in zip(xs_list, ys_list)]
    avg = [mean(col) for col in zip(*rows)]
    ax.plot(common, avg, label=label, color=color, lw=1.6)
    if len(rows) > 1:
        ax.fill_between(common, [min(c) for c in zip(*rows)], [max(c) for c in zip(*rows)], color=color, alpha=0.2)


def _label(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _profiles_by_placement(ax, runs: list[Result], profile) -> None:
    """One curve per placement: ``profile(run)`` per layer, mean and band over its runs."""
    groups: dict[str, list[list[float]]] = defaultdict(list)
    for r in runs:
        values = profile(r)
        if values:
            groups[r["placement"]].append(values)
    for p, profiles in groups.items():
        _band(ax, [list(range(1, len(v) + 1)) for v in profiles], profiles, p, COLORS.get(p))


def plot_loss_curves(results: list[Result], metrics: dict[str, list], study: str, path: Path,
                     panel_key: str | None = None) -> Path | None:
    runs = [r for r in results if _study_of(r) == study and r.get("kind") == "train"]
    if not runs:
        return None
    panels = sorted({r["tags"].get(panel_key) for r in runs}, key=str) if panel_key else [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False, sharey=True)
    for ax, panel in zip(axes[0], panels):
        groups: dict[str, list[Result]] = defaultdict(list)
        for r in runs:
            if panel_key is None or r["tags"].get(panel_key) == panel:
                groups[_group(r)].append(r)
        for i, (g, rs) in enumerate(sorted(groups.items())):
            xs_list, ys_list = [], []
            for r in rs:
                recs = [m for m in metrics.get(r["name"], []) if math.isfinite(m.get("train_loss", math.nan))]
                xs_list.append([m["step"] for m in recs])
                ys_list.append([m["train_loss"] for m in recs])
            color = COLORS.get(g.split()[0], plt.cm.tab10(i % 10))
            style_label = g + (" (diverged)" if any(r.get("diverged") for r in rs) else "")
            _band(ax, xs_list, ys_list, style_label, color)
            if "no warm-up" in g and ax.lines:
                ax.lines[-1].set_linestyle("--")
        ax.set_title(f"{panel_key} = {panel}" if panel_key else study)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("train loss (nats/byte)")
    return _save(fig, path)


def plot_grad_by_layer(results: list[Result], path: Path, kinds=("ffn_w2", "ffn_w1")) -> Path | None:
    runs = [r for r in results if r.get("kind") == "probe" and r.get("grad_norms_by_layer")]
    if not runs:
        return None
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.6 * len(kinds), 3.4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        _profiles_by_placement(ax, runs, lambda r, kind=kind: r["grad_norms_by_layer"].get(kind))
        ax.set_yscale("log")
        _label(ax, "layer", f"|grad| of {kind}", f"{kind} gradient norm at initialization")
    return _save(fig, path)


def plot_activation_rms(results: list[Result], path: Path) -> Path | None:
    runs = [r for r in results if r.get("kind") == "probe" and r.get("activation_rms_by_layer")]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    _profiles_by_placement(ax, runs, lambda r: r["activation_rms_by_layer"])
    _label(ax, "block", "residual stream RMS", "Residual stream scale by depth (init)")
    return _save(fig, path)


def plot_lr_heatmap(results: list[Result], path: Path) -> Path | None:
    runs = [r for r in results if _study_of(r) == "warmup"]
    if not runs:
        return None
    rows = sorted({_group(r) for r in runs})
    lrs = sorted({r["lr"] for r in runs})
    grid = [[math.nan] * len(lrs) for _ in rows]
    for i, g in enumerate(rows):
        for j, lr in enumerate(lrs):
            cell = [r for r in runs if _group(r) == g and r["lr"] == lr]
            if cell:
                vals = [math.inf if r.get("diverged") else r.get("final_val_loss", math.nan) for r in cell]
                grid[i][j] = mean(vals)
    finite = [v for row in grid for v in row if math.isfinite(v)]
    vmax = max(finite) if finite else 1.0
    shown = [[v if math.isfinite(v) else vmax for v in row] for row in grid]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(lrs), 0.9 + 0.55 * len(rows)))
    im = ax.imshow(shown, cmap="viridis_r", aspect="auto")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, "div." if math.isinf(v) else ("-" if math.isnan(v) else f"{v:.2f}"),
                    ha="center", va="center", color="w", fontsize=8)
    ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("peak learning rate")
    ax.set_title("final validation loss")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def plot_depth(results: list[Result], path: Path) -> Path | None:
    runs = [r for r in results if _study_of(r) == "depth"]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    for p in sorted({r["placement"] for r in runs}):
        depths = sorted({r["n_layers"] for r in runs if r["placement"] == p})
        losses = []
        for n in depths:
            cell = [r for r in runs if r["placement"] == p and r["n_layers"] == n]
            losses.append(mean(math.nan if r.get("diverged") else r.get("final_val_loss", math.nan) for r in cell))
        ax.plot(depths, losses, "o-", label=p, color=COLORS.get(p))
        for n, v in zip(depths, losses):
            if math.isnan(v):
                ax.annotate("diverged", (n, ax.get_ylim()[1]), fontsize=7, color=COLORS.get(p))
    ax.set_xscale("log", base=2)
    _label(ax, "layers", "final validation loss", "Depth")
    return _save(fig, path)


def plot_tokens_per_s(results: list[Result], path: Path) -> Path | None:
    runs = [r for r in results if _study_of(r) == "norms" and math.isfinite(r.get("tokens_per_s", math.nan))]
    if not runs:
        return None
    names = sorted({r["norm"] for r in runs})
    speed = [mean(r["tokens_per_s"] for r in runs if r["norm"] == n) for n in names]
    loss = [mean(r.get("final_val_loss", math.nan) for r in runs if r["norm"] == n) for n in names]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    a1.bar(names, speed, color="#1f77b4")
    a1.set_ylabel("training tokens/s")
    a1.set_title("Throughput by norm")
    a2.bar(names, loss, color="#ff7f0e")
    a2.set_ylabel("final validation loss")
    a2.set_title("Loss by norm")
    finite = [v for v in loss if math.isfinite(v)]
    if finite:
        a2.set_ylim(min(finite) * 0.95, max(finite) * 1.03)
    for ax in (a1, a2):
        ax.tick_params(axis="x", rotation=30)
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def make_plots(out: Path, results: list[Result], metrics: dict[str, list]) -> dict[str, Path]:
    """Draw every plot the runs allow; returns {title: path}."""
    plots = {
        "Gradient norm by layer at initialization": plot_grad_by_layer(results, out / "grad_by_layer.png"),
        "Residual stream RMS by depth": plot_activation_rms(results, out / "activation_rms.png"),
        "Warm-up study: loss curves": plot_loss_curves(results, metrics, "warmup", out / "loss_warmup.png", "lr"),
        "Warm-up study: final loss by learning rate": plot_lr_heatmap(results, out / "lr_heatmap.png"),
        "Depth study: loss curves": plot_loss_curves(results, metrics, "depth", out / "loss_depth.png", "depth"),
        "Depth study: final loss by depth": plot_depth(results, out / "depth.png"),
        "Norms study: loss curves": plot_loss_curves(results, metrics, "norms", out / "loss_norms.png"),
        "Norms study: throughput and loss": plot_tokens_per_s(results, out / "tokens_per_s.png"),
    }
    return {k: v for k, v in plots.items() if v is not None}


# ------------------------------------------------------------------ HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} .sub{color:#666;margin-top:0}
table{border-collapse:collapse;width:100%;font-size:13px;margin:1em 0}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left} th{background:#f4f4f4}
.claim{border:1px solid #ddd;border-radius:6px;padding:.8em 1em;margin:1em 0}
.verdict{display:inline-block;padding:2px 10px;border-radius:10px;color:#fff;font-weight:600;font-size:13px}
.agrees{background:#2e7d32} .disagrees{background:#c62828} .inconclusive{background:#9e9e9e}
.src{color:#666;font-size:13px} figure{margin:1.2em 0} img{max-width:100%;border:1px solid #eee}
figcaption{font-size:13px;color:#555} td.num{text-align:right;font-variant-numeric:tabular-nums}
"""


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _num(v: Any, fmt: str = "{:.3f}") -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else fmt.format(v)
    return html.escape(str(v)) if v is not None else "-"


def write_html(out: Path, study_name: str, description: str, claim_keys: tuple[str, ...],
               results: list[Result], plots: dict[str, Path], meta: dict[str, Any]) -> Path:
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>normlab study: {esc(study_name)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>normlab study: {esc(study_name)}</h1><p class='sub'>{esc(description)}</p>",
             "<p class='src'>" + " · ".join(f"{esc(k)}: {esc(str(v))}" for k, v in meta.items()) + "</p>",
             "<h2>Published claims and what these runs measured</h2>"]
    verdicts = [(CLAIMS[key], CLAIMS[key].judge(results)) for key in claim_keys]
    if verdicts:
        tally = {o: sum(v.outcome == o for _, v in verdicts) for o in ("agrees", "disagrees", "inconclusive")}
        parts.append(f"<p><b>{tally['agrees']} of {len(verdicts)} claims agree</b> with these runs"
                     f" ({tally['disagrees']} disagree, {tally['inconclusive']} inconclusive).</p>")
    for claim, verdict in verdicts:
        parts.append(
            f"<div class='claim'><b>{esc(claim.title)}</b> <span class='verdict {verdict.outcome}'>"
            f"{esc(verdict.outcome)}</span><div class='src'>{esc(claim.source)}</div>"
            f"<p><i>Claim:</i> {esc(claim.statement)}</p><p><i>Measured:</i> {esc(verdict.measured)}</p></div>")
    parts.append("<h2>Plots</h2>")
    for title, path in plots.items():
        parts.append(f"<figure>{_img(path)}<figcaption>{esc(title)} ({esc(path.name)})</figcaption></figure>")
    parts.append("<h2>Runs</h2><table><tr><th>run</th><th>placement</th><th>norm</th><th>layers</th><th>lr</th>"
                 "<th>warm-up</th><th>seed</th><th>steps</th><th>final train loss</th><th>final val loss</th>"
                 "<th>diverged</th><th>tokens/s</th></tr>")
    for r in results:
        diverged = f"at step {r.get('diverged_step')}" if r.get("diverged") else "no"
        parts.append(
            f"<tr><td>{esc(r['name'])}</td><td>{esc(str(r['placement']))}</td><td>{esc(str(r['norm']))}</td>"
            f"<td class='num'>{_num(r.get('n_layers'))}</td><td class='num'>{_num(r['lr'], '{:g}')}</td>"
            f"<td class='num'>{_num(r['warmup_steps'])}</td><td class='num'>{_num(r['seed'])}</td>"
            f"<td class='num'>{_num(r['steps'])}</td><td class='num'>{_num(r.get('final_train_loss', math.nan))}</td>"
            f"<td class='num'>{_num(r.get('final_val_loss', math.nan))}</td><td>{diverged if r.get('kind') == 'train' else 'probe'}</td>"
            f"<td class='num'>{_num(r.get('tokens_per_s', math.nan), '{:,.0f}')}</td></tr>")
    parts.append("</table></body></html>")
    path = out / "index.html"
    path.write_text("\n".join(parts))
    return path
