"""What a study keeps straight when its setting around the runs change or its process is
stopped: runs made on another corpus, dtype or device are refused like runs of other
settings (a checkpoint left aside by a cut-off swap too); the workers of a study whose
process is killed save and leave; Ctrl-C in a run's last step stops the study; a
resumed run's metrics survive a kill mid-rewrite; the seq2seq task fits every number
it draws; a folder whose files all hash into validation still splits; a job's device
follows the study's; repeated run names and runs of no steps are refused."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from normlab.studies import cluster, runner, train
from normlab.studies.cluster import JobOptions
from normlab.studies.data import ByteCorpus, NumberWords, _is_validation, number_to_words
from normlab.studies.runner import run_study
from normlab.studies.spec import RunSpec, Study, read_jsonl
from normlab.studies.train import Env, Interrupted, run_holder, run_one
from tests.studies.helpers import (
    MICRO,
    cpu_env,
    ctrl_c_at,
    folder_files,
    micro_spec,
    recording_executor,
    subprocess_env,
)


def _other_corpus(tmp_path):
    path = tmp_path / "other.txt"
    path.write_text("".join(f"line {i} of another corpus, not the standard library\n" for i in range(600)))
    return ByteCorpus.from_path(path)


# ------------------------------------------------------------------ the runs' data, dtype, device


def test_runs_made_on_another_corpus_dtype_or_device_are_refused(tmp_path, corpus, no_report):
    majority = micro_spec("m", task="majority", task_options={"classes": 4, "margin": 2}, steps=2, eval_every=1)
    study = Study("made", "made elsewhere", (micro_spec("lm", steps=2), majority))
    first, _ = run_study(study, tmp_path, cpu_env(), corpus=corpus, workers=1)
    assert (first[0]["corpus_sha256"], first[0]["dtype"], first[0]["device_type"]) == (corpus.sha256(), "fp32", "cpu")
    assert "corpus_sha256" not in first[1]  # the majority task draws its own data
    study_dir = tmp_path / study.name
    before = folder_files(study_dir)
    other = _other_corpus(tmp_path)
    # another --data: the LM run's numbers (and the baselines that judge them) are another corpus's
    with pytest.raises(ValueError, match=r"holds 1 run\(s\) made with other settings \(lm;.*--overwrite"):
        run_study(study, tmp_path, cpu_env(), corpus=other, workers=1)
    with pytest.raises(ValueError, match="give the options they were made with"):
        run_study(study, tmp_path, cpu_env(), corpus=other, report_only=True)
    with pytest.raises(ValueError, match=r"holds 2 run\(s\) made with other settings"):  # another --dtype
        run_study(study, tmp_path, Env(device=torch.device("cpu"), dtype="bf16"), corpus=corpus, workers=1)
    with pytest.raises(ValueError, match=r"holds 2 run\(s\) made with other settings"):  # another --device
        run_study(study, tmp_path, Env(device=torch.device("cuda")), corpus=corpus, workers=1)
    assert folder_files(study_dir) == before  # nothing touched
    # --overwrite: the LM run starts over on the other corpus; the majority run is found finished
    redone, _ = run_study(study, tmp_path, cpu_env(), corpus=other, workers=1, overwrite=True)
    assert redone[0]["corpus_sha256"] == other.sha256() and redone[1] == first[1]
    assert redone[0]["baseline_val_loss"] == other.baselines(16, 4096)["baseline_val_loss"]
    assert json.loads((study_dir / "summary.json").read_text())["provenance"]["runs_found_finished"] == 1


def test_a_checkpoint_made_on_another_corpus_is_refused_and_never_resumed(tmp_path, corpus):
    spec = micro_spec("r", steps=8, checkpoint_every=100)
    study = Study("ckpt", "a checkpoint of another corpus", (spec,))
    other = _other_corpus(tmp_path)
    ctrl_c_at(3, spec, tmp_path / study.name / "r", cpu_env(), corpus)
    with pytest.raises(ValueError, match="made with other settings"):
        run_study(study, tmp_path, cpu_env(), corpus=other, workers=1)
    # run_one itself starts such a run over: its records are the other corpus's alone
    straight = run_one(spec, tmp_path / "straight", cpu_env(), other)
    resumed = run_one(spec, tmp_path / study.name / "r", cpu_env(), other)
    assert resumed["final_val_loss"] == straight["final_val_loss"]
    assert read_jsonl(tmp_path / study.name / "r" / "metrics.jsonl") == read_jsonl(tmp_path / "straight" / "metrics.jsonl")


def test_a_checkpoint_of_other_settings_left_aside_is_refused(tmp_path, corpus):
    study = Study("aside", "a swap cut off", (micro_spec("r0", steps=8),))
    spec = study.runs[0].with_overrides(checkpoint_every=100)  # other settings
    run_dir = tmp_path / study.name / "r0"
    ctrl_c_at(3, spec, run_dir, cpu_env(), corpus)
    (run_dir / "checkpoint").rename(run_dir / "checkpoint.old")  # killed between the swap's two renames
    before = folder_files(run_dir)
    with pytest.raises(ValueError, match=r"made with other settings \(r0"):
        run_study(study, tmp_path, cpu_env(), corpus=corpus, workers=1)
    assert folder_files(run_dir) == before


# ------------------------------------------------------------------ the study's process stopped


_STUDY_SCRIPT = """
import sys
from pathlib import Path

import torch

from normlab.studies.data import ByteCorpus
from normlab.studies.runner import StudyInterrupted, run_study
from normlab.studies.spec import RunSpec, Study
from normlab.studies.train import Env

if __name__ == "__main__":
    model = {"d_model": 16, "n_heads": 2, "d_ff": 32, "dropout": 0.0, "n_layers": 1}
    runs = tuple(RunSpec(name=f"r{i}", model=model, seed=i, steps=1_000_000, batch_size=2, seq_len=16,
                         eval_every=0, val_bytes=64, val_bytes_during=32, log_every=1, diag_every=0,
                         checkpoint_every=0) for i in range(2))
    corpus = ByteCorpus.from_path(sys.argv[2])
    try:
        run_study(Study("long", "runs that do not end", runs), Path(sys.argv[1]), Env(device=torch.device("cpu")),
                  corpus=corpus, workers=2)
    except StudyInterrupted as e:
        print(e, flush=True)
        sys.exit(130)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_workers_save_and_leave_when_the_study_process_is_killed(tmp_path, how):
    (tmp_path / "data.txt").write_text("".join(f"the {i}th line of a small corpus\n" for i in range(300)))
    (tmp_path / "study.py").write_text(_STUDY_SCRIPT)
    env = subprocess_env()
    parent = subprocess.Popen([sys.executable, str(tmp_path / "study.py"), str(tmp_path), str(tmp_path / "data.txt")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dirs = [tmp_path / "long" / f"r{i}" for i in range(2)]
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not all(read_jsonl(d / "metrics.jsonl") for d in run_dirs):  # both runs are training
            assert parent.poll() is None, parent.stdout.read()
            assert time.monotonic() < deadline, "the runs did not start"
            time.sleep(0.05)
        workers = [int((d / ".lock").read_text()) for d in run_dirs]
        os.kill(parent.pid, how)
        rc = parent.wait(timeout=30)
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in workers), "the workers outlived the study's process"
        if how == signal.SIGTERM:  # as Ctrl-C: the study stops at a step boundary and says what it saved
            out = parent.stdout.read()
            assert rc == 130 and "interrupted: saved r" in out, out
        for d in run_dirs:  # each run saved its last step (it keeps no periodic checkpoint) and let go of its lock
            assert json.loads((d / "checkpoint" / "state.json").read_text())["step"] >= 1
            assert run_holder(d) is None
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        parent.stdout.close()


def test_ctrl_c_in_a_runs_last_step_keeps_it_and_stops_the_study(tmp_path, corpus, monkeypatch, no_report):
    study = Study("last", "Ctrl-C in the final evaluation", (micro_spec("a", steps=4), micro_spec("b", steps=4)))
    real, pressed = train.Task.evaluate, []

    def evaluate(self, model, env, final=True):
        if final and not pressed:  # Ctrl-C during the first run's final evaluation
            pressed.append(self.spec.name)
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, model, env, final)

    monkeypatch.setattr(train.Task, "evaluate", evaluate)
    with pytest.raises(Interrupted, match="'a'"):
        run_study(study, tmp_path, cpu_env(), corpus=corpus, workers=1)
    study_dir = tmp_path / study.name
    assert pressed == ["a"] and not (study_dir / "b").exists()  # the next run never started
    summary = json.loads((study_dir / "summary.json").read_text())
    assert [r["name"] for r in summary["runs"]] == ["a"]  # the finished run is kept, and counted
    assert not (study_dir / "a" / "checkpoint").exists()
    monkeypatch.setattr(train.Task, "evaluate", real)
    results, _ = run_study(study, tmp_path, cpu_env(), corpus=corpus, workers=1)
    assert [r["name"] for r in results] == ["a", "b"]
    assert results[0]["final_val_loss"] == summary["runs"][0]["final_val_loss"]


def test_ctrl_c_in_the_last_step_of_run_one_saves_the_result_then_raises(tmp_path, corpus):
    spec = micro_spec("r", steps=4)
    with pytest.raises(Interrupted, match="as it finished") as caught:
        run_one(spec, tmp_path / "r", cpu_env(), corpus, on_step=lambda n: n == 4 and os.kill(os.getpid(), signal.SIGINT))
    saved = json.loads((tmp_path / "r" / "result.json").read_text())
    assert caught.value.result == saved and caught.value.step == 4
    import pickle

    again = pickle.loads(pickle.dumps(caught.value))  # (raised in a worker, re-raised in the study's process)
    assert again.result == saved and str(again) == str(caught.value)
    assert run_one(spec, tmp_path / "r", cpu_env(), corpus) == saved  # finished: not run again


# ------------------------------------------------------------------ files and data


def test_truncating_the_metrics_keeps_every_record_if_killed_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": i, "train_loss": 1.0 / (i + 1)} for i in range(200)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))

    class Killed(BaseException):
        pass

    real_open = Path.open

    def open_then_die(self, mode="r", *a, **k):
        f = real_open(self, mode, *a, **k)
        if "w" not in mode:
            return f

        class HalfWritten:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

            def write(self, text):
                f.write(text[: len(text) // 2])
                f.flush()
                raise Killed  # as SIGKILL part way through the write

        return HalfWritten()

    monkeypatch.setattr(Path, "open", open_then_die)
    with pytest.raises(Killed):
        train._truncate_metrics(path, 99)
    monkeypatch.undo()
    assert read_jsonl(path) == records  # the file as it was: the resume redoes the cut
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left
    train._truncate_metrics(path, 99)
    assert read_jsonl(path) == records[:100]


def test_a_folder_whose_files_all_hash_into_validation_holds_out_its_tail(tmp_path):
    names = [n for n in (f"f{i}.txt" for i in range(2000)) if _is_validation(n, 5)][:2]
    for n in names:
        (tmp_path / n).write_text(f"the text of {n}\n" * 200)
    c = ByteCorpus.from_path(tmp_path)
    whole = b"\n".join((tmp_path / n).read_bytes() for n in sorted(names))
    assert c.n_files == 2 and c.train.numel() > 0 and c.val.numel() > 0
    assert bytes(c.train.tolist()) + bytes(c.val.tolist()) == whole


def test_number_words_fit_every_number_the_task_draws():
    from normlab.studies.data import longest_words

    task = NumberWords()
    longest = max(len(number_to_words(n)) for n in range(task.max_value + 1))
    assert longest + 2 <= task.tgt_len + 1  # BOS + words + EOS
    for step in range(50):  # (about one in four such batches held a number too long before)
        assert task.batch(16, seed=0, step=step)["tgt_out"].shape[1] == task.tgt_len
    # the longest form below a bound, against every number up to it
    best = 0
    for n in range(100_000):
        best = max(best, len(number_to_words(n)))
        if n < 2_000 or n % 997 == 0 or n == 99_999:
            assert longest_words(n) == best, n
    assert longest_words(999_999_999) == len(number_to_words(777_777_777)) == 100  # 27 bytes a group at most
    with pytest.raises(ValueError, match="tgt_len 10 is too short"):
        NumberWords(tgt_len=10)
    with pytest.raises(ValueError, match="src_len 3 is too short"):
        NumberWords(src_len=3)
    with pytest.raises(ValueError, match="max_value"):
        NumberWords(max_value=10**9)


# ------------------------------------------------------------------ settings refused


def test_repeated_run_names_and_training_runs_of_no_steps_are_refused():
    with pytest.raises(ValueError, match=r"Study 'dup': run name 'a' is given 2 times"):
        Study("dup", "two runs of one name", (micro_spec("a"), micro_spec("b"), micro_spec("a", seed=1)))
    with pytest.raises(ValueError, match=r"RunSpec 'z': steps must be >= 1 for a training run, got 0"):
        micro_spec("z", steps=0)
    assert micro_spec("p", kind="probe", steps=0).steps == 0  # a probe trains no step


def test_a_jobs_device_follows_the_study_and_its_gpus(tmp_path, corpus, monkeypatch, no_report):
    from types import SimpleNamespace

    jobs = []
    monkeypatch.setattr(cluster, "_submitit", lambda: SimpleNamespace(AutoExecutor=recording_executor(jobs)))
    runs = [micro_spec("a")]
    cluster.submit(runs, tmp_path, "local", JobOptions(gpus_per_run=1), data=None, ship_corpus=None, dtype="fp32",
                   keep_weights=False, device="cpu")
    cluster.submit(runs, tmp_path, "local", JobOptions(), data=None, ship_corpus=None, dtype="bf16",
                   keep_weights=False, device="cpu")
    assert [(job[4], job[5]) for job in jobs] == [("fp32", "cuda"), ("bf16", "cpu")]
    # --device cuda with jobs that get no GPU would train on their CPUs: refused, naming the options
    with pytest.raises(ValueError, match="--device cuda.*--gpus-per-run"):
        cluster.submit(runs, tmp_path, "local", JobOptions(), data=None, ship_corpus=None, dtype="fp32",
                       keep_weights=False, device="cuda")
    study = Study("jobs", "jobs on GPUs", tuple(runs))
    with pytest.raises(ValueError, match="--device cuda.*--gpus-per-run"):
        run_study(study, tmp_path, Env(device=torch.device("cuda")), corpus=corpus, launcher="local")
    assert not (tmp_path / "jobs" / "a").exists()
    # a GPU job's finished run counts as finished for a study submitted from a CPU-only machine
    run_one(runs[0], tmp_path / "gpu" / "jobs" / "a", Env(device=torch.device("cpu")), corpus)
    result_path = tmp_path / "gpu" / "jobs" / "a" / "result.json"
    result_path.write_text(json.dumps({**json.loads(result_path.read_text()), "device_type": "cuda"}))
    done, _ = run_study(study, tmp_path / "gpu", cpu_env(), corpus=corpus, launcher="local",
                        job_options=JobOptions(gpus_per_run=1))
    assert [r["name"] for r in done] == ["a"] and len(jobs) == 2  # nothing submitted
    summary = json.loads((tmp_path / "gpu" / "jobs" / "summary.json").read_text())
    assert summary["provenance"]["job_device"] == "cuda"
    with pytest.raises(ValueError, match="made with other settings"):  # the CPU jobs would not match it
        run_study(study, tmp_path / "gpu", cpu_env(), corpus=corpus, launcher="local")


def test_a_job_interrupted_as_its_run_finished_hands_back_the_result(tmp_path, corpus, monkeypatch):
    def interrupted(spec, run_dir, env, corpus, keep_weights=True):
        raise Interrupted(spec.name, spec.steps, result={"name": spec.name})

    monkeypatch.setattr(train, "run_one", interrupted)
    assert cluster.run_in_job(micro_spec("r"), str(tmp_path), None, corpus, "fp32", "cpu", 1, False) == {"name": "r"}
    monkeypatch.setattr(train, "run_one", lambda *a, **k: (_ for _ in ()).throw(Interrupted("r", 3)))
    with pytest.raises(Interrupted, match="at step 3"):  # cut off mid-run: the job is requeued or fails as before
        cluster.run_in_job(micro_spec("r"), str(tmp_path), None, corpus, "fp32", "cpu", 1, False)


def test_runs_recorded_without_their_corpus_dtype_or_device_are_taken_as_they_are():
    # the fingerprint is the spec's alone: runs finished before the corpus, dtype and device were
    # recorded keep theirs (and are taken as made here: nothing says otherwise); --report-only
    # (device None) reads runs of any device, so a CPU-only machine reports a GPU study
    spec = RunSpec(name="x", model={**MICRO})
    found = {"fingerprint": spec.fingerprint()}
    assert train.same_run(found, train.run_identity(spec, None, "bf16", "cuda"))
    assert not train.same_run({**found, "dtype": "fp32"}, train.run_identity(spec, None, "bf16", "cuda"))
    assert train.same_run({**found, "device_type": "cuda"}, train.run_identity(spec, None, "fp32", None))
    assert runner._finished(spec, Path("/nonexistent")) is False
