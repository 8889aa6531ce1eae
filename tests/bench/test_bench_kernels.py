"""``normlab bench kernels --quick --json`` on tiny sizes through Typer's CliRunner:
the records' fields and values are sane (no timing thresholds)."""

from __future__ import annotations

import json
import math

from typer.testing import CliRunner

from normlab.cli import app

FIELDS = {"op", "pass", "dtype", "rows", "hidden", "impl", "device", "median_ms", "gbps",
          "ratio_vs_torch", "ratio_vs_copy", "copy_gbps", "torch_version", "torch_path", "host_ms"}


def test_bench_kernels_quick_json(tmp_path, monkeypatch):
    # the CPU bench keeps freed memory for reuse (process-wide malloc settings): stubbed
    # here, so the test process keeps its own (test_keep_freed_memory checks the real one)
    import normlab.bench.kernels as bk
    calls = []
    monkeypatch.setattr(bk, "keep_freed_memory", lambda: calls.append(1) or True)
    result = CliRunner().invoke(app, [
        "bench", "kernels", "--device", "cpu", "--dtype", "fp32", "--quick", "--json",
        "--rows", "8", "--hidden", "16,32", "--ops", "rms_norm,add_layer_norm",
        "--out", str(tmp_path),
    ])
    import traceback
    assert result.exit_code == 0, (result.output, traceback.format_exception(*result.exc_info)
                                   if result.exc_info else None)
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    # 2 ops x 2 hidden x 3 passes x 2 impls (normlab, torch eager; compile off for --quick on CPU)
    assert len(records) == 24
    import torch
    for r in records:
        assert FIELDS <= set(r)
        assert r["dtype"] == "float32" and r["rows"] == 8 and r["hidden"] in (16, 32)
        assert r["pass"] in ("fwd", "bwd", "fwdbwd") and r["impl"] in ("normlab", "torch")
        assert r["torch_version"] == torch.__version__ and "cores" in r["device"]
        assert r["median_ms"] > 0 and r["gbps"] > 0 and r["copy_gbps"] > 0
        assert r["host_ms"] == r["median_ms"]  # on the CPU the host time is the timing
        n = {"fwd": 2, "bwd": 3, "fwdbwd": 5}[r["pass"]] + (
            {"fwd": 2, "bwd": 2, "fwdbwd": 4}[r["pass"]] if r["op"] == "add_layer_norm" else 0)
        assert math.isclose(r["gbps"], n * 8 * r["hidden"] * 4 / (r["median_ms"] * 1e-3) / 1e9,
                            rel_tol=0.05, abs_tol=1e-3)
        if r["impl"] == "torch":
            assert r["ratio_vs_torch"] == 1.0
    torch_paths = {r["op"]: r["torch_path"] for r in records}
    assert "aten::layer_norm" in torch_paths["add_layer_norm"]
    assert "aten::rms_norm" in torch_paths["rms_norm"]
    for suffix in ("csv", "md", "png"):
        assert (tmp_path / f"kernels-cpu-fp32.{suffix}").stat().st_size > 0
    md = (tmp_path / "kernels-cpu-fp32.md").read_text()
    assert "| rms_norm | fwd | 8 | 16 | normlab |" in md
    assert calls == [1] and "kept freed memory for reuse" in md
    from normlab.provenance import code_line
    assert code_line() in md  # which code made the table (normlab's version, the checkout's commit)


def test_keep_freed_memory():
    import subprocess
    import sys
    code = "from normlab.bench.common import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    import platform
    expected = "True" if platform.libc_ver()[0] == "glibc" else None
    if expected:
        assert out.stdout.strip() == expected


def test_bench_rejects_bad_dtype():
    result = CliRunner().invoke(app, ["bench", "kernels", "--device", "cpu", "--dtype", "int8"])
    assert result.exit_code != 0 and "bf16" in result.output


def _quick_json(tmp_path, monkeypatch, *args):
    """``bench kernels --device cpu --dtype fp32 --quick --json ARGS``: (records, the inputs
    each measurement was given)."""
    import normlab.bench.kernels as bk
    monkeypatch.setattr(bk, "keep_freed_memory", lambda: True)
    seen = []
    real_inputs = bk._inputs
    monkeypatch.setattr(bk, "_inputs", lambda *a, **k: seen.append(real_inputs(*a, **k)) or seen[-1])
    result = CliRunner().invoke(app, ["bench", "kernels", "--device", "cpu", "--dtype", "fp32", "--quick", "--json",
                                      *args, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")], seen


def test_bench_kernels_qk_norm_on_a_transposed_view(tmp_path, monkeypatch):
    records, seen = _quick_json(tmp_path, monkeypatch, "--ops", "qk_rms_norm,qk_layer_norm", "--qk-shapes", "1x2x8x64")
    assert len(records) == 2 * 3 * 2  # ops x passes x impls
    for r in records:
        assert r["op"] in ("qk_rms_norm", "qk_layer_norm") and r["impl"] in ("normlab", "torch")
        assert (r["rows"], r["hidden"], r["shape"]) == (16, 64, "1x2x8x64")
        assert r["median_ms"] > 0 and r["gbps"] > 0
    x = seen[0][0]  # [B, H, T, hd] view of a contiguous [B, T, H, hd]
    assert x.shape == (1, 2, 8, 64) and x.stride() == (1024, 64, 128, 1)
    assert "qk_rms_norm 1x2x8x64" in (tmp_path / "kernels-cpu-fp32.md").read_text()


def test_bench_rejects_bad_qk_shapes():
    result = CliRunner().invoke(app, ["bench", "kernels", "--device", "cpu", "--ops", "qk_rms_norm",
                                      "--qk-shapes", "8x128"])
    assert result.exit_code != 0 and "BxHxTxHD" in result.output


def test_bench_kernels_adaln_ops(tmp_path, monkeypatch):
    # x [8, rows / 8, hidden] with one scale and shift per example ([8, 1, hidden]); rows
    # not a multiple of 8: one example; torch's counterpart is the unfused expression
    import normlab.bench.kernels as bk
    records, seen = _quick_json(tmp_path, monkeypatch, "--ops", "adaln_layer_norm,adaln_rms_norm",
                                "--shapes", "16x32,9x32")
    assert len(records) == 2 * 2 * 3 * 2  # ops x shapes x passes x impls
    assert {r["op"] for r in records} == {"adaln_layer_norm", "adaln_rms_norm"}
    assert all(r["median_ms"] > 0 and r["gbps"] > 0 for r in records)
    shapes = [tuple(t.shape for t in inputs[:3]) for inputs in seen]
    assert ((8, 2, 32), (8, 1, 32), (8, 1, 32)) in shapes and ((1, 9, 32), (1, 1, 32), (1, 1, 32)) in shapes
    x, scale, shift, _ = seen[0]
    torch_fn, ours = bk._torch_eager("adaln_layer_norm", 32), bk._normlab("adaln_layer_norm", 32)
    import torch
    torch.testing.assert_close(ours(x, scale, shift, None), torch_fn(x, scale, shift, None))


def test_an_interrupted_run_keeps_its_rows_marked_partial(tmp_path, monkeypatch):
    import normlab.bench.kernels as bk
    from tests.bench.helpers import ctrl_c_on_call

    monkeypatch.setattr(bk, "keep_freed_memory", lambda: True)
    (tmp_path / "kernels-cpu-fp32.png").write_bytes(b"an earlier run's plot")
    ctrl_c_on_call(monkeypatch, bk, "_inputs")
    result = CliRunner().invoke(app, [
        "bench", "kernels", "--device", "cpu", "--dtype", "fp32", "--quick",
        "--rows", "8", "--hidden", "16,32", "--ops", "rms_norm", "--out", str(tmp_path),
    ])
    assert result.exit_code == 130, result.output
    assert "interrupted: kept the" in result.output and "marked partial" in result.output
    md = (tmp_path / "kernels-cpu-fp32.md").read_text()
    assert "**Partial: the run stopped after" in md and "| rms_norm | fwd | 8 | 16 | normlab |" in md
    assert not (tmp_path / "kernels-cpu-fp32.png").exists()  # it would not match the tables


def test_bench_kernels_practitioners_variants(tmp_path, monkeypatch):
    # Gemma's and Llama's RMSNorm and LayerNorm1p: normlab's offset / casting modes against
    # the torch code those models run, which computes the same function (the Hugging Face
    # ones bit for bit; LayerNorm1p adds the offset in the weight's dtype, here float32)
    import normlab.bench.kernels as bk
    ops = "gemma_rms_norm,llama_rms_norm,layer_norm_1p"
    records, seen = _quick_json(tmp_path, monkeypatch, "--ops", ops, "--shapes", "8x32")
    assert len(records) == 3 * 3 * 2  # ops x passes x impls
    assert {r["op"] for r in records} == set(ops.split(","))
    assert all(r["median_ms"] > 0 and r["gbps"] > 0 for r in records)
    import torch
    for op, (x, r, w, b) in zip(ops.split(","), seen, strict=True):
        assert r is None and (b is not None) == (op == "layer_norm_1p")
        ours, theirs = bk._normlab(op, 32)(x, r, w, b), bk._torch_eager(op, 32)(x, r, w, b)
        if op == "layer_norm_1p":
            torch.testing.assert_close(ours, theirs)
        else:
            assert torch.equal(ours, theirs)
