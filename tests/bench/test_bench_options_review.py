"""Bench options a reviewer found crashing: size lists with non-ASCII digits ("²" passes
``str.isdigit`` and then ``int`` raises), and a custom ``--d-model`` that 64-wide heads
do not divide."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from normlab.cli import app


@pytest.mark.parametrize(("option", "value", "words"), [
    ("--rows", "²", "positive integers"),
    ("--rows", "8,²", "positive integers"),
    ("--hidden", "64,²", "positive integers"),
    ("--shapes", "8x²", "ROWSxHIDDEN"),
    ("--qk-shapes", "1x2x8x²", "BxHxTxHD"),
])
def test_bench_kernels_refuses_non_ascii_digits(option, value, words):
    args = ["bench", "kernels", "--device", "cpu", option, value]
    if option == "--qk-shapes":
        args += ["--ops", "qk_rms_norm"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (result.exception, result.output)  # a usage error, not a traceback
    assert not isinstance(result.exception, ValueError)
    assert option in result.output and words in result.output


def test_heads_for_divides_d_model():
    from normlab.bench.e2e import heads_for

    assert [heads_for(d) for d in (32, 64, 200, 256, 193, 320, 1000)] == [1, 1, 2, 4, 1, 5, 10]
    for d in range(1, 600):
        h = heads_for(d)
        assert d % h == 0 and 1 <= h <= max(1, d // 64)


def test_bench_e2e_d_model_that_64_wide_heads_do_not_divide(tmp_path):
    threads = torch.get_num_threads()
    try:
        result = CliRunner().invoke(app, [
            "bench", "e2e", "--device", "cpu", "--dtype", "fp32", "--quick", "--json", "--threads", "1",
            "--d-model", "200", "--n-layers", "1", "--tokens", "8", "--batch", "1", "--out", str(tmp_path),
        ])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, (result.exception, result.output)
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(records) == 24
    assert {(r["d_model"], r["n_heads"], r["n_layers"], r["seq_len"], r["batch"]) for r in records} == {
        (200, 2, 1, 8, 1)}
    assert all(r["median_ms"] > 0 for r in records)


def test_bench_e2e_names_an_out_of_memory_configuration_on_stderr_and_in_the_table(tmp_path, monkeypatch):
    """A configuration that runs out of memory is skipped: named on stderr (``--json``
    prints records only) and under the table's title; all skipped: an error, exit 1."""
    import normlab.bench.e2e as e2e

    real = e2e.measure

    def measure(size, placement, norm, *args, **kw):
        if norm == "rmsnorm":
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
        return real(size, placement, norm, *args, **kw)

    monkeypatch.setattr(e2e, "measure", measure)
    base = ["bench", "e2e", "--device", "cpu", "--quick", "--d-model", "32", "--n-layers", "1", "--tokens", "8",
            "--batch", "2", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, [*base, "--configs", "pre-layernorm,pre-rmsnorm", "--json"])
    assert result.exit_code == 0, result.output
    for line in result.stdout.splitlines():
        assert json.loads(line)["norm"] == "layernorm"
    assert "skipped" in result.stderr and "pre rmsnorm" in result.stderr
    md = (tmp_path / "e2e-cpu-fp32.md").read_text()
    assert "**Skipped, out of memory:** d32 L1 2x8 pre rmsnorm" in md
    result = CliRunner().invoke(app, [*base, "--configs", "pre-rmsnorm"])
    assert result.exit_code == 1 and "nothing measured" in result.stderr


def test_bench_kernels_measures_a_repeated_value_once_and_names_qk_shapes(tmp_path):
    """``--ops rms_norm,rms_norm`` or ``--rows 8,8``: one measurement; two qk shapes of the
    same rows and hidden (1x2x8x64, 2x1x8x64) are told apart in the table."""
    base = ["bench", "kernels", "--device", "cpu", "--quick", "--no-compile", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, [*base, "--ops", "rms_norm,rms_norm", "--rows", "8,8", "--hidden", "64",
                                      "--json"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == len({(r["op"], r["pass"], r["impl"]) for r in records}) == 6
    result = CliRunner().invoke(app, [*base, "--ops", "qk_rms_norm", "--qk-shapes", "1x2x8x64,2x1x8x64"])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "kernels-cpu-bf16.md").read_text()
    assert "| qk_rms_norm 1x2x8x64 | fwd | 16 | 64 |" in md and "| qk_rms_norm 2x1x8x64 | fwd | 16 | 64 |" in md
