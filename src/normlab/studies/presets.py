"""The study presets: each a small declarative list of runs and the claims it checks.

    grad-at-init  Xiong et al. 2020, Fig. 3: FFN gradient norms by layer at init
    warmup        Post-LN vs Pre-LN with and without learning-rate warm-up
    depth         Post-LN vs Pre-LN vs DeepNorm as depth grows
    norms         the norm zoo at equal placement: loss and tokens/s
    quick         a subset of all four that finishes in minutes on a 2-core CPU
    full          sizes meant for a GPU
"""

from __future__ import annotations

from itertools import product
from typing import Any

from normlab.studies.spec import RunSpec, Study

# The original Transformer's setting, which Xiong et al. analyse: ReLU FFN, sinusoidal
# positions, Xavier init. (With GELU and learned positions the Post-LN gradient growth at
# initialization is much weaker at these sizes: measured x0.9-1.2 first->last layer vs x1.7.)
# Tiny widths for CPU; depth is what the published comparisons are about.
ORIGINAL = {"activation": "relu", "positional": "sinusoidal", "init": "xavier"}
TINY = {**ORIGINAL, "d_model": 64, "n_heads": 4, "d_ff": 256, "dropout": 0.0}
SMALL = {**ORIGINAL, "d_model": 128, "n_heads": 4, "d_ff": 512, "dropout": 0.0}
GPU = {**ORIGINAL, "d_model": 512, "n_heads": 8, "d_ff": 2048, "dropout": 0.1}

NORMS = ("layernorm", "rmsnorm", "scalenorm", "powernorm", "batchnorm", "dyt")


def _model(base: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {**base, **kw}


def grad_at_init(*, base=SMALL, n_layers=12, seeds=(0, 1, 2), batch_size=8, seq_len=64,
                 probe_batches=4, placements=("post", "pre", "deepnorm", "peri")) -> list[RunSpec]:
    return [
        RunSpec(name=f"init-{p}-L{n_layers}-s{s}", model=_model(base, placement=p, n_layers=n_layers),
                kind="probe", seed=s, batch_size=batch_size, seq_len=seq_len, probe_batches=probe_batches,
                steps=0, tags={"study": "grad-at-init", "group": p})
        for p, s in product(placements, seeds)
    ]


def warmup(*, base=TINY, n_layers=6, lrs=(5e-4, 1e-3, 2e-3), warmups=(0, 100), steps=300,
           seeds=(0,), batch_size=16, seq_len=64, placements=("post", "pre")) -> list[RunSpec]:
    return [
        RunSpec(name=f"warmup-{p}-lr{lr:g}-w{w}-s{s}", model=_model(base, placement=p, n_layers=n_layers),
                lr=lr, warmup_steps=w, steps=steps, seed=s, batch_size=batch_size, seq_len=seq_len,
                eval_every=max(1, steps // 4), diag_every=max(1, steps // 6),
                checkpoint_every=max(1, steps // 2),
                tags={"study": "warmup", "group": f"{p} {'warm-up' if w else 'no warm-up'}", "lr": lr})
        for p, lr, w, s in product(placements, lrs, warmups, seeds)
    ]


def depth(*, base=TINY, depths=(6, 12, 24, 48), lr=1e-3, warmup_steps=50, steps=300, seeds=(0,),
          batch_size=16, seq_len=64, placements=("post", "pre", "deepnorm")) -> list[RunSpec]:
    return [
        RunSpec(name=f"depth-{p}-L{n}-s{s}", model=_model(base, placement=p, n_layers=n), lr=lr,
                warmup_steps=warmup_steps, steps=steps, seed=s, batch_size=batch_size, seq_len=seq_len,
                eval_every=max(1, steps // 4), diag_every=max(1, steps // 6),
                checkpoint_every=max(1, steps // 2),
                tags={"study": "depth", "group": p, "depth": n})
        for p, n, s in product(placements, depths, seeds)
    ]


def norms(*, base=TINY, n_layers=4, lr=1e-3, warmup_steps=50, steps=300, seeds=(0,), batch_size=16,
          seq_len=64, names=NORMS, placement="pre") -> list[RunSpec]:
    return [
        RunSpec(name=f"norms-{n}-s{s}", model=_model(base, placement=placement, norm=n, n_layers=n_layers),
                lr=lr, warmup_steps=warmup_steps, steps=steps, seed=s, batch_size=batch_size, seq_len=seq_len,
                eval_every=max(1, steps // 4), diag_every=max(1, steps // 6),
                checkpoint_every=max(1, steps // 2),
                tags={"study": "norms", "group": n})
        for n, s in product(names, seeds)
    ]


CLAIMS_BY_STUDY = {
    "grad-at-init": ("xiong-grad-init", "pre-ln-residual-growth"),
    "warmup": ("postln-needs-warmup",),
    "depth": ("deepnorm-depth",),
    "norms": ("rmsnorm-matches-layernorm", "dyt-matches-layernorm", "powernorm-beats-batchnorm"),
}


def _study(name: str, description: str, runs: list[RunSpec], claims: tuple[str, ...]) -> Study:
    return Study(name=name, description=description, runs=tuple(runs), claims=claims)


def _all_claims() -> tuple[str, ...]:
    return tuple(c for cs in CLAIMS_BY_STUDY.values() for c in cs)


PRESETS = {
    "grad-at-init": lambda: _study(
        "grad-at-init", "Xiong et al. 2020 Fig. 3: FFN gradient norms by layer at initialization, "
        "Post-LN vs Pre-LN (and DeepNorm, Peri-LN), 12 layers, averaged over seeds and batches.",
        grad_at_init(), CLAIMS_BY_STUDY["grad-at-init"]),
    "warmup": lambda: _study(
        "warmup", "Post-LN vs Pre-LN, with and without learning-rate warm-up, at three learning rates, "
        "Adam(0.9, 0.98).", warmup(), CLAIMS_BY_STUDY["warmup"]),
    "depth": lambda: _study(
        "depth", "Post-LN vs Pre-LN vs DeepNorm at 6-48 layers: which train, and the loss reached.",
        depth(), CLAIMS_BY_STUDY["depth"]),
    "norms": lambda: _study(
        "norms", "LayerNorm vs RMSNorm vs ScaleNorm vs PowerNorm vs masked BatchNorm vs DyT at Pre-LN "
        "placement: validation loss and tokens/s.", norms(), CLAIMS_BY_STUDY["norms"]),
    "quick": lambda: _study(
        "quick", "A small subset of every study that runs in minutes on a 2-core CPU and draws every plot.",
        grad_at_init(seeds=(0, 1, 2), probe_batches=2)
        + warmup(n_layers=6, lrs=(1e-3, 3e-3), warmups=(0, 60), steps=200)
        + depth(depths=(4, 16), steps=150, placements=("post", "pre", "deepnorm"))
        + norms(steps=150),
        _all_claims()),
    "full": lambda: _study(
        "full", "Every study at sizes meant for a GPU (d_model 512, up to 48 layers, 3 seeds).",
        grad_at_init(base=GPU, seeds=(0, 1, 2, 3, 4), batch_size=16, seq_len=256)
        + warmup(base=GPU, n_layers=12, lrs=(5e-4, 1e-3, 2e-3), warmups=(0, 4000), steps=20000,
                 seeds=(0, 1, 2), batch_size=64, seq_len=256)
        + depth(base=GPU, steps=20000, warmup_steps=4000, seeds=(0, 1, 2), batch_size=64, seq_len=256)
        + norms(base=GPU, n_layers=12, steps=20000, warmup_steps=4000, seeds=(0, 1, 2), batch_size=64,
                seq_len=256),
        _all_claims()),
}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_study(name: str) -> Study:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown study preset {name!r}; expected one of: {', '.join(PRESETS)}") from None
