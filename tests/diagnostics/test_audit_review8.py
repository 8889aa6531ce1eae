"""normlab audit, reviewed: an empty MODEL is refused (it was read as the current
directory), a normlab file with malformed metadata or with weights that do not fit its own
config is refused in one line naming what is wrong, and the directory normlab convert writes
for a normlab model names the file to audit instead of transformers' "model_type" message."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from normlab.cli import app
from tests.convert.test_convert_review8 import (  # (the same tiny files)
    _cfg,
    _missing_weight,
    _saved,
    _with_metadata,
)


def _refused(spec, *needles: str) -> str:
    """The one-line error of a refused ``normlab audit`` (exit 2, no traceback)."""
    result = CliRunner().invoke(app, ["audit", str(spec)], env={"COLUMNS": "2000"})
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.output
    lines = [ln.strip(" │") for ln in result.output.splitlines() if ln.strip(" │╭╮╰╯─")]
    line = next((ln for ln in lines if ln.startswith("Invalid value for MODEL: ")), None)
    assert line is not None, result.output
    assert not any(ln.startswith(("Error(s)", "Missing key", "size mismatch")) for ln in lines), result.output
    for needle in needles:
        assert needle in line, result.output
    return line


@pytest.mark.parametrize("spec", ["", "  "])
def test_an_empty_model_is_refused_not_read_as_the_current_directory(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    line = _refused(spec, "expected pkg.module:factory, a local Hugging Face checkpoint or config, or a normlab "
                          ".safetensors file, got an empty path")
    assert "is a directory without a config.json" not in line


@pytest.mark.parametrize(("meta", "needles"), [
    ({"normlab.config": "[1,2]"}, ("normlab.config that is a JSON array", "expected a JSON object (dict)")),
    ({"normlab.config": "null"}, ("normlab.config that is a JSON null",)),
    ({"normlab.config": "7"}, ("normlab.config that is a JSON number",)),
    ({"normlab.config": "not json{"}, ("normlab.config that is not JSON",)),
    ({"normlab.config": json.dumps(dict(_cfg().to_dict(), bogus=1))}, ("unknown field(s) bogus",)),
    ({"normlab.model": "Nope"}, ("normlab.model 'Nope'", "expected one of TransformerLM")),
])
def test_malformed_normlab_metadata_is_one_line(tmp_path, meta, needles):
    src = _saved(tmp_path / "good.safetensors")
    meta = {"normlab.model": "TransformerLM", "normlab.config": json.dumps(_cfg().to_dict()), **meta}
    bad = _with_metadata(tmp_path / "bad.safetensors", src, **meta)
    _refused(bad, f"cannot load '{bad}'", "bad.safetensors' has", *needles)


def test_weights_that_do_not_fit_their_own_config_are_summarized(tmp_path):
    src = _saved(tmp_path / "good.safetensors")
    wide = _with_metadata(tmp_path / "wide.safetensors", src, **{
        "normlab.model": "TransformerLM", "normlab.config": json.dumps(_cfg(d_model=32).to_dict())})
    _refused(wide, f"cannot load '{wide}'", "its weights do not fit the TransformerLM of its own normlab.config",
             "size mismatch", "in the file", "in the model")


def test_a_missing_weight_is_named(tmp_path):
    bad, gone = _missing_weight(tmp_path)
    _refused(bad, "1 missing key", gone)


@pytest.mark.parametrize("config_json", ["normlab", "none"])
def test_a_directory_convert_wrote_for_a_normlab_model_names_its_file(tmp_path, config_json):
    # what normlab convert writes for a normlab model: model.safetensors (save_model's), a
    # config.json of TransformerConfig fields (no model_type) and its report
    res = CliRunner().invoke(app, ["convert", str(_saved(tmp_path / "lm.safetensors")), str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    if config_json == "none":
        (tmp_path / "o" / "config.json").unlink()
    line = _refused(tmp_path / "o", "holds a normlab model",
                    f"expected its file as MODEL: {tmp_path / 'o' / 'model.safetensors'}")
    assert "model_type" not in line
    # and that file audits
    res = CliRunner().invoke(app, ["audit", str(tmp_path / "o" / "model.safetensors")])
    assert res.exit_code in (0, 1) and "Invalid value" not in res.output, res.output
