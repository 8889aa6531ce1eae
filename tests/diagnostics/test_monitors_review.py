"""Monitors, from a review: activation checkpointing's recomputed forward is not recorded
again, a cross-attention call's keys come from its context, a step's parameter norm is
of the weights its gradient was computed at, and a normlab norm's input without an
example dim is named by the recorder."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import normlab
from normlab.diagnostics import (
    ActivationMonitor,
    AttentionLogitMonitor,
    GradientMonitor,
    per_example_grad_norms,
)
from normlab.models.attention import Attention


class _Blocks(nn.Module):
    def __init__(self, ckpt: str | None) -> None:
        super().__init__()
        self.ckpt = ckpt
        self.blocks = nn.ModuleList(nn.Sequential(normlab.LayerNorm(8), nn.Linear(8, 8)) for _ in range(3))

    def forward(self, x):
        for b in self.blocks:
            if self.ckpt is None:
                x = x + b(x)
            else:
                x = x + checkpoint(b, x, use_reentrant=self.ckpt == "reentrant")
        return x


@pytest.mark.parametrize("ckpt", ["reentrant", "non-reentrant"])
def test_checkpointing_records_each_activation_once(ckpt):
    torch.manual_seed(0)
    plain = _Blocks(None)
    checked = _Blocks(ckpt)
    checked.load_state_dict(plain.state_dict())
    x = torch.randn(4, 5, 8, requires_grad=True)
    got = {}
    for name, model in (("plain", plain), ("checked", checked)):
        with ActivationMonitor(model) as mon:
            model(x).sum().backward()
        got[name] = [(r.site, r.module, round(r.rms, 5)) for r in mon.records]
    assert got["checked"] == got["plain"]
    # each norm's input and each block's output (the Sequential blocks are a block list), once
    assert [site for site, _, _ in got["plain"]] == ["norm_input", "residual"] * 3


class _Decoder(nn.Module):
    """A user's decoder of normlab Attention modules whose cross-attention has another name."""

    def __init__(self) -> None:
        super().__init__()
        self.self_attn = Attention(16, 2)
        self.enc_attn = Attention(16, 2)

    def forward(self, x, mem):
        x = x + self.self_attn(x, is_causal=True)
        return x + self.enc_attn(x, mem)


def test_a_cross_attention_call_takes_its_keys_from_the_context():
    torch.manual_seed(0)
    model = _Decoder()
    x, mem = torch.randn(2, 5, 16), 4.0 * torch.randn(2, 7, 16)
    with AttentionLogitMonitor(model) as mon:
        model(x, mem)
    a = model.enc_attn
    with torch.no_grad():
        q = a.q_proj(x + model.self_attn(x, is_causal=True)).view(2, 5, 2, 8).transpose(1, 2)
        k = a.k_proj(mem).view(2, 7, 2, 8).transpose(1, 2)
        expected = float((q @ k.transpose(-2, -1) / math.sqrt(8)).amax())
    assert mon.by_layer()[1] == pytest.approx(expected, rel=1e-5)


def test_param_norm_is_of_the_weights_the_gradient_was_computed_at():
    def run(read_last: bool) -> list[float]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        before = []
        with GradientMonitor(model) as mon:
            for _ in range(3):
                before.append(float(model[0].weight.detach().norm()))
                model(torch.randn(8, 4)).square().mean().backward()
                if read_last:
                    mon.last  # noqa: B018 (reading it writes the entry)
                opt.step()
                opt.zero_grad()
        got = [next(r.param_norm for r in norms if r.name == "0.weight") for _, norms in mon.history]
        assert got == pytest.approx(before, rel=1e-6)
        return got

    assert run(True) == run(False)


@pytest.mark.parametrize("cls", [nn.LayerNorm, normlab.LayerNorm, normlab.RMSNorm])
def test_an_input_without_example_dim_is_named_with_its_norm(cls):
    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pooled_norm = cls(8)

        def forward(self, x):
            return self.pooled_norm(x.mean(0))

    model = Pooled()
    with per_example_grad_norms(model), pytest.raises(RuntimeError, match="norm 'pooled_norm' got input of size"):
        model(torch.randn(4, 8))
