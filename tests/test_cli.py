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
