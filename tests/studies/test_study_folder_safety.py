"""A study's folder is safe to share and to damage: one writer at a time (folder and run
locks), damaged files start their run over instead of failing it forever, runs made with
other settings are never silently replaced or mixed, Ctrl-C and a full disk are told."""

import json
import os
import warnings

import pytest

from normlab.studies import runner
from normlab.studies.runner import StudyBusy, StudyInterrupted, _error_line, run_study
from normlab.studies.spec import Study, read_jsonl
from normlab.studies.train import FolderLock, Interrupted, RunBusy, run_holder, run_one
from tests.studies.helpers import cpu_env, ctrl_c_at, micro_spec


def _study(name="safe", steps=6, kinds=("train",)):
    runs = []
    for i, kind in enumerate(kinds):
        runs.append(micro_spec(f"r{i}", steps=steps, kind=kind, probe_batches=1))
    return Study(name, "folder safety", tuple(runs), claims=())


def _results(study_dir):
    return {r["name"]: r for r in json.loads((study_dir / "summary.json").read_text())["runs"]}


def test_a_second_study_on_the_same_folder_is_refused(tmp_path, corpus):
    study = _study()
    (tmp_path / study.name).mkdir()
    other = FolderLock(tmp_path / study.name)  # another study holds the folder
    assert other.acquire() is None
    try:
        with pytest.raises(StudyBusy, match=f"pid {os.getpid()}"):
            run_study(study, tmp_path, cpu_env(), corpus=corpus, workers=1)
        assert not (tmp_path / study.name / "r0").exists()  # nothing ran
        # --report-only only reads: it runs alongside
        run_study(study, tmp_path, cpu_env(), corpus=corpus, report_only=True)
    finally:
        other.release()
    run_study(study, tmp_path, cpu_env(), corpus=corpus, workers=1)  # free again: the lock went with its holder


def test_a_run_held_by_another_process_is_left_alone(tmp_path, corpus):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 0}\n')
    held = FolderLock(run_dir)
    assert held.acquire() is None
    try:
        assert run_holder(run_dir) == os.getpid()
        with pytest.raises(RunBusy, match="another process"):
            run_one(micro_spec("r"), run_dir, cpu_env(), corpus)
        assert (run_dir / "metrics.jsonl").read_text() == '{"step": 0}\n'  # untouched
    finally:
        held.release()
    assert run_holder(run_dir) is None
    assert run_one(micro_spec("r", steps=2), run_dir, cpu_env(), corpus)["steps"] == 2


def test_a_damaged_result_runs_again(tmp_path, corpus):
    study = _study()
    run_study(study, tmp_path, cpu_env(), corpus=corpus, workers=1)
    first = _results(tmp_path / study.name)["r0"]
    path = tmp_path / study.name / "r0" / "result.json"
    path.write_text(path.read_text()[:40])  # cut off
    run_study(study, tmp_path, cpu_env(), corpus=corpus, workers=1)
    again = _results(tmp_path / study.name)["r0"]
    assert again["final_val_loss"] == first["final_val_loss"]


@pytest.mark.parametrize("damage", ["state", "weights", "optimizer"])
def test_a_damaged_checkpoint_is_moved_aside_and_the_run_starts_over(tmp_path, corpus, damage):
    spec = micro_spec("d", steps=8, checkpoint_every=100)
    straight = run_one(spec, tmp_path / "a", cpu_env(), corpus)

    ctrl_c_at(3, spec, tmp_path / "b", cpu_env(), corpus)
    ckpt = tmp_path / "b" / "checkpoint"
    target = {"state": "state.json", "weights": "model.safetensors", "optimizer": "optimizer.pt"}[damage]
    data = (ckpt / target).read_bytes()
    (ckpt / target).write_bytes(data[: len(data) // 2])
    with pytest.warns(RuntimeWarning, match="cannot be read.*starts over"):
        resumed = run_one(spec, tmp_path / "b", cpu_env(), corpus)
    assert (tmp_path / "b" / "checkpoint.damaged" / target).exists()  # the user's file is kept
    assert resumed["final_val_loss"] == straight["final_val_loss"]
    steps = [m["step"] for m in read_jsonl(tmp_path / "b" / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[0] == 0  # one clean record per logged step


def test_a_cut_off_metrics_line_is_dropped_on_resume_and_in_the_report(tmp_path, corpus):
    spec = micro_spec("m", steps=8, checkpoint_every=100)
    straight = run_one(spec, tmp_path / "a", cpu_env(), corpus)

    ctrl_c_at(4, spec, tmp_path / "b", cpu_env(), corpus)
    metrics = tmp_path / "b" / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 4, "train_lo')  # a kill mid-write
    with pytest.warns(RuntimeWarning, match="skipped 1 damaged line"):
        run_one(spec, tmp_path / "b", cpu_env(), corpus)
    assert read_jsonl(metrics) == read_jsonl(tmp_path / "a" / "metrics.jsonl")
    assert straight["final_val_loss"] == json.loads((tmp_path / "b" / "result.json").read_text())["final_val_loss"]


def test_read_jsonl_skips_and_names_damaged_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 0}\nnot json\n[1, 2]\n\n{"step": 1}\n{"step": 2, "x"')
    with pytest.warns(RuntimeWarning, match=r"m.jsonl: skipped 3 damaged line\(s\) \(line 2, 3, 6\)"):
        assert read_jsonl(path) == [{"step": 0}, {"step": 1}]
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_runs_made_with_other_settings_are_refused_not_replaced(tmp_path, corpus):
    study = _study(steps=4)
    run_study(study, tmp_path, cpu_env(), corpus=corpus, workers=1)
    study_dir = tmp_path / study.name
    before = {p: p.read_bytes() for p in study_dir.rglob("*") if p.is_file()}
    changed = _study(steps=6)
    with pytest.raises(ValueError, match=r"holds 1 run\(s\) made with other settings \(r0.*--overwrite"):
        run_study(changed, tmp_path, cpu_env(), corpus=corpus, workers=1)
    with pytest.raises(ValueError, match="give the options they were made with"):
        run_study(changed, tmp_path, cpu_env(), corpus=corpus, report_only=True)
    after = {p: p.read_bytes() for p in study_dir.rglob("*") if p.is_file()}
    assert after == before  # nothing touched: results, metrics, summary
    run_study(changed, tmp_path, cpu_env(), corpus=corpus, workers=1, overwrite=True)
    result = _results(study_dir)["r0"]
    assert result["steps"] == 6
    assert max(m["step"] for m in read_jsonl(study_dir / "r0" / "metrics.jsonl")) == 5  # no 4-step records mixed in


def test_a_checkpoint_of_other_settings_counts_as_their_work(tmp_path, corpus):
    study = _study(steps=8)
    spec = study.runs[0]

    ctrl_c_at(3, spec.with_overrides(checkpoint_every=100), tmp_path / study.name / "r0", cpu_env(), corpus)
    with pytest.raises(ValueError, match="made with other settings"):
        run_study(study, tmp_path, cpu_env(), corpus=corpus, workers=1)


def test_ctrl_c_in_a_run_without_checkpoints_is_told_and_saves_the_summary(tmp_path, corpus, monkeypatch):
    study = _study(kinds=("train", "probe"))
    real = runner.run_one

    def run_one_then_ctrl_c(spec, *args, **kw):
        if spec.kind == "probe":
            raise KeyboardInterrupt
        return real(spec, *args, **kw)

    monkeypatch.setattr(runner, "run_one", run_one_then_ctrl_c)
    with pytest.raises(Interrupted, match="'r1', which keeps no checkpoint.*re-run the same command"):
        run_study(study, tmp_path, cpu_env(), corpus=corpus, workers=1)
    assert list(_results(tmp_path / study.name)) == ["r0"]  # the finished run is in the summary


def test_an_unwritable_summary_does_not_stop_the_runs(tmp_path, corpus, monkeypatch):
    study = _study(kinds=("train", "train"))
    real, calls = runner._write_summary, []

    def full_disk_once(*args, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real(*args, **kw)

    monkeypatch.setattr(runner, "_write_summary", full_disk_once)
    run_study(study, tmp_path, cpu_env(), corpus=corpus, workers=1)
    assert set(_results(tmp_path / study.name)) == {"r0", "r1"}
    assert not list((tmp_path / study.name).glob("*.tmp"))


def test_the_error_line_of_a_job_log():
    log = ("submitit INFO (2026-12-06) - Loading pickle: /x/jobs/12_submitted.pkl\n"
           "Traceback (most recent call last):\n  File \"x.py\", line 3, in f\n"
           "ValueError: RunSpec 'a': bad setting\n"
           "submitit ERROR - Submitted job triggered an exception\n")
    assert _error_line(log) == "ValueError: RunSpec 'a': bad setting"
    assert _error_line("just one line") == "just one line"
    assert issubclass(StudyInterrupted, Interrupted)


def test_a_failed_run_names_its_error_not_the_log_tail(tmp_path, corpus, monkeypatch, capsys):
    study = _study()

    def boom(spec, *a, **k):
        raise ValueError("bad setting")

    monkeypatch.setattr(runner, "run_one", boom)
    from rich.console import Console

    console = Console(width=200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_study(study, tmp_path, cpu_env(), corpus=corpus, workers=1, console=console)
    assert "run r0 failed: ValueError: bad setting" in capsys.readouterr().out


def test_a_checkpoint_swap_cut_off_between_its_renames_resumes(tmp_path, corpus):
    spec = micro_spec("swap", steps=8, checkpoint_every=2)
    straight = run_one(spec, tmp_path / "a", cpu_env(), corpus)

    ctrl_c_at(5, spec, tmp_path / "b", cpu_env(), corpus)
    run_dir = tmp_path / "b"
    assert not (run_dir / "checkpoint.old").exists()  # a whole swap leaves nothing aside
    (run_dir / "checkpoint").rename(run_dir / "checkpoint.old")  # killed after the first rename
    resumed = run_one(spec, run_dir, cpu_env(), corpus)
    assert resumed["final_val_loss"] == straight["final_val_loss"]
    assert read_jsonl(run_dir / "metrics.jsonl") == read_jsonl(tmp_path / "a" / "metrics.jsonl")
    assert not (run_dir / "checkpoint").exists() and not (run_dir / "checkpoint.old").exists()


def test_a_transient_read_error_keeps_the_checkpoint(tmp_path, corpus, monkeypatch):
    import errno

    import torch

    spec = micro_spec("t", steps=8, checkpoint_every=100)
    ctrl_c_at(4, spec, tmp_path / "r", cpu_env(), corpus)

    def flaky(*a, **k):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(torch, "load", flaky)
    with pytest.raises(OSError, match="Input/output"):
        run_one(spec, tmp_path / "r", cpu_env(), corpus)
    assert (tmp_path / "r" / "checkpoint" / "state.json").exists()
    assert not list(tmp_path.glob("r/checkpoint.damaged*"))


def test_damaged_checkpoints_are_kept_under_numbered_names(tmp_path, corpus):
    spec = micro_spec("n", steps=8, checkpoint_every=100)
    ctrl_c_at(3, spec, tmp_path / "r", cpu_env(), corpus)
    for expected in ("checkpoint.damaged", "checkpoint.damaged-2"):
        (tmp_path / "r" / "checkpoint" / "state.json").write_text("{")  # (starts over, saves at 3 again)
        with pytest.warns(RuntimeWarning, match="cannot be read"):
            ctrl_c_at(3, spec, tmp_path / "r", cpu_env(), corpus)
        assert (tmp_path / "r" / expected).is_dir()


def test_a_file_system_without_locks_warns_and_runs(tmp_path, monkeypatch):
    import errno
    import fcntl

    from normlab.studies import train

    monkeypatch.setattr(train, "_NO_LOCKS_TOLD", [])

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(RuntimeWarning, match="takes no locks"):
        assert FolderLock(tmp_path).acquire() is None


def test_a_job_whose_run_is_held_elsewhere_ends_without_failing(tmp_path, corpus):
    from normlab.studies.cluster import run_in_job

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    held = FolderLock(run_dir)
    assert held.acquire() is None
    try:
        assert run_in_job(micro_spec("r", steps=2), str(run_dir), None, corpus, "fp32", "cpu", 1, False) is None
    finally:
        held.release()


def test_the_cpu_allocators_out_of_memory_keeps_the_checkpoint(tmp_path, corpus, monkeypatch):
    import torch

    spec = micro_spec("o", steps=8, checkpoint_every=100)
    ctrl_c_at(4, spec, tmp_path / "r", cpu_env(), corpus)

    def oom(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")

    monkeypatch.setattr(torch, "load", oom)
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        run_one(spec, tmp_path / "r", cpu_env(), corpus)
    assert (tmp_path / "r" / "checkpoint" / "state.json").exists()


def test_no_locks_is_told_once_per_process(tmp_path, monkeypatch):
    import errno
    import fcntl
    import warnings

    from normlab.studies import train

    monkeypatch.setattr(train, "_NO_LOCKS_TOLD", [])

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in range(3):
            (tmp_path / str(k)).mkdir()
            assert FolderLock(tmp_path / str(k)).acquire() is None
    assert len([w for w in caught if "takes no locks" in str(w.message)]) == 1
