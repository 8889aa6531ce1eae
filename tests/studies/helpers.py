"""What the study tests share: a micro model, a run spec builder, the CPU."""

import os
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from normlab.studies.spec import RunSpec
from normlab.studies.train import Env, Interrupted, run_one

MICRO = {"d_model": 16, "n_heads": 2, "d_ff": 32, "dropout": 0.0, "n_layers": 2}


def micro_spec(name="r", **kw) -> RunSpec:
    """A run of the micro model on short windows and a 4 KiB validation set; ``kw``
    overrides any field."""
    base = dict(name=name, model={**MICRO, "placement": "pre"}, steps=8, batch_size=4, seq_len=16, eval_every=4,
                eval_batches=1, val_bytes=4096, val_bytes_during=1024, log_every=1, diag_every=3,
                checkpoint_every=3, tags={"study": "warmup", "group": "pre"})
    base.update(kw)
    return RunSpec(**base)


def cpu_env() -> Env:
    return Env(device=torch.device("cpu"))


@contextmanager
def one_thread():
    """torch at one thread inside the block: a worker's or a job's thread count, so a run in
    this process is bit for bit theirs (another count sums in another order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def folder_files(folder):
    """Every file under ``folder`` with its bytes."""
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def ctrl_c_at(step, spec, run_dir, env, corpus):
    """Run ``spec`` and press Ctrl-C at the end of ``step``: it saves and stops."""
    def on_step(n):
        if n == step:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        run_one(spec, run_dir, env, corpus, on_step=on_step)


def recording_executor(jobs: list):
    """A stand-in for submitit's ``AutoExecutor`` that appends each job's arguments to
    ``jobs`` instead of running it."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    class Executor:
        def __init__(self, folder, cluster):
            pass

        def update_parameters(self, **kw):
            pass

        def batch(self):
            return nullcontext()

        def submit(self, fn, *args):
            jobs.append(args)
            return SimpleNamespace(job_id=str(len(jobs)))

    return Executor


def subprocess_env() -> dict[str, str]:
    """The environment of a child Python that runs this checkout's normlab and tests,
    one thread (a study script started as its own process, to signal or kill it)."""
    root = Path(__file__).resolve().parents[2]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)]), "OMP_NUM_THREADS": "1"}
