"""The worker pool when things go wrong: a worker killed mid-run (its run fails with the
signal named, the run it cut off resumes from its checkpoint, the others go on, and the
numbers equal one run after another), a pool that keeps breaking with no run to blame,
and Ctrl-C at the study's process (every worker stops at a step boundary and saves; the
next invocation resumes to the same numbers)."""

import functools
import json

import pytest
import torch

from normlab.studies import runner
from normlab.studies.spec import Study
from normlab.studies.train import Interrupted
from tests.studies import worker_targets
from tests.studies.helpers import MICRO, cpu_env, micro_spec, one_thread


def _spec(name, **kw):
    base = dict(steps=10, eval_every=5, diag_every=0, checkpoint_every=3, tags={"study": "norms", "group": "layernorm"})
    base.update(kw)
    return micro_spec(name, **base)


def _with_target(monkeypatch, target):
    monkeypatch.setattr(runner, "_run_parallel", functools.partial(runner._run_parallel, target=target))


def _losses(results):
    return {r["name"]: (r["final_train_loss"], r["final_val_loss"]) for r in results}


def test_a_worker_killed_mid_run_fails_that_run_and_the_others_resume(tmp_path, corpus, monkeypatch):
    # "die" is longest, so it starts first, beside "a"; it is killed at its step 2, while
    # "a" (40 steps) runs: the pool ends "a" too, which resumes from its checkpoint in a new pool
    runs = (_spec("die", steps=50), _spec("a", seed=1, steps=40, model={**MICRO, "placement": "post", "dropout": 0.1}),
            _spec("b", seed=2))
    with one_thread():
        straight, _ = runner.run_study(Study("ok", "serial", runs[1:]), tmp_path / "serial", cpu_env(), workers=1,
                                       corpus=corpus)
    _with_target(monkeypatch, worker_targets.killed_mid_run)
    pools = []

    class Recorded(runner.ProcessPoolExecutor):
        def submit(self, fn, *args):
            if fn is not runner._started:  # a run (not a worker's start)
                if not pools or pools[-1][0] is not self:
                    pools.append((self, []))
                pools[-1][1].append(args[0].name)
            return super().submit(fn, *args)

    monkeypatch.setattr(runner, "ProcessPoolExecutor", Recorded)
    results, report = runner.run_study(Study("crash", "a worker dies", runs), tmp_path / "pool", cpu_env(),
                                       workers=2, corpus=corpus)
    # a second pool got what the first one's end cut off ("a", 40 steps, as a rule; "b" where
    # "a" finished before "die" reached its step 2, as on a loaded machine), never "die"
    later = [name for _, names in pools[1:] for name in names]
    assert pools[0][1] == ["die", "a", "b"] and len(pools) <= 2 and "die" not in later
    assert set(later) <= {"a", "b"}
    assert _losses(results) == _losses(straight)  # bit for bit: one thread each, exact resume
    summary = json.loads((tmp_path / "pool" / "crash" / "summary.json").read_text())
    (failed,) = summary["failed"]
    assert failed["name"] == "die"
    assert "WorkerDied" in failed["error"] and "was killed by SIGKILL (often the out-of-memory killer)" in failed["error"]
    assert report.exists() and "Failed runs" in report.read_text()


def test_a_worker_whose_run_hit_a_sticky_cuda_error_retires(tmp_path, corpus, monkeypatch):
    # "bad" fails with its traceback as any run; its worker leaves at its next call (a real
    # CUDA context would fail every later call), the pool starts again and the rest finish
    runs = (_spec("bad", steps=14), _spec("a", seed=1), _spec("b", seed=2), _spec("c", seed=3))
    with one_thread():
        straight, _ = runner.run_study(Study("ok", "serial", runs[1:]), tmp_path / "serial", cpu_env(), workers=1,
                                       corpus=corpus)
    _with_target(monkeypatch, worker_targets.cuda_error_mid_run)
    results, _ = runner.run_study(Study("sticky", "a CUDA error", runs), tmp_path / "pool", cpu_env(), workers=2,
                                  corpus=corpus)
    assert _losses(results) == _losses(straight)
    (failed,) = json.loads((tmp_path / "pool" / "sticky" / "summary.json").read_text())["failed"]
    assert failed["name"] == "bad" and "illegal memory access" in failed["error"] and "Traceback" in failed["error"]


def test_a_poisoned_worker_retires_at_its_next_run(tmp_path, monkeypatch):
    # (whether the pool hands that worker another run depends on timing: the mechanism here)
    import multiprocessing as mp
    import queue as queue_module
    import threading

    ctx = mp.get_context("spawn")
    running, retired = ctx.Array("i", 2, lock=False), ctx.Array("b", 2, lock=False)

    class Exited(Exception):
        pass

    def fake_exit(code):
        raise Exited(code)

    monkeypatch.setattr(runner.os, "_exit", fake_exit)
    monkeypatch.setattr(runner, "_WORKER", {"queue": queue_module.Queue(), "stop": threading.Event(), "slot": 1, "corpus": None,
                                            "running": running, "retired": retired, "poisoned": True})
    with pytest.raises(Exited):
        runner._worker_run(_spec("next"), tmp_path / "next", False, 0)
    assert list(retired) == [0, 1] and list(running) == [0, 0] and not (tmp_path / "next").exists()
    runner._WORKER["poisoned"] = False
    sticky = RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(runner, "run_one", lambda *a, **k: (_ for _ in ()).throw(sticky))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        runner._worker_run(_spec("bad"), tmp_path / "bad", False, 0)
    assert runner._WORKER["poisoned"] and list(running) == [0, 0]
    runner._WORKER["poisoned"] = False
    monkeypatch.setattr(runner, "run_one", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory")))
    with pytest.raises(torch.OutOfMemoryError):
        runner._worker_run(_spec("oom"), tmp_path / "oom", False, 0)
    assert not runner._WORKER["poisoned"]  # out of memory leaves the context usable


def test_a_pool_that_breaks_with_no_run_to_blame_is_restarted_then_gives_up(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(runner, "POOL_RESTARTS", 1)
    _with_target(monkeypatch, worker_targets.killed_between_runs)
    runs = (_spec("die", steps=4), _spec("b", steps=4))
    results, _ = runner.run_study(Study("broken", "workers die", runs), tmp_path, cpu_env(), workers=2, corpus=corpus)
    summary = json.loads((tmp_path / "broken" / "summary.json").read_text())
    failed = {f["name"]: f["error"] for f in summary["failed"]}
    assert "die" in failed and "the worker pool broke 2 times without a run to blame" in failed["die"]
    # "b" either finished in a pool "die" broke after it, or was failed with it: never lost
    assert {r["name"] for r in results} | set(failed) == {"die", "b"}


def test_ctrl_c_stops_every_worker_saves_and_the_next_invocation_resumes(tmp_path, corpus, monkeypatch):
    runs = (_spec("first", steps=40), _spec("second", seed=1, steps=12), _spec("third", seed=2, steps=4),
            _spec("fourth", seed=3, steps=4))
    study = Study("stopped", "Ctrl-C", runs)
    with one_thread():
        straight, _ = runner.run_study(study, tmp_path / "serial", cpu_env(), workers=1, corpus=corpus)
    _with_target(monkeypatch, worker_targets.ctrl_c_at_step_3)
    with pytest.raises(Interrupted):
        runner.run_study(study, tmp_path / "pool", cpu_env(), workers=2, corpus=corpus)
    study_dir = tmp_path / "pool" / "stopped"
    saved = [r.name for r in runs if (study_dir / r.name / "checkpoint" / "model.safetensors").exists()]
    assert "first" in saved  # stopped after its step 3 with its state saved
    assert not all((study_dir / r.name / "result.json").exists() for r in runs)
    monkeypatch.undo()
    results, report = runner.run_study(study, tmp_path / "pool", cpu_env(), workers=2, corpus=corpus)
    assert _losses(results) == _losses(straight) and report.exists()


def test_workers_that_cannot_start_fail_every_run_at_once_with_the_error(tmp_path, corpus, monkeypatch):
    # workers pinned to a GPU this CPU build of torch has not: their initializer raises; the runs fail
    # with that error after one pool (not after restarts blaming an outside kill), and the
    # progress line counts them
    from rich.progress import Progress

    pools, failed = [], {}
    real = runner.ProcessPoolExecutor
    monkeypatch.setattr(runner, "ProcessPoolExecutor", lambda *a, **k: pools.append(1) or real(*a, **k))
    study = Study("nostart", "workers cannot start", (_spec("a", steps=2), _spec("b", steps=2)))
    with Progress(disable=True) as progress:
        runner._run_parallel(study, tmp_path, corpus, progress, lambda spec, result: None,
                             lambda spec, error: failed.__setitem__(spec.name, error), False, 2, 1,
                             devices=["cuda:0", "cuda:0"], target=worker_targets.cuda_set_device_fails)
    assert set(failed) == {"a", "b"} and len(pools) == 1
    for e in failed.values():
        assert isinstance(e, runner.WorkerStartFailed) and "_pin_worker" in str(e) and "set_device" in str(e), e
    assert "0 done, 0 running, 2 failed of 2" in progress.tasks[0].description


def test_the_stop_flag_is_shared_memory_without_a_lock():
    import multiprocessing as mp

    flag = runner._StopFlag(mp.get_context("spawn"))
    assert not flag.is_set()
    flag.set()
    assert flag.is_set() and not hasattr(flag._value, "get_lock")
