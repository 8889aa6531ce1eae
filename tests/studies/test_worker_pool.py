"""The worker pool when things go wrong: a worker killed mid-run (its run fails with the
signal named, the run it cut off resumes from its checkpoint, the others go on, and the
numbers equal one run after another), a pool that keeps breaking with no run to blame,
and Ctrl-C at the study's process (every worker stops at a step boundary and saves; the
next invocation resumes to the same numbers)."""

import functools
import json

import pytest

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
    # "a" runs: the pool ends "a" too, which resumes from its checkpoint in a new pool
    runs = (_spec("die", steps=14), _spec("a", seed=1, model={**MICRO, "placement": "post", "dropout": 0.1}),
            _spec("b", seed=2))
    with one_thread():
        straight, _ = runner.run_study(Study("ok", "serial", runs[1:]), tmp_path / "serial", cpu_env(), workers=1,
                                       corpus=corpus)
    _with_target(monkeypatch, worker_targets.killed_mid_run)
    pools = []

    class Recorded(runner.ProcessPoolExecutor):
        def submit(self, fn, spec, *args):
            if not pools or pools[-1][0] is not self:
                pools.append((self, []))
            pools[-1][1].append(spec.name)
            return super().submit(fn, spec, *args)

    monkeypatch.setattr(runner, "ProcessPoolExecutor", Recorded)
    results, report = runner.run_study(Study("crash", "a worker dies", runs), tmp_path / "pool", cpu_env(),
                                       workers=2, corpus=corpus)
    # the second pool got "a" (cut off by the first pool's end) and whatever had not finished
    assert [names for _, names in pools][0] == ["die", "a", "b"] and "a" in pools[1][1] and "die" not in pools[1][1]
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
    pools = []
    real = runner.ProcessPoolExecutor
    monkeypatch.setattr(runner, "ProcessPoolExecutor", lambda *a, **k: pools.append(1) or real(*a, **k))
    results, _ = runner.run_study(Study("sticky", "a CUDA error", runs), tmp_path / "pool", cpu_env(), workers=2,
                                  corpus=corpus)
    assert _losses(results) == _losses(straight)
    (failed,) = json.loads((tmp_path / "pool" / "sticky" / "summary.json").read_text())["failed"]
    assert failed["name"] == "bad" and "illegal memory access" in failed["error"] and "Traceback" in failed["error"]
    assert len(pools) == 2  # the worker retired and the pool started again


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
