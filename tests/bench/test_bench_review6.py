"""normlab bench and the benchmark scripts, reviewed: a table from a checkout with changes
says so, sizes past any machine are refused (not overflowed or counted for hours), every
CSV/JSON row names the code that measured it, and the scripts check their arguments and
--out before measuring."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from normlab import provenance
from normlab.bench import e2e, kernels
from normlab.bench.common import out_file_problem
from normlab.cli import app

ROOT = Path(__file__).resolve().parents[2]


def test_a_table_from_a_checkout_with_changes_says_so(monkeypatch):
    monkeypatch.setattr(provenance, "git_commit", lambda: "b9e8fc6336160b6019f8bb193acac53272d3268c-dirty")
    assert provenance.code_line().endswith("commit b9e8fc633616-dirty")
    monkeypatch.setattr(provenance, "git_commit", lambda: "b9e8fc6336160b6019f8bb193acac53272d3268c")
    assert provenance.code_line().endswith("commit b9e8fc633616")


@pytest.mark.parametrize("args,option", [
    (["kernels", "--device", "cpu", "--quick", "--shapes", "8x64", "--threads", "2147483648"], "--threads"),
    (["e2e", "--device", "cpu", "--quick", "--threads", "1099511627776"], "--threads"),
    (["e2e", "--device", "cpu", "--quick", "--n-layers", "99999"], "--n-layers"),
    (["e2e", "--device", "cpu", "--quick", "--d-model", "99999999999999999999"], "--d-model"),
    (["e2e", "--device", "cpu", "--quick", "--batch", "99999999999999999999"], "--batch"),
    (["e2e", "--device", "cpu", "--quick", "--tokens", "99999999999999999999"], "--tokens"),
])
def test_sizes_past_any_machine_are_refused_naming_the_option(tmp_path, args, option):
    out = CliRunner().invoke(app, ["bench", *args, "--out", str(tmp_path)])
    assert out.exit_code == 2, out.output
    text = " ".join(out.output.replace("│", " ").split())
    assert f"Invalid value for {option}" in text and "at most" in text


@pytest.mark.parametrize("record", [kernels.Record, e2e.Record])
def test_every_row_names_the_code_that_measured_it(record):
    defaults = {f.name: f.default_factory() for f in dataclasses.fields(record)
                if f.default_factory is not dataclasses.MISSING}
    code = provenance.code_record()
    assert defaults["normlab_version"] == (code["normlab_version"] or "")
    assert defaults["git_commit"] == (code["git_commit"] or "")


def test_out_file_problem(tmp_path):
    assert "is a directory" in out_file_problem(tmp_path)
    assert "is not a directory" in out_file_problem(tmp_path / "missing" / "t.md")
    assert out_file_problem(tmp_path / "t.md") is None and not (tmp_path / "t.md").exists()  # nothing left
    (tmp_path / "kept.md").write_text("x")
    assert out_file_problem(tmp_path / "kept.md") is None and (tmp_path / "kept.md").read_text() == "x"


@pytest.mark.parametrize("script,args,message", [
    ("host_time_cpu.py", ["--rounds", "0"], "--rounds: expected >= 1, got 0"),
    ("host_time_cpu.py", ["--threads", "0"], "--threads: expected >= 1, got 0"),
    ("host_time_cpu.py", ["--out", "{tmp}"], "is a directory"),
    ("host_path_stubbed.py", ["--number", "0"], "--number: expected >= 1, got 0"),
    ("host_path_stubbed.py", ["--out", "{tmp}"], "is a directory"),
    ("host_overhead.py", ["--calls", "0", "--device", "cpu"], "--calls: expected >= 1, got 0"),
])
def test_the_scripts_refuse_bad_arguments_before_measuring(tmp_path, script, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                         timeout=120, env={"PYTHONPATH": str(ROOT / "src"), "TRITON_INTERPRET": "1",
                                           "PATH": "/usr/bin:/bin"})
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_host_overhead_runs_its_api_rows_on_the_backend_it_names(backend):
    # (it switched to triton on a CPU only: on a GPU its rows stayed on auto, which picks
    # torch's op for its 8 x 1024 calls there)
    code = ("import importlib.util, sys, normlab; "
            f"spec = importlib.util.spec_from_file_location('h', {str(ROOT / 'benchmarks' / 'host_overhead.py')!r}); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            f"m.main(['--device', 'cpu', '--calls', '1'] + (['--backend', {backend!r}] if {backend!r} != 'triton' "
            "else [])); print('after:', normlab.get_backend())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(ROOT / "src"), "TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith(f"device cpu, backend {backend} for the api rows")
    assert out.stdout.rstrip().endswith(f"after: {backend}")
