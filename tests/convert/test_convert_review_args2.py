"""The convert/hf fixes, reviewed again: a handle entered again after undo() inside its
own block is released when that block ends; SRC (or --config) that is one of the files
converting writes or removes in OUT is refused, not deleted; numpy bools, 0/1 and
one-element tensors are taken where a bool or a tolerance is expected."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from normlab.cli import app
from normlab.convert import fold_norm_affine, layernorm_to_rmsnorm
from tests.convert.models import PreLNLM

transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install 'normlab[hf]')")
from normlab.integrations.hf import patch  # noqa: E402

ml = pytest.importorskip("transformers.models.llama.modeling_llama")


def test_a_handle_entered_again_after_undo_is_released_when_that_block_ends():
    original = ml.LlamaRMSNorm
    with patch("llama") as p:
        p.undo()
        with p:
            assert ml.LlamaRMSNorm is not original
        assert ml.LlamaRMSNorm is original
    assert ml.LlamaRMSNorm is original


@pytest.mark.parametrize("name", ["model-00001-of-00001.safetensors", "model.safetensors"])
def test_a_source_file_among_outs_model_files_is_refused_and_kept(tmp_path, name):
    src = tmp_path / name
    save_file({"w": torch.zeros(2)}, src)
    r = CliRunner().invoke(app, ["convert", str(src), str(tmp_path), "--overwrite"], env={"COLUMNS": "400"})
    assert r.exit_code == 2 and f"{name} is SRC" in " ".join(r.output.split())
    assert src.is_file()


def test_a_config_among_outs_model_files_is_refused_and_kept(tmp_path):
    src, out = tmp_path / "w.safetensors", tmp_path / "out"
    out.mkdir()
    save_file({"w": torch.zeros(2)}, src)
    (out / "config.json").write_text("{}")
    r = CliRunner().invoke(app, ["convert", str(src), str(out), "--config", str(out / "config.json"),
                                 "--overwrite"], env={"COLUMNS": "400"})
    assert r.exit_code == 2 and "config.json is --config" in " ".join(r.output.split())
    assert (out / "config.json").read_text() == "{}"


@pytest.mark.parametrize("flag", [np.False_, 0, False])
def test_numpy_bools_and_zero_are_bools(flag):
    model = PreLNLM()
    keys = set(model.state_dict())
    fold_norm_affine(model, add_bias=flag)  # as add_bias=False: no bias added
    assert {k for k in model.state_dict() if k.endswith("bias")} <= {k for k in keys if k.endswith("bias")}


def test_a_one_element_tensor_is_a_tolerance():
    model = PreLNLM().eval()
    x = torch.randint(0, 32, (2, 8))
    layernorm_to_rmsnorm(model, example_inputs=x, atol=torch.tensor(1e-4), rtol=np.float64(1e-4))


def test_a_link_to_outs_model_file_is_refused_as_src(tmp_path):
    out, other = tmp_path / "out", tmp_path / "other"
    out.mkdir()
    other.mkdir()
    save_file({"w": torch.zeros(2)}, out / "model.safetensors")
    (other / "src.safetensors").symlink_to(out / "model.safetensors")
    before = (out / "model.safetensors").read_bytes()
    r = CliRunner().invoke(app, ["convert", str(other / "src.safetensors"), str(out), "--overwrite"],
                           env={"COLUMNS": "400"})
    assert r.exit_code == 2 and "model.safetensors is SRC" in " ".join(r.output.split())
    assert (out / "model.safetensors").read_bytes() == before
