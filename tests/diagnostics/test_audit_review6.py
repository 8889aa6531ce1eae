"""audit and the monitors, reviewed as a user would meet them: a tokenizer's output as the
example input, an affine-free input norm, a model nothing can be made up for, a negative
eps, an example input that fails, a config transformers refuses, attention modules the
logit monitor cannot read, and blocks that are nn.Sequential themselves."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from normlab.cli import app
from normlab.diagnostics import (
    ActivationMonitor,
    AttentionLogitMonitor,
    audit,
    find_block_lists,
    grad_norms,
)
from normlab.errors import NormArgumentError
from normlab.models import TransformerConfig, TransformerLM

transformers = pytest.importorskip("transformers")


def _found(findings):
    return {(f.kind, f.module) for f in findings}


def _llama_without_final_norm():
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg)
    m.model.norm = nn.Identity()
    return m


def test_a_tokenizers_batch_encoding_is_taken_as_keyword_arguments():
    m = _llama_without_final_norm()
    ids = torch.randint(0, 100, (2, 6))
    enc = transformers.BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert not isinstance(enc, dict)
    got = audit(m, enc)
    assert _found(got) == _found(audit(m, dict(enc)))
    assert ("pre-ln-no-final-norm", "model.layers") in _found(got)
    assert not any(f.kind == "no-trace" for f in got), got


class _Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.norm1, self.fc = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc(self.norm1(x))


class _InputNorm(nn.Module):
    """An affine-free norm of the float input, whose output is the Pre-LN blocks' residual stream."""

    def __init__(self, double=False):
        super().__init__()
        self.input_norm = nn.LayerNorm(8, elementwise_affine=False)
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.final = nn.LayerNorm(8)
        self.double = double

    def forward(self, x):
        x = self.input_norm(x)
        if self.double:  # the only reader of the first norm is a second norm: a double norm
            return self.final(self.blocks[0].norm1(x))
        for b in self.blocks:
            x = b(x)
        return self.final(x)


def test_an_affine_free_input_norm_read_by_the_residual_stream_is_no_double_norm():
    x = torch.randn(2, 5, 8)
    assert audit(_InputNorm(), x) == []
    assert not x.requires_grad  # the caller's input is left as it was
    # a true double norm after the affine-free norm is still found
    assert ("double-norm", "blocks.0.norm1") in _found(audit(_InputNorm(double=True), x))


class _ZeroInitRes(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        nn.init.zeros_(self.bn.weight)

    def forward(self, x):
        return x + self.bn(self.conv(x))


def test_a_model_nothing_can_be_made_up_for_is_told_and_an_input_given_that_fails_says_so():
    net = nn.Sequential(_ZeroInitRes(), _ZeroInitRes())
    got = audit(net)
    (info,) = [f for f in got if f.kind == "no-trace"]
    assert "no example input could be made up for Sequential" in info.message
    assert "pass example_input=" in info.suggestion
    assert not any(f.kind == "no-trace" for f in audit(net, torch.randn(2, 3, 8, 8)))
    assert audit(nn.Module()) == [] and audit(nn.Sequential(nn.ReLU())) == []  # nothing to trace for: silent
    lm = TransformerLM(TransformerConfig(vocab_size=50, d_model=16, n_heads=2, n_layers=2, d_ff=32))
    (info,) = [f for f in audit(lm, example_input=torch.randn(2, 7)) if f.kind == "no-trace"]
    assert "the example input given failed" in info.message and info.suggestion.startswith("fix example_input")


def test_a_negative_eps_is_named_as_negative():
    (f,) = audit(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4, eps=-1e-5)), torch.randn(2, 4))
    assert f.kind == "eps-underflow" and f.severity == "error"
    assert "is negative" in f.message and "is 0 in" not in f.message
    (f,) = audit(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4, eps=0.0)), torch.randn(2, 4))
    assert "eps=0 is 0 in torch.float32" in f.message


def test_the_cli_names_a_config_transformers_refuses_and_exits_2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 30, "num_attention_heads": 4, "vocab_size": 10,
        "num_hidden_layers": 1, "intermediate_size": 8}))
    res = CliRunner().invoke(app, ["audit", str(tmp_path)])
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.replace("│", " ").split())  # (the error panel wraps lines)
    assert "transformers cannot build a model config" in text and "Traceback" not in text


def test_the_logit_monitor_refuses_a_model_without_normlabs_attention():
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2,
                                enable_nested_tensor=False)
    with pytest.raises(NormArgumentError, match="normlab's self-attention"):
        AttentionLogitMonitor(enc)
    with pytest.raises(NormArgumentError, match="LlamaForCausalLM"):
        AttentionLogitMonitor(_llama_without_final_norm())


def test_blocks_that_are_sequentials_make_a_block_list():
    torch.manual_seed(0)
    m = nn.Sequential(*[nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)) for _ in range(3)])
    assert [p for p, _ in find_block_lists(m)] == [""]
    x = torch.randn(2, 8)
    recs = grad_norms(m, m(x).sum())
    assert {r.layer for r in recs} == {0, 1, 2}
    assert len(recs.by_layer("norm")) == 3
    with ActivationMonitor(m) as am:
        m(x)
    assert len(am.residual_rms()) == 3
    # unlike parts are no block list, and a model's stages (lists of like blocks) keep
    # their own lists as the block lists
    assert find_block_lists(nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.Sequential(nn.Linear(2, 2)))) \
        == []
    stages = nn.ModuleList([nn.ModuleList([_Block(), _Block()]) for _ in range(2)])
    assert [p for p, _ in find_block_lists(stages)] == ["0", "1"]


def test_container_blocks_add_no_residual_so_no_placement_finding():
    mlp = nn.Sequential(*[nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16)) for _ in range(4)])
    assert audit(mlp, torch.randn(2, 16)) == []  # it read "the Pre-LN stack ends without a norm"
    deep = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16)) for _ in range(24)])
    assert audit(deep, torch.randn(2, 16), optimizer=torch.optim.Adam(deep.parameters())) == []


def test_dir_of_normlab_lists_what_a_core_install_can_read():
    # (a fresh process: here other tests have imported normlab.cli, which binds it)
    import subprocess
    import sys
    from pathlib import Path

    code = ("import normlab; names = dir(normlab); print('cli' in names, 'bench' in names); "
            "[getattr(normlab, n) for n in names]; print({'LayerNorm', 'functional', 'backend', 'ops'} <= set(names))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"), "PATH": "/usr/bin:/bin"})
    assert out.stdout.split() == ["False", "False", "True"], out.stderr[-2000:]
