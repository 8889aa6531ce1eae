"""Claims on incomplete runs: settings one side lacks, seeds left out of a pair, runs
that raised or did not finish, equal units, and the report's tables read the same way
as the claims."""

import json
import math

import pytest

from normlab.studies.claims import best_setting, judge_all, missing_runs
from normlab.studies.report import configurations, write_markdown
from normlab.studies.spec import RunSpec
from normlab.studies.stats import Interval, degenerate, mean_ci, verdict
from tests.studies.test_claim_edges import _train as _edge_train


def _train(study, seed, lr, loss, *, placement="pre", norm="layernorm", group=None, **kw):
    """``test_claim_edges``' training result, with a ``group`` tag (the configuration's name)."""
    r = _edge_train(study, seed, lr, loss, placement=placement, norm=norm, **kw)
    r["tags"]["group"] = group or (norm if study == "norms" else placement)
    return r


def _caveats(row):
    return " | ".join(row["caveats"])


# ------------------------------------------------------------------ settings one side lacks


def _stability_runs(post_top_lr=True):
    """Post-LN fails at 3e-2 on every seed; DeepNorm at 3e-2 on seeds 0-3 and at 1e-2 on seed 0."""
    runs = []
    for s in range(5):
        for lr in (3e-3, 1e-2, 3e-2):
            if post_top_lr or lr != 3e-2:
                runs.append(_train("depth", s, lr, 2.5, placement="post", n_layers=12, diverged=lr == 3e-2))
            runs.append(_train("depth", s, lr, 2.5, placement="deepnorm", n_layers=12,
                               diverged=(lr == 3e-2 and s < 4) or (lr == 1e-2 and s == 0)))
    return runs


def test_stability_counts_failures_only_at_settings_both_sides_ran():
    (full,) = judge_all(["deepnorm-stability"], _stability_runs())
    assert full["estimate"] == pytest.approx(0.0) and full["verdict"] == "inconclusive"
    # Post-LN's lr 3e-2 runs missing: DeepNorm's failures there must not count against it
    (row,) = judge_all(["deepnorm-stability"], _stability_runs(post_top_lr=False))
    assert row["verdict"] != "disagrees"
    assert row["estimate"] == pytest.approx(-0.2)  # only seed 0's DeepNorm failure at 1e-2 is left
    assert any("lr 0.03" in c and "left out" in c for c in row["caveats"]), row["caveats"]


def test_stability_with_no_shared_setting_is_undetermined():
    runs = [r for r in _stability_runs() if not (r["placement"] == "post" and r["lr"] != 3e-2)]
    runs = [r for r in runs if not (r["placement"] == "deepnorm" and r["lr"] == 3e-2)]
    (row,) = judge_all(["deepnorm-stability"], runs)
    assert row["verdict"] == "inconclusive" and row["n_seeds"] == 0
    assert "Inconclusive by construction" in row["measured"]


def _qk_runs(drop_top):
    runs = []
    plain = {1e-3: 2.6, 3e-3: 2.5, 1e-2: 2.45, 3e-2: 2.5, 1e-1: 2.7, 3e-1: 9.9}
    qk = {1e-3: 2.6, 3e-3: 2.5, 1e-2: 2.45, 3e-2: 2.5, 1e-1: 2.6, 3e-1: 2.8}
    for s in range(3):
        for lr in plain:
            j = 0.005 * s
            if not (drop_top and lr == 3e-1):
                runs.append(_train("qk-norm", s, lr, plain[lr] + (3 * j if lr == 1e-1 else 0), group="no qk-norm",
                                   n_layers=4, diverged=lr == 3e-1))
            runs.append(_train("qk-norm", s, lr, qk[lr] - (j if lr == 1e-1 else 0), group="qk-norm", n_layers=4))
    return runs


def test_lr_sensitivity_is_measured_over_the_lrs_both_sides_ran():
    (row,) = judge_all(["wortsman-qk-norm-lr-sensitivity"], _qk_runs(drop_top=True))
    # over the five shared lrs: without QK-norm 0.1 nats worse at 0.1 (plus its jitter)
    assert row["verdict"] == "agrees" and row["estimate"] == pytest.approx((0.1 + 4 * 0.005) / 5)
    assert any("lr 0.3" in c for c in row["caveats"]), row["caveats"]
    (full,) = judge_all(["wortsman-qk-norm-lr-sensitivity"], _qk_runs(drop_top=False))
    assert not any("lr 0.3" in c for c in full["caveats"])


# ------------------------------------------------------------------ seeds left out are named


def _warmup_runs():
    runs = []
    for s in range(5):
        for lr in (1e-3, 3e-3, 1e-2):
            for p in ("post", "pre"):
                for w in (0, 30):
                    if p == "post" and w == 0 and s >= 3:
                        continue
                    extra = 0.3 + 0.03 * s if (p, w) == ("post", 0) else 0.0
                    runs.append(_train("warmup", s, lr, 2.5 + {1e-3: 0.05, 3e-3: 0.0, 1e-2: 0.05}[lr] + extra,
                                       placement=p, warmup=w))
    return runs


def test_warmup_rows_name_the_seeds_without_all_four_runs():
    rows = judge_all(["postln-needs-warmup", "postln-needs-warmup-best-lr"], _warmup_runs())
    assert len(rows) == 4
    for row in rows:
        assert row["n_seeds"] == 3
        assert any("3 and 4" in c and "Post-LN without warm-up" in c for c in row["caveats"]), row["caveats"]
        assert "3 paired seeds" in row["scope"] and "5 paired seeds" not in row["scope"], row["scope"]


def test_unselectable_keys_name_diverged_and_unpaired_seeds():
    runs = []
    for s in range(5):
        runs.append(_train("expressivity", s, 3e-3, 2.9, norm="none", n_layers=4, diverged=s >= 3,
                           unselectable_by_layer=[0.05 + 0.01 * s] * 4, undetermined_by_layer=[0.0] * 4))
        if s != 2:
            runs.append(_train("expressivity", s, 3e-3, 2.8, norm="layernorm", n_layers=4,
                               unselectable_by_layer=[0.0] * 4, undetermined_by_layer=[0.0] * 4))
    (row,) = judge_all(["brody-scaling-selects-keys"], runs)
    assert row["n_seeds"] == 2
    text = _caveats(row)
    assert "3 and 4" in text and "diverged" in text
    assert "seed 2 of no norm left out: no pair" in text


def _probe(p, n, s, last, study="grad-at-init"):
    return {"name": f"init-{p}-L{n}-s{s}", "kind": "probe", "task": "lm", "placement": p, "norm": "layernorm",
            "n_layers": n, "d_model": 128, "lr": 1e-3, "warmup_steps": 0, "seed": s, "steps": 0,
            "final_val_loss": math.nan, "tags": {"study": study, "group": p},
            "grad_norms_by_layer": {"ffn_w2": [1.0] * (n - 1) + [last]}, "activation_rms_by_layer": [1.0] * n,
            "config": {"batch_size": 8, "seq_len": 64, "probe_batches": 4}}


def test_last_layer_ratio_names_unpaired_and_unusable_probes():
    probes = [_probe("post", 6, s, 2.0 + 0.1 * s) for s in range(6)] + [_probe("pre", 6, s, 1.0) for s in range(4)]
    probes[1]["grad_norms_by_layer"]["ffn_w2"][-1] = math.inf  # Post-LN seed 1 overflowed
    (row,) = judge_all(["xiong-last-layer-larger"], probes)
    assert row["n_seeds"] == 3
    text = _caveats(row)
    assert "seeds 4 and 5 of Post-LN left out: no pair" in text
    assert "seed 1" in text and "not finite" in text
    assert "3 paired seeds" in row["scope"]


def _update_run(placement, n_layers, seed, change):
    return {"name": f"update-{placement}-L{n_layers}-s{seed}", "kind": "update", "task": "lm",
            "placement": placement, "norm": "layernorm", "n_layers": n_layers, "d_model": 64, "lr": 1e-5,
            "warmup_steps": 0, "seed": seed, "steps": 0, "final_val_loss": math.nan, "output_change_sq": change,
            "tags": {"study": "amplification", "group": placement}, "config": {"probe_batches": 2}}


def test_non_finite_output_changes_are_named():
    runs = []
    for s in range(6):
        for n in (6, 12, 24):
            change = math.inf if n == 24 and s < 3 else n ** (1.0 + 0.05 * (s - 2.5))
            runs.append(_update_run("post", n, s, change))
            if s < 5:
                runs.append(_update_run("pre", n, s, n ** 0.5))
    rows = {r["claim"]: r for r in judge_all(["liu-postln-update-linear-in-n", "liu-preln-update-slower"], runs)}
    for row in rows.values():
        text = _caveats(row)
        assert "0, 1 and 2" in text and "24 layers" in text and "not finite" in text, text
    gap = rows["liu-preln-update-slower"]
    assert gap["n_seeds"] == 5 and "seed 5 of Post-LN left out: no pair" in _caveats(gap)
    assert "5 paired seeds" in gap["scope"]


def test_qk_logits_name_the_seeds_left_out_at_the_top_lr():
    runs = []
    for s in range(4):
        for lr in (1e-2, 1e-1):
            runs.append(_train("qk-norm", s, lr, 2.5, group="no qk-norm", n_layers=4,
                               attention_logit_max=50.0 + s if lr == 1e-1 else 5.0))
            if not (s == 3 and lr == 1e-1):
                runs.append(_train("qk-norm", s, lr, 2.5, group="qk-norm", n_layers=4, attention_logit_max=5.0))
    runs[0]["attention_logit_max"] = None  # a run whose monitor recorded nothing (at the lower lr: no effect)
    (row,) = judge_all(["wortsman-qk-norm-bounds-logits"], runs)
    assert row["n_seeds"] == 3 and "seed 3 of no QK-norm left out: no pair" in _caveats(row)


# ------------------------------------------------------------------ noise-scale runs without an estimate


def test_gns_runs_without_an_estimate_are_named_not_a_crash():
    runs = []
    for s in range(3):
        r = _train("gns", s, 3e-3, 2.4, norm="layernorm", n_layers=3)
        r.update(gns_total=40.0 + s, gns_norms=35.0 + 2 * s)
        if s == 2:
            del r["gns_norms"]  # this seed's summed norm-layer |G|^2 came out <= 0: no estimate
        runs.append(r)
    (row,) = judge_all(["gray-norm-gns-matches-total"], runs)
    assert row["n_seeds"] == 2
    assert any(runs[2]["name"] in c and "no estimate" in c for c in row["caveats"]), row["caveats"]
    for r in runs:
        r.pop("gns_norms", None)
    (row,) = judge_all(["gray-norm-gns-matches-total"], runs)
    assert row["verdict"] == "inconclusive" and row["n_seeds"] == 0
    assert "no estimate" in row["measured"] + _caveats(row)


# ------------------------------------------------------------------ runs that raised or did not finish


def _norm_runs(seeds=range(3)):
    return [_train("norms", s, lr, 2.5 + 0.01 * s + (0.02 if norm == "rmsnorm" else 0.0), norm=norm, n_layers=4)
            for norm in ("layernorm", "rmsnorm") for lr in (3e-3, 1e-2) for s in seeds]


def _spec(norm, seed, lr=3e-3):
    return RunSpec(name=f"norms-{norm}-lr{lr:g}-s{seed}", lr=lr, seed=seed, warmup_steps=30,
                   model={"d_model": 32, "n_heads": 2, "d_ff": 64, "n_layers": 4, "placement": "pre", "norm": norm},
                   tags={"study": "norms", "group": norm, "lr": lr})


def test_runs_that_raised_or_did_not_finish_are_named_in_the_rows_that_read_them():
    specs = [_spec(n, s, lr) for n in ("layernorm", "rmsnorm") for lr in (3e-3, 1e-2) for s in range(3)]
    finished = [r for r in _norm_runs(range(2))]
    for r in finished:  # the names the specs give them
        r["name"] = f"norms-{r['norm']}-lr{r['lr']:g}-s{r['seed']}"
    names = {r["name"] for r in finished}
    missing = missing_runs(specs, names, raised={"norms-layernorm-lr0.003-s2"})
    assert {m["name"] for m in missing} == {s.name for s in specs} - names
    rows = judge_all(["rmsnorm-matches-layernorm", "deepnorm-stability"], finished, missing=missing)
    by_claim = {r["claim"]: r for r in rows}
    text = _caveats(by_claim["rmsnorm-matches-layernorm"])
    assert "1 of 3 planned seeds" in text, text
    assert "raised: norms-layernorm-lr0.003-s2" in text and "not finished:" in text
    assert "norms-rmsnorm-lr0.01-s2" in text
    # a row that reads none of them says nothing of them
    assert "norms-layernorm-lr0.003-s2" not in _caveats(by_claim["deepnorm-stability"])


def test_a_row_with_nothing_measured_names_the_runs_it_needed():
    specs = [_spec("rmsnorm", s) for s in range(2)]
    missing = missing_runs(specs, set(), raised={specs[0].name})
    (row,) = judge_all(["rmsnorm-matches-layernorm"], _norm_runs()[:3], missing=missing)
    assert row["measured"].startswith("not measured") and specs[0].name in _caveats(row)


def test_missing_runs_of_a_spec_the_model_refuses_still_have_a_record():
    bad = RunSpec(name="bad", model={"d_model": 16, "n_heads": 3, "norm": "rmsnorm"}, tags={"study": "norms"})
    (record,) = missing_runs([bad], set(), raised={"bad"})
    assert record["name"] == "bad" and record["norm"] == "rmsnorm" and record["missing"] == "raised"


def test_missing_runs_reject_names_that_are_not_planned():
    with pytest.raises(ValueError, match="not a planned run: 'typo'"):
        missing_runs([_spec("rmsnorm", 0)], set(), raised={"typo"})


def test_claims_md_lists_failed_runs_and_each_claims_statement_scope_and_margin(tmp_path):
    rows = judge_all(["rmsnorm-matches-layernorm"], _norm_runs())
    failures = {"norms-rmsnorm-s3": "Traceback (most recent call last):\n  ...\nRuntimeError: CUDA error: boom"}
    md = write_markdown(tmp_path, "t", rows, {}, _norm_runs(), failures).read_text()
    assert "## Failed runs" in md and "norms-rmsnorm-s3" in md and "RuntimeError: CUDA error: boom" in md
    row = rows[0]
    assert row["statement"] in md and row["scope"] in md and row["margin_why"] in md
    assert "## Failed runs" not in write_markdown(tmp_path, "t", rows, {}, _norm_runs()).read_text()


def test_a_study_names_its_failed_runs_in_claims_json_and_claims_md(tmp_path, corpus):
    import torch
    from rich.console import Console

    from normlab.studies import runner
    from normlab.studies.spec import Study
    from normlab.studies.train import Env
    from tests.studies.helpers import micro_spec, one_thread

    runs = tuple(micro_spec(f"norms-{n}-s{s}", seed=s, lr=3e-3,
                            model={"d_model": 16, "n_heads": 2 if (n, s) != ("layernorm", 2) else 3, "d_ff": 32,
                                   "dropout": 0.0, "n_layers": 2, "placement": "pre", "norm": n},
                            tags={"study": "norms", "group": n})
                 for n in ("layernorm", "rmsnorm") for s in range(3))
    study = Study("mini", "two norms, 3 seeds, one run raises", runs, ("rmsnorm-matches-layernorm",))
    with one_thread():
        runner.run_study(study, tmp_path, Env(device=torch.device("cpu")), corpus=corpus, workers=1,
                         keep_weights=False, console=Console(quiet=True))
    (row,) = json.loads((tmp_path / "mini" / "claims.json").read_text())
    assert row["n_seeds"] == 2 and any("1 of 3 planned seeds" in c and "norms-layernorm-s2" in c
                                       for c in row["caveats"]), row["caveats"]
    md = (tmp_path / "mini" / "claims.md").read_text()
    assert "## Failed runs" in md and "norms-layernorm-s2" in md and "divisible" in md


# ------------------------------------------------------------------ the report ranks as the claims do


def test_configurations_rank_majority_runs_by_the_claims_error():
    runs = []
    for n in ("layernorm", "rmsnorm"):
        for s in range(3):
            for lr, loss, acc in ((1e-2, 0.40, 0.70), (3e-2, 0.50, 0.80)):  # 3e-2: worse loss, learned faster
                r = _train("expressivity", s, lr, loss + 0.01 * s, norm=n, n_layers=1, group=n)
                a = acc + 0.01 * s
                r.update(task="majority", baseline_val_loss=math.log(20), chance_accuracy=0.05,
                         final_val_accuracy=a, val_accuracy_mean_select=a, val_accuracy_mean_test=a)
                runs.append(r)
    (row,) = judge_all(["brody-projection-majority"], runs)
    assert "LayerNorm: best lr 0.03" in row["measured"]
    configs = {c["configuration"]: c for c in configurations(runs)}
    assert configs["layernorm"]["best"].startswith("lr 0.03")
    assert configs["layernorm"]["measure"] == "error" and configs["layernorm"]["value"] == pytest.approx(0.19)
    lm = configurations(_norm_runs())
    assert {c["measure"] for c in lm} == {"loss"}


# ------------------------------------------------------------------ the sweep a configuration ran


def test_a_configuration_missing_a_whole_lr_reads_as_incomplete():
    runs = [r for r in _norm_runs() if not (r["norm"] == "rmsnorm" and r["lr"] == 1e-2)]
    (row,) = judge_all(["rmsnorm-matches-layernorm"], runs)
    assert any("rmsnorm's sweep is incomplete" in c and "lr 0.01" in c for c in row["caveats"]), row["caveats"]
    assert not any("layernorm's sweep is incomplete" in c for c in row["caveats"])


def test_a_seeds_cross_fitted_choice_at_the_edge_is_a_caveat():
    # the middle lr is best on average, but without seed 0 the largest lr wins: seed 0 is
    # judged at the sweep's edge
    loss = {(3e-3, 0): 2.60, (1e-2, 0): 2.00, (3e-2, 0): 2.60,
            (3e-3, 1): 2.60, (1e-2, 1): 2.50, (3e-2, 1): 2.45,
            (3e-3, 2): 2.60, (1e-2, 2): 2.50, (3e-2, 2): 2.45}
    runs = [_train("norms", s, lr, v, norm=n, n_layers=4) for (lr, s), v in loss.items()
            for n in ("layernorm", "rmsnorm")]
    best = best_setting([r for r in runs if r["norm"] == "layernorm"])
    assert best.setting[0] == 1e-2 and not best.at_edge and best.chosen[0][0] == 3e-2
    (row,) = judge_all(["rmsnorm-matches-layernorm"], runs)
    assert any("seed 0" in c and "edge of the sweep" in c for c in row["caveats"]), row["caveats"]


# ------------------------------------------------------------------ equal units


def test_the_equal_units_caveat_follows_the_verdicts_rule():
    runs = []
    for s in range(3):  # LayerNorm 0.1 nats worse on every seed, up to rounding
        runs.append(_train("norms", s, 3e-3, 1.0 + s, norm="layernorm", n_layers=4))
        runs.append(_train("norms", s, 3e-3, 0.9 + s, norm="powernorm", n_layers=4))
    (row,) = judge_all(["powernorm-beats-layernorm"], runs)
    lo, hi = row["ci95"]
    assert lo != hi and row["verdict"] == "inconclusive"
    assert any("every seed gave the same value" in c and "6 seeds" in c for c in row["caveats"]), row["caveats"]


@pytest.mark.parametrize("n,expected", [(5, "inconclusive"), (6, "agrees"), (9, "agrees")])
def test_equal_units_are_judged_by_the_sign_test_interval_from_six_seeds(n, expected):
    i = mean_ci([3.0] * n)
    assert degenerate(i)
    assert verdict("directional", i, 0.0) == expected
    assert verdict("directional", mean_ci([-3.0] * n), 0.0) == ("disagrees" if n >= 6 else "inconclusive")
    assert verdict("equivalence", mean_ci([0.0] * n), 0.05) == ("agrees" if n >= 6 else "inconclusive")
    assert verdict("directional", mean_ci([0.0] * n), 0.0) == "inconclusive"  # on the margin itself
    units = [1.0 - 0.9, 2.0 - 1.9, 3.0 - 2.9] * 3  # equal up to rounding
    assert verdict("noninferiority", mean_ci(units[:n]), 0.05) == ("disagrees" if n >= 6 else "inconclusive")


def test_degenerate_is_one_rule():
    assert degenerate(mean_ci([0.1, 0.1, 0.1])) and degenerate(mean_ci([1.0 - 0.9, 2.0 - 1.9, 3.0 - 2.9]))
    assert not degenerate(Interval(0.1, 0.1 - 1e-6, 0.1 + 1e-6, 3))
    assert not degenerate(mean_ci([1.0])) and not degenerate(mean_ci([]))


def test_stronger_stability_evidence_no_longer_reads_weaker_with_six_seeds():
    runs = []
    for s in range(6):
        for lr in (3e-3, 1e-2, 3e-2):
            runs.append(_train("depth", s, lr, 2.5, placement="post", n_layers=12, diverged=True))
            runs.append(_train("depth", s, lr, 2.5, placement="deepnorm", n_layers=12))
    (row,) = judge_all(["deepnorm-stability"], runs)
    assert row["estimate"] == 3.0 and row["verdict"] == "agrees"
    assert any("sign test" in c for c in row["caveats"])
    (five,) = judge_all(["deepnorm-stability"], [r for r in runs if r["seed"] < 5])
    assert five["verdict"] == "inconclusive" and any("6 seeds" in c for c in five["caveats"])


def test_diverged_keys_runs_without_a_measurement_are_named_as_diverged():
    # a keys run that diverged writes no unselectable_by_layer: it is still one of the
    # rows' runs, named as diverged (it used to vanish, its partner named as unpaired)
    runs = []
    for s in range(5):
        for norm in ("none", "layernorm"):
            diverged = norm == "none" and s == 4
            extra = {} if diverged else {"unselectable_by_layer": [0.05 if norm == "none" else 0.0] * 4,
                                         "undetermined_by_layer": [0.0] * 4}
            r = _train("expressivity", s, 3e-3, 2.8, norm=norm, n_layers=4, diverged=diverged, **extra)
            r["tags"]["part"] = "keys"
            runs.append(r)
    (row,) = judge_all(["brody-scaling-selects-keys"], runs)
    assert row["n_seeds"] == 4
    text = _caveats(row)
    assert "seed 4" in text and "diverged" in text, text
    assert "no norm: seed 4 left out: diverged" in text, text
    assert "(of 5 run)" in row["scope"], row["scope"]
