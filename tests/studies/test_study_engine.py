"""The study engine: the fixed validation set, runs side by side in worker processes
(equal to one after another), stopping a worker's run, the speed run, kept weights,
and norm options in the model config."""

import json
import math
import queue
import threading

import pytest
import torch

from normlab.models import TransformerConfig, TransformerLM
from normlab.studies import runner
from normlab.studies.data import fixed_windows
from normlab.studies.spec import RunSpec, Study
from normlab.studies.train import Env, Interrupted, Task, build_model, run_one
from tests.studies.helpers import MICRO, cpu_env, micro_spec, one_thread

_cpu = cpu_env


def _spec(name="r", **kw):
    """The shared micro run, shorter, without diagnostics or periodic checkpoints."""
    base = dict(steps=6, eval_every=3, diag_every=0, checkpoint_every=100,
                tags={"study": "norms", "group": "layernorm"})
    base.update(kw)
    return micro_spec(name, **base)


def test_fixed_windows_are_the_prefix_in_order():
    stream = torch.arange(100, dtype=torch.uint8)
    x, y = fixed_windows(stream, seq_len=8, max_bytes=40)
    assert x.shape == y.shape == (5, 8)
    assert torch.equal(x.flatten(), torch.arange(40))  # consecutive, non-overlapping, every byte once
    assert torch.equal(y.flatten(), torch.arange(1, 41))
    x_all, _ = fixed_windows(stream, seq_len=8, max_bytes=10**6)  # smaller split: all of it
    assert x_all.shape == (99 // 8, 8)


def test_validation_set_is_the_same_for_every_seed_and_at_least_256_kib(corpus):
    assert RunSpec(name="d", model={}).val_bytes >= 256 * 1024
    a, b = Task(_spec(seed=0), corpus), Task(_spec(seed=7), corpus)
    for final in (True, False):
        assert torch.equal(a.val_windows(final)[0], b.val_windows(final)[0])
    assert a.val_windows(True)[0].numel() == 4096 // 16 * 16
    assert torch.equal(a.val_windows(False)[0], a.val_windows(True)[0][: 1024 // 16])
    torch.manual_seed(0)
    model = build_model(_spec())
    ea, eb = a.evaluate(model, _cpu()), b.evaluate(model, _cpu())
    assert ea == eb  # the same model scores the same whatever the run's seed
    halves = (ea["val_loss_select"] + ea["val_loss_test"]) / 2
    assert halves == pytest.approx(ea["val_loss"], rel=1e-6)  # equal-sized halves average to the whole


def test_evaluation_matches_a_direct_cross_entropy(corpus):
    torch.manual_seed(0)
    model = build_model(_spec()).eval()
    task = Task(_spec(), corpus)
    x, y = task.val_windows(True)
    with torch.no_grad():
        direct = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    assert task.evaluate(model, _cpu())["val_loss"] == pytest.approx(direct, rel=1e-5)


def test_runs_evaluate_on_the_fixed_set_during_and_at_the_end(tmp_path, corpus):
    result = run_one(_spec(), tmp_path / "r", _cpu(), corpus)
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    evals = [m["step"] for m in records if "val_loss" in m]
    assert evals == [0, 3, 5]
    assert result["final_val_loss"] == records[-1]["val_loss"]
    assert {"final_val_loss_select", "final_val_loss_test"} <= set(result)


def test_weights_kept_or_not(tmp_path, corpus):
    from safetensors.torch import load_model

    kept = run_one(_spec(), tmp_path / "k", _cpu(), corpus)
    model = build_model(_spec())
    load_model(model, str(tmp_path / "k" / "model.safetensors"))
    task = Task(_spec(), corpus)
    assert task.evaluate(model, _cpu())["val_loss"] == pytest.approx(kept["final_val_loss"], rel=1e-6)
    dropped = run_one(_spec(), tmp_path / "d", _cpu(), corpus, keep_weights=False)
    assert not (tmp_path / "d" / "model.safetensors").exists() and "weights" not in dropped


@pytest.mark.parametrize("task", ["lm", "majority", "seq2seq"])
def test_kept_weights_rebuild_the_model_alone(tmp_path, corpus, task):
    # the file carries the model's class and config: load_model, normlab audit and
    # normlab convert read it without the run's spec
    from typer.testing import CliRunner

    from normlab.cli import app
    from normlab.models import load_model

    spec = _spec(task=task, steps=2, eval_every=2, diag_every=0, checkpoint_every=0)
    kept = run_one(spec, tmp_path / "k", _cpu(), corpus)
    model = load_model(tmp_path / "k" / "model.safetensors")
    assert type(model) is type(build_model(spec)) and model.cfg == build_model(spec).cfg
    assert Task(spec, corpus).evaluate(model, _cpu())["val_loss"] == pytest.approx(kept["final_val_loss"],
                                                                                   rel=1e-6)
    audited = CliRunner().invoke(app, ["audit", str(tmp_path / "k" / "model.safetensors")])
    assert audited.exit_code == 0 and f"no findings for {type(model).__name__}" in audited.output, audited.output


def _study(seeds=(0, 1)):
    runs = [_spec(f"n-{norm}-s{s}", seed=s, model={**MICRO, "placement": "pre", "norm": norm},
                  tags={"study": "norms", "group": norm}) for norm in ("layernorm", "rmsnorm") for s in seeds]
    runs.append(RunSpec(name="init-post", model={**MICRO, "placement": "post", "n_layers": 3}, kind="probe",
                        batch_size=4, seq_len=16, probe_batches=2, tags={"study": "grad-at-init", "group": "post"}))
    return Study("pool", "side by side", tuple(runs), claims=("rmsnorm-matches-layernorm",))


def test_workers_side_by_side_equal_one_after_another(tmp_path, corpus):
    # bit for bit at equal thread counts (a worker runs one thread; more threads change
    # the order of floating-point sums, by about 1e-9 relative)
    study = _study()
    with one_thread():
        serial, _ = runner.run_study(study, tmp_path / "one", _cpu(), workers=1, corpus=corpus)
    parallel, report = runner.run_study(study, tmp_path / "two", _cpu(), workers=2, corpus=corpus)
    assert [r["name"] for r in parallel] == [r.name for r in study.runs]  # study order, not finishing order
    for a, b in zip(serial, parallel):
        for key in ("final_val_loss", "final_train_loss", "probe_loss"):
            assert a.get(key) == b.get(key) or (math.isnan(a.get(key, 0.0)) and math.isnan(b.get(key, 0.0))), key
    prov = json.loads((tmp_path / "two" / "pool" / "summary.json").read_text())["provenance"]
    assert prov["workers"] == 2 and prov["threads"] >= 1
    assert report.exists()


def test_workers_must_be_positive_and_cpu_only(tmp_path, corpus):
    with pytest.raises(ValueError, match="--workers: expected >= 1, got 0"):
        runner.run_study(_study(), tmp_path, _cpu(), workers=0, corpus=corpus)
    with pytest.raises(ValueError, match="cannot combine with torchrun"):
        runner.run_study(_study(), tmp_path, Env(device=torch.device("cpu"), world=2), workers=2, corpus=corpus)


class _StopAt(queue.Queue):
    """A progress queue that raises the study's stop flag when a run reports step ``at``."""

    def __init__(self, stop, at):
        super().__init__()
        self.stop, self.at = stop, at

    def put(self, item, *a, **k):
        super().put(item, *a, **k)
        if item[1] >= self.at:
            self.stop.set()


def test_a_stopped_worker_run_saves_and_resumes_to_the_same_numbers(tmp_path, corpus, monkeypatch):
    spec = _spec("stopped", steps=12, model={**MICRO, "placement": "post", "dropout": 0.1})
    straight = run_one(spec, tmp_path / "a", _cpu(), corpus)
    stop = threading.Event()
    monkeypatch.setattr(runner, "_WORKER", {"corpus": corpus, "queue": _StopAt(stop, 4), "stop": stop})
    monkeypatch.setattr(runner.time, "monotonic", iter(range(0, 10**6, 10)).__next__)  # report every step
    with pytest.raises(Interrupted):
        runner._worker_run(spec, tmp_path / "b", True)
    assert (tmp_path / "b" / "checkpoint" / "model.safetensors").exists()
    assert runner._worker_run(spec, tmp_path / "c", True) is None  # stopped before it began: not run
    assert not (tmp_path / "c").exists()
    resumed = run_one(spec, tmp_path / "b", _cpu(), corpus)
    assert resumed["final_val_loss"] == straight["final_val_loss"]


def test_interrupted_survives_the_trip_from_a_worker():
    import pickle

    e = pickle.loads(pickle.dumps(Interrupted("run-a", 7)))
    assert isinstance(e, Interrupted) and e.run == "run-a" and e.step == 7 and "step 7" in str(e)


def test_speed_run_times_both_models_side_by_side(tmp_path, corpus):
    spec = RunSpec(name="speed", kind="speed", model={**MICRO, "placement": "pre", "norm": "rmsnorm"},
                   speed_against={"norm": "layernorm"}, steps=2, batch_size=4, seq_len=16, speed_rounds=4,
                   tags={"study": "norms", "group": "speed"})
    result = run_one(spec, tmp_path / "s", _cpu(), corpus)
    assert len(result["speed_ratios"]) == 4 and all(r > 0 for r in result["speed_ratios"])
    assert result["tokens_per_s"] > 0 and result["baseline_tokens_per_s"] > 0
    assert result["config"]["norm"] == "rmsnorm" and result["speed_against"] == {"norm": "layernorm"}
    from normlab.studies.claims import CLAIMS, judge

    (row,) = judge(CLAIMS["rmsnorm-faster"], [result])
    assert row["n_seeds"] == 4 and row["estimate"] == pytest.approx(
        sum(math.log(r) for r in result["speed_ratios"]) / 4)


def test_norm_options_reach_the_norm_and_are_checked():
    cfg = TransformerConfig(d_model=16, n_heads=2, norm="dyt", norm_options={"alpha_init": 2.0})
    alphas = {float(m.alpha.detach()) for m in TransformerLM(cfg).modules() if type(m).__name__ == "DyT"}
    assert alphas == {2.0}
    assert TransformerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="norm 'layernorm' refuses .*norm_options"):
        TransformerConfig(norm="layernorm", norm_options={"alpha_init": 1.0})
    with pytest.raises(ValueError, match="expected norm_options to be None or a dict"):
        TransformerConfig(norm_options=[("alpha_init", 1.0)])


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_run_is_reported_and_the_others_go_on(tmp_path, corpus, workers):
    good = _spec("good", seed=0)
    bad = _spec("bad", model={**MICRO, "n_heads": 3, "placement": "pre"})  # 16 is not divisible by 3
    study = Study("crash", "one run fails", (bad, good))
    results, report = runner.run_study(study, tmp_path, _cpu(), workers=workers, corpus=corpus)
    assert [r["name"] for r in results] == ["good"] and report.exists()
    summary = json.loads((tmp_path / "crash" / "summary.json").read_text())
    (failed,) = summary["failed"]
    assert failed["name"] == "bad" and "divisible" in failed["error"] and "Traceback" in failed["error"]
    html = report.read_text()
    assert "Failed runs" in html and "divisible" in html


def test_a_runs_model_settings_are_read_from_the_resolved_config():
    from normlab.studies.train import model_config, result_fields

    spec = RunSpec(name="defaults", model={"d_model": 16, "n_heads": 2, "d_ff": 32})  # n_layers etc. left to the config
    cfg, fields = model_config(spec), result_fields(spec)
    defaults = TransformerConfig(vocab_size=2, d_model=16, n_heads=2, d_ff=32)
    assert cfg.n_layers == defaults.n_layers and fields["n_layers"] == defaults.n_layers
    assert (fields["placement"], fields["norm"], fields["init"]) == (defaults.placement, defaults.norm, defaults.init)
    assert fields["d_model"] == 16 and cfg.max_seq_len == spec.seq_len


def test_the_update_probe_measures_a_change_quadratic_in_a_small_lr(tmp_path, corpus):
    """One Adam step moves every parameter by about lr: in the linear regime the output
    change ||dF||^2 scales as lr^2, and a model with no update does not change."""
    base = dict(model={**MICRO, "placement": "pre", "n_layers": 3}, kind="update", batch_size=4, seq_len=16,
                probe_batches=2, steps=0, tags={"study": "amplification", "group": "pre"})
    small = run_one(RunSpec(name="u1", lr=1e-6, **base), tmp_path / "u1", _cpu(), corpus)
    double = run_one(RunSpec(name="u2", lr=2e-6, **base), tmp_path / "u2", _cpu(), corpus)
    assert small["output_change_sq"] > 0 and small["output_sq"] > 0
    assert double["output_change_sq"] / small["output_change_sq"] == pytest.approx(4.0, rel=0.05)
    assert small["kind"] == "update" and small["n_layers"] == 3 and math.isfinite(small["probe_loss"])
    with pytest.raises(ValueError, match="kind 'update' measures the LM's stack output"):
        run_one(RunSpec(name="u3", lr=1e-6, **{**base, "task": "seq2seq"}), tmp_path / "u3", _cpu(), corpus)


def test_the_whole_models_noise_scale_matches_torch_func_per_example_gradients(corpus):
    """probes.total_noise_scale (one example at a time) against per-example gradients from
    torch.func (vmap over grad), and it leaves .grad and the RNG as they were."""
    from torch.func import functional_call, grad, vmap

    from normlab.diagnostics.noise_scale import gradient_noise_scale
    from normlab.studies.probes import total_noise_scale

    spec = _spec("g", model={**MICRO, "placement": "pre", "n_layers": 2}, batch_size=4)
    torch.manual_seed(0)
    model = build_model(spec)
    task = Task(spec, corpus)
    batch = task.batch(0, "train", _cpu())
    loss, _ = task.loss(model, batch)
    loss.backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    got = total_noise_scale(model, task, batch, _cpu())
    assert all(torch.equal(p.grad, before[n]) for n, p in model.named_parameters())
    assert torch.equal(torch.get_rng_state(), rng)

    params = {n: p.detach() for n, p in model.named_parameters()}

    def example_loss(ps, x, y):
        logits = functional_call(model, ps, (x[None],))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y)

    per = vmap(grad(example_loss), in_dims=(None, 0, 0), randomness="same")(params, batch["x"], batch["y"])
    n = batch["x"].shape[0]
    sq = sum(g.double().flatten(1).pow(2).sum(1) for g in per.values())
    batch_sq = sum(float(g.double().mean(0).pow(2).sum()) for g in per.values())
    want = gradient_noise_scale(sq / (n * n), batch_sq)
    assert got["gns_total_step"] == pytest.approx(want.b_simple, rel=1e-5)
    assert got["gns_total_g_sq"] == pytest.approx(want.g_sq, rel=1e-5)
    assert batch_sq == pytest.approx(sum(float(g.double().pow(2).sum()) for g in before.values()), rel=1e-5)


def test_the_pool_progress_line_says_the_timing_runs_come_after_it(tmp_path, corpus, monkeypatch):
    # the pool's count leaves the speed runs out ("of 303" where the study has 304): the
    # line says what follows the pool, so the two counts agree
    spec = RunSpec(name="speed", kind="speed", model={**MICRO, "placement": "pre", "norm": "rmsnorm"},
                   speed_against={"norm": "layernorm"}, steps=2, batch_size=4, seq_len=16, speed_rounds=2,
                   tags={"study": "norms", "group": "speed"})
    study = Study(name="pool", description="two runs and a timing", runs=(micro_spec("a", steps=2), micro_spec("b", steps=2), spec))
    lines = []
    counts = runner._counts
    monkeypatch.setattr(runner, "_counts", lambda *a, **k: lines.append(counts(*a, **k)) or lines[-1])
    runner.run_study(study, tmp_path, _cpu(), workers=2, corpus=corpus)
    pool = [line for line in lines if "workers" in line]
    assert pool and all(line.endswith("of 2 on 2 workers; then 1 timing run alone") for line in pool), pool


@pytest.mark.parametrize("norm", ["powernorm", "batchnorm"])
def test_the_whole_models_noise_scale_leaves_batch_statistics_as_they_were(corpus, norm):
    # each example's forward in training mode moved a batch-statistics norm's running
    # statistics (and PowerNorm's step count: 25 steps counted in 5), which changed the run
    from normlab.studies.probes import total_noise_scale

    spec = _spec("g", model={**MICRO, "placement": "pre", "n_layers": 2, "norm": norm}, batch_size=4)
    torch.manual_seed(0)
    model = build_model(spec)
    task = Task(spec, corpus)
    batch = task.batch(0, "train", _cpu())
    before = {n: b.clone() for n, b in model.named_buffers()}
    total_noise_scale(model, task, batch, _cpu())
    assert before and all(torch.equal(b, before[n]) for n, b in model.named_buffers())


def test_seq2seq_validation_loss_is_the_mean_over_its_tokens(corpus):
    # it was the mean of the batches' means: a token of a short batch weighed more than one
    # of a long batch, where training takes the mean over the tokens
    spec = _spec("s", task="seq2seq", eval_batches=4)
    torch.manual_seed(0)
    model = build_model(spec)
    task = Task(spec, corpus)
    got = task.evaluate(model, _cpu())
    total, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(4):
            s, n = task.loss_sum(model, task.batch(i, "val", _cpu()))
            total, tokens = total + s.item(), tokens + n
    assert got["val_loss"] == pytest.approx(total / tokens, rel=1e-12)
