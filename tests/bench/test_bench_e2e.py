"""``normlab bench e2e --quick --json`` on a tiny model through Typer's CliRunner: the
records' fields and values are sane (no timing thresholds)."""

from __future__ import annotations

import json
import math

import torch
from typer.testing import CliRunner

from normlab.cli import app

FIELDS = {"step", "placement", "norm", "d_model", "n_layers", "n_heads", "batch", "seq_len",
          "vocab_size", "params", "dtype", "impl", "backend", "compiled", "device", "median_ms",
          "tokens_per_s", "ratio_vs_torch", "ratio_vs_torch_norms", "reps", "torch_version", "load_avg"}


def test_bench_e2e_quick_json(tmp_path):
    threads = torch.get_num_threads()
    try:  # one thread: a second one only waits for a busy core on a shared machine
        result = CliRunner().invoke(app, [
            "bench", "e2e", "--device", "cpu", "--dtype", "fp32", "--quick", "--json", "--threads", "1",
            "--d-model", "32", "--n-layers", "2", "--tokens", "16", "--batch", "2", "--out", str(tmp_path),
        ])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    # 2 placements x 2 norms x 2 steps x 3 impls (compile off by default on CPU)
    assert len(records) == 24
    assert {(r["placement"], r["norm"], r["step"], r["impl"]) for r in records} == {
        (p, n, s, i) for p in ("pre", "post") for n in ("layernorm", "rmsnorm")
        for s in ("train", "infer") for i in ("normlab", "torch", "torch norms")}
    for r in records:
        assert FIELDS <= set(r)
        assert (r["d_model"], r["n_layers"], r["seq_len"], r["batch"]) == (32, 2, 16, 2)
        assert r["dtype"] == "float32" and r["params"] > 0 and r["reps"] > 0
        assert r["torch_version"] == torch.__version__ and "cores" in r["device"]
        assert r["backend"] == "torch" and r["compiled"] is False  # CPU: auto runs the torch path
        assert r["median_ms"] > 0 and r["tokens_per_s"] > 0
        assert math.isclose(r["tokens_per_s"], 2 * 16 / (r["median_ms"] * 1e-3), rel_tol=1e-3)
        assert len(r["load_avg"].split(",")) == 3 or r["load_avg"] == "n/a"
        if r["impl"] == "torch":
            assert r["ratio_vs_torch"] == 1.0
    by_key = {(r["placement"], r["norm"], r["step"], r["impl"]): r for r in records}
    for (p, n, s, _impl), r in by_key.items():
        torch_ms = by_key[(p, n, s, "torch")]["median_ms"]
        assert math.isclose(r["ratio_vs_torch"], torch_ms / r["median_ms"], rel_tol=1e-2)
        torch_norms_ms = by_key[(p, n, s, "torch norms")]["median_ms"]
        assert math.isclose(r["ratio_vs_torch_norms"], torch_norms_ms / r["median_ms"], rel_tol=1e-2)
    for suffix in ("csv", "md"):
        assert (tmp_path / f"e2e-cpu-fp32.{suffix}").stat().st_size > 0
    md = (tmp_path / "e2e-cpu-fp32.md").read_text()
    assert md.startswith("# normlab bench e2e: ") and torch.__version__ in md and "Load average" in md
    assert "| train | pre | rmsnorm | 32 | 1 | 2 | 128 | 2 x 16 |" in md  # d_model, heads, layers, vocab
    assert len((tmp_path / "e2e-cpu-fp32.csv").read_text().splitlines()) == 25


def test_torch_norms_baseline_is_the_same_model():
    """The baseline swaps normlab's norms for torch's own modules, parameters kept: the
    same logits and gradients, and not one normlab norm left."""
    import normlab
    from normlab.bench.e2e import with_torch_norms
    from normlab.models import TransformerConfig, TransformerLM

    for placement, norm in (("pre", "layernorm"), ("post", "rmsnorm"), ("sandwich", "layernorm")):
        torch.manual_seed(0)
        model = TransformerLM(TransformerConfig(vocab_size=50, d_model=16, n_heads=2, n_layers=2, max_seq_len=8,
                                                norm=norm, placement=placement, dropout=0.0))
        baseline = with_torch_norms(model)
        assert not any(isinstance(m, (normlab.LayerNorm, normlab.RMSNorm)) for m in baseline.modules())
        assert any(type(m).__module__ == "normlab.bench.e2e" for m in baseline.modules())
        tokens = torch.randint(0, 50, (2, 8))
        a, b = model(tokens), baseline(tokens)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        a.square().mean().backward()
        b.square().mean().backward()
        for (name, p), q in zip(model.named_parameters(), baseline.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bench_e2e_rejects_fp16():
    result = CliRunner().invoke(app, ["bench", "e2e", "--device", "cpu", "--dtype", "fp16"])
    assert result.exit_code != 0 and "fp32" in result.output


def test_an_interrupted_e2e_run_keeps_its_rows_marked_partial(tmp_path, monkeypatch):
    import normlab.bench.e2e as be
    from tests.bench.helpers import ctrl_c_on_call

    ctrl_c_on_call(monkeypatch, be, "measure")
    threads = torch.get_num_threads()
    try:
        result = CliRunner().invoke(app, [
            "bench", "e2e", "--device", "cpu", "--dtype", "fp32", "--quick", "--threads", "1",
            "--d-model", "32", "--n-layers", "1", "--tokens", "8", "--batch", "2", "--out", str(tmp_path),
        ])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 130, result.output
    assert "interrupted: kept the 6 rows" in result.output  # one configuration: 2 steps x 3 impls
    md = (tmp_path / "e2e-cpu-fp32.md").read_text()
    assert "**Partial: the run stopped before measuring all 4 configurations**" in md
    assert md.count("| train |") + md.count("| infer |") == 6


def test_bench_e2e_configs_measures_only_the_pairs_asked_for(tmp_path):
    # (the GPU check runs the compiled Pre-LN pairs alone, in what is left of its budget)
    threads = torch.get_num_threads()
    try:
        result = CliRunner().invoke(app, [
            "bench", "e2e", "--device", "cpu", "--quick", "--json", "--threads", "1", "--d-model", "32",
            "--n-layers", "1", "--tokens", "8", "--batch", "2", "--configs", "post-rmsnorm, pre-layernorm,post-rmsnorm",
            "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [(r["placement"], r["norm"]) for r in records[::6]] == [("post", "rmsnorm"), ("pre", "layernorm")]
    assert len(records) == 12
    for bad in ("pre-foo", "pre", "", "sandwich-layernorm"):
        out = CliRunner().invoke(app, ["bench", "e2e", "--device", "cpu", "--configs", bad, "--out", str(tmp_path)])
        assert out.exit_code == 2 and "--configs" in out.output, (bad, out.output)
