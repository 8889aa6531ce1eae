"""GPU workers on a real GPU (skipped without CUDA; `benchmarks/gpu_check.sh` runs them):
several runs per GPU give the numbers of one run after another, a worker killed mid-run
fails its run alone and the cut-off runs resume, and Ctrl-C with GPU workers saves and
resumes. The CPU versions of these tests (bit for bit) are in test_worker_pool.py and
test_study_engine.py; on a GPU the numbers are compared with a tolerance, since some of
cuda's backward kernels (the embedding's) sum with atomics, in no fixed order."""

import functools
import json

import pytest
import torch

from normlab.studies import runner
from normlab.studies.spec import Study
from normlab.studies.train import Env, Interrupted
from tests.studies import worker_targets
from tests.studies.helpers import MICRO, micro_spec

pytestmark = pytest.mark.gpu


def _spec(name, **kw):
    base = dict(steps=10, eval_every=5, diag_every=0, checkpoint_every=3, tags={"study": "norms", "group": "layernorm"})
    base.update(kw)
    return micro_spec(name, **base)


def _cuda():
    return Env(device=torch.device("cuda"))


def _close(results, straight):
    got = {r["name"]: (r["final_train_loss"], r["final_val_loss"]) for r in results}
    want = {r["name"]: (r["final_train_loss"], r["final_val_loss"]) for r in straight}
    assert got.keys() == want.keys()
    for name in got:
        torch.testing.assert_close(torch.tensor(got[name]), torch.tensor(want[name]), rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"run {name}: {m}")


def test_runs_per_gpu_match_one_after_another(tmp_path, corpus):
    runs = tuple(_spec(f"r{i}", seed=i, model={**MICRO, "placement": "post" if i % 2 else "pre"}) for i in range(4))
    study = Study("gpu-pool", "side by side on one GPU", runs)
    straight, _ = runner.run_study(study, tmp_path / "one", _cuda(), workers=1, corpus=corpus)
    results, report = runner.run_study(study, tmp_path / "two", _cuda(), runs_per_gpu=2, corpus=corpus)
    _close(results, straight)
    prov = json.loads((tmp_path / "two" / "gpu-pool" / "summary.json").read_text())["provenance"]
    assert prov["workers"] == 2 * torch.cuda.device_count() or prov["workers"] == len(runs)
    assert all(d.startswith("cuda:") for d in prov["worker_devices"]) and report.exists()


def test_a_gpu_worker_killed_mid_run_fails_that_run_alone(tmp_path, corpus, monkeypatch):
    runs = (_spec("die", steps=14), _spec("a", seed=1), _spec("b", seed=2))
    straight, _ = runner.run_study(Study("ok", "serial", runs[1:]), tmp_path / "one", _cuda(), workers=1,
                                   corpus=corpus)
    monkeypatch.setattr(runner, "_run_parallel",
                        functools.partial(runner._run_parallel, target=worker_targets.killed_mid_run))
    results, _ = runner.run_study(Study("crash", "a GPU worker dies", runs), tmp_path / "pool", _cuda(),
                                  runs_per_gpu=2, corpus=corpus)
    _close(results, straight)
    (failed,) = json.loads((tmp_path / "pool" / "crash" / "summary.json").read_text())["failed"]
    assert failed["name"] == "die" and "SIGKILL" in failed["error"]


def test_ctrl_c_with_gpu_workers_saves_and_resumes(tmp_path, corpus, monkeypatch):
    runs = (_spec("first", steps=40), _spec("second", seed=1, steps=12), _spec("third", seed=2, steps=4))
    study = Study("stopped", "Ctrl-C on GPU workers", runs)
    straight, _ = runner.run_study(study, tmp_path / "one", _cuda(), workers=1, corpus=corpus)
    monkeypatch.setattr(runner, "_run_parallel",
                        functools.partial(runner._run_parallel, target=worker_targets.ctrl_c_at_step_3))
    with pytest.raises(Interrupted):
        runner.run_study(study, tmp_path / "pool", _cuda(), runs_per_gpu=2, corpus=corpus)
    assert (tmp_path / "pool" / "stopped" / "first" / "checkpoint" / "model.safetensors").exists()
    monkeypatch.undo()
    results, _ = runner.run_study(study, tmp_path / "pool", _cuda(), runs_per_gpu=2, corpus=corpus)
    _close(results, straight)
