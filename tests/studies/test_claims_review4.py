"""Verdict rows, from a review: the QK-norm lr-sensitivity row when a side failed at every
lr (a sensitivity of 0 by the loss cap), DeepNorm's stability counts on the judged half,
the per-claim text of a bound near the margin, and corrupt timing rounds."""

import math

import pytest

from normlab.studies.claims import judge_all

BASE = 3.2


def _run(study, seed, lr, loss, *, placement="pre", norm="layernorm", n_layers=4, group=None, diverged=False,
         select=None, test=None, **extra):
    tags = {"study": study, "group": group or (norm if study == "norms" else placement), "lr": lr}
    nan = math.nan
    r = {"name": f"{study}-{group}-{placement}-{norm}-{n_layers}-{lr}-{seed}", "kind": "train", "task": "lm",
         "placement": placement, "norm": norm, "n_layers": n_layers, "d_model": 32, "lr": lr, "warmup_steps": 40,
         "seed": seed, "steps": 150, "tags": tags, "diverged": diverged,
         "final_val_loss": nan if diverged else loss,
         "final_val_loss_select": nan if diverged else (loss if select is None else select),
         "final_val_loss_test": nan if diverged else (loss if test is None else test),
         "baseline_val_loss": BASE, "baseline_val_loss_select": BASE, "baseline_val_loss_test": BASE,
         "n_params": 50000, "config": {"batch_size": 16, "seq_len": 64, "betas": [0.9, 0.98]}}
    r.update(extra)
    return r


LRS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3)


def _qk(failing: str, seeds=range(3), failing_seeds=None):
    runs = []
    failing_seeds = set(seeds) if failing_seeds is None else set(failing_seeds)
    for s in seeds:
        for i, lr in enumerate(LRS):
            for group in ("qk-norm", "no qk-norm"):
                if group == failing and s in failing_seeds:
                    runs.append(_run("qk-norm", s, lr, 9.9, group=group, diverged=True, attention_logit_max=1e4))
                else:
                    runs.append(_run("qk-norm", s, lr, 2.4 + (0.05 + 0.01 * s) * abs(i - 3), group=group,
                                     attention_logit_max=5.0))
    return runs


@pytest.mark.parametrize("failing", ["no qk-norm", "qk-norm"])
def test_a_side_that_failed_at_every_lr_is_not_read_as_insensitive(failing):
    (row,) = judge_all(["wortsman-qk-norm-lr-sensitivity"], _qk(failing))
    assert row["verdict"] == "inconclusive", row
    assert "failed at every lr" in row["measured"]
    assert any("a sensitivity of 0 by the cap" in c for c in row["caveats"]), row["caveats"]


def test_a_minority_of_seeds_failing_everywhere_is_left_out_and_named():
    runs = _qk("no qk-norm", seeds=range(5), failing_seeds={4})
    (row,) = judge_all(["wortsman-qk-norm-lr-sensitivity"], runs)
    assert row["n_seeds"] == 4
    assert any("seed 4 left out" in c and "without QK-norm failed at every lr" in c for c in row["caveats"])


def test_deepnorm_stability_counts_failures_on_the_judged_half():
    runs = []
    for s in range(6):
        for lr in (3e-3, 1e-2, 3e-2):
            if lr == 3e-2:  # the whole set at the baseline (failed there), the judged test half under it
                runs.append(_run("depth", s, lr, 3.21, placement="post", n_layers=12, select=3.27, test=3.15))
            else:
                runs.append(_run("depth", s, lr, 2.6 + 0.01 * s, placement="post", n_layers=12))
            runs.append(_run("depth", s, lr, 2.55 + 0.01 * s + (0.05 if s % 2 else 0), placement="deepnorm",
                             n_layers=12))
    (row,) = judge_all(["deepnorm-stability"], runs)
    assert "failed runs post 0/18, deepnorm 0/18" in row["measured"], row["measured"]
    assert row["verdict"] != "agrees"


def _against_layernorm(norm: str, mean: float) -> list:
    """Three seeds of LayerNorm and ``norm`` at one lr, ``norm``'s loss higher by ``mean`` +-
    0.003864 (with three seeds, a 95% t-interval of half-width 0.0096)."""
    d = [mean - 0.003864, mean, mean + 0.003864]
    return [r for s in range(3) for r in (_run("norms", s, 1e-2, 2.5, norm="layernorm"),
                                          _run("norms", s, 1e-2, 2.5 + d[s], norm=norm))]


def test_the_claim_text_keeps_a_bound_near_the_margin_on_its_side():
    # the upper bound is 0.0496: agrees at a margin of 0.05
    (row,) = judge_all(["rmsnorm-matches-layernorm"], _against_layernorm("rmsnorm", 0.04))
    assert row["verdict"] == "agrees"
    assert "+0.050]" not in row["measured"] and "+0.0496" in row["measured"], row["measured"]


def _speed(ratios):
    return {"name": "norms-speed", "kind": "speed", "task": "lm", "norm": "rmsnorm", "placement": "pre",
            "n_layers": 3, "d_model": 32, "lr": 1e-3, "warmup_steps": 0, "seed": 0, "steps": 0,
            "tags": {"study": "norms"}, "speed_against": {"norm": "layernorm"}, "speed_ratios": ratios,
            "tokens_per_s": 1000.0, "baseline_tokens_per_s": 900.0, "final_val_loss": math.nan}


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_a_corrupt_timing_round_is_left_out_and_named(bad):
    (row,) = judge_all(["rmsnorm-faster"], [_speed([1.1] * 11 + [bad])])
    assert row["n_seeds"] == 11
    assert any("round 12" in c and "left out as not finite" in c for c in row["caveats"]), row["caveats"]
    if bad != math.inf:  # no stand-in value can count it: the row cannot be judged
        assert row["verdict"] == "inconclusive"


def test_the_beyond_the_margin_caveat_keeps_its_bounds_on_their_side():
    # hi = -0.05004: beyond -0.05
    (row,) = judge_all(["dyt-matches-layernorm"], _against_layernorm("dyt", -0.05964))
    assert row["verdict"] == "agrees"
    beyond = [c for c in row["caveats"] if c.startswith("better by more than the margin")]
    assert beyond and "-0.050]" not in beyond[0] and "-0.0500" in beyond[0], beyond


def test_a_qk_row_with_every_seed_left_out_reads_cleanly():
    (row,) = judge_all(["wortsman-qk-norm-lr-sensitivity"], _qk("no qk-norm"))
    assert "nan" not in row["measured"] and "no seed measured" in row["measured"], row["measured"]
