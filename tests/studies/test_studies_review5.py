"""A study stopped part way sets aside the report an earlier command left (its verdicts
no longer match the summary.json this invocation wrote); the missing-seeds caveat of a
row that could read none of its finished runs counts their seeds as planned."""

from __future__ import annotations

import json
import math

import pytest

from normlab.studies import runner
from normlab.studies.claims import Measurement, _missing_caveats
from normlab.studies.spec import Study
from normlab.studies.stats import Interval
from normlab.studies.train import Interrupted
from tests.studies.helpers import cpu_env, micro_spec


def test_a_study_stopped_part_way_sets_aside_the_earlier_commands_report(tmp_path, corpus, monkeypatch):
    study = Study("part", "stopped part way", (micro_spec("x", steps=2), micro_spec("c", steps=2, seed=1)))
    folder = tmp_path / "part"
    folder.mkdir()
    earlier = {"claims.json": "[]", "claims.md": "# old verdicts", "index.html": "<p>old</p>"}
    for name, text in earlier.items():
        (folder / name).write_text(text)

    def stopped(spec, *a, **k):  # Ctrl-C in x: run_one saves it and raises
        raise Interrupted(spec.name, 1)

    monkeypatch.setattr(runner, "run_one", stopped)
    with pytest.raises(Interrupted):
        runner.run_study(study, tmp_path, cpu_env(), corpus=corpus, workers=1)
    assert json.loads((folder / "summary.json").read_text())["runs"] == []
    for name, text in earlier.items():
        stem, _, ext = name.partition(".")
        assert not (folder / name).exists(), name
        assert (folder / f"{stem}.stale.{ext}").read_text() == text  # kept, under a name nothing reads


def _run(seed):
    return {"name": f"gns-layernorm-s{seed}", "seed": seed, "kind": "lm", "norm": "layernorm",
            "tags": {"study": "gns", "group": "layernorm"}}


def test_the_missing_seeds_caveat_counts_the_finished_runs_a_row_could_not_use():
    # seeds 0 and 1 finished but gave the row nothing it could use, seed 2 did not finish:
    # 1 of 3 planned seeds lacks a run (it read "1 of 1")
    m = Measurement("@layernorm", Interval(math.nan, math.nan, math.nan, 0), "not measured",
                    wanted=(("gns", (("norm", "layernorm"),)),))
    missing = [dict(_run(2), missing="not finished")]
    (caveat,) = _missing_caveats(m, missing, [_run(0), _run(1)])
    assert caveat.startswith("1 of 3 planned seeds"), caveat
    assert "gns-layernorm-s2" in caveat
