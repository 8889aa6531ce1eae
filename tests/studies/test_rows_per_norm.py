"""A claim with a row per norm keeps the row of a norm none of whose planned runs
finished (a study stopped part way, or --report-only before they ran): inconclusive,
naming the runs it waits for, not silently left out of the report."""

from __future__ import annotations

from normlab.studies.claims import CLAIMS, judge
from tests.studies.test_study_claims import _gns, _unselectable


def _planned(name, norm, seed, **tags):
    return {"name": name, "kind": "train", "task": "lm", "placement": "pre", "norm": norm, "n_layers": 3,
            "seed": seed, "lr": 3e-3, "tags": {"study": tags.pop("study"), "group": norm, **tags},
            "missing": "not finished"}


def test_the_noise_scale_claim_keeps_a_row_for_a_norm_with_no_finished_run():
    runs = _gns("agrees")  # LayerNorm's runs finished
    missing = [_planned(f"gns-rmsnorm-L3-s{s}", "rmsnorm", s, study="gns") for s in (0, 1, 2)]
    rows = {r["id"]: r for r in judge(CLAIMS["gray-norm-gns-matches-total"], runs, missing=missing)}
    assert list(rows) == ["gray-norm-gns-matches-total@layernorm", "gray-norm-gns-matches-total@rmsnorm"]
    assert rows["gray-norm-gns-matches-total@layernorm"]["verdict"] == "agrees"
    row = rows["gray-norm-gns-matches-total@rmsnorm"]
    assert row["verdict"] == "inconclusive" and row["estimate"] is None and row["n_seeds"] == 0
    assert "none of its planned runs finished" in row["measured"]
    assert any("gns-rmsnorm-L3-s0" in c and "gns-rmsnorm-L3-s2" in c for c in row["caveats"]), row["caveats"]
    # with nothing missing, no such row
    assert [r["id"] for r in judge(CLAIMS["gray-norm-gns-matches-total"], runs)] == [
        "gray-norm-gns-matches-total@layernorm"]


def test_the_scaled_keys_rows_keep_a_norm_with_no_finished_run():
    runs = [r for r in _unselectable("agrees") if r["norm"] != "rmsnorm"]
    missing = [_planned(f"keys-rmsnorm-d8-s{s}", "rmsnorm", s, study="expressivity", part="keys")
               for s in (0, 1, 2)]
    # another planned run of the study (the majority part) is not a keys row's
    missing.append(_planned("majority-rmsnorm-s0", "rmsnorm", 0, study="expressivity", part="majority"))
    rows = {r["id"]: r for r in judge(CLAIMS["brody-scaled-keys-selectable"], runs, missing=missing)}
    assert list(rows) == ["brody-scaled-keys-selectable@layernorm", "brody-scaled-keys-selectable@rmsnorm"]
    row = rows["brody-scaled-keys-selectable@rmsnorm"]
    assert row["estimate"] is None and "none of its planned runs finished" in row["measured"]
    (caveat,) = [c for c in row["caveats"] if "keys-rmsnorm" in c]
    assert "keys-rmsnorm-d8-s1" in caveat and "majority-rmsnorm" not in caveat
