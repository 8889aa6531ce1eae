"""The normlab command line."""

from typer.testing import CliRunner

import normlab
from normlab.cli import app


def test_help_lists_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "norms" in result.output


def test_norms_command_measures_every_norm():
    result = CliRunner().invoke(app, ["norms", "--hidden", "32", "--rows", "64"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in normlab.norm_names():
        assert name in result.output
    # the layernorm row shows a standardized output: mean +0.000, rms 1.000
    line = next(line for line in result.output.splitlines() if "layernorm" in line)
    assert "+0.000" in line or "-0.000" in line
    assert "1.000" in line


def test_norms_refuses_bad_sizes():
    for args, needle in ((["--rows", "8"], "--rows: expected an integer >= 16"),
                         (["--rows", "0"], "--rows: expected an integer >= 16"),
                         (["--hidden", "0"], "--hidden: expected a positive integer, got 0"),
                         (["--hidden", "-3"], "--hidden: expected a positive integer, got -3")):
        result = CliRunner().invoke(app, ["norms", *args], env={"COLUMNS": "200"})
        assert result.exit_code == 2, (args, result.output)
        assert needle in result.output and "Traceback" not in result.output


def test_bad_backend_environment_variable_is_one_clear_error():
    # the check reads the environment at each invocation, whatever backend is cached
    result = CliRunner().invoke(app, ["norms", "--hidden", "8", "--rows", "16"],
                                env={"NORMLAB_BACKEND": "bogus", "COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert "NORMLAB_BACKEND" in result.output and "expected one of 'auto', 'torch', 'triton', got 'bogus'" \
        in result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, ValueError)


def test_norms_refuses_a_demo_too_large_to_allocate():
    result = CliRunner().invoke(app, ["norms", "--rows", "1000000000"], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "expected rows x hidden up to" in result.output
    assert "Traceback" not in result.output


def test_bench_kernels_refuses_empty_values():
    for args, hint in ((["--shapes", ""], "--shapes"), (["--qk-shapes", ""], "--qk-shapes"),
                       (["--out", ""], "--out")):
        result = CliRunner().invoke(app, ["bench", "kernels", "--device", "cpu", "--quick", "--ops", "rms_norm",
                                          *args], env={"COLUMNS": "200"})
        assert result.exit_code == 2, (args, result.output)
        assert f"Invalid value for {hint}" in result.output, result.output
