"""Second review of this round's fixes: non-affine norms on the checked-once path, the
monitors under torch.compile and whole-model checkpointing, a skipped step under
autocast, per-example buffers under non-reentrant checkpointing, config hashes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import normlab
from normlab.diagnostics import ActivationMonitor, GradientMonitor, per_example_grad_norms
from normlab.models import TransformerConfig, TransformerLM
from normlab.studies.stats import mean_ci


@pytest.mark.parametrize("cls", [normlab.LayerNorm, normlab.RMSNorm])
def test_non_affine_norms_on_the_checked_once_path(cls):
    x = torch.randn(2, 3, 6)
    ref = cls(6, elementwise_affine=False)(x)
    with normlab.set_backend("triton"):  # the remembered-signature path (Triton interpreter on CPU)
        m = cls(6, elementwise_affine=False)
        for _ in range(2):
            torch.testing.assert_close(m(x), ref)


def test_activation_monitor_under_fullgraph_compile():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), normlab.LayerNorm(8))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 8)
    with ActivationMonitor(model) as mon:
        compiled(x)
    (rec,) = mon.records
    assert rec.rms == pytest.approx(float(model[0](x).square().mean().sqrt()), rel=1e-5)


def test_monitors_count_a_checkpointed_models_steps_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), normlab.LayerNorm(8), nn.Linear(8, 1))
    with ActivationMonitor(model, every=2) as act, GradientMonitor(model) as grads:
        for _ in range(3):
            checkpoint(model, torch.randn(4, 8), use_reentrant=False).sum().backward()
    assert act.step == 2 and sorted({r.step for r in act.records}) == [0, 2]
    assert [s for s, _ in grads.history] == [0, 1, 2]


def test_a_skipped_step_under_autocast_is_forgotten():
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=32, d_model=16, n_heads=2, n_layers=2, d_ff=32, dropout=0.0,
                                            placement="pre"))
    tokens = torch.randint(0, 32, (4, 8))
    with per_example_grad_norms(model) as rec:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(tokens).float().mean()
        del loss  # skipped: its graph (bf16 branches added to a float32 stream) is freed
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(tokens).float().mean().backward()
        assert len(rec.total()) == 4


def test_module_buffer_under_non_reentrant_checkpointing():
    torch.manual_seed(0)
    norm, ref = normlab.LayerNorm(6), normlab.LayerNorm(6)
    norm.collect_per_example_grad_sq = True
    x = torch.randn(3, 6)
    checkpoint(lambda z: norm(z) * 2, x.requires_grad_(), use_reentrant=False).square().sum().backward()
    want = [float(torch.autograd.grad((ref(x[b:b + 1].detach()) * 2).square().sum(), ref.weight)[0].square().sum())
            for b in range(3)]
    assert norm.per_example_grad_sq[0].tolist() == pytest.approx(want, rel=1e-5)


def test_config_hash_agrees_with_equality():
    a = TransformerConfig(norm="dyt", norm_options={"alpha_init": 1}, dropout=0.0)
    b = TransformerConfig(norm="dyt", norm_options={"alpha_init": 1.0}, dropout=-0.0)
    assert a == b and hash(a) == hash(b)


def test_mean_of_huge_finite_values():
    assert math.isinf(mean_ci([1.5e308, 1.5e308]).estimate)
