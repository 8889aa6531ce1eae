"""Cluster runs as a reviewer met them: a job stopped by Ctrl-C (its run saved, resumable)
was reported failed; a jobs.json that parses to something else than an object crashed
the study; a run another process holds was recorded failed."""

from __future__ import annotations

import json
import pickle
from types import SimpleNamespace

import pytest

from normlab.studies import cluster, runner
from normlab.studies.spec import Study
from normlab.studies.train import RunBusy
from tests.studies.helpers import cpu_env, micro_spec


def _ended(tmp_path, monkeypatch, payload):
    folder = tmp_path / "jobs"
    folder.mkdir()
    result = folder / "7_0_result.pkl"
    result.write_bytes(pickle.dumps(("error", payload)))

    class LocalJob:
        def __init__(self, folder, job_id):
            self.paths = SimpleNamespace(result_pickle=result)

    monkeypatch.setattr(cluster, "_submitit", lambda: SimpleNamespace(LocalJob=LocalJob, SlurmJob=LocalJob))
    monkeypatch.setattr(cluster, "_alive", lambda *a, **k: False)
    (tmp_path / "jobs.json").write_text(json.dumps({"r0": {"job_id": "7", "launcher": "local", "folder": "jobs"}}))
    return cluster.ended_jobs(tmp_path, ["r0"], lambda name: False)


def test_a_job_stopped_by_ctrl_c_is_not_finished_and_one_that_raised_is_failed(tmp_path, monkeypatch):
    stopped = ("Traceback (most recent call last):\n  File \"x.py\", line 1\nnormlab.studies.train.Interrupted: "
               "interrupted in run 'r0' at step 1374; state saved; re-run the same command to resume")
    assert _ended(tmp_path, monkeypatch, stopped) == {}
    raised = "Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: bad"
    (tmp_path / "jobs").rename(tmp_path / "old")
    assert "ValueError: bad" in _ended(tmp_path, monkeypatch, raised)["r0"]
    # an error raised while handling an Interrupted (its save failed): the job failed
    chained = (stopped + "\n\nDuring handling of the above exception, another exception occurred:\n\n"
               "Traceback (most recent call last):\n  File \"y.py\", line 2\nFileNotFoundError: gone")
    (tmp_path / "jobs").rename(tmp_path / "old2")
    assert "FileNotFoundError: gone" in _ended(tmp_path, monkeypatch, chained)["r0"]


@pytest.mark.parametrize("text", ["null", "[]", "3", "{not json"])
def test_a_jobs_file_that_is_no_object_reads_as_none_with_a_warning(tmp_path, text):
    (tmp_path / "jobs.json").write_text(text)
    with pytest.warns(RuntimeWarning, match="jobs.json"):
        assert cluster.read_jobs(tmp_path) == {}
    (tmp_path / "jobs.json").write_text(json.dumps({"a": {"job_id": "1"}, "b": 3}))
    assert cluster.read_jobs(tmp_path) == {"a": {"job_id": "1"}}


def test_a_run_another_process_holds_is_not_failed(tmp_path, corpus, monkeypatch, no_report):
    import normlab.studies.runner as r

    def busy(spec, *a, **k):
        raise RunBusy(f"run {spec.name}: another process (pid 1) is running it")

    monkeypatch.setattr(r, "run_one", busy)
    study = Study("s", "d", (micro_spec("r0", steps=2),))
    with pytest.warns(RuntimeWarning, match="another process .* left to it"):
        runner.run_study(study, tmp_path, cpu_env(), corpus=corpus, workers=1)
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert not summary["provenance"].get("failed") and summary["provenance"]["not_finished"] == ["r0"]
