"""The monitors as a reviewer met them: GradientMonitor read the gradient that clipping or
zero_grad later changed in place (it held a view of the tensor autograd installed as
.grad), kept a model-sized copy after it was closed; AttentionLogitMonitor crashed an empty
batch's forward; misspelled kinds and stacks read as zero gradients or no layers."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from normlab.diagnostics import ActivationMonitor, AttentionLogitMonitor, GradientMonitor
from normlab.errors import NormArgumentError
from normlab.models import TransformerConfig, TransformerLM


def _norms(model):
    return [float(p.grad.detach().norm()) for p in model.parameters()]


@pytest.mark.parametrize("after", ["clip", "zero_grad_in_place", "scale"])
def test_the_entry_is_the_backwards_gradient_whatever_the_step_does_to_grad_after(after):
    torch.manual_seed(0)
    model, x = nn.Linear(4, 1), torch.randn(8, 4)
    with GradientMonitor(model) as mon:
        model(x).pow(2).mean().backward()  # .grad was None: autograd installs a gradient there
        true = _norms(model)
        if after == "clip":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        elif after == "zero_grad_in_place":
            model.zero_grad(set_to_none=False)
        else:
            for p in model.parameters():
                p.grad.mul_(1 / 1024)  # as GradScaler.unscale_
        got = [r.grad_norm for r in mon.last]
    assert got == pytest.approx(true, rel=1e-6)
    assert min(true) > 1e-3


def test_a_gradient_penalty_with_create_graph_is_still_read():
    torch.manual_seed(0)
    model, x = nn.Linear(4, 1), torch.randn(8, 4)
    with GradientMonitor(model) as mon:
        model(x).pow(2).mean().backward(create_graph=True)
        true = _norms(model)
        got = [r.grad_norm for r in mon.last]
    assert got == pytest.approx(true, rel=1e-6)
    for p in model.parameters():
        p.grad = None


def test_leaving_the_monitor_releases_the_gradients_it_held():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 1))
    with GradientMonitor(model) as mon:
        model(torch.randn(4, 64)).sum().backward()
    assert mon.history and not mon._pending and not mon._param_norms
    model.zero_grad(set_to_none=True)
    gc.collect()


def test_attention_logits_of_an_empty_batch_leave_the_forward_working():
    model = TransformerLM(TransformerConfig(vocab_size=50, d_model=16, n_heads=4, n_layers=2))
    tokens = torch.randint(0, 50, (0, 7))
    with AttentionLogitMonitor(model) as mon:
        assert model(tokens).shape == (0, 7, 50)
    assert all(v != v or v == float("-inf") for v in mon.by_layer())  # no reading: NaN or -inf


def test_a_misspelled_kind_or_stack_is_refused():
    model = TransformerLM(TransformerConfig(vocab_size=50, d_model=16, n_heads=4, n_layers=2))
    tokens = torch.randint(0, 50, (2, 5))
    with GradientMonitor(model) as mon, ActivationMonitor(model) as act:
        model(tokens).sum().backward()
    recs = mon.last
    assert len(recs.by_layer("ffn_w2")) == 2
    with pytest.raises(NormArgumentError, match="expected kind among .*got 'ffnw2'"):
        recs.by_layer("ffnw2")
    with pytest.raises(NormArgumentError, match="expected stack among .*got 'block'"):
        recs.by_layer("ffn_w2", stack="block")
    assert len(act.residual_rms()) == 2
    with pytest.raises(NormArgumentError, match="expected stack among .*got 'block'"):
        act.residual_rms(stack="block")
