"""The bench commands' option checks (``normlab.bench.common``): a bad value is one clear
error naming the option, exit code 2, before any benchmark runs."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from normlab.cli import app

# small sizes, so a check that lets a value through ends quickly instead of benchmarking
KERNELS = ["bench", "kernels", "--dtype", "fp32", "--quick", "--json", "--ops", "rms_norm"]
E2E = ["bench", "e2e", "--dtype", "fp32", "--quick", "--json", "--d-model", "32", "--n-layers", "1",
       "--tokens", "8", "--batch", "1"]


def _refused(args: list[str], *needles: str) -> None:
    threads = torch.get_num_threads()
    try:
        result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output


@pytest.mark.parametrize("cmd", [KERNELS, E2E], ids=["kernels", "e2e"])
@pytest.mark.parametrize("device", ["gpu", "xpu", "cuda:x", "cpu0"])
def test_bench_refuses_unknown_device(cmd, device):
    _refused(cmd + ["--device", device], "--device", "expected cpu, cuda or cuda:N", repr(device))


@pytest.mark.parametrize("cmd", [KERNELS, E2E], ids=["kernels", "e2e"])
def test_bench_refuses_cuda_without_cuda(cmd, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _refused(cmd + ["--device", "cuda:0"], "--device", "no CUDA device is available")


def test_pick_device_refuses_a_cuda_index_out_of_range(monkeypatch):
    import typer

    from normlab.bench.common import pick_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda:1")
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(typer.BadParameter, match="has 2 CUDA device"):
        pick_device("cuda:2")


@pytest.mark.parametrize("cmd", [KERNELS, E2E], ids=["kernels", "e2e"])
@pytest.mark.parametrize("threads", ["0", "-1"])
def test_bench_refuses_non_positive_threads(cmd, threads, tmp_path):
    _refused(cmd + ["--device", "cpu", "--threads", threads, "--out", str(tmp_path)],
             "--threads", f"expected a positive integer, got {threads}")


@pytest.mark.parametrize("option", ["--d-model", "--n-layers", "--tokens", "--batch"])
def test_bench_e2e_refuses_non_positive_sizes(option, tmp_path):
    args = E2E + ["--device", "cpu", "--out", str(tmp_path)]
    args[args.index(option) + 1] = "0"
    _refused(args, option, "expected a positive integer, got 0")


@pytest.mark.parametrize("cmd", [KERNELS, E2E], ids=["kernels", "e2e"])
def test_bench_refuses_an_unwritable_out(cmd, tmp_path):
    (tmp_path / "file").write_text("")
    _refused(cmd + ["--device", "cpu", "--out", "/proc/normlab-x"], "--out", "cannot write to /proc/normlab-x")
    _refused(cmd + ["--device", "cpu", "--out", str(tmp_path / "file")], "--out", "not a directory")
    _refused(cmd + ["--device", "cpu", "--out", str(tmp_path / "file" / "sub")], "--out", "not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_check_out_dir_leaves_nothing_behind(tmp_path):
    from normlab.bench.common import check_out_dir
    assert check_out_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert check_out_dir(tmp_path) == tmp_path
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option,value", [("--rows", "0"), ("--hidden", "0"), ("--hidden", "-3"),
                                          ("--rows", "8,a")])
def test_bench_kernels_refuses_bad_sizes(option, value, tmp_path):
    args = KERNELS + ["--device", "cpu", "--rows", "8", "--hidden", "16", "--out", str(tmp_path)]
    args[args.index(option) + 1] = value
    _refused(args, option, "expected comma-separated positive integers", repr(value))


@pytest.mark.parametrize("other", ["--rows", "--hidden"])
def test_bench_kernels_refuses_shapes_with_rows_or_hidden(other, tmp_path):
    _refused(KERNELS + ["--device", "cpu", "--shapes", "8x64", other, "16", "--out", str(tmp_path)],
             "--shapes", "cannot be combined with --rows/--hidden")
