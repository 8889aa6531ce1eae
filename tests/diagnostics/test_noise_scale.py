"""The gradient noise scale estimators on a problem whose noise scale is known."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import grad, vmap

from normlab.diagnostics import NoiseScaleEMA, gradient_noise_scale, two_batch_estimates
from normlab.errors import NormArgumentError


def _linear_problem(d=256, seed=0):
    """L_b(w) = (G + eps_b) . w + |w|^2 / 2 at w = 0: per-example gradient G + eps_b with
    eps_b ~ N(0, Sigma), Sigma = diag(sigma^2). B_simple = tr(Sigma) / |G|^2."""
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(d, generator=g, dtype=torch.float64)
    sigma = 0.5 + torch.rand(d, generator=g, dtype=torch.float64) * 1.5
    sigma = sigma * math.sqrt(40.0 * G.square().sum() / sigma.square().sum())  # B_simple = 40
    return G, sigma


def _per_example_grads(G, sigma, batch, g):
    targets = G + sigma * torch.randn(batch, G.numel(), generator=g, dtype=torch.float64)
    w = torch.zeros_like(G)

    def loss(w, t):
        return t @ w + 0.5 * w @ w
    return vmap(grad(loss), in_dims=(None, 0))(w, targets)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_recovers_known_noise_scale(reduction):
    G, sigma = _linear_problem()
    true = float(sigma.square().sum() / G.square().sum())
    assert true == pytest.approx(40.0)
    g = torch.Generator().manual_seed(1)
    ema = NoiseScaleEMA(beta=0.98)
    g_sqs, traces = [], []
    batch = 32
    for _ in range(300):
        per_ex = _per_example_grads(G, sigma, batch, g)               # g_b
        contrib = per_ex / batch if reduction == "mean" else per_ex   # what a backward sees
        est = gradient_noise_scale(contrib.square().sum(1), contrib.sum(0).square().sum(),
                                   reduction=reduction)
        assert est.batch_size == batch
        g_sqs.append(est.g_sq)
        traces.append(est.trace_sigma)
        ema.update(contrib.square().sum(1), float(contrib.sum(0).square().sum()), reduction=reduction)
    # unbiased numerator and denominator: their averages give B_simple within 10%
    assert sum(traces) / len(traces) == pytest.approx(float(sigma.square().sum()), rel=0.05)
    assert sum(g_sqs) / len(g_sqs) == pytest.approx(float(G.square().sum()), rel=0.10)
    assert (sum(traces) / sum(g_sqs)) == pytest.approx(true, rel=0.10)
    assert ema.b_simple == pytest.approx(true, rel=0.10)


def test_two_batch_estimator_is_exact_on_expectations():
    g_sq, trace = 3.0, 120.0
    for b_small, b_big in [(1, 64), (8, 512)]:
        small, big = g_sq + trace / b_small, g_sq + trace / b_big
        got = two_batch_estimates(small, big, b_small, b_big)
        assert got == pytest.approx((g_sq, trace), rel=1e-12)
    with pytest.raises(ValueError, match="b_small < b_big"):
        two_batch_estimates(1.0, 1.0, 8, 8)


def test_noise_free_gradient_has_zero_noise_scale():
    contrib = torch.ones(16, 5) / 16  # every example has the same gradient
    est = gradient_noise_scale(contrib.square().sum(1), contrib.sum(0).square().sum())
    assert est.trace_sigma == pytest.approx(0.0, abs=1e-12)
    assert est.g_sq == pytest.approx(5.0)
    assert est.b_simple == pytest.approx(0.0, abs=1e-12)


def test_ema_is_bias_corrected_ratio_of_averages():
    ema = NoiseScaleEMA(beta=0.9)
    assert math.isnan(ema.b_simple)
    ema.update_estimates(2.0, 6.0)
    assert ema.b_simple == pytest.approx(3.0) and ema.g_sq == pytest.approx(2.0)
    ema.update_estimates(4.0, 6.0)
    # averages: g = (0.9*0.1*2 + 0.1*4)/(1-0.81), trace = 6
    g_avg = (0.09 * 2 + 0.1 * 4) / 0.19
    assert ema.g_sq == pytest.approx(g_avg) and ema.b_simple == pytest.approx(6.0 / g_avg)
    with pytest.raises(ValueError, match="beta"):
        NoiseScaleEMA(beta=1.0)
    with pytest.raises(ValueError, match="shape"):
        gradient_noise_scale(torch.ones(1), 1.0)


def test_bad_arguments_are_named():
    with pytest.raises(NormArgumentError, match=r"gradient_noise_scale: expected per_example_sq to be a "
                                                r"torch.Tensor of shape \[B\] with B >= 2, got list"):
        gradient_noise_scale([1.0, 2.0, 3.0], 1.0)
    with pytest.raises(NormArgumentError, match="expected batch_grad_sq to be a number or a one-element"):
        gradient_noise_scale(torch.ones(3), torch.ones(3))
    with pytest.raises(NormArgumentError, match=r"NoiseScaleEMA: expected beta .* got '0\.9'"):
        NoiseScaleEMA("0.9")
    # a one-element tensor still goes: per-example norms 1, 2, 3 of a mean loss (|G_1|^2 =
    # 9 * mean = 18) and |G_3|^2 = 0.5: |G|^2 = (3 * 0.5 - 18) / 2, tr(Sigma) = (18 - 0.5) / (2 / 3)
    est = gradient_noise_scale(torch.tensor([1.0, 2.0, 3.0]), torch.tensor(0.5))
    assert (est.g_sq, est.trace_sigma) == pytest.approx((-8.25, 26.25))
