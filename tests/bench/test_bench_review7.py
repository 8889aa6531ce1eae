"""normlab bench as a reviewer met it: a hidden size beyond the Triton kernels refused up
front under NORMLAB_BACKEND=triton (not a traceback after the shapes before it) and the
forced-Triton row left out past it, small shapes' GB/s not rounded to 0, a partial run's
CSV named partial, options no selected op reads named on stderr, and tables printed
whole where the output is not a terminal."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

import normlab
from normlab.bench import e2e, kernels
from normlab.bench.common import print_table, significant
from normlab.cli import app


def _invoke(tmp_path, *args):
    return CliRunner().invoke(app, ["bench", "kernels", "--device", "cpu", "--dtype", "fp32", "--quick",
                                    *args, "--out", str(tmp_path)])


@pytest.mark.parametrize("args,option,limit", [
    (("--ops", "rms_norm", "--shapes", "2x3,1x70000"), "--shapes", 65536),
    (("--ops", "layer_norm", "--rows", "2", "--hidden", "3,65537"), "--hidden", 65536),
    (("--ops", "adaln_rms_norm", "--shapes", "8x20000"), "--shapes", 16384),
    (("--ops", "qk_rms_norm", "--qk-shapes", "1x1x2x70000"), "--qk-shapes", 65536),
])
def test_a_size_beyond_the_triton_kernels_is_refused_up_front_under_backend_triton(tmp_path, args, option, limit):
    with normlab.set_backend("triton"):
        out = _invoke(tmp_path, *args)
    assert out.exit_code == 2, out.output
    text = " ".join(out.output.replace("│", " ").split())
    assert f"Invalid value for {option}" in text and f"from 1 to {limit}" in text
    assert not list(tmp_path.iterdir())  # refused before anything was measured


def _record(hidden=64, gbps=0.0000694321, copy=0.00012345, op="rms_norm", impl="normlab"):
    return kernels.Record(op, "fwd", "float32", 8, hidden, impl, "dev", 0.5, gbps, 1.0, copy, 10.0, "t", "p", "q",
                          0.01, f"8x{hidden}")


def test_small_shapes_keep_their_bandwidth_and_beyond_triton_is_named(tmp_path):
    assert kernels._sig(0.000069432123) == 6.943e-05 and kernels._sig(1234.5678) == 1235.0
    assert significant(0.0000694321) == "0.0000694" and significant(3.14159) == "3.14"
    assert significant(1234.5) == "1234" and significant(0.5) == "0.500" and significant(0.0) == "0"
    kernels.write_outputs([_record(), _record(hidden=70000, gbps=812.34, copy=0.71)], tmp_path, "k", plot=False,
                          device_type="cuda")
    md = (tmp_path / "k.md").read_text()
    assert "| 0.0000694 | 1.00 | 0.00012 |" in md and "| 812.3 | 1.00 | 0.71 |" in md
    assert "`normlab triton` is not measured at rms_norm hidden 70000" in md


@pytest.mark.parametrize("module", [kernels, e2e])
def test_a_partial_runs_csv_is_named_partial_and_the_finished_one_replaces_it(tmp_path, module):
    if module is kernels:
        records = [_record()]

        def write(**kw):
            return kernels.write_outputs(records, tmp_path, "s", plot=False, **kw)
    else:
        records = [e2e.Record("train", "pre", "rmsnorm", 32, 2, 1, 2, 16, 128, 1000, "float32", "normlab", "torch",
                              False, "dev", 1.0, 100.0, 1.0, 1.0, 3, "t", "0 0 0")]

        def write(**kw):
            return e2e.write_outputs(records, tmp_path, "s", "0 0 0", **kw)
    (tmp_path / "s.csv").write_text("an earlier run's rows\n")
    paths = write(partial=9)
    assert tmp_path / "s.partial.csv" in paths and not (tmp_path / "s.csv").exists()
    paths = write()
    assert tmp_path / "s.csv" in paths and not (tmp_path / "s.partial.csv").exists()
    assert "an earlier" not in (tmp_path / "s.csv").read_text()


def test_an_interrupted_run_says_where_its_partial_csv_is(tmp_path, monkeypatch):
    from tests.bench.helpers import ctrl_c_on_call

    monkeypatch.setattr(kernels, "keep_freed_memory", lambda: True)
    ctrl_c_on_call(monkeypatch, kernels, "_inputs")
    out = _invoke(tmp_path, "--rows", "8", "--hidden", "16,32", "--ops", "rms_norm")
    assert out.exit_code == 130, out.output
    assert "kernels-cpu-fp32.partial.csv" in "".join(out.output.split())  # (wrapped at any character)
    assert (tmp_path / "kernels-cpu-fp32.partial.csv").exists() and not (tmp_path / "kernels-cpu-fp32.csv").exists()


def test_options_no_selected_op_reads_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "keep_freed_memory", lambda: True)
    out = _invoke(tmp_path, "--json", "--ops", "qk_rms_norm", "--rows", "8", "--qk-shapes", "1x1x2x16")
    assert out.exit_code == 0, out.output
    assert "--rows/--hidden/--shapes: not used" in " ".join(out.stderr.split())
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert records and {r["shape"] for r in records} == {"1x1x2x16"}
    out = _invoke(tmp_path, "--json", "--ops", "rms_norm", "--shapes", "2x8", "--qk-shapes", "1x1x2x16",
                  "--no-hide-host")
    assert out.exit_code == 0, out.output
    err = " ".join(out.stderr.split())
    assert "--qk-shapes: not used" in err and "--no-hide-host: not used on the CPU" in err


def test_a_table_is_printed_whole_where_the_output_is_not_a_terminal():
    table = Table(title="t")
    for col in ("op", "pass", "rows", "hidden", "impl", "median ms", "GB/s", "vs torch", "vs copy"):
        table.add_column(col, overflow="fold", no_wrap=col not in ("op", "pass", "impl"))
    table.add_row("qk_rms_norm 2x8x64x128", "fwdbwd", "1024", "128", "normlab+compile", "12.345", "0.0000694",
                  "1.00", "0.00012")
    table.add_row("layer_norm_1p", "fwd", "4096", "65536", "normlab triton", "0.519", "1234.5", "0.71", "0.55")
    buf = io.StringIO()
    console = Console(file=buf, width=80)
    print_table(console, table)
    text = buf.getvalue()
    for cell in ("qk_rms_norm 2x8x64x128", "layer_norm_1p", "normlab+compile", "0.0000694", "median ms"):
        assert cell in text, cell
    assert "…" not in text and console.width == 80
