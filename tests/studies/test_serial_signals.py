"""A study that runs one run after another (``--workers 1``) stops on SIGTERM and SIGHUP
as on Ctrl-C: the running run saves at the end of its step, the study exits 130 and the
next invocation resumes it. A signal the study was started with ignored (a shell's
background job ignores SIGINT) stays ignored."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from normlab.studies.spec import read_jsonl
from normlab.studies.train import run_holder
from tests.studies.helpers import subprocess_env

_SCRIPT = """
import sys
from pathlib import Path

import torch

from normlab.studies.data import ByteCorpus
from normlab.studies.runner import StudyInterrupted, run_study
from normlab.studies.spec import RunSpec, Study
from normlab.studies.train import Env, Interrupted

model = {"d_model": 16, "n_heads": 2, "d_ff": 32, "dropout": 0.0, "n_layers": 1}
steps = int(sys.argv[3])
runs = tuple(RunSpec(name=f"r{i}", model=model, seed=i, steps=steps, batch_size=2, seq_len=16, eval_every=0,
                     val_bytes=64, val_bytes_during=32, log_every=1, diag_every=0, checkpoint_every=0)
             for i in range(2))
try:
    results, _ = run_study(Study("serial", "one run after another", runs), Path(sys.argv[1]),
                           Env(device=torch.device("cpu")), corpus=ByteCorpus.from_path(sys.argv[2]), workers=1)
    print("finished", [r["name"] for r in results], flush=True)
except (Interrupted, StudyInterrupted) as e:
    print(e, flush=True)
    sys.exit(130)
"""


def _start(tmp_path: Path, steps: int, ignore_sigint: bool = False) -> subprocess.Popen:
    (tmp_path / "data.txt").write_text("".join(f"the {i}th line of a small corpus\n" for i in range(300)))
    (tmp_path / "study.py").write_text(_SCRIPT)
    env = subprocess_env()
    preexec = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
    return subprocess.Popen([sys.executable, str(tmp_path / "study.py"), str(tmp_path), str(tmp_path / "data.txt"),
                             str(steps)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=preexec)


def _wait_training(parent: subprocess.Popen, run_dir: Path, steps: int = 1) -> None:
    deadline = time.monotonic() + 60
    while len(read_jsonl(run_dir / "metrics.jsonl")) < steps:
        assert parent.poll() is None, parent.stdout.read()
        assert time.monotonic() < deadline, "the run did not start"
        time.sleep(0.05)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP")
@pytest.mark.parametrize("how", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_stop_a_serial_study_at_a_step_boundary_and_it_resumes(tmp_path, how):
    parent = _start(tmp_path, steps=1_000_000)
    run_dir = tmp_path / "serial" / "r0"
    try:
        _wait_training(parent, run_dir)
        os.kill(parent.pid, getattr(signal, how))
        rc = parent.wait(timeout=60)
        out = parent.stdout.read()
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.stdout.close()
    # before, the default disposition ended the process at once (rc -15 / -1): the run's
    # steps since its last checkpoint (here: every step, it keeps no periodic one) were lost
    assert rc == 130 and "interrupted in run 'r0'" in out and "state saved" in out, (rc, out)
    saved = json.loads((run_dir / "checkpoint" / "state.json").read_text())["step"]
    assert saved >= 1 and run_holder(run_dir) is None
    # every metrics record up to the saved step is kept; the run resumes there
    assert max(r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")) <= saved
    assert not (tmp_path / "serial" / "r1").exists()


def test_a_finite_serial_study_resumes_from_the_step_sigterm_saved(tmp_path):
    parent = _start(tmp_path, steps=40)
    run_dir = tmp_path / "serial" / "r0"
    try:
        _wait_training(parent, run_dir)
        os.kill(parent.pid, signal.SIGTERM)
        assert parent.wait(timeout=60) == 130
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.stdout.close()
    saved = json.loads((run_dir / "checkpoint" / "state.json").read_text())["step"]
    again = _start(tmp_path, steps=40)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0 and "finished ['r0', 'r1']" in out, out
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and len(steps) == 40 and saved < 40  # resumed, no step twice or missing


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a shell's background job")
def test_a_serial_study_started_with_sigint_ignored_runs_on_through_sigint(tmp_path):
    parent = _start(tmp_path, steps=1_000_000, ignore_sigint=True)
    run_dir = tmp_path / "serial" / "r0"
    try:
        _wait_training(parent, run_dir)
        os.kill(parent.pid, signal.SIGINT)  # a background job: the terminal's Ctrl-C is not for it
        seen = len(read_jsonl(run_dir / "metrics.jsonl"))
        _wait_training(parent, run_dir, seen + 3)  # it trains on
        assert parent.poll() is None and not (run_dir / "checkpoint").exists()
        os.kill(parent.pid, signal.SIGTERM)  # still stops it, saved
        assert parent.wait(timeout=60) == 130
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.stdout.close()
    assert json.loads((run_dir / "checkpoint" / "state.json").read_text())["step"] >= 1
