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
