"""The published findings a study checks, each with how it is judged from the runs.

A claim's ``judge(results)`` returns a ``Verdict``: "agrees", "disagrees" or
"inconclusive" (not enough runs, or a margin too small to call), and the numbers it
read, so the report shows what was measured next to what was claimed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from itertools import product
from statistics import mean
from typing import Any

Result = dict[str, Any]


@dataclass(frozen=True)
class Verdict:
    outcome: str  # "agrees" | "disagrees" | "inconclusive"
    measured: str


@dataclass(frozen=True)
class Claim:
    key: str
    title: str
    source: str
    statement: str
    judge: Callable[[list[Result]], Verdict]


def _of(results: list[Result], study: str, **match: Any) -> list[Result]:
    return [r for r in results if r.get("tags", {}).get("study") == study
            and all(r.get(k, r.get("tags", {}).get(k)) == v for k, v in match.items())]


def _mean_profile(runs: list[Result], key: str, kind: str | None = None) -> list[float] | None:
    profiles = [r[key][kind] if kind else r[key] for r in runs if r.get(key) and (kind is None or kind in r[key])]
    if not profiles:
        return None
    return [mean(vals) for vals in zip(*profiles)]


def _loss(r: Result) -> float:
    return math.inf if r.get("diverged") or not math.isfinite(r.get("final_val_loss", math.nan)) else r["final_val_loss"]


def _fmt(x: float) -> str:
    return "diverged" if math.isinf(x) else f"{x:.3f}"


# ------------------------------------------------------------------ judges


def _xiong(results: list[Result]) -> Verdict:
    post = _mean_profile(_of(results, "grad-at-init", placement="post"), "grad_norms_by_layer", "ffn_w2")
    pre = _mean_profile(_of(results, "grad-at-init", placement="pre"), "grad_norms_by_layer", "ffn_w2")
    if not post or not pre or len(post) < 2:
        return Verdict("inconclusive", "needs Post-LN and Pre-LN probes of at least 2 layers")
    post_growth, pre_growth = post[-1] / post[0], pre[-1] / pre[0]
    measured = (f"FFN W2 gradient norm, first -> last layer: Post-LN {post[0]:.3g} -> {post[-1]:.3g} "
                f"(x{post_growth:.2f}), Pre-LN {pre[0]:.3g} -> {pre[-1]:.3g} (x{pre_growth:.2f}); "
                f"last layer Post/Pre = {post[-1] / pre[-1]:.2f}")
    ok = post[-1] > pre[-1] and post_growth > 1.2 and pre_growth <= 1.1
    bad = post[-1] <= pre[-1] or post_growth <= 1.0
    return Verdict("agrees" if ok else "disagrees" if bad else "inconclusive", measured)


def _residual_growth(results: list[Result]) -> Verdict:
    pre = _mean_profile(_of(results, "grad-at-init", placement="pre"), "activation_rms_by_layer")
    post = _mean_profile(_of(results, "grad-at-init", placement="post"), "activation_rms_by_layer")
    if not pre or not post or len(pre) < 2:
        return Verdict("inconclusive", "needs Post-LN and Pre-LN probes with activation statistics")
    pre_growth, post_growth = pre[-1] / pre[0], post[-1] / post[0]
    measured = (f"residual-stream RMS, first -> last block: Pre-LN {pre[0]:.3g} -> {pre[-1]:.3g} "
                f"(x{pre_growth:.2f}); Post-LN {post[0]:.3g} -> {post[-1]:.3g} (x{post_growth:.2f})")
    ok = pre_growth > 1.5 and 0.5 < post_growth < 1.5
    return Verdict("agrees" if ok else "disagrees", measured)


def _warmup(results: list[Result]) -> Verdict:
    runs = _of(results, "warmup")
    by = defaultdict(list)
    for r in runs:
        by[(r["placement"], r["warmup_steps"] > 0, r["lr"])].append(_loss(r))
    lrs = sorted({r["lr"] for r in runs})
    if not lrs or not all((p, w, lrs[-1]) in by for p in ("post", "pre") for w in (False, True)):
        return Verdict("inconclusive", "needs Post-LN and Pre-LN runs with and without warm-up")
    lines, post_gaps, pre_gaps = [], [], []
    for lr in lrs:
        cell = {k: mean(by[(*k, lr)]) for k in product(("post", "pre"), (False, True)) if (*k, lr) in by}
        if len(cell) < 4:
            continue
        post_gaps.append(cell[("post", False)] - cell[("post", True)])
        pre_gaps.append(cell[("pre", False)] - cell[("pre", True)])
        lines.append(f"lr {lr:g}: Post-LN {_fmt(cell[('post', False)])} without / {_fmt(cell[('post', True)])} "
                     f"with warm-up; Pre-LN {_fmt(cell[('pre', False)])} / {_fmt(cell[('pre', True)])}")
    measured = "final validation loss: " + "; ".join(lines)
    post_gap, pre_gap = post_gaps[-1], pre_gaps[-1]  # at the largest learning rate
    if post_gap > 0.05 and post_gap > 2 * max(pre_gap, 0.0):
        return Verdict("agrees", measured)
    if post_gap <= 0.0:
        return Verdict("disagrees", measured)
    return Verdict("inconclusive", measured)


def _deepnorm(results: list[Result]) -> Verdict:
    runs = _of(results, "depth")
    depths = sorted({r["n_layers"] for r in runs})
    if not depths:
        return Verdict("inconclusive", "needs depth runs")
    lines = []
    for n in depths:
        cell = {p: mean(_loss(r) for r in _of(results, "depth", placement=p, n_layers=n))
                for p in ("post", "pre", "deepnorm") if _of(results, "depth", placement=p, n_layers=n)}
        lines.append(f"{n} layers: " + ", ".join(f"{p} {_fmt(v)}" for p, v in cell.items()))
    deepest = {p: mean(_loss(r) for r in _of(results, "depth", placement=p, n_layers=depths[-1]))
               for p in ("post", "deepnorm") if _of(results, "depth", placement=p, n_layers=depths[-1])}
    measured = "final validation loss: " + "; ".join(lines)
    if len(deepest) < 2:
        return Verdict("inconclusive", measured)
    if math.isfinite(deepest["deepnorm"]) and deepest["deepnorm"] <= deepest["post"]:
        return Verdict("agrees", measured)
    return Verdict("disagrees", measured)


def _norm_pair(a: str, b: str, margin: float, better: bool) -> Callable[[list[Result]], Verdict]:
    """a's final loss within ``margin`` of b's (better=False), or below b's (better=True)."""

    def judge(results: list[Result]) -> Verdict:
        ra, rb = _of(results, "norms", norm=a), _of(results, "norms", norm=b)
        if not ra or not rb:
            return Verdict("inconclusive", f"needs {a} and {b} runs")
        la, lb = mean(_loss(r) for r in ra), mean(_loss(r) for r in rb)
        ta = mean(r.get("tokens_per_s", math.nan) for r in ra)
        tb = mean(r.get("tokens_per_s", math.nan) for r in rb)
        measured = (f"final validation loss {a} {_fmt(la)} vs {b} {_fmt(lb)}; "
                    f"tokens/s {a} {ta:,.0f} vs {b} {tb:,.0f}")
        if better:
            ok = la < lb
        else:
            ok = math.isfinite(la) and abs(la - lb) <= margin
        return Verdict("agrees" if ok else "disagrees", measured)

    return judge


CLAIMS: dict[str, Claim] = {c.key: c for c in [
    Claim("xiong-grad-init", "Post-LN's gradients at initialization grow toward the output",
          "Xiong et al. 2020, On Layer Normalization in the Transformer Architecture (Fig. 3)",
          "At initialization, the gradient norm of the FFN weights grows with the layer index in Post-LN "
          "and stays flat (or shrinks) in Pre-LN; the last layer's is larger in Post-LN.", _xiong),
    Claim("pre-ln-residual-growth", "Pre-LN's residual stream grows with depth",
          "Xiong et al. 2020; Liu et al. 2020, Understanding the Difficulty of Training Transformers",
          "In Pre-LN the residual stream's scale grows with depth (each block adds to an unnormalized sum); "
          "in Post-LN every block's output is normalized, so it stays flat.", _residual_growth),
    Claim("postln-needs-warmup", "Post-LN needs learning-rate warm-up, Pre-LN does not",
          "Xiong et al. 2020; Liu et al. 2020",
          "Without warm-up, Post-LN trains worse or diverges at larger learning rates, while Pre-LN "
          "reaches about the same loss with or without warm-up.", _warmup),
    Claim("deepnorm-depth", "DeepNorm trains deep Post-LN-style stacks",
          "Wang et al. 2022, DeepNet: Scaling Transformers to 1,000 Layers",
          "Scaling the residual by alpha and the initialization by beta keeps a deep Post-LN-style model "
          "trainable: at the largest depth DeepNorm reaches a loss at least as low as Post-LN.", _deepnorm),
    Claim("rmsnorm-matches-layernorm", "RMSNorm matches LayerNorm",
          "Zhang & Sennrich 2019, Root Mean Square Layer Normalization",
          "Dropping the re-centering costs no quality: RMSNorm's loss is within 0.05 nats of LayerNorm's.",
          _norm_pair("rmsnorm", "layernorm", 0.05, better=False)),
    Claim("dyt-matches-layernorm", "Dynamic Tanh replaces LayerNorm",
          "Zhu et al. 2025, Transformers without Normalization",
          "An element-wise tanh(alpha x) in place of every norm trains to within 0.1 nats of LayerNorm.",
          _norm_pair("dyt", "layernorm", 0.1, better=False)),
    Claim("powernorm-beats-batchnorm", "PowerNorm fixes batch normalization for transformers",
          "Shen et al. 2020, PowerNorm: Rethinking Batch Normalization in Transformers",
          "Batch statistics fluctuate in NLP batches; PowerNorm's running quadratic mean trains to a lower "
          "loss than (masked) batch normalization.", _norm_pair("powernorm", "batchnorm", 0.0, better=True)),
]}
