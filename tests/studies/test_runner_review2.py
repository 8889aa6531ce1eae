"""What a study keeps when it outlives its terminal, is read on another machine, or
meets runs of an older version: signals the study was started with ignored stay
ignored; the default corpus, this Python's standard library, differs between Python
builds, and runs made on another one are reported (with a warning) but not resumed; a
model that changed under the same settings (the seq2seq target length) is refused,
never loaded part way; runs that raised stay failed in a later --report-only."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from normlab.studies import cluster, data, runner, train
from normlab.studies.data import ByteCorpus
from normlab.studies.runner import run_study
from normlab.studies.spec import RunSpec, Study, read_jsonl
from normlab.studies.train import Env, run_one
from tests.studies.helpers import (
    MICRO,
    cpu_env,
    ctrl_c_at,
    folder_files,
    micro_spec,
    recording_executor,
    subprocess_env,
)

# ------------------------------------------------------------------ signals the study was started with ignored


_IGNORED_SCRIPT = """
import os, signal, sys
from concurrent.futures import Future
from pathlib import Path

from rich.progress import Progress

from normlab.studies import runner
from normlab.studies.spec import Study
from tests.studies.helpers import micro_spec


class Pool:
    # runs each task at once, here; as the workers start, the terminal closes and Ctrl-C is pressed
    def __init__(self, max_workers, **kw):
        self._processes, self._started = {}, False

    def submit(self, fn, *args):
        f = Future()
        if fn is runner._started and not self._started:
            self._started = True
            print("SIGTERM handled:", callable(signal.getsignal(signal.SIGTERM)), flush=True)
            os.kill(os.getpid(), signal.SIGHUP)
            os.kill(os.getpid(), signal.SIGINT)
            f.set_result(os.getpid())
        elif fn is runner._started:
            f.set_result(os.getpid())
        else:
            f.set_result({"name": args[0].name})
        return f

    def shutdown(self, wait=True, cancel_futures=False):
        pass


runner.ProcessPoolExecutor = Pool
shown = {signal.SIG_IGN: "ignored", signal.SIG_DFL: "default"}
study = Study("s", "two runs", (micro_spec("a"), micro_spec("b", seed=1)))
for attempt in ("ignored", "SIGHUP handled"):
    if attempt != "ignored":
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
    done = []
    try:
        with Progress(disable=True) as progress:
            runner._run_parallel(study, Path(sys.argv[1]), None, progress, lambda s, r: done.append(s.name),
                                 lambda s, e: done.append(repr(e)), False, 2, 1)
        print(attempt, "finished", sorted(done), flush=True)
    except runner.StudyInterrupted:
        print(attempt, "stopped", flush=True)
    print(attempt, "after:", *(shown.get(signal.getsignal(s), "a handler") for s in (signal.SIGHUP, signal.SIGINT)),
          flush=True)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP")
def test_signals_the_study_was_started_with_ignored_stay_ignored(tmp_path):
    # nohup starts a command with SIGHUP ignored, a shell a background job with SIGINT
    # ignored: the study runs on when its terminal closes, or Ctrl-C is pressed there
    (tmp_path / "child.py").write_text(_IGNORED_SCRIPT)
    env = subprocess_env()

    def ignore():
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    out = subprocess.run([sys.executable, str(tmp_path / "child.py"), str(tmp_path)], env=env, preexec_fn=ignore,
                         capture_output=True, text=True, timeout=60)
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ignored finished ['a', 'b']" in lines, out.stdout
    assert "ignored after: ignored ignored" in lines, out.stdout
    # a signal not ignored still stops the study as Ctrl-C does, and its disposition comes back
    assert "SIGHUP handled stopped" in lines and "SIGHUP handled after: default ignored" in lines, out.stdout
    assert lines.count("SIGTERM handled: True") == 2, out.stdout


# ------------------------------------------------------------------ the default corpus under another Python


def _another_python(corpus):
    """The standard library of another Python build: the default corpus, other bytes."""
    return ByteCorpus(corpus.train[: -1000].clone(), corpus.val.clone(), "python-stdlib", corpus.n_files)


def test_runs_made_with_another_pythons_default_corpus_are_reported_with_a_warning(tmp_path, corpus, no_report):
    majority = micro_spec("m", task="majority", task_options={"classes": 4, "margin": 2}, steps=2, eval_every=1)
    study = Study("py", "made under another Python", (micro_spec("lm", steps=2), majority))
    first, _ = run_study(study, tmp_path, cpu_env(), corpus=corpus, workers=1)
    study_dir = tmp_path / study.name
    before = folder_files(study_dir)
    here = _another_python(corpus)
    # running: the runs would resume on other bytes; the error says why, and the ways on
    with pytest.raises(ValueError, match=r"made with other settings \(lm;.*this Python's standard library.*"
                                         r"lm: corpus: [0-9a-f]{12}, here [0-9a-f]{12}\).*Python they were made "
                                         r"with.*--data.*--overwrite.*--out.*version of normlab that split it"):
        run_study(study, tmp_path, cpu_env(), corpus=here, workers=1)
    assert folder_files(study_dir) == before
    # --report-only: reported as they were made, with a warning, and the provenance says so
    with pytest.warns(RuntimeWarning, match=r"1 finished run\(s\) were made on another corpus \(lm\).*standard "
                                            r"library"):
        reported, _ = run_study(study, tmp_path, cpu_env(), corpus=here, report_only=True)
    assert [r["name"] for r in reported] == ["lm", "m"]
    assert reported[0]["corpus_sha256"] == corpus.sha256() != here.sha256()
    # judged against the unigram baseline of the corpus they trained on, as reported before
    assert reported[0]["baseline_val_loss"] == first[0]["baseline_val_loss"]
    assert here.baselines(16, 4096)["baseline_val_loss"] != first[0]["baseline_val_loss"]
    prov = json.loads((study_dir / "summary.json").read_text())["provenance"]
    assert prov["runs_on_other_corpora"] == {corpus.sha256(): ["lm"]} and prov["not_finished"] == []
    assert prov["corpus_sha256"] == here.sha256()
    # a corpus given with --data says which runs are meant: another is refused, naming the field
    other = tmp_path / "other.txt"
    other.write_text("".join(f"line {i} of another corpus\n" for i in range(600)))
    with pytest.raises(ValueError, match=r"give the options they were made with.*lm: corpus: "):
        run_study(study, tmp_path, cpu_env(), corpus=ByteCorpus.from_path(other), report_only=True)
    with pytest.raises(ValueError, match=r"what differs: lm: dtype: 'fp32', here 'bf16'; m: dtype: 'fp32', "
                                         r"here 'bf16'"):
        run_study(study, tmp_path, Env(device=torch.device("cpu"), dtype="bf16"), corpus=corpus, workers=1)


def test_a_job_whose_corpus_is_not_the_studys_refuses_before_training(tmp_path, corpus, monkeypatch):
    # a compute node's Python has another standard library: its run would be made on other bytes
    with pytest.raises(ValueError, match=r"this job's corpus .* is not the study's .*this node's Python's standard "
                                         r"library.*--data"):
        cluster.run_in_job(micro_spec("r"), str(tmp_path / "r"), None, corpus, "fp32", "cpu", 1, False, "0" * 64)
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
    # the submitting command hands each job the sha256 of the corpus it read
    from types import SimpleNamespace

    jobs = []
    monkeypatch.setattr(cluster, "_submitit", lambda: SimpleNamespace(AutoExecutor=recording_executor(jobs)))
    data = tmp_path / "data.txt"
    data.write_text("".join(f"the {i}th line of a small corpus\n" for i in range(300)))
    run_study(Study("jobs", "jobs", (micro_spec("a"),)), tmp_path, cpu_env(), data=str(data), launcher="local",
              wait=False)
    assert [job[8] for job in jobs] == [ByteCorpus.from_path(data).sha256()]


# ------------------------------------------------------------------ a model that changed under the same settings


def test_a_seq2seq_checkpoint_of_the_shorter_target_is_refused_never_loaded(tmp_path, corpus, monkeypatch, no_report):
    spec = micro_spec("s", task="seq2seq", steps=6, checkpoint_every=100, diag_every=0)
    study = Study("s2s", "made before the target length changed", (spec,))
    run_dir = tmp_path / study.name / "s"
    with monkeypatch.context() as m:  # the version before: targets of 48 (too short for 1.7% of numbers)
        m.setattr(data, "longest_words", lambda max_value: 47)
        assert train.model_config(spec).max_seq_len == 48
        ctrl_c_at(2, spec, run_dir, cpu_env(), None)
    assert train.model_config(spec).max_seq_len == 51
    before = folder_files(run_dir)
    with pytest.raises(ValueError, match=r"\(s\): re-run .*what differs: s: model: max_seq_len 48, here 51; .*another "
                                         r"version of normlab"):
        run_study(study, tmp_path, cpu_env(), workers=1)
    # made before the model was recorded: its tensors tell
    state_path = run_dir / "checkpoint" / "state.json"
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps({k: v for k, v in state.items() if k != "model_config"}))
    before = folder_files(run_dir)
    for report_only in (False, True):
        with pytest.raises(ValueError, match=r"what differs: s: model: embed\.positions\.weight is \[48, 16\] in the "
                                             r"checkpoint, \[51, 16\] here"):
            run_study(study, tmp_path, cpu_env(), workers=1, report_only=report_only)
    assert folder_files(run_dir) == before
    # --overwrite (and run_one itself, as a job runs it): the run starts over, nothing loaded part way
    done, _ = run_study(study, tmp_path, cpu_env(), workers=1, overwrite=True)
    straight = run_one(spec, tmp_path / "straight", cpu_env(), None)
    assert done[0]["final_val_loss"] == straight["final_val_loss"] and done[0]["model_config"]["max_seq_len"] == 51
    assert read_jsonl(run_dir / "metrics.jsonl") == read_jsonl(tmp_path / "straight" / "metrics.jsonl")


def test_an_old_finished_seq2seq_result_is_refused_where_its_config_tells(tmp_path, corpus, no_report):
    spec = micro_spec("s", task="seq2seq", steps=2, diag_every=0)
    study = Study("old", "a result of the shorter target", (spec,))
    (done,), _ = run_study(study, tmp_path, cpu_env(), workers=1)
    path = tmp_path / study.name / "s" / "result.json"
    old = {k: v for k, v in done.items() if k != "model_config"}  # as results were written before it
    path.write_text(json.dumps({**old, "config": {**old["config"], "max_seq_len": 48}}))
    for report_only in (False, True):
        with pytest.raises(ValueError, match=r"what differs: s: model: max_seq_len 48, here 51"):
            run_study(study, tmp_path, cpu_env(), workers=1, report_only=report_only)
    # a config without a field added since, or a result that records no config, is taken as it is
    path.write_text(json.dumps({**old, "config": {k: v for k, v in old["config"].items() if k != "qk_norm_scope"}}))
    assert runner._finished(spec, path.parent, lambda s: train.run_identity(s, None, "fp32", "cpu"))
    identity = train.run_identity(spec, None, "fp32", "cpu")
    assert train.same_run({"fingerprint": spec.fingerprint()}, identity)
    assert train.run_differences({"fingerprint": spec.fingerprint(), "config": {"max_seq_len": 48}}, identity) == [
        "model: max_seq_len 48, here 51"]
    # a bad model setting leaves the model out: the run reports its error in its turn
    bad = RunSpec(name="x", model={**MICRO, "n_heads": 3})
    assert "model_config" not in train.run_identity(bad, None, "fp32", "cpu")


# ------------------------------------------------------------------ runs that raised, read again


def test_report_only_keeps_the_runs_that_raised_until_they_finish(tmp_path, corpus, monkeypatch, no_report):
    study = Study("f", "one run raises", (micro_spec("a", steps=2), micro_spec("b", steps=2, seed=1)))
    real = runner.run_one

    def raises(spec, *a, **k):
        if spec.name == "b":
            raise RuntimeError("out of memory, say")
        return real(spec, *a, **k)

    monkeypatch.setattr(runner, "run_one", raises)
    run_study(study, tmp_path, cpu_env(), corpus=corpus, workers=1)
    study_dir = tmp_path / study.name
    summary = json.loads((study_dir / "summary.json").read_text())
    assert [f["name"] for f in summary["failed"]] == ["b"]
    error = summary["failed"][0]["error"]
    run_study(study, tmp_path, cpu_env(), corpus=corpus, report_only=True)
    summary = json.loads((study_dir / "summary.json").read_text())
    assert [{k: f[k] for k in ("name", "error")} for f in summary["failed"]] == [{"name": "b", "error": error}]
    assert summary["failed"][0]["identity"]["fingerprint"] == study.runs[1].fingerprint()  # (whose failure)
    assert summary["provenance"]["not_finished"] == []  # failed, not merely unfinished
    # once it has finished (a job, a later command), it is no longer failed
    run_one(study.runs[1], study_dir / "b", cpu_env(), corpus)
    done, _ = run_study(study, tmp_path, cpu_env(), corpus=corpus, report_only=True)
    summary = json.loads((study_dir / "summary.json").read_text())
    assert [r["name"] for r in done] == ["a", "b"] and summary["failed"] == []


def test_report_only_on_the_default_corpus_refuses_runs_made_with_data(tmp_path, corpus, no_report):
    # runs made with --data are not "another Python's standard library": a report without
    # --data refuses them (it would judge them against this corpus's baseline), by the
    # runs' own record, or, for records older than it, by the last summary's
    mine = tmp_path / "mydata.txt"
    mine.write_text("".join(f"the {i}th line of my own corpus, quite unlike python\n" for i in range(3000)))
    study = Study("d", "made with --data", (micro_spec("lm", steps=2, eval_every=1),))
    run_study(study, tmp_path, cpu_env(), data=str(mine), workers=1)
    with pytest.raises(ValueError, match=r"the default corpus \(no --data\): False, here True"):
        run_study(study, tmp_path, cpu_env(), corpus=corpus, report_only=True)
    result_path = tmp_path / "d" / "lm" / "result.json"
    old = json.loads(result_path.read_text())
    del old["corpus_default"]  # as written before runs recorded it
    result_path.write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"made with --data .*mydata.*give the same --data"):
        run_study(study, tmp_path, cpu_env(), corpus=corpus, report_only=True)
    # with the same --data it is reported
    reported, _ = run_study(study, tmp_path, cpu_env(), data=str(mine), report_only=True)
    assert [r["name"] for r in reported] == ["lm"]


def test_metrics_log_the_lr_each_step_ran_at(tmp_path, corpus):
    # the record took the scheduler's lr after its step: the next step's, so a warm-up's
    # first step (lr/4 here) was never logged and every curve was one step early
    spec = micro_spec("w", steps=6, warmup_steps=4, lr=1e-2, eval_every=0, checkpoint_every=0, diag_every=0)
    run_one(spec, tmp_path / "w", cpu_env(), corpus, keep_weights=False)
    logged = [(m["step"], m["lr"]) for m in read_jsonl(tmp_path / "w" / "metrics.jsonl")]
    factor = train.lr_factor(spec)
    assert logged == [(s, pytest.approx(1e-2 * factor(s), rel=1e-12)) for s in range(6)]
    assert logged[0][1] == pytest.approx(2.5e-3) and logged[3][1] == pytest.approx(1e-2)


def test_seq2seq_training_keeps_the_targets_padding_out_of_batch_statistics():
    # the loss called the model without tgt_padding_mask: a batchnorm decoder took the
    # PAD positions after EOS (about a fifth of them) into its batch statistics
    from normlab.studies.data import PAD

    spec = RunSpec(name="s2s", model={**MICRO, "norm": "batchnorm", "dropout": 0.0}, task="seq2seq", batch_size=8)
    task = train.Task(spec, None)
    batch = task.batch(0, "train", cpu_env())
    assert (batch["tgt_in"] == PAD).any()
    torch.manual_seed(0)
    model = train.build_model(spec).train()
    total, n = task.loss_sum(model, batch)
    masked = model(batch["src"], batch["tgt_in"], src_padding_mask=batch["src_padding_mask"],
                   tgt_padding_mask=batch["tgt_in"] == PAD)
    want = torch.nn.functional.cross_entropy(masked.flatten(0, 1), batch["tgt_out"].flatten(), ignore_index=PAD,
                                             reduction="sum")
    torch.testing.assert_close(total, want, rtol=1e-6, atol=0)
    unmasked = model(batch["src"], batch["tgt_in"], src_padding_mask=batch["src_padding_mask"])
    assert not torch.allclose(unmasked, masked)  # (so the test tells the two apart)


def test_a_released_run_lock_names_no_process(tmp_path):
    # a finished run's .lock kept its worker's pid: "kill the worker of run X" from it
    # killed the worker's next run, or later an unrelated process
    lock = train.FolderLock(tmp_path)
    assert lock.acquire() is None
    assert (tmp_path / train.LOCK).read_text() == str(os.getpid())
    lock.release()
    assert (tmp_path / train.LOCK).read_text() == "" and train.run_holder(tmp_path) is None


def test_the_recorded_command_can_be_pasted_back(monkeypatch):
    import shlex

    monkeypatch.setattr(sys, "argv", ["/x/normlab/__main__.py", "study", "gns", "--out", "runs dir/é x"])
    assert runner._command_line() == "normlab study gns --out 'runs dir/é x'"
    assert shlex.split(runner._command_line())[-1] == "runs dir/é x"


def test_a_result_records_the_thread_counts_it_trained_at(tmp_path, corpus):
    spec = micro_spec("t", steps=6, eval_every=0, checkpoint_every=0, diag_every=0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ctrl_c_at(3, spec, tmp_path / "t", cpu_env(), corpus)
        torch.set_num_threads(2)
        result = run_one(spec, tmp_path / "t", cpu_env(), corpus, keep_weights=False)
        probe = run_one(micro_spec("p", kind="probe", probe_batches=1), tmp_path / "p", cpu_env(), corpus)
    finally:
        torch.set_num_threads(before)
    assert result["threads"] == [1, 2]
    assert probe["threads"] == [2]  # probe and timing runs record theirs too


def test_a_run_from_another_corpus_is_judged_against_its_own_baseline_without_a_summary(tmp_path, corpus,
                                                                                        no_report):
    # each LM result records the unigram baseline of its own validation set: a report read on
    # another Python's standard library, from a folder with no summary.json (runs merged in
    # from elsewhere), judges the run against it, not against the reporting machine's
    study = Study("py", "made under another Python", (micro_spec("lm", steps=2),))
    first, _ = run_study(study, tmp_path, cpu_env(), corpus=corpus, workers=1)
    study_dir = tmp_path / study.name
    stored = json.loads((study_dir / "lm" / "result.json").read_text())
    assert stored["baseline_val_loss"] == first[0]["baseline_val_loss"] == corpus.baselines(16, 4096)["baseline_val_loss"]
    (study_dir / "summary.json").unlink()
    here = _another_python(corpus)
    with pytest.warns(RuntimeWarning, match="made on another corpus"):
        reported, _ = run_study(study, tmp_path, cpu_env(), corpus=here, report_only=True)
    assert reported[0]["baseline_val_loss"] == first[0]["baseline_val_loss"]
    assert here.baselines(16, 4096)["baseline_val_loss"] != first[0]["baseline_val_loss"]


def test_a_folder_of_runs_from_two_corpora_is_refused_as_it_was(tmp_path, corpus, no_report):
    # two Pythons' runs merged into one folder: a claim would pair runs of different
    # validation sets by seed
    import shutil

    study = Study("py", "two corpora", (micro_spec("a", steps=2), micro_spec("b", steps=2)))
    run_study(study, tmp_path / "one", cpu_env(), corpus=corpus, workers=1)
    here = _another_python(corpus)
    run_study(study, tmp_path / "two", cpu_env(), corpus=here, workers=1)
    merged = tmp_path / "one" / study.name
    shutil.rmtree(merged / "b")
    shutil.copytree(tmp_path / "two" / study.name / "b", merged / "b")
    before = folder_files(merged)
    with pytest.raises(ValueError, match=r"holds LM runs made on 2 corpora \([0-9a-f]{12}: a; [0-9a-f]{12}: b; "
                                         r"this Python's is [0-9a-f]{12}\): a claim pairs runs by seed"):
        run_study(study, tmp_path / "one", cpu_env(), corpus=here, report_only=True)
    assert folder_files(merged) == before
