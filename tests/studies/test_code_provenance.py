"""Each run records the code that made it (normlab's version, the commit, torch's
version), a resumed run every code it ran under; a report that merges runs other code
made names them in its provenance and warns."""

from __future__ import annotations

import json

import pytest

from normlab.provenance import code_record, describe_code
from normlab.studies import runner
from normlab.studies.spec import Study
from normlab.studies.train import CHECKPOINT, run_one
from tests.studies.helpers import cpu_env, ctrl_c_at, micro_spec

OTHER = {"normlab_version": "0.0.9", "git_commit": "f" * 40, "torch_version": "2.11.0"}


def _study():
    return Study("code", "code provenance", (micro_spec("a", steps=2), micro_spec("b", steps=2, seed=1)))


def _summary(tmp_path):
    return json.loads((tmp_path / "code" / "summary.json").read_text())


def test_a_run_records_its_code_and_a_study_of_this_codes_runs_names_none(tmp_path, corpus, no_report):
    runner.run_study(_study(), tmp_path, cpu_env(), corpus=corpus, workers=1)
    summary = _summary(tmp_path)
    assert [r["code"] for r in summary["runs"]] == [[code_record()]] * 2
    prov = summary["provenance"]
    assert {k: prov[k] for k in code_record()} == code_record()
    assert "runs_from_other_code" not in prov and "runs_without_code_record" not in prov


def test_a_report_of_runs_other_code_made_names_them_and_warns(tmp_path, corpus, no_report):
    study = _study()
    runner.run_study(study, tmp_path, cpu_env(), corpus=corpus, workers=1)
    a, b = (tmp_path / "code" / name / "result.json" for name in ("a", "b"))
    result = json.loads(a.read_text())
    a.write_text(json.dumps({**result, "code": [OTHER]}))
    result = json.loads(b.read_text())
    del result["code"]  # written before runs recorded it
    b.write_text(json.dumps(result))
    with pytest.warns(RuntimeWarning, match="other code than this command's") as caught:
        runner.run_study(study, tmp_path, cpu_env(), corpus=corpus, report_only=True)
    text = str(caught[0].message)
    assert "1 by normlab 0.0.9, commit ffffffffffff, torch 2.11.0 (a)" in text
    assert "1 with no record of their code (b)" in text
    prov = _summary(tmp_path)["provenance"]
    assert prov["runs_from_other_code"] == {describe_code(OTHER): ["a"]}
    assert prov["runs_without_code_record"] == ["b"]
    # the runs are still read: the code is not part of what makes a run this one
    assert [r["name"] for r in _summary(tmp_path)["runs"]] == ["a", "b"]

    # run again by this code: nothing is named, and the provenance entries go
    for path in (a, b):
        path.write_text(json.dumps({**json.loads(path.read_text()), "code": [code_record()]}))
    runner.run_study(study, tmp_path, cpu_env(), corpus=corpus, report_only=True)
    prov = _summary(tmp_path)["provenance"]
    assert "runs_from_other_code" not in prov and "runs_without_code_record" not in prov


def _resumed(tmp_path, corpus, code):
    """A run stopped at step 2, its checkpoint's code record replaced by ``code`` (None:
    none, as written before runs recorded it), then resumed: (its result, its folder)."""
    spec = micro_spec("r", steps=6, checkpoint_every=0)
    run_dir = tmp_path / "r"
    ctrl_c_at(2, spec, run_dir, cpu_env(), corpus)
    state = run_dir / CHECKPOINT / "state.json"
    saved = json.loads(state.read_text())
    assert saved.pop("code") == [code_record()]
    state.write_text(json.dumps(saved if code is None else {**saved, "code": code}))
    return run_one(spec, run_dir, cpu_env(), corpus), run_dir


def test_a_run_resumed_under_other_code_records_both(tmp_path, corpus):
    result, run_dir = _resumed(tmp_path, corpus, [OTHER])  # saved by other code
    assert result["code"] == [OTHER, code_record()]
    assert json.loads((run_dir / "result.json").read_text())["code"] == [OTHER, code_record()]


def test_the_report_shows_which_code_made_the_runs(tmp_path, corpus):
    study = _study()
    runner.run_study(study, tmp_path, cpu_env(), corpus=corpus, workers=1)
    a = tmp_path / "code" / "a" / "result.json"
    a.write_text(json.dumps({**json.loads(a.read_text()), "code": [OTHER]}))
    with pytest.warns(RuntimeWarning, match="other code"):
        runner.run_study(study, tmp_path, cpu_env(), corpus=corpus, report_only=True)
    for name in ("claims.md", "index.html"):
        assert "runs_from_other_code" in (tmp_path / "code" / name).read_text(), name
        assert "commit ffffffffffff" in (tmp_path / "code" / name).read_text(), name


def test_describe_code_says_what_is_known():
    assert describe_code({"normlab_version": None, "git_commit": "a" * 40 + "-dirty", "torch_version": "2.13.0"}) \
        == "normlab (not installed), commit aaaaaaaaaaaa-dirty, torch 2.13.0"
    assert describe_code(None) == "unrecorded code"


def test_a_run_resumed_from_a_checkpoint_without_a_code_record_is_counted_unrecorded(tmp_path, corpus):
    result, _ = _resumed(tmp_path, corpus, None)
    assert result["code"][0] == {"unrecorded": True} and result["code"][1] == code_record()
    prov = {**code_record()}
    runner._note_code([result], prov)
    assert prov["runs_without_code_record"] == ["r"] and "runs_from_other_code" not in prov
