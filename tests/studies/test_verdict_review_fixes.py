"""Rows that leave out a value that is not finite keep their verdict only where the value,
counted as the most extreme finite one, does not change it; non-inferiority rows say
what they test and when the interval lies beyond the margin on the favourable side; the
report's run status and failure lines follow the claims' own rule and baseline; and the
claims table says what each row's interval is."""

import math
import re

import pytest

from normlab.studies import report
from normlab.studies.claims import CLAIMS, failed, judge, judge_all, judged_loss
from tests.studies.test_study_claims import (
    LR_PENALTY,
    LRS,
    NOISE,
    SCENARIOS,
    SEEDS,
    _act_run,
    _probe,
    _qk_run,
    _run,
    _slope_probes,
    _sweep,
    _update_exponent,
    _update_run,
)

# ------------------------------------------------------------------ values that are not finite


def _find(runs, **match):
    return next(r for r in runs if all(r.get(k, r.get("tags", {}).get(k)) == v for k, v in match.items()))


def _w2_inf(placement, n_layers, index=-1, study=None):
    def blow(runs):
        r = _find(runs, placement=placement, n_layers=n_layers, seed=0, **({"study": study} if study else {}))
        r["grad_norms_by_layer"]["ffn_w2"] = list(r["grad_norms_by_layer"]["ffn_w2"])
        r["grad_norms_by_layer"]["ffn_w2"][index] = math.inf
    return blow


def _every_deepest_change_inf(runs, placement):
    for r in runs:
        if r.get("placement") == placement and r.get("n_layers") == 24:
            r["output_change_sq"] = math.inf


def _change_inf(placement):
    def blow(runs):
        _find(runs, placement=placement, n_layers=24, seed=0)["output_change_sq"] = math.inf
    return blow


def _stream_inf(placement, key):
    def blow(runs):
        r = _find(runs, placement=placement, seed=0)
        r[key] = list(r[key][:-1]) + [math.inf]
    return blow


def _rms_inf(runs):
    r = _find(runs, placement="pre", n_layers=24, seed=0)
    r["activation_rms_by_layer"] = list(r["activation_rms_by_layer"][:-1]) + [math.inf]


def _gns_inf(runs):
    _find(runs, seed=0)["gns_norms"] = math.inf


def _logit_inf(runs):
    _find(runs, group="qk-norm", seed=0, lr=max(LRS))["attention_logit_max"] = math.inf


def _keys_diverged(runs):
    r = _find(runs, norm="none", seed=0)
    r.update(diverged=True, final_val_loss=math.nan, final_val_loss_select=math.nan, final_val_loss_test=math.nan)


# each row that leaves out a unit or a depth for a value that is not finite, and how to
# blow up one value of seed 0 in the scenario that agrees
BLOWN = {
    "xiong-postln-grad-grows": _w2_inf("post", 6, index=2),
    "xiong-preln-grad-flat": _w2_inf("pre", 6, index=2),
    "xiong-last-layer-larger": _w2_inf("post", 6),
    "xiong-ratio-grows-sqrt-depth": _w2_inf("post", 24),
    "preln-stream-variance-linear": _rms_inf,
    "init-depth-post": _w2_inf("post", 48),
    "init-depth-pre": _w2_inf("pre", 48),
    "liu-postln-update-grows": _change_inf("post"),
    "liu-postln-update-linear-in-n": _change_inf("post"),
    "liu-preln-update-slower": _change_inf("pre"),
    "liu-preln-update-log-n": _change_inf("pre"),
    "deepnet-update-bounded": _change_inf("deepnorm"),
    "preln-activations-grow": _stream_inf("pre", "activation_max_by_layer_final"),
    "peri-bounds-max-activations": _stream_inf("peri", "activation_max_by_layer_final"),
    "peri-bounds-rms": _stream_inf("peri", "activation_rms_by_layer_final"),
    "gray-norm-gns-matches-total": _gns_inf,
    "wortsman-qk-norm-bounds-logits": _logit_inf,
    "brody-scaling-selects-keys": _keys_diverged,
}


def _at_largest_finite(value):
    """The oracle: ``value`` with every infinity replaced by +-1e150 by hand (a loss left
    to the failure rule), a finite value the statistics weigh as they weigh any other."""
    if isinstance(value, float) and math.isinf(value):
        return math.copysign(1e150, value)
    if isinstance(value, dict):
        return {k: v if "loss" in k else _at_largest_finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_at_largest_finite(v) for v in value]
    return value


@pytest.mark.parametrize("claim_id", sorted(BLOWN))
def test_a_row_that_left_out_a_value_that_is_not_finite_keeps_its_verdict_only_if_the_value_would(claim_id):
    # the fit over what remains hid the overflow: every row agreed; now a row agrees only
    # where the same runs with the overflow at 1e150, finite, agree too
    runs = SCENARIOS[claim_id]("agrees")
    BLOWN[claim_id](runs)
    rows = judge(CLAIMS[claim_id], runs)
    finite = {r["id"]: r["verdict"] for r in judge(CLAIMS[claim_id], [_at_largest_finite(r) for r in runs])}
    assert rows
    for row in rows:
        caveat = next(c for c in row["caveats"] if "A blown-up value" in c)
        if row["verdict"] == "agrees":
            assert finite[row["id"]] == "agrees" and "reads the same (agrees)" in caveat
        else:
            assert row["verdict"] == "inconclusive", (row["id"], row["caveats"])
            assert finite[row["id"]] != "agrees" or "cannot be counted" in caveat, (row["id"], caveat)
    # an overflow that cannot be counted at a finite stand-in (a diverged run: nan) never agrees
    if claim_id in ("brody-scaling-selects-keys",):
        assert all(r["verdict"] == "inconclusive" for r in rows)


def test_a_row_with_every_value_finite_is_judged_as_before():
    for claim_id in BLOWN:
        for row in judge(CLAIMS[claim_id], SCENARIOS[claim_id]("agrees")):
            assert row["verdict"] == "agrees", row["id"]
            assert not any("not finite" in c for c in row["caveats"])


def test_deepnorm_update_with_every_deepest_probe_overflowed_is_not_bounded():
    # flat from 6 to 12 layers, every seed's 24-layer output change overflowed: the slope
    # refitted on 6-12 layers is 0 on every seed, which would "agree" with a bounded update
    def runs(top):
        return [_update_run("deepnorm", n, s, top if n == 24 else 1e-6 * (1 + 0.01 * s))
                for s in range(6) for n in (6, 12, 24)]

    (row,) = judge(CLAIMS["deepnet-update-bounded"], runs(math.inf))
    assert row["verdict"] == "inconclusive"
    assert any("24 layers" in c and "it reads disagrees" in c for c in row["caveats"])
    (finite,) = judge(CLAIMS["deepnet-update-bounded"], runs(1e150))
    assert finite["verdict"] == "disagrees"


def test_peri_stream_overflow_leaves_the_gap_inconclusive():
    # Peri-LN's stream overflowing is evidence against "Peri-LN bounds the activations"
    pre = [_act_run("pre", s, 1.0, 4.0 * (1.3 + 0.01 * s)) for s in range(3)]
    peri = [_act_run("peri", s, 1.0, 4.0 * (1.0 + 0.01 * s)) for s in range(3)]
    peri[0]["activation_max_by_layer_final"] = [4.0] * 11 + [math.inf]
    (row,) = judge(CLAIMS["peri-bounds-max-activations"], pre + peri)
    assert row["n_seeds"] == 2 and row["verdict"] == "inconclusive"
    assert any("Peri-LN" in c and "seed 0" in c and "not finite" in c for c in row["caveats"])


def test_an_overflow_is_weighed_in_its_direction_but_never_decides_alone():
    # the logits without QK-norm overflowing is the growth the claim is about: the caveat
    # says the overflow, counted at 1e150, reads agrees, but with every seed's overflowed
    # no pair remains to judge, and one seed's at 1e150 against finite ones makes the
    # Student-t interval as wide as it goes: inconclusive either way, the overflow named
    def runs(seeds):
        out = SCENARIOS["wortsman-qk-norm-bounds-logits"]("agrees")
        for s in SEEDS:  # (logits that differ by seed: an interval with a width)
            _find(out, group="qk-norm", seed=s, lr=max(LRS))["attention_logit_max"] = 1.0 + 0.1 * s
        for s in seeds:
            _find(out, group="no qk-norm", seed=s, lr=max(LRS))["attention_logit_max"] = math.inf
        return out

    (every,) = judge(CLAIMS["wortsman-qk-norm-bounds-logits"], runs(SEEDS))
    assert every["verdict"] == "inconclusive" and every["n_seeds"] == 0
    assert any("not finite" in c and "it reads agrees" in c for c in every["caveats"])
    (one,) = judge(CLAIMS["wortsman-qk-norm-bounds-logits"], runs([0]))
    assert one["verdict"] == "inconclusive"
    assert any("read agrees" in c and "it reads inconclusive" in c for c in one["caveats"])
    assert any("is not finite" in c for c in one["caveats"])
    assert not any("no attention logit recorded" in c for c in one["caveats"] + every["caveats"])


def test_an_overflow_against_a_disagreeing_row_makes_it_inconclusive():
    # Post-LN's deepest update overflowing is growth, what the claim says: a row that
    # disagreed on the shallower depths cannot stand
    runs = SCENARIOS["liu-postln-update-grows"]("disagrees")
    _change_inf("post")(runs)
    (row,) = judge(CLAIMS["liu-postln-update-grows"], runs)
    assert row["verdict"] == "inconclusive"
    assert any("read disagrees" in c and "it reads" in c for c in row["caveats"])


def test_an_agreeing_row_whose_overflow_points_the_claims_way_still_agrees():
    # every seed's deepest Post-LN update overflowed: growth, what the claim says, and the
    # depths that remain agree too
    runs = SCENARIOS["liu-postln-update-grows"]("agrees")
    _every_deepest_change_inf(runs, "post")
    (row,) = judge(CLAIMS["liu-postln-update-grows"], runs)
    assert row["verdict"] == "agrees"
    assert any("A blown-up value" in c and "reads the same (agrees)" in c for c in row["caveats"])


def test_the_stand_in_lies_beyond_every_finite_value_a_run_records():
    # at 1e30 an overflow of the QK-norm side (against the claim) counted below finite
    # logits of 1e35 without QK-norm, and the row kept agreeing
    runs = SCENARIOS["wortsman-qk-norm-bounds-logits"]("agrees")
    for s in SEEDS:
        _find(runs, group="no qk-norm", seed=s, lr=max(LRS))["attention_logit_max"] = 1e35 * (1 + 0.1 * s)
        _find(runs, group="qk-norm", seed=s, lr=max(LRS))["attention_logit_max"] = 1.0 + 0.1 * s
    _find(runs, group="qk-norm", seed=0, lr=max(LRS))["attention_logit_max"] = math.inf
    (row,) = judge(CLAIMS["wortsman-qk-norm-bounds-logits"], runs)
    assert row["verdict"] == "inconclusive"


def test_a_row_that_the_counted_overflow_moves_says_so():
    # every seed's 24-layer stream overflowed: the row, judged at 12 layers without them,
    # is at 24 layers with them counted; it said they "cannot be counted"
    deep = SCENARIOS["preln-stream-variance-linear"]("agrees")
    shallow = [dict(r, n_layers=12, name=r["name"].replace("L24", "L12"),
                    activation_rms_by_layer=r["activation_rms_by_layer"][:12],
                    grad_norms_by_layer={"ffn_w2": [1.0] * 12, "ffn_w1": [1.0] * 12}) for r in deep]
    for r in deep:
        r["activation_rms_by_layer"] = list(r["activation_rms_by_layer"][:-1]) + [math.inf]
    rows = judge(CLAIMS["preln-stream-variance-linear"], deep + shallow)
    assert rows
    for row in rows:
        caveat = next(c for c in row["caveats"] if "A blown-up value" in c)
        assert row["verdict"] == "inconclusive" and "another depth or lr" in caveat, caveat


def test_a_row_that_disagrees_with_or_without_the_overflow_still_disagrees():
    # every seed's deepest DeepNorm update overflowed, in a row that disagrees with a
    # bounded update on the depths that remain: counted at 1e150 it disagrees the more
    runs = _update_exponent("deepnorm", 0.0, margin=0.2)("disagrees")
    _every_deepest_change_inf(runs, "deepnorm")
    (row,) = judge(CLAIMS["deepnet-update-bounded"], runs)
    assert row["verdict"] == "disagrees"
    assert any("not finite" in c and "reads the same (disagrees)" in c for c in row["caveats"])


def test_a_value_never_recorded_is_not_a_blown_up_one():
    runs = _slope_probes("post", 0.1, 0.01)
    del runs[0]["grad_norms_by_layer"]["ffn_w2"]  # not measured: left out and named, but no overflow
    (row,) = judge(CLAIMS["xiong-postln-grad-grows"], runs)
    assert row["verdict"] == "agrees" and row["n_seeds"] == len(SEEDS) - 1


# ------------------------------------------------------------------ non-inferiority


def _qk_better_by(delta):
    return ([_qk_run("qk-norm", s, lr, 2.4 + LR_PENALTY[lr] - delta + 0.005 * NOISE[s], 10.0)
             for lr in LRS for s in SEEDS]
            + [_qk_run("no qk-norm", s, lr, 2.4 + LR_PENALTY[lr], 10.0) for lr in LRS for s in SEEDS])


def test_noninferiority_beyond_the_margin_on_the_favourable_side_says_so():
    (row,) = judge(CLAIMS["wortsman-qk-norm-keeps-best-loss"], _qk_better_by(0.5))
    assert row["verdict"] == "agrees" and row["ci95"][1] < -row["margin"]
    assert any("better by more than the margin" in c and "about the same" in c for c in row["caveats"])
    runs = (_sweep("warmup", -0.5, 0.005, placement="pre", warmup=0)
            + _sweep("warmup", 0.0, 0.0, placement="pre", warmup=40))
    (pre,) = judge(CLAIMS["preln-without-warmup"], runs)
    assert pre["verdict"] == "agrees"
    assert any("better by more than the margin" in c for c in pre["caveats"])


def test_noninferiority_within_the_margin_has_no_such_caveat():
    (row,) = judge(CLAIMS["wortsman-qk-norm-keeps-best-loss"], _qk_better_by(0.0))
    assert row["verdict"] == "agrees"
    assert not any("better by more than the margin" in c for c in row["caveats"])


@pytest.mark.parametrize("claim_id", ["wortsman-qk-norm-keeps-best-loss", "preln-without-warmup"])
def test_noninferiority_claims_say_what_is_tested(claim_id):
    claim = CLAIMS[claim_id]
    assert claim.test == "noninferiority"
    assert "no worse" in claim.statement and "non-inferiority" in claim.statement
    assert "non-inferiority" in claim.statistic
    assert "matches" not in claim.title


# ------------------------------------------------------------------ the report's failure rule


def _lm(**kw):
    r = _run("norms", 0, 1e-3, 2.5, norm="layernorm")
    r.update(baseline_val_loss_select=3.0, baseline_val_loss_test=3.0, **kw)
    return r


def _status(tmp_path, r):
    page = report.write_html(tmp_path, "t", "t", [], [r], {}, {}).read_text()
    row = re.search(rf"<td class='name'>{re.escape(r['name'])}</td>.*?</tr>", page).group(0)
    return re.findall(r"<td>([^<]*)</td>", row)[-1]


def test_run_status_follows_the_claims_failure_rule(tmp_path):
    no_loss = _lm(final_val_loss=math.nan, final_val_loss_select=2.5, final_val_loss_test=math.nan)
    assert failed(no_loss) and judged_loss(no_loss) == 3.0
    assert _status(tmp_path, no_loss) != "ok"
    test_half = _lm(final_val_loss=2.5, final_val_loss_select=2.5, final_val_loss_test=3.1)
    assert not failed(test_half) and judged_loss(test_half) == 3.0
    assert "test half" in _status(tmp_path, test_half)
    assert _status(tmp_path, _lm(final_val_loss_select=2.5, final_val_loss_test=2.5)) == "ok"


def test_loss_vs_lr_draws_the_failed_line_where_failed_runs_are_counted(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.append(fig) or path)
    runs = [_lm(final_val_loss_select=2.5, final_val_loss_test=2.5)]  # whole-set baseline 3.2, test half 3.0
    report.plot_loss_vs_lr(runs, "norms", tmp_path / "lr.png")
    (fig,) = figures
    lines = [line for ax in fig.axes for line in ax.get_lines() if "unigram" in str(line.get_label())]
    assert lines and all(set(line.get_ydata()) == {3.0} for line in lines)


# ------------------------------------------------------------------ what each interval is


def _rows():
    probes = [_probe("post", 6, s, [1.0] * 6, [1.0] * 6) for s in SEEDS]
    return judge_all(["postln-stream-normalized", "xiong-postln-grad-grows", "xiong-last-layer-larger"],
                     probes + SCENARIOS["xiong-last-layer-larger"]("agrees")
                     + SCENARIOS["xiong-postln-grad-grows"]("agrees"))


def test_each_row_names_what_its_interval_is_over():
    rows = {r["claim"]: r for r in _rows()}
    assert "min to max" in rows["postln-stream-normalized"]["interval"]
    assert "paired" not in rows["xiong-postln-grad-grows"]["interval"]
    assert "over seeds" in rows["xiong-postln-grad-grows"]["interval"]
    assert "paired seeds" in rows["xiong-last-layer-larger"]["interval"]
    keys = judge(CLAIMS["brody-scaled-keys-selectable"], SCENARIOS["brody-scaling-selects-keys"]("agrees"))
    assert keys and all("min to max" in r["interval"] and "not a confidence interval" in r["interval"] for r in keys)


def test_the_claims_tables_mark_min_to_max_rows(tmp_path):
    rows = _rows()
    page = report.write_html(tmp_path, "t", "t", rows, [], {}, {}).read_text()
    table = page[page.index("<h2>Claims</h2>"):page.index("<h2>What each claim says")]
    assert "mean over paired seeds (same data order" not in table
    sanity = re.search(r"postln-stream-normalized.*?</tr>", table, re.S).group(0)
    assert "min to max" in sanity
    grows = re.search(r"xiong-postln-grad-grows@.*?</tr>", table, re.S).group(0)
    assert "over seeds" in grows and "paired" not in grows
    md = report.write_markdown(tmp_path, "t", rows, {}).read_text()
    line = next(x for x in md.splitlines() if x.startswith("| `postln-stream-normalized"))
    assert "min to max" in line
    assert "Estimates are means over paired seeds" not in md
    # a row with no interval (nothing measured) gets no label: "- 95% CI over seeds" read as one
    empty = dict(rows[0], id="nothing-measured", ci95=[None, None], estimate=None)
    md = report.write_markdown(tmp_path, "t", [empty], {}).read_text()
    assert "| - | - |" in next(x for x in md.splitlines() if x.startswith("| `nothing-measured"))
    directional = next(r for r in rows if r["test"] == "directional")
    empty = dict(directional, id="nothing-measured", ci95=[None, None], estimate=None)
    page = report.write_html(tmp_path, "t", "t", [empty], [], {}, {}).read_text()
    cell = re.search(r"nothing-measured.*?</tr>", page, re.S).group(0)
    assert "95% CI" not in cell and "over" not in cell.split("class='num'>-")[-1]


def test_a_noise_scale_row_that_left_out_a_diverged_run_cannot_agree():
    runs = SCENARIOS["gray-norm-gns-matches-total"]("agrees")
    _find(runs, seed=0).update(diverged=True, final_val_loss=math.nan, final_val_loss_select=math.nan,
                               final_val_loss_test=math.nan)
    (row,) = judge(CLAIMS["gray-norm-gns-matches-total"], runs)
    assert row["verdict"] == "inconclusive" and row["n_seeds"] == len(SEEDS) - 1
    assert any("diverged" in c and "cannot be counted" in c for c in row["caveats"])


def test_the_command_lines_claims_table_says_what_each_interval_is(tmp_path, monkeypatch):
    # its title said "95% t-intervals over paired seeds" for every row, a sanity row's
    # min-to-max range included
    import io
    import json

    from rich.console import Console

    from normlab.studies import cli

    rows = [{"id": "paired-row", "ci95": [0.1, 0.3], "estimate": 0.2, "margin": 0.05, "n_seeds": 3,
             "verdict": "agrees", "test": "directional", "interval_kind": "paired seeds"},
            {"id": "sanity-row", "ci95": [1.0, 2.0], "estimate": 2.0, "margin": 0.0, "n_seeds": 3,
             "verdict": "sanity", "test": "sanity", "interval_kind": "min to max"}]
    (tmp_path / "claims.json").write_text(json.dumps(rows))
    out = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, width=250))
    cli._print_claims(tmp_path / "claims.json")
    text = out.getvalue()
    assert "[+0.100, +0.300] " in text and "(over" not in text.split("paired-row")[1].split("\n")[0]
    # (the label on the lines below the bounds, folded to the interval column's width)
    assert "[+1.000, +2.000]" in text and "(min to max (not a CI))" in " ".join(text.split("sanity-row")[1].split())
