"""What a study writes when it stops part way, and what its views and records say: an
interrupted study's summary.json holds every finished run of the plan on disk and the
earlier failures not run again (one after another, in a worker pool, and while waiting
for --launcher jobs); SIGTERM and SIGHUP stop the waiting for jobs as Ctrl-C does; the
worker pool's progress view drops late messages of runs that ended and counts a failed
run's work in full; jobs.json is swapped in whole; finished runs outside the plan (a
smaller --seeds) are named, not quietly left out."""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.progress import Progress

from normlab.studies import cluster, runner
from normlab.studies.cluster import JobOptions
from normlab.studies.spec import Study
from normlab.studies.train import Interrupted
from tests.studies.helpers import cpu_env, micro_spec, recording_executor, subprocess_env


def _study():
    # x and b raise the first time; c finishes. In plan order x comes first: a stop in x
    # leaves b (failed before) and c (finished before) unreached
    return Study("part", "stopped part way", (micro_spec("x", steps=2), micro_spec("b", steps=2, seed=1),
                                               micro_spec("c", steps=2, seed=2)))


def _first_invocation(tmp_path, corpus, monkeypatch):
    """x and b raise, c finishes; returns the summary's failed entries (name -> traceback)."""
    real = runner.run_one

    def run_one(spec, *a, **k):
        if spec.name in ("x", "b"):
            raise RuntimeError(f"{spec.name} broke")
        return real(spec, *a, **k)

    monkeypatch.setattr(runner, "run_one", run_one)
    runner.run_study(_study(), tmp_path, cpu_env(), corpus=corpus, workers=1)
    monkeypatch.undo()
    summary = _summary(tmp_path)
    assert [r["name"] for r in summary["runs"]] == ["c"]
    return {f["name"]: f["error"] for f in summary["failed"]}


def _summary(tmp_path):
    return json.loads((tmp_path / "part" / "summary.json").read_text())


def _kept_what_was_there(tmp_path, corpus, failed_before):
    summary = _summary(tmp_path)
    # c finished on disk though this invocation never reached it; b's failure (and its
    # traceback) stays until b runs again; x ran again (cut off), so its old failure goes
    assert [r["name"] for r in summary["runs"]] == ["c"], summary["runs"]
    assert summary["runs"][0]["baseline_val_loss"] > 0
    assert [{k: f[k] for k in ("name", "error")} for f in summary["failed"]] == \
        [{"name": "b", "error": failed_before["b"]}], summary["failed"]
    # ... and a later --report-only still reads b as a run that raised, not as one merely not finished
    runner.run_study(_study(), tmp_path, cpu_env(), corpus=corpus, report_only=True)
    summary = _summary(tmp_path)
    assert [{k: f[k] for k in ("name", "error")} for f in summary["failed"]] == \
        [{"name": "b", "error": failed_before["b"]}]
    assert summary["provenance"]["not_finished"] == ["x"]


def test_an_interrupted_serial_study_keeps_the_finished_runs_and_earlier_failures(tmp_path, corpus, monkeypatch,
                                                                                  no_report):
    failed_before = _first_invocation(tmp_path, corpus, monkeypatch)

    def stopped(spec, *a, **k):  # Ctrl-C in x: run_one saves it and raises
        raise Interrupted(spec.name, 1)

    monkeypatch.setattr(runner, "run_one", stopped)
    with pytest.raises(Interrupted):
        runner.run_study(_study(), tmp_path, cpu_env(), corpus=corpus, workers=1)
    monkeypatch.undo()
    _kept_what_was_there(tmp_path, corpus, failed_before)


class _InlinePool:
    """A process pool that runs each task at once, in this process."""

    def __init__(self, max_workers, **kw):
        self._processes = {}

    def submit(self, fn, *args):
        f = Future()
        try:
            f.set_result(os.getpid() if fn is runner._started else fn(*args))
        except Exception as e:  # noqa: BLE001 - the task's error, as a worker's would come back
            f.set_exception(e)
        return f

    def shutdown(self, wait=True, cancel_futures=False):
        pass


def _stopped_in_x(spec, run_dir, keep_weights, index=-1):
    """x is cut off by Ctrl-C at its step 1; the study is stopped before the others begin."""
    if spec.name == "x":
        raise Interrupted("x", 1)
    return None


def test_an_interrupted_worker_pool_keeps_the_finished_runs_and_earlier_failures(tmp_path, corpus, monkeypatch,
                                                                                 no_report):
    failed_before = _first_invocation(tmp_path, corpus, monkeypatch)
    monkeypatch.setattr(runner, "ProcessPoolExecutor", _InlinePool)
    monkeypatch.setattr(runner, "_run_parallel", functools.partial(runner._run_parallel, target=_stopped_in_x))
    with pytest.raises(Interrupted, match="saved x"):
        runner.run_study(_study(), tmp_path, cpu_env(), corpus=corpus, workers=2)
    monkeypatch.undo()
    _kept_what_was_there(tmp_path, corpus, failed_before)


class _Job:
    """A submitit job: "b" has raised; polling "x" meets Ctrl-C (then it has ended)."""

    state = "RUNNING"

    def __init__(self, name):
        self.name, self.polls = name, 0

    def done(self):
        self.polls += 1
        if self.name == "x" and self.polls == 1:
            raise KeyboardInterrupt
        return True

    def result(self):
        raise RuntimeError(f"job of {self.name} raised")

    def cancel(self, check=True):
        pass


def test_ctrl_c_while_waiting_for_jobs_keeps_the_finished_runs_and_the_failed_jobs(tmp_path, corpus, monkeypatch,
                                                                                  no_report):
    _first_invocation(tmp_path, corpus, monkeypatch)
    submitted = []
    monkeypatch.setattr(cluster, "submit", lambda runs, *a, **k: submitted.extend(r.name for r in runs) or {
        name: _Job(name) for name in ("b", "x")})
    with pytest.raises(runner.StudyInterrupted, match="the local jobs stopped too"):
        runner.run_study(_study(), tmp_path, cpu_env(), corpus=corpus, launcher="local")
    assert submitted == ["x", "b"]
    summary = _summary(tmp_path)
    assert [r["name"] for r in summary["runs"]] == ["c"]  # finished before, never submitted
    # b's job raised before the stop: its failure is this one; x ran again, its old one goes
    assert [f["name"] for f in summary["failed"]] == ["b"] and "job of b raised" in summary["failed"][0]["error"]


_SIGNAL_SCRIPT = """
import json, os, signal, sys
from pathlib import Path

from normlab.studies import cluster, runner
from normlab.studies.data import ByteCorpus
from normlab.studies.spec import Study
from normlab.studies.train import run_one
from tests.studies.helpers import cpu_env, micro_spec

signal.signal(signal.SIGHUP, signal.SIG_DFL)  # (whatever the test runner was started with)


class Job:
    # a local job still running; the signal comes as the study waits for it
    state = "RUNNING"

    def __init__(self, name):
        self.name, self.polls, self.cancelled = name, 0, False

    def done(self):
        self.polls += 1
        if self.polls == 1:
            os.kill(os.getpid(), SIGNAL)
        return self.cancelled or self.polls > 30

    def cancel(self, check=True):
        self.cancelled = True
        print("cancelled", self.name, flush=True)

    def result(self):
        return None


cluster.submit = lambda runs, *a, **k: {r.name: Job(r.name) for r in runs}
out, corpus = Path(sys.argv[1]), ByteCorpus.from_path(sys.argv[2])
study = Study("jobs", "one finished run, one job", (micro_spec("a", steps=2), micro_spec("b", steps=2, seed=1)))
run_one(study.runs[0], out / "jobs" / "a", cpu_env(), corpus)
for name in ("SIGTERM", "SIGHUP"):
    SIGNAL = getattr(signal, name)
    try:
        runner.run_study(study, out, cpu_env(), corpus=corpus, launcher="local")
        print(name, "finished", flush=True)
    except runner.StudyInterrupted as e:
        print(name, "stopped:", e, flush=True)
    summary = json.loads((out / "jobs" / "summary.json").read_text())
    print(name, "summary:", [r["name"] for r in summary["runs"]], flush=True)
    print(name, "after:", signal.getsignal(SIGNAL) == signal.SIG_DFL, flush=True)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP")
def test_sigterm_and_sighup_while_waiting_for_local_jobs_stop_as_ctrl_c_does(tmp_path):
    # they ended the command at once (exit 143 / 129): no message, no summary, and the
    # local jobs ran on
    (tmp_path / "data.txt").write_text("".join(f"the {i}th line of a small corpus\n" for i in range(300)))
    (tmp_path / "child.py").write_text(_SIGNAL_SCRIPT)
    out = subprocess.run([sys.executable, str(tmp_path / "child.py"), str(tmp_path), str(tmp_path / "data.txt")],
                         env=subprocess_env(), capture_output=True, text=True, timeout=120)
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("SIGTERM", "SIGHUP"):
        assert any(line.startswith(f"{name} stopped: interrupted ({name}): the local jobs stopped too;")
                   for line in lines), out.stdout
        assert f"{name} summary: ['a']" in lines and f"{name} after: True" in lines, out.stdout
    assert lines.count("cancelled b") == 2, out.stdout  # the job, a child of this process, is stopped


# ------------------------------------------------------------------ the worker pool's progress view


def test_a_late_progress_message_of_an_ended_run_brings_back_no_bar(tmp_path):
    import queue

    specs = {"done": micro_spec("done", steps=8), "going": micro_spec("going", steps=8)}
    with Progress(disable=True) as progress:
        overall = progress.add_task("pool", total=16)
        bars, completed = {}, {"done": 8}
        messages = queue.Queue()
        for message in (("done", 0), ("done", 5), ("going", 3)):  # the first two: sent before "done" ended
            messages.put(message)
        runner._drain(messages, specs, bars, completed, progress, overall, {"done"})
        assert list(bars) == ["going"] and completed == {"done": 8, "going": 3}
        assert progress.tasks[0].completed == 11 and len(progress.tasks) == 2


def _raises_for_bad(spec, run_dir, keep_weights, index=-1):
    if spec.name == "bad":
        raise RuntimeError("bad broke")
    return {"name": spec.name}


def test_a_failed_runs_work_counts_in_full_in_the_pools_progress(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "ProcessPoolExecutor", _InlinePool)
    study = Study("pool", "one run fails", (micro_spec("bad", steps=6), micro_spec("ok", steps=4, seed=1)))
    done, failed = [], []
    with Progress(disable=True) as progress:
        runner._run_parallel(study, tmp_path, None, progress, lambda spec, result: done.append(spec.name),
                             lambda spec, error: failed.append(spec.name), False, 2, 1, target=_raises_for_bad)
    assert done == ["ok"] and failed == ["bad"]
    [overall] = progress.tasks  # no run's bar left behind
    assert overall.completed == overall.total == 10, overall.completed  # (it stayed at 4: the bar never filled)
    assert "1 done, 0 running, 1 failed of 2" in overall.description


# ------------------------------------------------------------------ jobs.json


def test_jobs_json_is_swapped_in_whole(tmp_path, monkeypatch):
    (tmp_path / "jobs.json").write_text(json.dumps({"old": {"job_id": "7", "launcher": "local"}}))
    jobs = []
    monkeypatch.setattr(cluster, "_submitit", lambda: SimpleNamespace(AutoExecutor=recording_executor(jobs)))

    class Killed(BaseException):
        pass

    real = Path.write_text

    def half_then_killed(self, text, *a, **k):
        real(self, text[: len(text) // 2], *a, **k)
        raise Killed  # stops the write part way, as a kill does (a real SIGKILL would leave the temporary file)

    monkeypatch.setattr(Path, "write_text", half_then_killed)
    with pytest.raises(Killed):
        cluster.submit([micro_spec("new")], tmp_path, "local", JobOptions(), data=None, ship_corpus=None,
                       dtype="fp32", keep_weights=False)
    monkeypatch.undo()
    assert cluster.read_jobs(tmp_path) == {"old": {"job_id": "7", "launcher": "local"}}  # the earlier records
    assert [p.name for p in tmp_path.iterdir()] == ["jobs.json"]  # (the temporary file removed on the way out)
    cluster.submit([micro_spec("new")], tmp_path, "local", JobOptions(), data=None, ship_corpus=None,
                   dtype="fp32", keep_weights=False)
    assert set(cluster.read_jobs(tmp_path)) == {"old", "new"}


# ------------------------------------------------------------------ finished runs outside the plan


def test_finished_runs_outside_the_plan_are_named_not_quietly_dropped(tmp_path, corpus, no_report):
    three = Study("seeds", "three seeds", tuple(micro_spec(f"cfg-s{s}", steps=2, seed=s) for s in range(3)))
    runner.run_study(three, tmp_path, cpu_env(), corpus=corpus, workers=1)
    shutil.copytree(tmp_path / "seeds" / "cfg-s2", tmp_path / "seeds" / "gone")  # a configuration dropped since
    one = Study("seeds", "one seed", three.runs[:1])
    with pytest.warns(RuntimeWarning, match=r"3 finished run\(s\) of 'seeds' in .* were not read \(cfg-s1, cfg-s2, "
                                            r"gone\): 2 of seeds outside this plan's \(--seeds 3 or more reads them\); "
                                            r"1 of configurations this plan does not have"):
        results, _ = runner.run_study(one, tmp_path, cpu_env(), corpus=corpus, report_only=True)
    assert [r["name"] for r in results] == ["cfg-s0"]
    assert _provenance(tmp_path)["runs_not_read"] == ["cfg-s1", "cfg-s2", "gone"]
    with pytest.warns(RuntimeWarning, match=r"3 finished run\(s\) of 'seeds'"):  # a study run reads the plan alone too
        runner.run_study(one, tmp_path, cpu_env(), corpus=corpus, workers=1)
    assert _provenance(tmp_path)["runs_not_read"] == ["cfg-s1", "cfg-s2", "gone"]


def _provenance(tmp_path):
    return json.loads((tmp_path / "seeds" / "summary.json").read_text())["provenance"]


def test_ctrl_c_while_the_report_is_written_says_the_runs_are_saved(tmp_path, corpus, monkeypatch):
    # a KeyboardInterrupt from the plots gave a traceback after every run had finished
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "write_report", interrupted)
    study = Study("rep", "stopped in the report", (micro_spec("r", steps=2),))
    with pytest.raises(runner.StudyInterrupted, match=r"while writing the report: the runs are finished and saved; "
                                                      r"`normlab study rep --report-only` writes"):
        runner.run_study(study, tmp_path, cpu_env(), corpus=corpus, workers=1)
    assert [r["name"] for r in _summary_of(tmp_path / "rep")["runs"]] == ["r"]


def _summary_of(study_dir):
    return json.loads((study_dir / "summary.json").read_text())


def test_the_gradient_probes_loss_is_not_finite_when_any_batch_was_not():
    # it reported the last batch's loss alone: a non-finite first batch left the probe
    # "not diverged"
    import math
    from types import SimpleNamespace

    import torch

    from normlab.studies import probes
    from normlab.studies.train import build_model

    spec = micro_spec("g")
    model = build_model(spec)
    tokens = torch.randint(0, 256, (2, 8))

    def loss(m, batch):
        out = m(tokens).float().mean()
        return (out * math.nan if batch == 0 else out), None

    task = SimpleNamespace(spec=SimpleNamespace(probe_batches=2), batch=lambda i, split, env: i, loss=loss)
    env = SimpleNamespace(autocast=lambda: torch.autocast("cpu", enabled=False))
    assert math.isnan(probes.gradients_at_init(model, task, env)["probe_loss"])


# ------------------------------------------------------------------ handlers installed outside Python


def test_a_signal_whose_handler_python_cannot_give_back_is_not_taken_over(monkeypatch):
    # signal.signal returns None for a handler installed outside Python (an embedding
    # program's): the study took such a signal over and, unable to restore it, left its
    # own handler (which raises KeyboardInterrupt) installed after the study ended
    from normlab.studies import train

    real = signal.getsignal
    monkeypatch.setattr(signal, "getsignal", lambda s: None if s == signal.SIGTERM else real(s))
    assert signal.SIGTERM not in runner._stop_signals()
    before = real(signal.SIGTERM)
    stop = train._StepBoundaryInterrupt([signal.SIGTERM])
    assert real(signal.SIGTERM) is before and stop._previous == {}
    stop.restore()
