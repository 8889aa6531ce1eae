"""normlab convert, reviewed: an empty SRC, OUT or --config is refused (Typer read "" as the
current directory), a normlab file with malformed metadata or with weights that do not fit
its own config is refused in one line naming what is wrong, and a directory without a
config.json (or one holding a normlab model) says so rather than asking for a model_type."""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from normlab.cli import app
from normlab.models import TransformerConfig, TransformerLM, save_model


def _cfg(**kw) -> TransformerConfig:
    return TransformerConfig(**{**dict(vocab_size=50, d_model=16, n_heads=2, n_layers=1, max_seq_len=8), **kw})


def _saved(path, **kw):
    torch.manual_seed(0)
    save_model(TransformerLM(_cfg(**kw)), path)
    return path


def _with_metadata(path, src, **meta):
    """``src``'s tensors in ``path``, with ``meta`` as its metadata."""
    import safetensors.torch

    safetensors.torch.save_file(safetensors.torch.load_file(str(src)), str(path), metadata=meta)
    return path


def _refused(args, hint: str, *needles: str) -> str:
    """The one-line error of a refused ``normlab convert`` (exit 2, no traceback)."""
    result = CliRunner().invoke(app, ["convert", *map(str, args)], env={"COLUMNS": "2000"})
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.output
    line = next((ln for ln in result.output.splitlines() if "Invalid value for" in ln), None)
    assert line is not None, result.output
    line = line.strip(" │")
    assert line.startswith(f"Invalid value for {hint}: "), result.output
    for needle in needles:
        assert needle in line, result.output
    return line


# ------------------------------------------------------------------------ empty paths


def test_an_empty_out_is_refused_not_read_as_the_current_directory(tmp_path, monkeypatch):
    src = _saved(tmp_path / "lm.safetensors")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    _refused([src, ""], "OUT", "expected a directory to write to, got an empty path")
    _refused([src, "  "], "OUT", "expected a directory to write to, got an empty path")
    assert list((tmp_path / "cwd").iterdir()) == []  # nothing written to the current directory


def test_an_empty_src_is_refused_not_read_as_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # (it was read as ".", and OUT "o3" as inside it)
    line = _refused(["", "o3"], "SRC", "expected a model directory or a .safetensors file, got an empty path")
    assert "inside SRC" not in line
    assert not (tmp_path / "o3").exists()


def test_an_empty_config_is_refused(tmp_path, monkeypatch):
    import safetensors.torch

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    safetensors.torch.save_model(TransformerLM(_cfg()), str(tmp_path / "plain.safetensors"))
    _refused([tmp_path / "plain.safetensors", tmp_path / "out", "--config", ""], "--config",
             "expected a TransformerConfig JSON file, got an empty path")
    assert not (tmp_path / "out").exists()


def test_nonempty_paths_still_convert(tmp_path):
    # (the parameters are read as given, then as Paths: a plain conversion is unchanged)
    import safetensors.torch

    torch.manual_seed(0)
    model = TransformerLM(_cfg())
    safetensors.torch.save_model(model, str(tmp_path / "plain.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps(model.cfg.to_dict()))
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "plain.safetensors"), str(tmp_path / "out"),
                                      "--config", str(tmp_path / "cfg.json")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_the_help_is_unchanged():
    # (the parameters are taken as given, to see an empty one: the help still shows paths)
    result = CliRunner().invoke(app, ["convert", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    assert re.search(r"\bsrc\s+<path>\s+A local Hugging Face model directory, or a normlab .safetensors file",
                     result.output), result.output
    assert re.search(r"\bout\s+<path>\s+Directory to write the converted model and report to\.", result.output)
    assert re.search(r"--config\s+<path>\s+A TransformerConfig JSON, for a .safetensors SRC", result.output)


# ------------------------------------------------------------------ malformed metadata


@pytest.mark.parametrize(("meta", "needles"), [
    ({"normlab.config": "[1,2]"}, ("normlab.config that is a JSON array", "expected a JSON object (dict)")),
    ({"normlab.config": "null"}, ("normlab.config that is a JSON null", "expected a JSON object (dict)")),
    ({"normlab.config": "\"d_model\""}, ("normlab.config that is a JSON string",)),
    ({"normlab.config": "not json{"}, ("normlab.config that is not JSON",)),
    ({"normlab.config": json.dumps(dict(_cfg().to_dict(), bogus=1))}, ("TransformerConfig refuses",
                                                                       "unknown field(s) bogus")),
    ({"normlab.config": json.dumps(dict(_cfg().to_dict(), d_model="x"))}, ("TransformerConfig refuses",
                                                                           "expected d_model to be an int")),
    ({"normlab.model": "Nope"}, ("normlab.model 'Nope'", "expected one of TransformerLM")),
])
def test_malformed_normlab_metadata_is_one_line(tmp_path, meta, needles):
    src = _saved(tmp_path / "good.safetensors")
    meta = {"normlab.model": "TransformerLM", "normlab.config": json.dumps(_cfg().to_dict()), **meta}
    bad = _with_metadata(tmp_path / "bad.safetensors", src, **meta)
    _refused([bad, tmp_path / "out"], "SRC", f"cannot load {bad}", "bad.safetensors' has", *needles)
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------- weights that do not fit their config


def test_weights_that_do_not_fit_their_own_config_are_summarized(tmp_path):
    src = _saved(tmp_path / "good.safetensors")
    wide = _with_metadata(tmp_path / "wide.safetensors", src, **{
        "normlab.model": "TransformerLM", "normlab.config": json.dumps(_cfg(d_model=32).to_dict())})
    line = _refused([wide, tmp_path / "out"], "SRC", f"cannot load {wide}",
                    "its weights do not fit the TransformerLM of its own normlab.config", "size mismatch",
                    "in the file", "in the model")
    assert line.rstrip().endswith(")") and "Error(s) in loading state_dict" not in line


def _missing_weight(tmp_path):
    """A normlab file that lacks one of its config's weights: (its path, the key gone)."""
    import safetensors.torch

    src = _saved(tmp_path / "good.safetensors")
    state = safetensors.torch.load_file(str(src))
    gone = sorted(state)[0]
    del state[gone]
    safetensors.torch.save_file(state, str(tmp_path / "bad.safetensors"), metadata={
        "normlab.model": "TransformerLM", "normlab.config": json.dumps(_cfg().to_dict())})
    return tmp_path / "bad.safetensors", gone


def test_a_missing_weight_is_named(tmp_path):
    bad, gone = _missing_weight(tmp_path)
    _refused([bad, tmp_path / "out"], "SRC", "1 missing key", gone)


# ---------------------------------------------------------------------- directories


def test_a_directory_without_a_config_json_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    line = _refused([tmp_path / "empty", tmp_path / "out"], "SRC",
                    f"{tmp_path / 'empty'} is a directory without a config.json")
    assert "model_type" not in line


def test_a_directory_holding_a_normlab_model_without_config_json_names_its_file(tmp_path):
    # what convert writes for a normlab model, its config.json gone (or never there)
    assert CliRunner().invoke(app, ["convert", str(_saved(tmp_path / "lm.safetensors")),
                                    str(tmp_path / "o")]).exit_code == 0
    (tmp_path / "o" / "config.json").unlink()
    _refused([tmp_path / "o", tmp_path / "o2"], "SRC", "holds a normlab model",
             f"expected its file as SRC: {tmp_path / 'o' / 'model.safetensors'}")
