"""The study presets: each a small declarative list of runs and the claims it checks.

    grad-at-init  Xiong et al. 2020, Fig. 3: FFN gradient norms by layer at init, and
                  the residual stream's growth with depth (probes at several depths)
    warmup        Post-LN vs Pre-LN with and without learning-rate warm-up, lr sweep
    depth         Post-LN vs Pre-LN vs DeepNorm at depth, lr sweep: loss and stability
    norms         the norm zoo at Pre-LN placement, lr sweep (DyT also over alpha0),
                  and RMSNorm's speed timed side by side
    init-depth    Xiong et al. 2020, Theorem 1: the last layer's gradient at init against
                  depth, Post-LN vs Pre-LN at 6-48 layers
    amplification Liu et al. 2020 / Wang et al. 2022: the output change after one Adam
                  update at init against depth, Post-LN vs Pre-LN vs DeepNorm
    activations   Kim et al. 2025: the residual stream's scale through training, Pre-LN vs
                  Peri-LN (and Sandwich, Post-LN)
    gns           Gray et al. 2024: the noise scale from the norm layers' per-example
                  gradients against the whole model's
    expressivity  Brody et al. 2023: LayerNorm vs RMSNorm vs no norm before a narrow
                  attention layer on the majority task, and the keys no query can select
    qk-norm       Wortsman et al. 2023 / Dehghani et al. 2023: with and without QK-norm
                  over a wide lr sweep: attention logit growth, lr sensitivity
    quick         all of them but qk-norm at CPU sizes: 3 seeds, 3 learning rates, minutes on 2 cores
    full          all of them at sizes meant for a GPU: 5 seeds, 4 learning rates

Every configuration a training claim compares runs over the same seeds (paired: same
data order, same init where the shapes allow) and over a log-spaced lr sweep, so each
is compared at its own best lr. The margins the claims are judged against are fixed in
``normlab.studies.claims`` (each with its justification), before any run.
"""

from __future__ import annotations

from itertools import product
from typing import Any

from normlab.studies.spec import RunSpec, Study

# The original Transformer's setting, which Xiong et al. analyse: ReLU FFN, sinusoidal
# positions, Xavier init. (With GELU and learned positions the Post-LN gradient growth at
# initialization is much weaker at these sizes: measured x0.9-1.2 first->last layer vs x1.7.)
ORIGINAL = {"activation": "relu", "positional": "sinusoidal", "init": "xavier"}
MICRO = {**ORIGINAL, "d_model": 32, "n_heads": 2, "d_ff": 128, "dropout": 0.0}
TINY = {**ORIGINAL, "d_model": 64, "n_heads": 4, "d_ff": 256, "dropout": 0.0}
SMALL = {**ORIGINAL, "d_model": 128, "n_heads": 4, "d_ff": 512, "dropout": 0.0}
GPU = {**ORIGINAL, "d_model": 512, "n_heads": 8, "d_ff": 2048, "dropout": 0.1}
# the probes at initialization without dropout, as Xiong et al.'s and Liu et al.'s
# analyses assume and quick's probes run
GPU_PROBE = {**GPU, "dropout": 0.0}

NORMS = ("layernorm", "rmsnorm", "scalenorm", "powernorm", "batchnorm", "dyt")
DYT_ALPHA0 = (0.25, 0.5, 1.0)  # Zhu et al.'s default is 0.5; they tune it for LLMs
QUICK_LRS = (1e-3, 3e-3, 1e-2)
# the quick depth and norms models (d_model 32, 3 and 12 layers, 120 steps) train best at
# larger lrs: with QUICK_LRS every Pre-LN, DeepNorm and norm configuration's best lr was
# the sweep's largest, so their sweep is one step of x3.16 up (warm-up keeps QUICK_LRS,
# which brackets Post-LN's best with warm-up; without it, its best is the edge, 1e-3)
QUICK_LRS_HIGH = (3e-3, 1e-2, 3e-2)
FULL_LRS = (2.5e-4, 5e-4, 1e-3, 2e-3)


def _model(base: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {**base, **kw}


def _train(name: str, model: dict[str, Any], *, lr: float, warmup_steps: int, steps: int, seed: int,
           batch_size: int, seq_len: int, tags: dict[str, Any], **kw: Any) -> RunSpec:
    every = {"eval_every": max(1, steps // 3), "diag_every": max(1, steps // 6),
             "checkpoint_every": max(1, steps // 2), "log_every": max(1, min(10, steps // 10))}
    return RunSpec(name=name, model=model, lr=lr, warmup_steps=warmup_steps, steps=steps, seed=seed,
                   batch_size=batch_size, seq_len=seq_len, tags={**tags, "lr": lr}, **{**every, **kw})


def grad_at_init(*, base=SMALL, depths=(3, 6, 12, 24), seeds=tuple(range(6)), batch_size=8, seq_len=64,
                 probe_batches=4, placements=("post", "pre"), extra=("deepnorm", "peri"),
                 extra_depth=6) -> list[RunSpec]:
    """Probes at initialization: Post-LN and Pre-LN at every depth (the gradient profile
    is judged at 6 layers, the residual growth fitted over depths), ``extra`` placements
    at ``extra_depth`` for the plot."""
    cells = [(p, n) for p, n in product(placements, depths)] + [(p, extra_depth) for p in extra]
    return [
        RunSpec(name=f"init-{p}-L{n}-s{s}", model=_model(base, placement=p, n_layers=n), kind="probe", seed=s,
                batch_size=batch_size, seq_len=seq_len, probe_batches=probe_batches, steps=0,
                tags={"study": "grad-at-init", "group": p, "depth": n})
        for (p, n), s in product(cells, seeds)
    ]


def init_depth(*, base=SMALL, depths=(6, 12, 24, 48), seeds=tuple(range(6)), batch_size=8, seq_len=64,
               probe_batches=4, placements=("post", "pre")) -> list[RunSpec]:
    """Probes at initialization over depths, for the last layer's gradient against L. The
    same probes as ``grad_at_init`` (same names, same measurements): in ``quick`` this
    study adds only the depths grad-at-init does not have."""
    return [
        RunSpec(name=f"init-{p}-L{n}-s{s}", model=_model(base, placement=p, n_layers=n), kind="probe", seed=s,
                batch_size=batch_size, seq_len=seq_len, probe_batches=probe_batches, steps=0,
                tags={"study": "init-depth", "group": p, "depth": n})
        for p, n, s in product(placements, depths, seeds)
    ]


# One Adam step this small moves the output about linearly: from 1e-5 to 1e-4, ||dF||^2
# scaled as lr^2 within 1% for DeepNorm at 24 layers and Post-LN at 6, within 5% for
# Pre-LN at 12-24 (d_model 64, seed to seed), where at 1e-4 a 24-layer Post-LN model's
# output change already saturates.
UPDATE_LR = 1e-5
# at d_model 512 one step of 1e-5 already saturates a deep Post-LN model's change (||dF||^2
# 0.59x of 100x a tenth of the step's at 24 layers): full's probes step 5x less. Every
# update probe records how linear its response was (``update_linearity``), and the rows
# name the probes off it by more than 5%.
FULL_UPDATE_LR = 2e-6


def amplification(*, base=TINY, depths=(6, 12, 24), seeds=tuple(range(6)), lr=UPDATE_LR, batch_size=8,
                  seq_len=64, probe_batches=2, placements=("post", "pre", "deepnorm")) -> list[RunSpec]:
    """The output change after one Adam update at initialization, by depth and placement."""
    return [
        RunSpec(name=f"update-{p}-L{n}-s{s}", model=_model(base, placement=p, n_layers=n), kind="update", seed=s,
                lr=lr, batch_size=batch_size, seq_len=seq_len, probe_batches=probe_batches, steps=0,
                tags={"study": "amplification", "group": p, "depth": n})
        for p, n, s in product(placements, depths, seeds)
    ]


def activations(*, base=MICRO, n_layers=12, lr=3e-3, warmup_steps=30, steps=300, seeds=(0, 1, 2), batch_size=16,
                seq_len=64, placements=("pre", "peri", "sandwich", "post"), **kw: Any) -> list[RunSpec]:
    """The residual stream's RMS and max |x| by layer through training, at one lr for every
    placement (the paper trains its placements with the same hyperparameters)."""
    return [
        _train(f"act-{p}-L{n_layers}-s{s}", _model(base, placement=p, n_layers=n_layers), lr=lr,
               warmup_steps=warmup_steps, steps=steps, seed=s, batch_size=batch_size, seq_len=seq_len,
               tags={"study": "activations", "group": p, "depth": n_layers}, **kw)
        for p, s in product(placements, seeds)
    ]


def gns(*, base=MICRO, n_layers=3, lr=3e-3, warmup_steps=30, steps=150, seeds=(0, 1, 2), batch_size=16,
        seq_len=64, names=("layernorm", "rmsnorm"), **kw: Any) -> list[RunSpec]:
    """Training runs that also measure the whole model's noise scale from every
    parameter's per-example gradients at each diagnostics step, beside the norm layers'."""
    return [
        _train(f"gns-{n}-L{n_layers}-s{s}", _model(base, placement="pre", n_layers=n_layers, norm=n), lr=lr,
               warmup_steps=warmup_steps, steps=steps, seed=s, batch_size=batch_size, seq_len=seq_len,
               total_gns=True, tags={"study": "gns", "group": n}, **kw)
        for n, s in product(names, seeds)
    ]


# Brody et al. 2023's majority model: one Pre-LN layer, d_model 8, one head, FFN width 8,
# no positions (majority is a function of the bag of tokens), ReLU, no dropout
MAJORITY = {**ORIGINAL, "positional": "none", "d_model": 8, "n_heads": 1, "d_ff": 8, "n_layers": 1, "dropout": 0.0}
MAJORITY_TASK = {"classes": 20, "margin": 6}  # the paper's 20 classes, majority ahead by >= 6 of 50
# at 200 steps every norm's best lr on the majority task was QUICK_LRS_HIGH's largest (3e-2,
# measured over 3 seeds), so its sweep is one step of x3.16 up
MAJORITY_LRS = (1e-2, 3e-2, 1e-1)
# Brody et al.'s unselectable-keys models: GPT-2 with hidden size 8, 4 heads, 4 layers
KEYS_MODEL = {"activation": "gelu", "positional": "learned", "init": "gpt2", "d_model": 8, "n_heads": 4,
              "d_ff": 32, "n_layers": 4, "dropout": 0.0}
EXPRESSIVITY_NORMS = ("layernorm", "rmsnorm", "none")


def expressivity(*, base=MAJORITY, names=EXPRESSIVITY_NORMS, lrs=MAJORITY_LRS, warmup_steps=20, steps=400,
                 seeds=(0, 1, 2), batch_size=128, seq_len=50, task_options=MAJORITY_TASK, keys_base=KEYS_MODEL,
                 keys_lr=3e-3, keys_steps=None, keys_batch_size=16, keys_seq_len=64, **kw: Any) -> list[RunSpec]:
    """Brody et al. 2023 with every norm of the model (before attention, before the FFN,
    and the final one) LayerNorm (projection and scaling), RMSNorm (scaling only) or none:

    * the majority task at a width where attention is narrow, over the lr sweep;
    * a byte-level LM of hidden size 8 at one lr, whose attention inputs are tested for
      selectability at the end (``keys_steps`` steps, default ``steps``)."""
    majority = [
        _train(f"majority-{n}-d{base['d_model']}-lr{lr:g}-s{s}", _model(base, placement="pre", norm=n), lr=lr,
               warmup_steps=warmup_steps, steps=steps, seed=s, batch_size=batch_size, seq_len=seq_len,
               task="majority", task_options=dict(task_options), eval_batches=4,
               tags={"study": "expressivity", "group": n, "part": "majority", "width": base["d_model"]},
               **{"eval_every": max(1, steps // 16), **kw})
        for n, lr, s in product(names, lrs, seeds)
    ]
    keys_steps = steps if keys_steps is None else keys_steps
    keys = [
        _train(f"keys-{n}-d{keys_base['d_model']}-s{s}", _model(keys_base, placement="pre", norm=n), lr=keys_lr,
               warmup_steps=warmup_steps, steps=keys_steps, seed=s, batch_size=keys_batch_size,
               seq_len=keys_seq_len, unselectable_keys=True,
               tags={"study": "expressivity", "group": n, "part": "keys", "width": keys_base["d_model"]}, **kw)
        for n, s in product(names, seeds)
    ]
    return majority + keys


QK_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)  # log-spaced, up to where training breaks


def qk_norm(*, base=MICRO, n_layers=4, lrs=QK_LRS, warmup_steps=20, steps=200, seeds=(0, 1, 2), batch_size=16,
            seq_len=64, variants=(None, "layernorm"), schedule="cosine", **kw: Any) -> list[RunSpec]:
    """Pre-LN with and without QK-norm (a LayerNorm on each head's queries and keys) over
    a wide lr sweep, warm-up then cosine decay as in Wortsman et al.; every diagnostics
    step records each layer's largest attention logit."""
    return [
        _train(f"qk-{v or 'none'}-L{n_layers}-lr{lr:g}-s{s}", _model(base, placement="pre", n_layers=n_layers,
                                                                    qk_norm=v),
               lr=lr, warmup_steps=warmup_steps, steps=steps, seed=s, batch_size=batch_size, seq_len=seq_len,
               schedule=schedule, tags={"study": "qk-norm", "group": "qk-norm" if v else "no qk-norm",
                                        "depth": n_layers}, **kw)
        for v, lr, s in product(variants, lrs, seeds)
    ]


def warmup(*, base=TINY, n_layers=6, lrs=QUICK_LRS, warmup_steps=40, steps=150, seeds=(0, 1, 2),
           batch_size=16, seq_len=64, placements=("post", "pre"), **kw: Any) -> list[RunSpec]:
    """Post-LN and Pre-LN, with and without warm-up, over the lr sweep. The runs with
    warm-up double as the depth study's shallow points (tag "also")."""
    return [
        _train(f"warmup-{p}-L{n_layers}-lr{lr:g}-w{w}-s{s}", _model(base, placement=p, n_layers=n_layers),
               lr=lr, warmup_steps=w, steps=steps, seed=s, batch_size=batch_size, seq_len=seq_len,
               tags={"study": "warmup", "group": f"{p} {'warm-up' if w else 'no warm-up'}", "depth": n_layers,
                     **({"also": ["depth"]} if w else {})}, **kw)
        for p, w, lr, s in product(placements, (0, warmup_steps), lrs, seeds)
    ]


def depth(*, base=TINY, depths=(16,), lrs=QUICK_LRS, warmup_steps=40, steps=150, seeds=(0, 1, 2),
          batch_size=16, seq_len=64, placements=("post", "pre", "deepnorm"), shallow: int | None = 6,
          **kw: Any) -> list[RunSpec]:
    """Post-LN, Pre-LN and DeepNorm at ``depths`` over the lr sweep; DeepNorm also at
    ``shallow`` (where the warm-up study has Post-LN and Pre-LN with warm-up)."""
    cells = [(p, n) for p, n in product(placements, depths)]
    if shallow is not None:
        cells.append(("deepnorm", shallow))
    return [
        _train(f"depth-{p}-L{n}-lr{lr:g}-s{s}", _model(base, placement=p, n_layers=n), lr=lr,
               warmup_steps=warmup_steps, steps=steps, seed=s, batch_size=batch_size, seq_len=seq_len,
               tags={"study": "depth", "group": p, "depth": n}, **kw)
        for (p, n), lr, s in product(cells, lrs, seeds)
    ]


def norms(*, base=TINY, n_layers=4, lrs=QUICK_LRS, warmup_steps=40, steps=150, seeds=(0, 1, 2),
          batch_size=16, seq_len=64, names=NORMS, alpha0=DYT_ALPHA0, placement="pre", speed_steps=5,
          **kw: Any) -> list[RunSpec]:
    """The norms at ``placement`` over the lr sweep (DyT also over ``alpha0``), and one
    side-by-side speed run of the RMSNorm model against the LayerNorm model."""
    cells: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    for n in names:
        if n == "dyt":
            cells += [(f"dyt-a{a:g}", {"norm": n, "norm_options": {"alpha_init": a}}, {"alpha0": a}) for a in alpha0]
        elif n == "powernorm":  # with the authors' group scaling, one group per head (POWERNORM_NOTE)
            cells.append((n, {"norm": n, "norm_options": {"groups": base["n_heads"]}}, {}))
        else:
            cells.append((n, {"norm": n}, {}))
    runs = [
        _train(f"norms-{label}-L{n_layers}-lr{lr:g}-s{s}", _model(base, placement=placement, n_layers=n_layers, **m),
               lr=lr, warmup_steps=warmup_steps, steps=steps, seed=s, batch_size=batch_size, seq_len=seq_len,
               tags={"study": "norms", "group": m["norm"], **t}, **kw)
        for (label, m, t), lr, s in product(cells, lrs, seeds)
    ]
    if "rmsnorm" in names and "layernorm" in names:
        runs.append(RunSpec(name=f"speed-rmsnorm-vs-layernorm-L{n_layers}", kind="speed",
                            model=_model(base, placement=placement, n_layers=n_layers, norm="rmsnorm"),
                            speed_against={"norm": "layernorm"}, steps=speed_steps, batch_size=batch_size,
                            seq_len=seq_len, tags={"study": "norms", "group": "speed"}))
    return runs


CLAIMS_BY_STUDY = {
    "grad-at-init": ("xiong-postln-grad-grows", "xiong-preln-grad-flat", "xiong-last-layer-larger",
                     "xiong-ratio-grows-sqrt-depth", "preln-stream-variance-linear", "postln-stream-normalized"),
    "warmup": ("postln-needs-warmup", "postln-needs-warmup-best-lr", "preln-without-warmup"),
    "depth": ("deepnorm-beats-postln", "deepnorm-beats-preln", "deepnorm-stability"),
    "norms": ("rmsnorm-matches-layernorm", "rmsnorm-faster", "dyt-matches-layernorm",
              "powernorm-beats-batchnorm", "powernorm-beats-layernorm"),
    "init-depth": ("init-depth-post", "init-depth-pre"),
    "activations": ("preln-activations-grow", "peri-bounds-max-activations", "peri-bounds-rms"),
    "gns": ("gray-norm-gns-matches-total",),
    "qk-norm": ("wortsman-qk-norm-bounds-logits", "wortsman-qk-norm-lr-sensitivity", "wortsman-qk-norm-keeps-best-loss"),
    "expressivity": ("brody-projection-majority", "brody-norm-majority", "brody-scaling-selects-keys",
                     "brody-scaled-keys-selectable"),
    "amplification": ("liu-postln-update-grows", "liu-postln-update-linear-in-n", "liu-preln-update-slower",
                      "liu-preln-update-log-n", "deepnet-update-bounded"),
}


def _study(name: str, description: str, runs: list[RunSpec], claims: tuple[str, ...]) -> Study:
    return Study(name=name, description=description, runs=tuple(runs), claims=claims)


def _all_claims(exclude: tuple[str, ...] = ()) -> tuple[str, ...]:
    return tuple(c for study, cs in CLAIMS_BY_STUDY.items() if study not in exclude for c in cs)


def _quick() -> Study:
    # sized to finish in minutes on 2 CPU cores: 120 steps, the norms at 3 layers, the
    # depth study at 12 layers only (its 6-layer Post-LN and Pre-LN points are the warm-up
    # study's runs with warm-up). The validation set is its first 128 KiB: the final
    # evaluation of 256 KiB took 3 s of a 12-layer run's 7.5 s.
    evals = {"val_bytes_during": 16_384, "val_bytes": 131_072}
    train = {"base": MICRO, "steps": 120, "warmup_steps": 30, "lrs": QUICK_LRS, "seeds": (0, 1, 2),
             "batch_size": 16, "seq_len": 64, **evals}
    high = {**train, "lrs": QUICK_LRS_HIGH}
    runs = (grad_at_init(seeds=tuple(range(6)), probe_batches=4)
            + warmup(n_layers=6, **train)
            + depth(depths=(12,), shallow=None, **high)
            + norms(n_layers=3, names=("layernorm", "rmsnorm", "powernorm", "batchnorm", "dyt"), **high)
            + init_depth(depths=(48,))  # its 6-24 layer probes are grad-at-init's
            + amplification()
            # 200 steps and no Post-LN (its stream is a norm's output) keep make run within 10 minutes
            + activations(steps=200, placements=("pre", "peri", "sandwich"), **evals)
            + gns(steps=120, **evals)
            # majority: 120 steps of 64 sequences, like the other quick runs' budget, keep make run
            # within 10 minutes; the width-8 LMs keep their 400 steps (at 120 they barely leave the
            # unigram baseline)
            + expressivity(steps=120, batch_size=64, keys_steps=400, **evals))
    return _study("quick", "Every study at CPU sizes (d_model 32, 3-12 layers, 120 steps): 3 paired seeds, "
                  "3 learning rates per configuration, probes at init over 6 seeds (d_model 64-128, up to "
                  "48 layers); minutes on a 2-core CPU. qk-norm runs on its own (its 36 runs do not fit the "
                  "budget of make run).",
                  runs, _all_claims(exclude=("qk-norm",)))


def _full() -> Study:
    train = {"base": GPU, "steps": 20000, "warmup_steps": 4000, "lrs": FULL_LRS, "seeds": tuple(range(5)),
             "batch_size": 64, "seq_len": 256}
    runs = (grad_at_init(base=GPU_PROBE, seeds=tuple(range(10)), batch_size=16, seq_len=256)
            + warmup(n_layers=12, **train)
            + depth(depths=(24, 48), **train)
            + norms(n_layers=12, **train)
            + init_depth(base=GPU_PROBE, depths=(48, 96), seeds=tuple(range(10)), batch_size=16, seq_len=256)
            + amplification(base=GPU_PROBE, depths=(6, 12, 24, 48), seeds=tuple(range(10)), batch_size=16,
                            seq_len=256, lr=FULL_UPDATE_LR)
            + activations(base=GPU, n_layers=24, lr=1e-3, warmup_steps=4000, steps=20000, seeds=tuple(range(5)),
                          batch_size=64, seq_len=256)
            + gns(base=GPU, n_layers=6, lr=1e-3, warmup_steps=1000, steps=5000, seeds=tuple(range(5)),
                  batch_size=32, seq_len=256)
            + expressivity(lrs=(1e-3, 3e-3, 1e-2, 3e-2), steps=5000, seeds=tuple(range(5)), batch_size=1024,
                           warmup_steps=100, keys_steps=20000, keys_batch_size=64, keys_seq_len=256)
            + qk_norm(base=GPU, n_layers=12, lrs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2), warmup_steps=1000,
                      steps=10000, seeds=tuple(range(5)), batch_size=64, seq_len=256))
    return _study("full", "Every study at sizes meant for a GPU (d_model 512, up to 48 layers, 20k steps): "
                  "5 paired seeds, 4 learning rates per configuration.", runs, _all_claims())


PRESETS = {
    "grad-at-init": lambda: _study(
        "grad-at-init", "Xiong et al. 2020 Fig. 3: FFN gradient norms by layer at initialization, Post-LN vs "
        "Pre-LN at 3-24 layers (and DeepNorm, Peri-LN at 6), 6 seeds; the residual stream's growth with depth.",
        grad_at_init(), CLAIMS_BY_STUDY["grad-at-init"]),
    "warmup": lambda: _study(
        "warmup", "Post-LN vs Pre-LN at 6 layers, with and without learning-rate warm-up, at 3 learning "
        "rates and 3 paired seeds, Adam(0.9, 0.98).", warmup(), CLAIMS_BY_STUDY["warmup"]),
    "depth": lambda: _study(
        "depth", "Post-LN vs Pre-LN vs DeepNorm at 16 layers over 3 learning rates and 3 paired seeds: "
        "the loss reached and which runs fail.", depth(), CLAIMS_BY_STUDY["depth"]),
    "norms": lambda: _study(
        "norms", "LayerNorm, RMSNorm, ScaleNorm, PowerNorm, masked BatchNorm and DyT (3 alpha0) at Pre-LN "
        "placement over 3 learning rates and 3 paired seeds; RMSNorm's speed timed side by side.",
        norms(), CLAIMS_BY_STUDY["norms"]),
    "init-depth": lambda: _study(
        "init-depth", "Xiong et al. 2020 Theorem 1: the last layer's W2 gradient at initialization against depth, "
        "Post-LN vs Pre-LN at 6, 12, 24 and 48 layers, 6 seeds, no training.", init_depth(),
        CLAIMS_BY_STUDY["init-depth"]),
    "amplification": lambda: _study(
        "amplification", "Liu et al. 2020 / Wang et al. 2022: the output change after one Adam update at "
        "initialization against depth, Post-LN vs Pre-LN vs DeepNorm at 6, 12 and 24 layers, 6 seeds.",
        amplification(), CLAIMS_BY_STUDY["amplification"]),
    "activations": lambda: _study(
        "activations", "Kim et al. 2025 (Peri-LN): the residual stream's RMS and max |x| by layer through 300 "
        "steps of training, Pre-LN vs Peri-LN vs Sandwich vs Post-LN at 12 layers, one lr, 3 paired seeds.",
        activations(), CLAIMS_BY_STUDY["activations"]),
    "gns": lambda: _study(
        "gns", "Gray et al. 2024: the gradient noise scale from the norm layers' per-example gradients against "
        "the whole model's from every parameter's, through 150 steps of training, LayerNorm and RMSNorm at "
        "Pre-LN, 3 paired seeds.", gns(), CLAIMS_BY_STUDY["gns"]),
    "expressivity": lambda: _study(
        "expressivity", "Brody et al. 2023: the majority of 50 tokens over 20 classes, one Pre-LN layer of "
        "width 8 with LayerNorm, RMSNorm or no norm, over 3 learning rates and 3 paired seeds; the keys no "
        "query can select.", expressivity(), CLAIMS_BY_STUDY["expressivity"]),
    "qk-norm": lambda: _study(
        "qk-norm", "Wortsman et al. 2023 / Dehghani et al. 2023: Pre-LN at 4 layers (d_model 32) with and without "
        "QK-norm over 6 learning rates from 1e-3 to 0.3 and 3 paired seeds: the largest attention logit, the "
        "final loss and the lr sensitivity.", qk_norm(), CLAIMS_BY_STUDY["qk-norm"]),
    "quick": _quick,
    "full": _full,
}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_study(name: str) -> Study:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown study preset {name!r}; expected one of: {', '.join(PRESETS)}") from None
