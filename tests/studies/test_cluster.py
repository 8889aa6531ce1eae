"""Runs as jobs through submitit's local executor (the same code a SLURM job runs):
the results equal one-after-another runs, a failing job is reported by its run's name,
--no-wait then --report-only merges what has finished, and bad options are refused."""

import io
import json
import math
import time

import pytest
from rich.console import Console

from normlab.studies import runner
from normlab.studies.cluster import JobOptions
from normlab.studies.spec import Study
from tests.studies.helpers import MICRO, cpu_env, micro_spec, one_thread

pytest.importorskip("submitit", reason="submitit not installed (pip install 'normlab[cluster]')")


def _spec(name, **kw):
    base = dict(steps=6, eval_every=3, diag_every=0, checkpoint_every=100, tags={"study": "norms", "group": "g"})
    base.update(kw)
    return micro_spec(name, **base)


def _study(*runs):
    return Study(name="jobs", description="runs as jobs", runs=tuple(runs))


def _same(a, b):
    for key in ("final_val_loss", "final_train_loss"):
        assert a[key] == b[key] or (math.isnan(a[key]) and math.isnan(b[key])), key


def test_local_jobs_equal_one_after_another(tmp_path, corpus):
    # bit for bit at equal thread counts (a job runs --cpus-per-run threads, here 1)
    study = _study(_spec("a"), _spec("b", model={**MICRO, "placement": "post"}, seed=1))
    with one_thread():
        serial, _ = runner.run_study(study, tmp_path / "one", cpu_env(), workers=1, corpus=corpus)
    jobs, report = runner.run_study(study, tmp_path / "jobs", cpu_env(), corpus=corpus, launcher="local",
                                    job_options=JobOptions(time_min=10))
    assert [r["name"] for r in jobs] == ["a", "b"] and report.exists()
    for a, b in zip(serial, jobs):
        _same(a, b)
    summary = json.loads((tmp_path / "jobs" / "jobs" / "summary.json").read_text())
    assert summary["provenance"]["launcher"] == "local" and summary["failed"] == []
    ids = json.loads((tmp_path / "jobs" / "jobs" / "jobs.json").read_text())
    assert set(ids) == {"a", "b"} and all(v["launcher"] == "local" for v in ids.values())
    # a second invocation finds every run finished: nothing is submitted again
    again, _ = runner.run_study(study, tmp_path / "jobs", cpu_env(), corpus=corpus, launcher="local")
    assert json.loads((tmp_path / "jobs" / "jobs" / "jobs.json").read_text()) == ids
    _same(again[0], jobs[0])


def test_a_failing_job_is_reported_by_its_run_and_the_others_finish(tmp_path, corpus):
    bad = _spec("bad", model={**MICRO, "n_heads": 3})  # d_model 16 does not split into 3 heads
    results, _ = runner.run_study(_study(_spec("good"), bad), tmp_path, cpu_env(), corpus=corpus, launcher="local")
    assert [r["name"] for r in results] == ["good"]
    failed = json.loads((tmp_path / "jobs" / "summary.json").read_text())["failed"]
    assert [f["name"] for f in failed] == ["bad"] and "divisible by n_heads" in failed[0]["error"]


def test_no_wait_then_report_only_merges_what_finished(tmp_path, corpus):
    study = _study(_spec("x"), _spec("y", seed=1))
    early, report = runner.run_study(study, tmp_path, cpu_env(), corpus=corpus, report_only=True)
    assert early == [] and report.exists()
    summary = json.loads((tmp_path / "jobs" / "summary.json").read_text())
    assert summary["provenance"]["not_finished"] == ["x", "y"]
    console = Console(file=io.StringIO(), width=400)
    submitted, report = runner.run_study(study, tmp_path, cpu_env(), corpus=corpus, launcher="local", wait=False,
                                         console=console, merge_command="normlab study jobs --report-only --steps 2")
    assert submitted == [] and report is None
    # the hint is the invocation's own merge command (it said `normlab study jobs --report-only`
    # whatever --out, --seeds or --steps the runs were made with, and that was refused)
    assert "`normlab study jobs --report-only --steps 2` merges the finished runs" in console.file.getvalue()
    deadline = time.monotonic() + 120
    while not all((tmp_path / "jobs" / n / "result.json").exists() for n in ("x", "y")):
        assert time.monotonic() < deadline, "the local jobs did not finish"
        time.sleep(0.5)
    merged, report = runner.run_study(study, tmp_path, cpu_env(), corpus=corpus, report_only=True)
    assert [r["name"] for r in merged] == ["x", "y"] and report.exists()
    assert json.loads((tmp_path / "jobs" / "summary.json").read_text())["provenance"]["not_finished"] == []


def test_bad_launcher_options_are_refused(tmp_path, corpus):
    study = _study(_spec("z"))
    with pytest.raises(ValueError, match="--launcher: expected one of local, slurm, got 'ray'"):
        runner.run_study(study, tmp_path, cpu_env(), corpus=corpus, launcher="ray")
    with pytest.raises(ValueError, match="--launcher slurm: expected --partition"):
        runner.run_study(study, tmp_path, cpu_env(), corpus=corpus, launcher="slurm")
    with pytest.raises(ValueError, match="cannot combine with --launcher"):
        runner.run_study(study, tmp_path, cpu_env(), corpus=corpus, launcher="local", workers=2)


def test_the_cli_report_only_and_launcher_options(tmp_path):
    from typer.testing import CliRunner

    from normlab.cli import app
    from normlab.studies.presets import get_study

    # a run's folder (a run not finished): --report-only refuses a folder without runs
    (tmp_path / "quick" / get_study("quick").runs[0].name).mkdir(parents=True)
    out = CliRunner().invoke(app, ["study", "quick", "--report-only", "--out", str(tmp_path)],
                             env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    n = len(get_study("quick").runs)
    assert f"{n} run(s) not finished yet" in out.output and "more (summary.json" in out.output
    assert (tmp_path / "quick" / "index.html").exists() and (tmp_path / "quick" / "claims.json").exists()
    bad = CliRunner().invoke(app, ["study", "quick", "--launcher", "slurm", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "expected --partition" in bad.output


def test_report_only_names_jobs_that_ended_without_a_result(tmp_path, corpus):
    # --report-only listed a killed or failed job's run as "not finished": a SLURM user
    # would wait for a job that had run out of memory or raised
    import os
    import pickle
    import subprocess
    import sys

    from normlab.studies.train import FolderLock

    study = _study(_spec("killed"), _spec("raised", seed=1), _spec("running", seed=2), _spec("starting", seed=3))
    study_dir = tmp_path / "jobs"
    (study_dir / "jobs").mkdir(parents=True)
    dead, gone = (subprocess.Popen([sys.executable, "-c", "pass"]) for _ in range(2))
    dead.wait()  # pids no process has now (a local job's id is its pid)
    gone.wait()
    ids = {"killed": dead.pid, "raised": gone.pid, "running": 102, "starting": os.getpid()}  # (this test: alive)
    (study_dir / "jobs.json").write_text(json.dumps({name: {"job_id": str(i), "launcher": "local"}
                                                     for name, i in ids.items()}))
    for job_id in (gone.pid, 102):  # 102: an old error, its run running again (a requeued job)
        with open(study_dir / "jobs" / f"{job_id}_0_result.pkl", "wb") as f:
            pickle.dump(("error", "Traceback (most recent call last):\nValueError: the job's own error"), f)
    (study_dir / "running").mkdir()
    lock = FolderLock(study_dir / "running")  # a job of this run holds its lock
    assert lock.acquire() is None
    try:
        merged, report = runner.run_study(study, tmp_path, cpu_env(), corpus=corpus, report_only=True)
    finally:
        lock.release()
    summary = json.loads((study_dir / "summary.json").read_text())
    failed = {f["name"]: f["error"] for f in summary["failed"]}
    assert set(failed) == {"killed", "raised"}, failed
    assert f"job {dead.pid} is not running and left no result" in failed["killed"]
    assert f"job {gone.pid} raised" in failed["raised"] and "the job's own error" in failed["raised"]
    # a job holding its run's lock, and one still starting (its process alive, no lock yet)
    assert summary["provenance"]["not_finished"] == ["running", "starting"] and merged == []


def test_overwrite_refuses_runs_that_earlier_jobs_still_run(tmp_path, corpus):
    # --overwrite with new settings skipped the runs earlier jobs held and exited 0: those
    # jobs went on with the old settings, and the next invocation found them stale
    import os

    from normlab.studies.train import FolderLock

    study = _study(_spec("held"))
    study_dir = tmp_path / "jobs"
    (study_dir / "held").mkdir(parents=True)
    (study_dir / "jobs.json").write_text(json.dumps({"held": {"job_id": "4242", "launcher": "local"}}))
    lock = FolderLock(study_dir / "held")
    assert lock.acquire() is None
    try:
        with pytest.raises(ValueError, match=r"1 run\(s\) are running in earlier jobs with other settings \(held\)"
                                             r".*cancel the jobs \(4242\), then re-run"):
            runner.run_study(study, tmp_path, cpu_env(), corpus=corpus, launcher="local", overwrite=True)
        # the same settings: the job goes on, the run is not submitted twice (no refusal)
        (study_dir / "jobs.json").write_text(json.dumps({"held": {
            "job_id": "4242", "launcher": "local", "fingerprint": study.runs[0].fingerprint()}}))
        console = Console(file=io.StringIO(), width=300)
        assert runner.run_study(study, tmp_path, cpu_env(), corpus=corpus, launcher="local", overwrite=True,
                                console=console, wait=False) == ([], None)
        assert "1 run(s) still running in earlier jobs, not submitted again: held" in console.file.getvalue()
    finally:
        lock.release()
    assert not (study_dir / "held" / "result.json").exists()
    # a queued or starting job (alive, no lock yet) of other settings is refused too
    (study_dir / "jobs.json").write_text(json.dumps({"held": {"job_id": str(os.getpid()), "launcher": "local",
                                                              "fingerprint": "older settings"}}))
    with pytest.raises(ValueError, match="running in earlier jobs with other settings"):
        runner.run_study(study, tmp_path, cpu_env(), corpus=corpus, launcher="local")
