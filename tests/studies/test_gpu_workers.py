"""GPU workers with a mocked CUDA (no GPU is needed): the plan of which GPU each worker
takes, the devices run_study hands the workers, a worker's pinning and the device and
dtype its runs get, and the options refused. Nothing here trains on a GPU."""

import json
import multiprocessing as mp
import queue
import threading

import pytest
import torch

from normlab.studies import runner
from normlab.studies.spec import Study
from normlab.studies.train import Env
from tests.studies.helpers import cpu_env, micro_spec


def _study(n=5):
    return Study(name="gpus", description="runs on GPUs", runs=tuple(micro_spec(f"r{i}", seed=i) for i in range(n)))


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA that answers with ``n`` GPUs (set ``fake_cuda.n``) and records set_device."""

    class Fake:
        n = 2
        set_devices: list[str] = []

    Fake.set_devices = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: Fake.n)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: Fake.set_devices.append(str(device)))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    return Fake


@pytest.fixture
def pool(monkeypatch):
    """Stands in for the worker pool: records what it was handed, trains nothing."""
    calls = []

    def fake(study, study_dir, corpus, progress, finish, fail, keep_weights, workers, threads, devices=None,
             dtype="fp32", then=""):
        calls.append({"runs": [r.name for r in study.runs], "workers": workers, "threads": threads,
                      "devices": list(devices), "dtype": dtype})

    monkeypatch.setattr(runner, "_run_parallel", fake)
    return calls


@pytest.fixture
def serial(monkeypatch):
    calls = []
    monkeypatch.setattr(runner, "_run_serial", lambda runs, title, study_dir, env, *a, **k: calls.append(env))
    return calls


def _cuda(index=None, **kw):
    return Env(device=torch.device("cuda", index) if index is not None else torch.device("cuda"), **kw)


def test_gpu_plan():
    assert runner.gpu_plan(2) == [0, 1]
    assert runner.gpu_plan(2, runs_per_gpu=2) == [0, 1, 0, 1]
    assert runner.gpu_plan(1, runs_per_gpu=3) == [0, 0, 0]
    assert runner.gpu_plan(4, workers=3) == [0, 1, 2]  # fewer workers than GPUs
    assert runner.gpu_plan(2, workers=5) == [0, 1, 0, 1, 0]  # round-robin
    with pytest.raises(ValueError, match="--runs-per-gpu: expected >= 1, got 0"):
        runner.gpu_plan(2, runs_per_gpu=0)
    with pytest.raises(ValueError, match="no GPU is visible"):
        runner.gpu_plan(0)
    with pytest.raises(ValueError, match="--workers: expected >= 1, got 0"):
        runner.gpu_plan(2, workers=0)


def test_auto_workers_are_the_gpus_times_runs_per_gpu(fake_cuda):
    assert runner.default_workers(_cuda()) == 2
    assert runner.default_workers(_cuda(), runs_per_gpu=3) == 6
    assert runner.default_workers(_cuda(1)) == 1  # --device cuda:1: that GPU alone
    assert runner.default_workers(_cuda(world=2)) == 1  # torchrun: one run at a time
    fake_cuda.n = 8
    assert runner.default_workers(_cuda()) == 8


@pytest.mark.parametrize("kw, devices", [
    ({}, ["cuda:0", "cuda:1"]),
    ({"runs_per_gpu": 2}, ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]),
    ({"workers": 3}, ["cuda:0", "cuda:1", "cuda:0"]),
    ({"runs_per_gpu": 4}, ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]),  # 8 workers for 5 runs: 5
])
def test_run_study_hands_each_worker_its_gpu(tmp_path, corpus, fake_cuda, pool, serial, kw, devices):
    results, report = runner.run_study(_study(), tmp_path, _cuda(dtype="bf16"), corpus=corpus, **kw)
    assert results == [] and report.exists() and serial == []  # the pool ran nothing
    (call,) = pool
    assert call["devices"] == devices and call["workers"] == len(devices) and call["dtype"] == "bf16"
    assert call["threads"] == max(1, torch.get_num_threads() // len(devices))
    assert sorted(call["runs"]) == [f"r{i}" for i in range(5)]
    prov = json.loads((tmp_path / "gpus" / "summary.json").read_text())["provenance"]
    assert prov["worker_devices"] == devices and prov["workers"] == len(devices) and prov["device"] == "Fake GPU"
    assert prov["runs_per_gpu"] == kw.get("runs_per_gpu")


def test_a_named_gpu_takes_every_worker_and_one_gpu_runs_one_by_one(tmp_path, corpus, fake_cuda, pool, serial):
    runner.run_study(_study(), tmp_path / "a", _cuda(1), corpus=corpus, workers=2)
    assert pool[-1]["devices"] == ["cuda:1", "cuda:1"]
    runner.run_study(_study(), tmp_path / "b", _cuda(1), corpus=corpus, runs_per_gpu=3)
    assert pool[-1]["devices"] == ["cuda:1"] * 3
    fake_cuda.n = 1
    runner.run_study(_study(), tmp_path / "c", _cuda(), corpus=corpus)
    assert len(pool) == 2 and [str(e.device) for e in serial] == ["cuda"]  # as before: in this process


def test_torchrun_still_runs_one_data_parallel_run_at_a_time(tmp_path, corpus, fake_cuda, pool, serial):
    env = Env(device=torch.device("cuda", 0), world=2)
    runner.run_study(_study(2), tmp_path, env, corpus=corpus)
    assert pool == [] and serial == [env]
    with pytest.raises(ValueError, match="--workers > 1 .* cannot combine with torchrun"):
        runner.run_study(_study(2), tmp_path, env, corpus=corpus, workers=2)
    with pytest.raises(ValueError, match="--runs-per-gpu cannot combine with torchrun"):
        runner.run_study(_study(2), tmp_path, env, corpus=corpus, runs_per_gpu=2)


def test_bad_gpu_worker_options_are_refused(tmp_path, corpus, fake_cuda, pool, serial):
    study = _study(2)
    with pytest.raises(ValueError, match="--runs-per-gpu: expected >= 1, got 0"):
        runner.run_study(study, tmp_path, _cuda(), corpus=corpus, runs_per_gpu=0)
    with pytest.raises(ValueError, match="--runs-per-gpu places runs on GPUs; the device is cpu"):
        runner.run_study(study, tmp_path, cpu_env(), corpus=corpus, runs_per_gpu=2)
    with pytest.raises(ValueError, match="--runs-per-gpu and --workers: give one"):
        runner.run_study(study, tmp_path, _cuda(), corpus=corpus, runs_per_gpu=2, workers=4)
    with pytest.raises(ValueError, match="--runs-per-gpu runs on this machine; it cannot combine with --launcher"):
        runner.run_study(study, tmp_path, _cuda(), corpus=corpus, runs_per_gpu=2, launcher="local")
    with pytest.raises(ValueError, match="--workers: expected >= 1, got 0"):
        runner.run_study(study, tmp_path, _cuda(), corpus=corpus, workers=0)
    with pytest.raises(ValueError, match="--workers > 1 runs on a CPU or CUDA GPUs, not on meta"):
        runner.run_study(study, tmp_path, Env(device=torch.device("meta")), corpus=corpus, workers=2)
    assert pool == [] and serial == []


def test_a_worker_takes_the_next_device_and_its_runs_use_it(tmp_path, fake_cuda, monkeypatch):
    slots = mp.get_context("spawn").Value("i", 0)
    plan = ("cuda:0", "cuda:1", "cuda:0")
    got = [str(runner._pin_worker(slots, plan)) for _ in range(4)]
    assert got == ["cuda:0", "cuda:1", "cuda:0", "cuda:0"]  # a fourth (restarted) worker wraps around
    assert fake_cuda.set_devices == got
    assert str(runner._pin_worker(None, ("cpu",))) == "cpu" and fake_cuda.set_devices == got  # a CPU: no CUDA

    seen = []

    def fake_run_one(spec, run_dir, env, corpus, on_step=None, keep_weights=True):
        seen.append(env)
        return {"name": spec.name}

    monkeypatch.setattr(runner, "run_one", fake_run_one)
    monkeypatch.setattr(runner, "_WORKER", {"corpus": None, "queue": queue.Queue(), "stop": threading.Event(),
                                            "device": torch.device("cuda:1"), "dtype": "bf16"})
    assert runner._worker_run(micro_spec("w"), tmp_path / "w", True) == {"name": "w"}
    assert seen[0].device == torch.device("cuda", 1) and seen[0].dtype == "bf16" and seen[0].world == 1


def test_the_cli_runs_per_gpu(tmp_path, fake_cuda, pool, monkeypatch):
    from typer.testing import CliRunner

    from normlab.cli import app

    def stop_before_training(*args, **kw):
        raise ValueError(f"stopped before training on {','.join(kw['devices'])}")

    monkeypatch.setattr(runner, "_run_parallel", stop_before_training)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 2000)
    env = {"COLUMNS": "200"}
    args = ["study", "quick", "--out", str(tmp_path / "out"), "--data", str(text)]
    out = CliRunner().invoke(app, [*args, "--device", "cuda", "--runs-per-gpu", "2"], env=env)
    assert out.exit_code == 2 and "stopped before training on cuda:0,cuda:1,cuda:0,cuda:1" in out.output, out.output
    out = CliRunner().invoke(app, [*args, "--device", "cuda", "--workers", "3"], env=env)
    assert "stopped before training on cuda:0,cuda:1,cuda:0" in out.output, out.output
    out = CliRunner().invoke(app, [*args, "--device", "cuda", "--workers", "auto"], env=env)
    assert "stopped before training on cuda:0,cuda:1" in out.output, out.output
    for extra, message in [(["--device", "cuda", "--runs-per-gpu", "0"], "--runs-per-gpu: expected >= 1, got 0"),
                           (["--device", "cpu", "--runs-per-gpu", "2"], "--runs-per-gpu places runs on GPUs"),
                           (["--workers", "many"], "--workers: expected a number or auto, got 'many'")]:
        out = CliRunner().invoke(app, [*args, *extra], env=env)
        assert out.exit_code == 2 and message in out.output, out.output
