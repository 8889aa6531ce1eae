"""Rows whose lr or depth is chosen from the runs that finished name the planned one they
moved off, planned lrs with no row get one, the DeepNorm stability row says what its
counts show, and the limits of the t-interval on few equal units are documented."""

from pathlib import Path

from normlab.studies import stats
from normlab.studies.claims import judge_all, missing_runs
from normlab.studies.spec import RunSpec
from normlab.studies.stats import mean_ci, verdict
from tests.studies.test_claims_review import _caveats, _probe, _train

DOCS = Path(__file__).resolve().parents[2] / "docs" / "studies.md"


def _spec(study, name, lr, seed, tags, **model):
    return RunSpec(name=name, lr=lr, seed=seed, warmup_steps=model.pop("warmup", 30),
                   model={"d_model": 32, "n_heads": 2, "d_ff": 64, "n_layers": 4, "placement": "pre",
                          "norm": "layernorm", **model}, tags={"study": study, "lr": lr, **tags})


def _finish(specs, skip, make):
    """The results of ``specs`` but those ``skip`` names (each named as its spec), and the
    records of the ones skipped, as raised."""
    results = []
    for spec in specs:
        if not skip(spec):
            r = make(spec)
            r["name"] = spec.name
            results.append(r)
    raised = {s.name for s in specs if skip(s)}
    return results, missing_runs(specs, {r["name"] for r in results}, raised=raised)


# ------------------------------------------------------------------ the sweep's largest lr


def _qk(skip):
    specs = [_spec("qk-norm", f"qk-{g}-lr{lr:g}-s{s}", lr, s, {"group": g}, **({"qk_norm": True} if g == "qk-norm"
                                                                            else {}))
             for s in range(3) for lr in (1e-2, 1e-1) for g in ("no qk-norm", "qk-norm")]
    return _finish(specs, skip, lambda sp: _train("qk-norm", sp.seed, sp.lr, 2.5, group=sp.tags["group"], n_layers=4,
                                                  attention_logit_max=5.0 + sp.seed * (sp.tags["group"] != "qk-norm")))


def test_qk_logits_moved_off_the_largest_lr_name_the_planned_runs():
    results, missing = _qk(lambda sp: sp.tags["group"] == "no qk-norm" and sp.lr == 1e-1)
    (row,) = judge_all(["wortsman-qk-norm-bounds-logits"], results, missing=missing)
    assert row["id"].endswith("@lr=0.01")
    text = _caveats(row)
    assert "judged at lr 0.01, not at the planned lr 0.1" in text, text
    assert "raised: qk-no qk-norm-lr0.1-s0, qk-no qk-norm-lr0.1-s1, qk-no qk-norm-lr0.1-s2" in text
    # from the finished runs alone: the lr one side lacks
    (alone,) = judge_all(["wortsman-qk-norm-bounds-logits"], results)
    assert "not at the planned lr 0.1: lr 0.1 has no run without QK-norm" in _caveats(alone)
    assert alone["verdict"] == row["verdict"]  # the verdict rule is unchanged
    # at the planned lr, nothing to say
    full, none = _qk(lambda sp: False)
    (top,) = judge_all(["wortsman-qk-norm-bounds-logits"], full, missing=none)
    assert top["id"].endswith("@lr=0.1") and "judged at" not in _caveats(top)


# ------------------------------------------------------------------ the deepest DeepNorm depth


def _depth(skip):
    specs = [_spec("depth", f"depth-{p}-L{n}-lr{lr:g}-s{s}", lr, s, {"group": p, "depth": n}, placement=p, n_layers=n)
             for p in ("post", "pre", "deepnorm") for n in (12, 24) for lr in (3e-3, 1e-2) for s in range(3)]
    return _finish(specs, skip, lambda sp: _train("depth", sp.seed, sp.lr, 2.5 + 0.1 * (sp.model["placement"] == "post")
                                                  + 0.01 * sp.seed, placement=sp.model["placement"],
                                                  n_layers=sp.model["n_layers"]))


DEPTH_CLAIMS = ["deepnorm-beats-postln", "deepnorm-beats-preln", "deepnorm-stability"]


def test_deepnorm_rows_moved_to_a_shallower_depth_name_the_planned_runs():
    results, missing = _depth(lambda sp: sp.model["placement"] == "deepnorm" and sp.model["n_layers"] == 24)
    rows = judge_all(DEPTH_CLAIMS, results, missing=missing)
    assert len(rows) == 3
    for row in rows:
        assert row["id"].endswith("@L12")
        text = _caveats(row)
        assert "judged at 12 layers, not at the planned 24 layers" in text, text
        assert "the planned runs at 24 layers left no result (raised: depth-deepnorm-L24-lr0.003-s0" in text
        assert "depth-deepnorm-L24-lr0.01-s2" in text
    full, none = _depth(lambda sp: False)
    for row in judge_all(DEPTH_CLAIMS, full, missing=none):
        assert row["id"].endswith("@L24") and "judged at" not in _caveats(row)


def test_probe_rows_off_xiongs_depth_name_the_planned_probes():
    probes = [_probe(p, n, s, 2.0 + 0.1 * s if p == "post" else 1.0) for p in ("post", "pre") for n in (6, 24)
              for s in range(3)]
    lost = [r for r in probes if r["n_layers"] == 6]
    missing = [{**r, "missing": "raised"} for r in lost]
    rows = judge_all(["xiong-postln-grad-grows", "xiong-last-layer-larger"],
                     [r for r in probes if r not in lost], missing=missing)
    for row in rows:
        assert row["id"].endswith("@L24")
        assert "judged at 24 layers, not at the planned 6 layers" in _caveats(row), row["caveats"]
        assert "init-post-L6-s0" in _caveats(row)
    for row in judge_all(["xiong-postln-grad-grows", "xiong-last-layer-larger"], probes):
        assert row["id"].endswith("@L6") and "judged at" not in _caveats(row)


# ------------------------------------------------------------------ a row per planned lr


def _warmup(skip):
    specs = [_spec("warmup", f"w-{p}-w{w}-lr{lr:g}-s{s}", lr, s, {"group": p}, placement=p, n_layers=6, warmup=w)
             for s in range(3) for p in ("post", "pre") for w in (0, 30) for lr in (3e-3, 1e-2)]
    return _finish(specs, skip, lambda sp: _train(
        "warmup", sp.seed, sp.lr, 2.5 + 0.01 * sp.seed + 0.1 * (sp.model["placement"] == "post" and sp.warmup_steps == 0)
        + 0.02 * sp.seed * (sp.model["placement"] == "post"), placement=sp.model["placement"], n_layers=6,
        warmup=sp.warmup_steps))


def test_a_planned_warmup_lr_without_a_row_gets_an_inconclusive_one():
    results, missing = _warmup(lambda sp: sp.lr == 1e-2)
    rows = judge_all(["postln-needs-warmup"], results, missing=missing)
    assert [r["id"] for r in rows] == ["postln-needs-warmup@lr=0.003", "postln-needs-warmup@lr=0.01"]
    lost = rows[1]
    assert lost["verdict"] == "inconclusive" and lost["n_seeds"] == 0
    assert "not measured" in lost["measured"] and "Inconclusive by construction" in lost["measured"]
    text = _caveats(lost)
    assert "3 of 3 planned seeds lack a run this row reads" in text
    assert "w-post-w0-lr0.01-s0" in text and "w-pre-w30-lr0.01-s2" in text
    assert "lr0.01" not in _caveats(rows[0])
    # one configuration finished there: its row is still missing, and named
    results, missing = _warmup(lambda sp: sp.lr == 1e-2 and sp.model["placement"] == "post")
    rows = judge_all(["postln-needs-warmup"], results, missing=missing)
    assert [r["id"] for r in rows] == ["postln-needs-warmup@lr=0.003", "postln-needs-warmup@lr=0.01"]
    assert "w-post-w30-lr0.01-s1" in _caveats(rows[1]) and "w-pre-w0-lr0.01-s0" not in _caveats(rows[1])
    assert "not judged at an lr one configuration lacks" in _caveats(rows[0])
    # every configuration finished every lr: no extra row
    full, none = _warmup(lambda sp: False)
    assert len(judge_all(["postln-needs-warmup"], full, missing=none)) == 2


def test_warmup_runs_with_no_shared_lr_give_a_row_that_says_so():
    results, _ = _warmup(lambda sp: (sp.lr == 1e-2) == (sp.model["placement"] == "post"))
    (row,) = judge_all(["postln-needs-warmup"], results)
    assert row["verdict"] == "inconclusive" and "shared lr" in row["measured"]


# ------------------------------------------------------------------ what the stability counts show


def _stability(post_fails, deepnorm_fails, seeds=3):
    return [_train("depth", s, lr, 2.5, placement=p, n_layers=12, diverged=fails)
            for s in range(seeds) for lr in (3e-3, 1e-2, 3e-2)
            for p, fails in (("post", post_fails), ("deepnorm", deepnorm_fails))]


def test_stability_row_tells_no_failures_from_failures_everywhere():
    (both,) = judge_all(["deepnorm-stability"], _stability(True, True))
    assert "no failures" not in both["measured"]
    assert "both placements failed at every setting both ran: stability is not separable" in both["measured"]
    (neither,) = judge_all(["deepnorm-stability"], _stability(False, False))
    assert "no failures at these settings" in neither["measured"] and "not separable" not in neither["measured"]
    (post,) = judge_all(["deepnorm-stability"], _stability(True, False))
    assert "no failures" not in post["measured"] and "not separable" not in post["measured"]


# ------------------------------------------------------------------ equal units with few seeds


def test_tied_units_with_few_seeds_are_inconclusive_said_so_and_documented():
    # a known limit of the t-interval on counts: all tied reads weaker than nearly tied
    assert verdict("directional", mean_ci([1.0] * 5), 0.0) == "inconclusive"
    assert verdict("directional", mean_ci([1.0] * 4 + [2.0]), 0.0) == "agrees"
    (row,) = judge_all(["deepnorm-stability"], _stability(True, False, seeds=5))
    assert row["verdict"] == "inconclusive"
    assert any("every seed gave the same value" in c and "6 seeds" in c for c in row["caveats"]), row["caveats"]
    for text in (stats.__doc__, DOCS.read_text()):
        assert "[1, 1, 1, 1, 2]" in text and "[1, 1, 1, 1, 1]" in text
