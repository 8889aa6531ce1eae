"""normlab convert over a local Hugging Face model directory."""

import json

import pytest
import torch
from typer.testing import CliRunner

from normlab.cli import app
from tests.convert.models import hf_inputs, hf_model, perturb

transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install 'normlab[hf]')")


def test_convert_gpt2_dir_rms_then_fold_reloads_exactly(tmp_path):
    torch.manual_seed(0)
    model = perturb(hf_model("gpt2"), scale=0.05).eval()
    model.save_pretrained(tmp_path / "src")
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "out"),
                                      "-t", "rms", "-t", "fold"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "layernorm_to_rmsnorm: 1 untied, 6 centered, 5 converted" in result.output
    assert "fold_norm_affine: 4 folded, 1 left" in result.output
    assert "consumer lm_head has no bias" in result.output
    reports = json.loads((tmp_path / "out" / "normlab_convert.json").read_text())
    assert [r["transform"] for r in reports] == ["layernorm_to_rmsnorm", "fold_norm_affine"]
    # the converted weights are exact in the original architecture too
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    kw = hf_inputs("gpt2")
    with torch.no_grad():
        torch.testing.assert_close(back(**kw).logits, model(**kw).logits, atol=2e-5, rtol=2e-5)


def test_convert_refusal_exits_nonzero(tmp_path):
    hf_model("llama").save_pretrained(tmp_path / "src")
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "out"), "-t", "rms"])
    assert result.exit_code == 1
    assert "is not a LayerNorm" in result.output


def test_convert_rejects_unknown_transform(tmp_path):
    result = CliRunner().invoke(app, ["convert", str(tmp_path), str(tmp_path / "out"), "-t", "nope"])
    assert result.exit_code != 0 and "expected each --transform" in result.output
