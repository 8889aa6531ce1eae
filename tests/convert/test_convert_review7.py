"""A torch model whose residual stream adds a table held by a submodule (a parameter, or
a fixed buffer) is converted or refused with a reason, not crashed on; a half-precision
normlab checkpoint converts through the command line, in float32 as documented."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from normlab.convert import ConversionError, fold_norm_affine, layernorm_to_rmsnorm


class _Emb(nn.Module):
    def __init__(self, buffer: bool):
        super().__init__()
        self.tok = nn.Embedding(30, 16)
        if buffer:
            self.register_buffer("pos", torch.randn(8, 16))
        else:
            self.pos = nn.Parameter(torch.randn(8, 16))

    def forward(self, idx):
        return self.tok(idx) + self.pos


class _LM(nn.Module):
    def __init__(self, buffer: bool):
        super().__init__()
        self.emb, self.ln, self.fc1 = _Emb(buffer), nn.LayerNorm(16), nn.Linear(16, 32)
        self.fc2, self.ln_f, self.head = nn.Linear(32, 16), nn.LayerNorm(16), nn.Linear(16, 30)
        for m in (self.ln, self.ln_f):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)

    def forward(self, idx):
        x = self.emb(idx)
        x = x + self.fc2(torch.relu(self.fc1(self.ln(x))))
        return self.head(self.ln_f(x))


def _model(buffer):
    torch.manual_seed(0)
    return _LM(buffer).eval()


IDX = torch.randint(0, 30, (2, 8), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("buffer", [False, True])
def test_fold_with_a_nested_table_on_the_stream(buffer):
    m = _model(buffer)
    with torch.no_grad():
        want = m(IDX)
        report = fold_norm_affine(m).normlab_report
        torch.testing.assert_close(m(IDX), want, rtol=1e-5, atol=1e-5)
    assert set(report.paths("folded")) == {"ln", "ln_f"} and not report.left


def test_rms_centres_a_nested_parameter_table():
    m = _model(False)
    with torch.no_grad():
        want = m(IDX)
        layernorm_to_rmsnorm(m)
        torch.testing.assert_close(m(IDX), want, rtol=1e-5, atol=1e-5)
    assert type(m.ln).__name__.startswith("RMSNorm")


def test_rms_refuses_a_fixed_buffer_table_naming_it():
    m = _model(True)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ConversionError, match="emb.pos \\(a buffer, not a parameter: a fixed table\\)"):
        layernorm_to_rmsnorm(m)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("transform", ["swap", "fold", "rms"])
def test_convert_cli_takes_a_bfloat16_normlab_checkpoint(tmp_path, transform):
    from typer.testing import CliRunner

    from normlab.cli import app
    from normlab.models import TransformerConfig, TransformerLM, load_model, save_model

    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=50, d_model=32, n_heads=4, n_layers=2, max_seq_len=16))
    save_model(model.to(torch.bfloat16), tmp_path / "lm.safetensors")
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "lm.safetensors"), str(tmp_path / "out"),
                                      "-t", transform], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = load_model(tmp_path / "out" / "model.safetensors")
    assert next(out.parameters()).dtype == torch.float32
    tokens = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(out.eval()(tokens), model.float().eval()(tokens), rtol=1e-4, atol=1e-4)
