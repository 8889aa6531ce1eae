"""Studies end to end: plans build, a tiny study writes its report, resume equals an
uninterrupted run, 2-process DDP equals one process, divergence is recorded."""

import json
import math
import os
import signal
import socket

import pytest
import torch
import torch.multiprocessing as mp
from typer.testing import CliRunner

from normlab.cli import app
from normlab.studies.claims import CLAIMS
from normlab.studies.presets import get_study, preset_names
from normlab.studies.runner import apply_overrides, run_study
from normlab.studies.spec import RunSpec, Study
from normlab.studies.train import Env, Interrupted, Task, run_one
from tests.studies.helpers import MICRO, cpu_env, micro_spec

_spec, _cpu = micro_spec, cpu_env


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_plan_builds(name):
    study = get_study(name)
    assert study.runs and len({r.name for r in study.runs}) == len(study.runs)
    assert all(c in CLAIMS for c in study.claims)
    from normlab.studies.train import build_model

    first = {(r.kind, r.task): r for r in study.runs}
    for spec in first.values():  # the models of the preset build (cheaply: one of each kind and task)
        small = spec.with_overrides(model={**spec.model, "d_model": 16, "n_heads": 2, "d_ff": 32, "n_layers": 2})
        assert build_model(small) is not None
    assert {r.tags["study"] for r in get_study("quick").runs} == {"grad-at-init", "warmup", "depth", "norms",
                                                                  "init-depth", "amplification", "activations", "gns",
                                                                  "expressivity"}


def test_overrides_seeds_and_steps():
    base = get_study("norms")  # 3 seeds per configuration, and one speed run
    study = apply_overrides(base, seeds=2, steps=30)
    trained = [r for r in study.runs if r.kind == "train"]
    assert len(trained) == 2 * sum(r.kind == "train" for r in base.runs) // 3
    assert {r.seed for r in trained} == {0, 1}
    assert all(r.steps == 30 and r.eval_every <= 30 for r in trained)
    assert [r for r in study.runs if r.kind == "speed"] == [r for r in base.runs if r.kind == "speed"]


def test_tiny_study_end_to_end_writes_report(tmp_path, corpus, monkeypatch):
    runs = (
        RunSpec(name="init-post", model={**MICRO, "placement": "post", "n_layers": 3}, kind="probe",
                batch_size=4, seq_len=16, probe_batches=2, tags={"study": "grad-at-init", "group": "post"}),
        RunSpec(name="init-pre", model={**MICRO, "placement": "pre", "n_layers": 3}, kind="probe",
                batch_size=4, seq_len=16, probe_batches=2, tags={"study": "grad-at-init", "group": "pre"}),
        _spec("norms-layernorm", model={**MICRO, "placement": "pre", "norm": "layernorm"},
              tags={"study": "norms", "group": "layernorm"}),
        _spec("norms-rmsnorm", model={**MICRO, "placement": "pre", "norm": "rmsnorm"},
              tags={"study": "norms", "group": "rmsnorm"}),
        _spec("s2s", task="seq2seq", steps=3, eval_every=3, tags={"study": "other"}),
    )
    study = Study("tiny", "a tiny study", runs,
                  claims=("xiong-postln-grad-grows", "xiong-last-layer-larger", "rmsnorm-matches-layernorm"))
    monkeypatch.setattr("normlab.studies.runner.ByteCorpus.from_path", lambda *a, **k: corpus)
    results, report = run_study(study, tmp_path, _cpu(), workers=1)
    out = tmp_path / "tiny"
    full = json.loads((out / "summary.json").read_text())
    summary = full["runs"]
    assert [r["name"] for r in summary] == [r.name for r in runs]
    for key in ("name", "placement", "norm", "n_layers", "lr", "warmup_steps", "seed", "init", "steps",
                "final_train_loss", "final_val_loss", "diverged", "tokens_per_s", "config", "n_params"):
        assert all(key in r for r in summary), key
    for key in ("d_model", "n_layers", "n_heads", "d_ff", "placement", "norm", "lr", "warmup_steps", "batch_size",
                "seq_len", "steps", "activation", "positional", "init", "betas", "seed", "schedule", "optimizer"):
        assert all(key in r["config"] for r in summary), key
    prov = full["provenance"]
    for key in ("normlab_version", "git_commit", "torch_version", "python_version", "device", "threads",
                "corpus_sha256", "wall_s"):
        assert key in prov, key
    assert prov["corpus_sha256"] == corpus.sha256() and prov["torch_version"] == torch.__version__
    assert prov["git_commit"] is None or len(prov["git_commit"].split("-")[0]) == 40
    claims = json.loads((out / "claims.json").read_text())
    assert [c["id"] for c in claims][:1] == ["xiong-postln-grad-grows@L3"] and len(claims) == 3
    assert all(c["verdict"] in ("agrees", "disagrees", "inconclusive") for c in claims)
    ln = next(r for r in summary if r["name"] == "norms-layernorm")
    assert 0 < ln["final_val_loss"] < 6 and ln["tokens_per_s"] > 0 and not ln["diverged"]
    assert "final_val_exact_match" in next(r for r in summary if r["name"] == "s2s")
    probe = next(r for r in summary if r["name"] == "init-post")
    assert len(probe["grad_norms_by_layer"]["ffn_w2"]) == 3 and len(probe["activation_rms_by_layer"]) == 3
    metrics = [json.loads(line) for line in (out / "norms-layernorm" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(8))
    diag = [m for m in metrics if "grad_norms_by_layer" in m]
    assert [m["step"] for m in diag] == [0, 3, 6] and all("gns_step" in m for m in diag)
    html = report.read_text()
    assert report == out / "index.html"
    assert f"{ln['final_val_loss']:.3f}" in html and "Post-LN" in html and "data:image/png;base64," in html
    assert "corpus_sha256" in html and prov["corpus_sha256"] in html  # provenance in the header
    assert "claims agree" not in html and "95% CI" in html  # a claims table, no tally
    for c in claims:
        assert c["id"] in html
    for png in ("grad_by_layer.png", "loss_norms.png", "lr_norms.png", "norms.png"):
        assert (out / png).stat().st_size > 1000
    # final weights are kept, and load into the model they came from
    from safetensors.torch import load_file

    weights = load_file(out / "norms-layernorm" / "model.safetensors")
    assert ln["weights"] == "model.safetensors" and any(k.endswith("weight") for k in weights)
    # a second invocation finds every run finished and reproduces the summary
    again, _ = run_study(study, tmp_path, _cpu(), workers=1)
    trained = [r["name"] for r in results if r["kind"] == "train"]
    assert [r["final_val_loss"] for r in again if r["name"] in trained] == \
        [r["final_val_loss"] for r in results if r["name"] in trained]


def _final_state(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_ctrl_c_equals_uninterrupted_run(tmp_path, corpus):
    # dropout on, diagnostics (with the noise-scale EMA) every 3 steps, interrupted mid-run
    spec = _spec("resume", model={**MICRO, "placement": "post", "dropout": 0.1}, checkpoint_every=100,
                 steps=12, diag_every=3)
    straight = run_one(spec, tmp_path / "a", _cpu(), corpus)

    def ctrl_c_at_4(n):
        if n == 4:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C delivers

    with pytest.raises(Interrupted, match="step 4"):
        run_one(spec, tmp_path / "b", _cpu(), corpus, on_step=ctrl_c_at_4)
    assert (tmp_path / "b" / "checkpoint" / "model.safetensors").exists()
    assert not (tmp_path / "b" / "result.json").exists()
    resumed = run_one(spec, tmp_path / "b", _cpu(), corpus)
    a, b = _final_state(tmp_path / "a"), _final_state(tmp_path / "b")
    assert [m["step"] for m in a] == [m["step"] for m in b]
    assert [m["train_loss"] for m in a] == [m["train_loss"] for m in b]  # exact: same data, same masks
    assert [m.get("gns") for m in a] == [m.get("gns") for m in b]  # the EMA continues across the resume
    assert any(m.get("gns") for m in a[6:])
    for key in ("final_train_loss", "final_val_loss"):
        assert resumed[key] == straight[key], key
    assert not (tmp_path / "b" / "checkpoint").exists()  # cleaned once finished


def test_changed_settings_do_not_resume_a_stale_checkpoint(tmp_path, corpus):
    spec = _spec("stale")
    run_one(spec, tmp_path / "r", _cpu(), corpus)
    changed = spec.with_overrides(lr=3e-3)
    result = run_one(changed, tmp_path / "r", _cpu(), corpus)
    assert result["lr"] == 3e-3 and result["fingerprint"] == changed.fingerprint()


def test_divergence_is_recorded_not_raised(tmp_path, corpus, monkeypatch):
    real_loss = Task.loss_sum

    def poisoned(self, model, batch):
        loss, n = real_loss(self, model, batch)
        poisoned.calls += 1
        return (loss * float("nan") if poisoned.calls == 6 else loss), n

    poisoned.calls = 0
    monkeypatch.setattr(Task, "loss_sum", poisoned)
    result = run_one(_spec("div", diag_every=0), tmp_path / "d", _cpu(), corpus)
    assert result["diverged"] and result["diverged_step"] is not None and math.isnan(result["final_val_loss"])
    last = _final_state(tmp_path / "d")[-1]
    assert last.get("diverged") and last["step"] == result["diverged_step"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out, corpus_train, corpus_val, specs):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    from normlab.studies.data import ByteCorpus
    from normlab.studies.train import run_one, setup_env, teardown_env

    torch.set_num_threads(1)
    env = setup_env("cpu")
    corpus = ByteCorpus(corpus_train, corpus_val, "test", 1)
    for spec in specs:
        run_one(spec, out / spec.name, env, corpus)
    teardown_env(env)


def test_ddp_two_processes_match_one(tmp_path, corpus):
    # the LM (equal tokens per rank) and seq2seq (different non-pad token counts per rank:
    # the loss must be the mean over the global batch's tokens, not a mean of rank means)
    # masked BatchNorm and PowerNorm: statistics over the global batch (seq2seq: padded)
    specs = [_spec("ddp-lm", diag_every=0),
             _spec("ddp-s2s", task="seq2seq", steps=4, eval_every=4, diag_every=0),
             _spec("ddp-bn", task="seq2seq", steps=4, eval_every=4, diag_every=0,
                   model={**MICRO, "placement": "pre", "norm": "batchnorm"}),
             _spec("ddp-pn", steps=4, eval_every=4, diag_every=0,
                   model={**MICRO, "placement": "pre", "norm": "powernorm", "norm_options": {"warmup_iters": 2}})]
    for spec in specs:
        run_one(spec, tmp_path / "single" / spec.name, _cpu(), corpus)
    mp.start_processes(_ddp_worker, args=(2, _free_port(), tmp_path / "ddp", corpus.train, corpus.val, specs),
                       nprocs=2, start_method="spawn")
    for spec in specs:
        one, two = _final_state(tmp_path / "single" / spec.name), _final_state(tmp_path / "ddp" / spec.name)
        assert len(one) == len(two) == spec.steps
        for a, b in zip(one, two):
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5, abs=1e-6), spec.name


def test_batch_must_split_evenly_over_processes(tmp_path, corpus):
    env = Env(device=torch.device("cpu"), rank=0, world=3)
    with pytest.raises(ValueError, match="batch_size 4 does not split evenly over 3 processes"):
        run_one(_spec("uneven"), tmp_path / "u", env, corpus)


def test_study_cli_lists_and_rejects(tmp_path):
    runner = CliRunner()
    listed = runner.invoke(app, ["study", "--list"], env={"COLUMNS": "200"})
    assert listed.exit_code == 0 and "quick" in listed.output and "grad-at-init" in listed.output
    bad = runner.invoke(app, ["study", "nope", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "unknown study preset 'nope'" in " ".join(bad.output.split())
    missing = runner.invoke(app, ["study", "norms", "--steps", "2", "--data", str(tmp_path / "missing"),
                                  "--out", str(tmp_path)])
    assert missing.exit_code == 2 and "does not exist" in " ".join(missing.output.split())
