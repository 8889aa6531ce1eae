"""The launcher's bookkeeping a reviewer found wrong: local jobs known by a pid alone (a
reused pid looked alive, or another job's result was read), running jobs of another
dtype or corpus taken as this run, a lock probe that made a starting run give up, a
failure carried over to the run under other settings, and options --report-only
ignored."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time

import pytest
from typer.testing import CliRunner

from normlab.cli import app
from normlab.studies import cluster, runner, train
from tests.studies.helpers import micro_spec


def test_a_local_job_is_known_by_its_process_not_its_pid_alone():
    me = cluster.process_identity(os.getpid())
    if me is None:
        pytest.skip("no /proc here")
    assert me and cluster._alive(str(os.getpid()), None, me) is True
    # the pid given to another process since (another start time): not the job's
    assert cluster._alive(str(os.getpid()), None, me.rsplit(":", 1)[0] + ":1") is False
    # a process gone by the time it was recorded
    assert cluster._alive(str(os.getpid()), None, "") is False
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert cluster.process_identity(int(done.stdout)) == ""
    # records without it: the pid alone, as before
    assert cluster._alive(str(os.getpid()), None, None) is True


def test_each_submission_keeps_its_job_files_apart(tmp_path):
    assert cluster.job_folder(tmp_path, {"job_id": "8"}) == tmp_path / "jobs"  # older records
    assert cluster.job_folder(tmp_path, {"job_id": "8", "folder": "jobs/20261207T081500-ab12cd34"}) == \
        tmp_path / "jobs" / "20261207T081500-ab12cd34"
    assert cluster.job_folder(tmp_path, {"job_id": "8", "folder": "/etc"}) == tmp_path / "jobs"


def test_a_running_job_is_this_run_only_with_its_identity():
    spec = micro_spec("a")
    want = {"fingerprint": spec.fingerprint(), "dtype": "fp32", "device_type": "cpu"}
    assert runner._submitted_as({"job_id": "1", "identity": dict(want)}, want, False)
    assert not runner._submitted_as({"job_id": "1", "identity": {**want, "dtype": "bf16"}}, want, False)
    assert not runner._submitted_as({"job_id": "1", "identity": {**want, "corpus_sha256": "x" * 64}},
                                    {**want, "corpus_sha256": "y" * 64}, False)
    # older records: the fingerprint; none: this run, unless --overwrite (which cannot replace it)
    assert runner._submitted_as({"job_id": "1", "fingerprint": spec.fingerprint()}, want, False)
    assert not runner._submitted_as({"job_id": "1", "fingerprint": "other"}, want, False)
    assert runner._submitted_as(None, want, False) and not runner._submitted_as(None, want, True)


def test_a_failure_counts_only_for_the_run_it_was_recorded_for():
    spec = micro_spec("a")
    study = runner.Study("s", "", (spec,), ())
    now = {"fingerprint": spec.fingerprint(), "dtype": "fp32"}
    summary = {"failed": [{"name": "a", "error": "boom", "identity": {**now, "fingerprint": "older settings"}}]}
    assert runner._failed_before(summary, study, lambda s: now) == {}
    summary["failed"][0]["identity"] = dict(now)
    assert runner._failed_before(summary, study, lambda s: now) == {"a": "boom"}
    summary["failed"][0].pop("identity")  # written before failures carried it: kept
    assert runner._failed_before(summary, study, lambda s: now) == {"a": "boom"}


def test_a_lock_probe_neither_rewrites_the_holder_nor_turns_a_starting_run_away(tmp_path):
    holder = train.FolderLock(tmp_path)
    assert holder.acquire() is None
    assert train.run_holder(tmp_path) == os.getpid()
    assert (tmp_path / train.LOCK).read_text() == str(os.getpid())  # the probe wrote nothing
    holder.release()
    assert train.run_holder(tmp_path) is None
    # a probe holding its shared lock for an instant: a run starting then waits for it
    fd = os.open(tmp_path / train.LOCK, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    assert train.FolderLock(tmp_path).acquire() == 0  # (no wait: taken as held)
    threading.Timer(0.2, os.close, (fd,)).start()
    lock = train.FolderLock(tmp_path)
    t0 = time.monotonic()
    assert lock.acquire(wait_s=train.RUN_LOCK_WAIT_S) is None and time.monotonic() - t0 < train.RUN_LOCK_WAIT_S
    lock.release()


def _study(tmp_path, *args):
    return CliRunner().invoke(app, ["study", "quick", "--device", "cpu", "--out", str(tmp_path), *args])


@pytest.mark.parametrize("args, flag", [
    (["--overwrite"], "--overwrite"),
    (["--no-keep-weights"], "--no-keep-weights"),
    (["--workers", "1"], "--workers 1"),
])
def test_report_only_refuses_options_it_would_ignore(tmp_path, args, flag):
    out = _study(tmp_path, "--report-only", *args)
    assert out.exit_code == 2, out.output
    assert f"{flag}: --report-only runs nothing" in out.output


def test_slurm_without_sbatch_is_refused_naming_the_launcher(tmp_path, monkeypatch):
    monkeypatch.setattr(cluster.shutil, "which", lambda name: None)
    out = _study(tmp_path, "--launcher", "slurm", "--partition", "cpu")
    assert out.exit_code == 2, out.output
    assert "--launcher slurm: sbatch is not on this machine's PATH" in " ".join(out.output.split())
    assert not (tmp_path / "quick").exists()


def test_a_job_submitted_as_another_run_is_not_this_runs_failure(tmp_path):
    pytest.importorskip("submitit", reason="submitit not installed (pip install 'normlab[cluster]')")
    import json

    spec = micro_spec("a")
    mine = {"fingerprint": spec.fingerprint(), "dtype": "fp32"}
    entry = {"job_id": "999999999", "launcher": "local", "folder": "jobs/x", "process": "",
             "identity": {**mine, "dtype": "bf16"}}  # a killed bf16 job, no result
    (tmp_path / "jobs.json").write_text(json.dumps({"a": entry}))
    assert cluster.ended_jobs(tmp_path, ["a"], lambda name: False, identity=lambda name: mine) == {}
    entry["identity"] = dict(mine)
    (tmp_path / "jobs.json").write_text(json.dumps({"a": entry}))
    ended = cluster.ended_jobs(tmp_path, ["a"], lambda name: False, identity=lambda name: mine)
    assert "is not running and left no result" in ended["a"]


def test_a_carried_over_failure_keeps_the_identity_it_failed_under(tmp_path):
    import json

    spec = micro_spec("a")
    study = runner.Study("s", "", (spec,), ())
    recorded = {"fingerprint": spec.fingerprint(), "dtype": "fp32", "device_type": "cuda"}
    (tmp_path / "summary.json").write_text(json.dumps({"failed": [{"name": "a", "error": "boom",
                                                                    "identity": recorded}]}))
    narrower = {"fingerprint": spec.fingerprint(), "dtype": "fp32"}  # a report read without the GPUs
    runner._write_summary(tmp_path, study, [], {}, {"a": "boom"}, lambda s: narrower)
    assert json.loads((tmp_path / "summary.json").read_text())["failed"][0]["identity"] == recorded
    runner._write_summary(tmp_path, study, [], {}, {"a": "another traceback"}, lambda s: narrower)
    assert json.loads((tmp_path / "summary.json").read_text())["failed"][0]["identity"] == narrower
