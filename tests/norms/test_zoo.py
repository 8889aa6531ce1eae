"""Each zoo norm: its defining property, its gradients, the residual protocol."""

import math

import pytest
import torch
from torch import nn

import normlab
from normlab import NormArgumentError
from normlab.norms import get_norm_entry
from normlab.ops import reference as R


def test_registry_lists_every_norm_with_its_paper():
    names = normlab.norm_names()
    assert names == ["layernorm", "rmsnorm", "scalenorm", "dyt", "none", "batchnorm", "powernorm"]
    for name in names:
        summary = get_norm_entry(name).summary
        assert "y = " in summary and "(" in summary, name
        m = normlab.build_norm(name, 12, eps=1e-4)
        assert isinstance(m, nn.Module)
        if get_norm_entry(name).has_eps:
            assert m.eps == 1e-4


def test_build_norm_errors_and_eps_handling():
    with pytest.raises(NormArgumentError, match="unknown norm 'layrnorm'.*layernorm, rmsnorm"):
        normlab.build_norm("layrnorm", 8)
    with pytest.raises(NormArgumentError, match="dim.*int >= 1.*0"):
        normlab.build_norm("layernorm", 0)
    assert isinstance(normlab.build_norm("dyt", 8, eps=1e-5), normlab.DyT)  # eps ignored
    assert normlab.build_norm("rmsnorm", 8, eps=None).eps is None
    assert normlab.build_norm("layernorm", 8, eps=None).eps == 1e-5  # None: the default
    with pytest.raises(TypeError):
        normlab.build_norm("layernorm", 8, epsilon=1e-5)


@pytest.mark.parametrize("name", ["layernorm", "rmsnorm", "scalenorm", "dyt", "none", "batchnorm", "powernorm"])
def test_residual_protocol_for_every_norm(name):
    torch.manual_seed(0)
    m = normlab.build_norm(name, 16).eval()
    x, r = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    out, new_r = m(x, r)
    torch.testing.assert_close(new_r, r + x)
    torch.testing.assert_close(out, m(r + x))


def test_rmsnorm_output_has_unit_rms_before_affine():
    x = torch.randn(10, 300) * 5 + 2
    y = normlab.RMSNorm(300, elementwise_affine=False)(x)
    torch.testing.assert_close(y.square().mean(-1), torch.ones(10), atol=1e-5, rtol=1e-5)


def test_layernorm_output_is_standardized():
    x = torch.randn(10, 300) * 5 + 2
    y = normlab.LayerNorm(300, elementwise_affine=False)(x)
    torch.testing.assert_close(y.mean(-1), torch.zeros(10), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(10), atol=1e-4, rtol=0)


def test_scalenorm_output_has_norm_g():
    m = normlab.ScaleNorm(64)
    assert m.g.item() == pytest.approx(8.0)  # sqrt(64)
    with torch.no_grad():
        m.g.fill_(3.5)
    y = m(torch.randn(7, 64) * 10)
    torch.testing.assert_close(y.norm(dim=-1), torch.full((7,), 3.5))
    assert torch.equal(m(torch.zeros(2, 64)), torch.zeros(2, 64))  # eps clamps the zero row


def test_dyt_equation_and_init():
    m = normlab.DyT(6)
    assert m.alpha.item() == 0.5 and torch.equal(m.weight, torch.ones(6))
    with torch.no_grad():
        m.alpha.fill_(1.7)
        m.weight.copy_(torch.arange(6.0))
        m.bias.fill_(0.25)
    x = torch.randn(3, 6)
    torch.testing.assert_close(m(x), torch.arange(6.0) * torch.tanh(1.7 * x) + 0.25)
    assert normlab.DyT(6, alpha_init=0.2).alpha.item() == pytest.approx(0.2)


def test_none_is_identity():
    x = torch.randn(3, 4)
    assert normlab.build_norm("none", 4)(x) is x


# ------------------------------------------------------------- masked batch norm


def _padded_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 3, 5])
    x = torch.randn(3, 7, 4, generator=g) * 2 + 1
    pad = torch.arange(7)[None, :] >= lengths[:, None]
    return x, pad


def test_masked_batchnorm_statistics_ignore_padded_positions_exactly():
    x, pad = _padded_batch()
    m = normlab.MaskedBatchNorm(4)
    ref = nn.BatchNorm1d(4)  # torch's batch norm on the real positions only
    y = m(x, padding_mask=pad)
    y_ref = ref(x[~pad])
    torch.testing.assert_close(y[~pad], y_ref)
    torch.testing.assert_close(m.running_mean, ref.running_mean)
    torch.testing.assert_close(m.running_var, ref.running_var)
    # garbage (even inf/nan) in padded positions changes nothing at real positions
    x2 = x.clone()
    x2[pad] = float("inf")
    x2[pad.nonzero()[0][0], pad.nonzero()[0][1]] = float("nan")
    m2 = normlab.MaskedBatchNorm(4)
    torch.testing.assert_close(m2(x2, padding_mask=pad)[~pad], y[~pad])
    # and the gradient into padded positions through the statistics is zero
    xg = x.clone().requires_grad_(True)
    out = normlab.MaskedBatchNorm(4)(xg, padding_mask=pad)
    (g,) = torch.autograd.grad((out * (~pad).unsqueeze(-1)).square().sum(), xg)
    assert torch.equal(g[pad], torch.zeros_like(g[pad]))


def test_masked_batchnorm_without_padding_equals_batchnorm_and_eval_uses_running_stats():
    x, _ = _padded_batch(1)
    m, ref = normlab.MaskedBatchNorm(4), nn.BatchNorm1d(4)
    for _ in range(3):
        torch.testing.assert_close(m(x), ref(x.reshape(-1, 4)).reshape(x.shape))
    m.eval(), ref.eval()
    torch.testing.assert_close(m(x), ref(x.reshape(-1, 4)).reshape(x.shape))


def test_masked_batchnorm_bad_mask():
    x, pad = _padded_batch()
    m = normlab.MaskedBatchNorm(4)
    with pytest.raises(NormArgumentError, match=r"padding_mask of shape \[3, 7\].*got \[3, 6\]"):
        m(x, padding_mask=pad[:, :6])
    with pytest.raises(NormArgumentError, match="padding_mask.*torch.bool"):
        m(x, padding_mask=pad.long())
    with pytest.raises(NormArgumentError, match="more than 1 real"):
        m(x, padding_mask=torch.ones(3, 7, dtype=torch.bool))


# ------------------------------------------------------------- PowerNorm


def test_powernorm_eval_uses_running_quadratic_mean():
    m = normlab.PowerNorm(4, warmup_iters=2, alpha_fwd=0.5)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 6, 4, generator=g) * s for s in (1.0, 2.0, 3.0, 0.5)]
    phi = torch.ones(4)
    for t, xb in enumerate(batches, start=1):
        y = m(xb)
        batch_phi = xb.square().mean((0, 1))
        used = batch_phi if t <= 2 else phi
        torch.testing.assert_close(y, xb / torch.sqrt(used + m.eps))  # affine is identity at init
        phi = phi * (t - 1) / t + batch_phi / t if t <= 2 else 0.5 * phi + 0.5 * batch_phi
        torch.testing.assert_close(m.running_phi, phi)
    m.eval()
    x = torch.randn(3, 4)
    torch.testing.assert_close(m(x), x / torch.sqrt(phi + m.eps))
    assert torch.equal(m.running_phi, phi)  # eval does not update the statistic


def test_powernorm_relaxes_zero_mean():
    m = normlab.PowerNorm(4)
    x = torch.randn(4, 8, 4) + 5.0
    y = m(x)
    assert (y.mean((0, 1)) > 0.9).all()  # no mean subtraction: the mean survives


def test_powernorm_padding_is_ignored_in_statistics():
    x, pad = _padded_batch()
    m = normlab.PowerNorm(4, warmup_iters=10)
    y = m(x, padding_mask=pad)
    phi = x[~pad].square().mean(0)
    torch.testing.assert_close(y[~pad], x[~pad] / torch.sqrt(phi + m.eps))


def test_powernorm_approximate_backward():
    # dL/dx = (g - nu * x_hat) / psi; nu <- nu * (1 - (1 - a) * Gamma) + (1 - a) * Lambda,
    # Lambda = mean(g * x_hat), Gamma = mean(x_hat^2) (Shen et al. 2020, Algorithm 2)
    m = normlab.PowerNorm(3, warmup_iters=0, alpha_bkw=0.8, affine=False)
    with torch.no_grad():
        m.running_phi.copy_(torch.tensor([1.0, 4.0, 9.0]))
        m.grad_ema.copy_(torch.tensor([0.1, -0.2, 0.3]))
    x = torch.randn(5, 3, requires_grad=True)
    g = torch.randn(5, 3)
    y = m(x)
    psi = torch.sqrt(torch.tensor([1.0, 4.0, 9.0]) + m.eps)
    x_hat = x.detach() / psi
    torch.testing.assert_close(y, x_hat)
    nu = m.grad_ema.clone()
    (dx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(dx, (g - nu * x_hat) / psi)
    torch.testing.assert_close(m.grad_ema, nu * (1 - 0.2 * x_hat.square().mean(0)) + 0.2 * (g * x_hat).mean(0))


def test_powernorm_backward_is_the_authors_nu_update_over_steps():
    """The authors' nu update (their running ema_gz E: approx = g - (1 - a) E z,
    E += mean(approx * z)) is ours with nu = (1 - a) E, step after step. dx = approx / psi
    with Algorithm 2's running psi (their code divides by the batch's psi instead)."""
    torch.manual_seed(0)
    a = 0.9
    m = normlab.PowerNorm(4, warmup_iters=0, alpha_bkw=a, alpha_fwd=0.95, affine=False)
    e = torch.zeros(4)
    for _ in range(4):
        x = (torch.randn(6, 4) * 3).requires_grad_()
        psi = torch.sqrt(m.running_phi.clone() + m.eps)
        g = torch.randn(6, 4)
        (dx,) = torch.autograd.grad(m(x), x, g)
        z = x.detach() / psi
        approx = g - (1 - a) * e * z
        e = e + (approx * z).mean(0)
        torch.testing.assert_close(dx, approx / psi)
        torch.testing.assert_close(m.grad_ema, (1 - a) * e)


@pytest.mark.parametrize("name", ["powernorm", "batchnorm"])
def test_padding_gets_no_gradient_and_garbage_there_changes_nothing(name):
    """Changing only the padded positions (even to inf/nan) changes no gradient and no
    statistic: the loss sees the real positions only."""
    torch.manual_seed(0)
    cls = {"powernorm": normlab.PowerNorm, "batchnorm": normlab.MaskedBatchNorm}[name]
    x = torch.randn(3, 5, 4)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[0, 3:] = pad[2, 1:] = True
    w = torch.randn(3, 5, 4)
    grads, states = [], []
    for fill in (None, 7.0, math.inf, math.nan):
        m = cls(4)
        if name == "powernorm":
            m.warmup_iters = 0
            with torch.no_grad():
                m.grad_ema.fill_(0.3)
        torch.manual_seed(1)
        lin = torch.nn.Linear(4, 4)  # the same weights each time
        xi = lin(x)
        if fill is not None:
            xi = xi.masked_fill(pad.unsqueeze(-1), fill)  # garbage at the norm's padded inputs
        xi.retain_grad()
        h = m(xi, padding_mask=pad)
        loss = (h * w).masked_fill(pad.unsqueeze(-1), 0.0).square().sum()
        loss.backward()
        assert torch.isfinite(xi.grad).all() and (xi.grad[pad] == 0).all()
        grads.append([lin.weight.grad.clone(), m.weight.grad.clone()])
        states.append({k: v.clone() for k, v in m.state_dict().items()})
    for other, state in zip(grads[1:], states[1:]):
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b)
        for k in state:
            torch.testing.assert_close(state[k], states[0][k])


@pytest.mark.parametrize("make,match", [
    (lambda: normlab.PowerNorm(4, alpha_fwd=1.5), "alpha_fwd"),
    (lambda: normlab.PowerNorm(4, alpha_bkw=-0.1), "alpha_bkw"),
    (lambda: normlab.PowerNorm(4, warmup_iters=-3), "warmup_iters"),
    (lambda: normlab.PowerNorm(4, eps=0.0), "eps"),
    (lambda: normlab.MaskedBatchNorm(4, momentum=-0.5), "momentum"),
    (lambda: normlab.MaskedBatchNorm(4, eps=float("nan")), "eps"),
    (lambda: normlab.ScaleNorm(4, eps=-1.0), "eps"),
    (lambda: normlab.DyT(4, alpha_init=float("nan")), "alpha_init"),
])
def test_zoo_hyperparameters_are_checked(make, match):
    with pytest.raises(NormArgumentError, match=match):
        make()


def test_masked_batchnorm_momentum_none_is_a_cumulative_average():
    torch.manual_seed(0)
    m, ref = normlab.MaskedBatchNorm(4, momentum=None), torch.nn.BatchNorm1d(4, momentum=None)
    for _ in range(3):
        x = torch.randn(8, 4) * 2 + 1
        m(x)
        ref(x)
    torch.testing.assert_close(m.running_mean, ref.running_mean)
    torch.testing.assert_close(m.running_var, ref.running_var)


# ------------------------------------------------------------- AdaLN


def test_adaln_is_plain_layernorm_at_init_and_modulates_after():
    torch.manual_seed(0)
    m = normlab.AdaLN(8, cond_dim=5)
    x, c = torch.randn(2, 3, 8), torch.randn(2, 5)
    torch.testing.assert_close(m(x, c), R.layer_norm(x, (8,), eps=1e-6))
    with torch.no_grad():
        m.modulation.bias.copy_(torch.cat([torch.full((8,), 0.5), torch.full((8,), 1.0)]))
    torch.testing.assert_close(m(x, c), R.layer_norm(x, (8,), eps=1e-6) * 2.0 + 0.5)
    with pytest.raises(NormArgumentError, match=r"cond of shape \[2, 5\]"):
        m(x, torch.randn(2, 4))


# ------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("name", ["scalenorm", "dyt", "batchnorm", "powernorm_eval", "rmsnorm", "layernorm"])
def test_gradcheck_float64_zoo(name):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    if name == "powernorm_eval":
        m = normlab.PowerNorm(5).double().eval()
    else:
        m = normlab.build_norm(name, 5).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    params = [p for p in m.parameters()]

    def fn(x, *ps):
        saved = [p.data for p in params]
        for p, q in zip(params, ps):
            p.data = q
        try:
            return torch.func.functional_call(m, dict(zip([n for n, _ in m.named_parameters()], ps)), (x,))
        finally:
            for p, s in zip(params, saved):
                p.data = s

    assert torch.autograd.gradcheck(fn, (x, *[p.detach().clone().requires_grad_(True) for p in params]))


def test_gradcheck_adaln():
    torch.manual_seed(0)
    m = normlab.AdaLN(4, 3).double()
    with torch.no_grad():
        m.modulation.weight.normal_()
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x, c))
    assert math.isfinite(m(x, c).sum().item())


def test_powernorm_a_nan_gradient_at_padded_outputs_reaches_nothing():
    m = normlab.PowerNorm(4, warmup_iters=0)
    x = torch.randn(2, 5, 4, requires_grad=True)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    g = torch.randn(2, 5, 4).masked_fill(pad.unsqueeze(-1), math.nan)
    m(x, padding_mask=pad).backward(g)
    assert torch.isfinite(x.grad).all() and torch.isfinite(m.grad_ema).all()


def test_masked_batchnorm_gradient_at_padded_outputs_stays_off_the_real_positions():
    # a padded output used to be (0 - mu_B) / sigma_B * gamma + beta: a gradient there (a
    # custom loss that does not mask) reached every real position through the batch
    # statistics, and a nan one made them nan; now it is 0, and the real positions' and
    # the parameters' gradients are nn.BatchNorm1d's on the real positions alone
    torch.manual_seed(0)
    m = normlab.MaskedBatchNorm(3, dtype=torch.float64)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-1, 1)
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    y = m(x, padding_mask=pad)
    assert y[pad].abs().max() == 0
    g = torch.randn_like(y)
    y.backward(g)
    ref = nn.BatchNorm1d(3, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(m.weight)
        ref.bias.copy_(m.bias)
    real = x.detach()[~pad].clone().requires_grad_()
    out = ref(real)
    out.backward(g[~pad])
    torch.testing.assert_close(y[~pad], out, rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad[~pad], real.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(m.weight.grad, ref.weight.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(m.bias.grad, ref.bias.grad, rtol=0, atol=1e-12)
    assert x.grad[pad].abs().max() == 0
    x.grad = m.weight.grad = m.bias.grad = None
    m(x, padding_mask=pad).backward(g.masked_fill(pad.unsqueeze(-1), math.nan))
    assert torch.isfinite(x.grad).all() and torch.isfinite(m.weight.grad).all() and torch.isfinite(m.bias.grad).all()


@pytest.mark.parametrize("build", [
    lambda: normlab.ScaleNorm(0), lambda: normlab.PowerNorm(0), lambda: normlab.MaskedBatchNorm(0),
    lambda: normlab.DyT(-1), lambda: normlab.AdaLN(0, 4), lambda: normlab.AdaLN(4, 0), lambda: normlab.DyT(2.0),
], ids=["scalenorm", "powernorm", "batchnorm", "dyt", "adaln-dim", "adaln-cond", "dyt-float"])
def test_a_norm_built_directly_checks_its_size(build):
    # ScaleNorm(0), PowerNorm(0), MaskedBatchNorm(0) and AdaLN(0, 4) were built, DyT(-1)
    # raised torch's "negative dimension": build_norm checked, the classes did not
    with pytest.raises(NormArgumentError, match=r"expected (dim|cond_dim) to be an int >= 1"):
        build()


def test_powernorm_buffers_follow_its_dtype():
    m = normlab.PowerNorm(4, dtype=torch.float64, warmup_iters=0)
    assert m.running_phi.dtype == m.grad_ema.dtype == torch.float64
    x = torch.full((3, 4), 1e-5, dtype=torch.float64, requires_grad=True)
    m(x).sum().backward()
    # psi^2 = 0.9 * 1 + 0.1 * 1e-10: a float32 buffer rounds the batch's share away
    assert math.isclose(m.running_phi[0].item(), 0.9 + 1e-11, rel_tol=1e-13)


def test_powernorm_padded_outputs_are_zero_and_reach_no_parameter():
    # as MaskedBatchNorm's: a padded output was beta, and the gradient at it (all of a
    # plain sum's, or a nan) reached gamma and beta
    torch.manual_seed(0)
    m = normlab.PowerNorm(4, warmup_iters=0)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.fill_(0.5)
    x = torch.randn(2, 5, 4)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 2:] = True
    y = m(x, padding_mask=pad)
    assert y[pad].abs().max() == 0
    y.sum().backward()
    assert torch.equal(m.bias.grad, torch.full((4,), 7.0))  # the 7 real positions
    x_hat = y.detach()[~pad] - 0.5  # gamma * x_hat at the real positions
    torch.testing.assert_close(m.weight.grad, (x_hat / m.weight.detach()).sum(0))
    m.zero_grad()
    m(x, padding_mask=pad).backward(torch.ones(2, 5, 4).masked_fill(pad.unsqueeze(-1), math.nan))
    assert torch.isfinite(m.weight.grad).all() and torch.equal(m.bias.grad, torch.full((4,), 7.0))


def test_powernorm_refuses_a_second_derivative_by_name():
    torch.manual_seed(0)
    m = normlab.PowerNorm(8, warmup_iters=0)
    x = torch.randn(4, 8, requires_grad=True)
    (g,) = torch.autograd.grad((m(x) ** 3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="PowerNorm: no second derivative"):
        g.sum().backward()
    # the first derivative under create_graph is the plain backward's
    m2 = normlab.PowerNorm(8, warmup_iters=0)
    (plain,) = torch.autograd.grad((m2(x) ** 3).sum(), x)
    torch.testing.assert_close(g, plain)
    torch.testing.assert_close(m.grad_ema, m2.grad_ema)
    # a second derivative whose graph holds PowerNorm's output (not its backward) still runs
    lin = nn.Linear(8, 8)
    (gw,) = torch.autograd.grad(lin(m(x)).square().sum(), lin.weight, create_graph=True)
    gw.square().sum().backward()
    assert lin.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("weight_shape", [(2.5, 8), (-1, 8), "ab", (0, 8), (True, 8), (2, 7)])
def test_layernorm_weight_shape_is_checked_by_name(weight_shape):
    # (2.5, 8) became (2, 8), (0, 8) a zero-size weight; -1 and "ab" raised from torch / int()
    with pytest.raises(NormArgumentError, match="expected weight_shape"):
        normlab.LayerNorm(8, weight_shape=weight_shape)
    assert normlab.LayerNorm(8, weight_shape=[3, 8]).weight.shape == (3, 8)
    import numpy as np

    assert normlab.LayerNorm(8, weight_shape=(np.int64(4), 8)).weight.shape == (4, 8)  # integers of any kind


def test_nonorm_checks_its_size_and_its_input_as_every_norm():
    for dim in (-3, "8", 0):
        with pytest.raises(NormArgumentError, match="expected dim to be an int >= 1"):
            normlab.NoNorm(dim)
    m = normlab.NoNorm(8)
    with pytest.raises(NormArgumentError, match=r"expected input with shape \[\*, 8\]"):
        m(torch.randn(2, 7))  # passed through: a wrong width upstream went unnoticed
    x = torch.randn(2, 8)
    assert m(x) is x


@pytest.mark.parametrize("cls", [normlab.LayerNorm, normlab.RMSNorm, normlab.NoNorm])
def test_an_input_that_is_no_tensor_is_named(cls):
    with pytest.raises(TypeError, match="expected input to be a torch.Tensor, got list"):
        cls(8)([1.0] * 8)  # LayerNorm/RMSNorm raised AttributeError: 'list' object has no attribute 'shape'


@pytest.mark.parametrize("x,cond,match", [
    ((2, 3, 7), (2, 4), r"expected input of shape \[B, \.\.\., 8\]"),  # blamed a scale the caller never passed
    ((8,), (2, 4), r"expected input of shape \[B, \.\.\., 8\]"),  # took x's 8 for the batch
    ((2, 3, 8), (3, 4), r"expected cond of shape \[2, 4\]"),
])
def test_adaln_names_the_argument_at_fault(x, cond, match):
    with pytest.raises(NormArgumentError, match=match):
        normlab.AdaLN(8, 4)(torch.randn(*x), torch.randn(*cond))


def test_adaln_checks_cond_dtype_and_eps():
    a = normlab.AdaLN(8, 4)
    with pytest.raises(NormArgumentError, match="expected cond as the modulation's parameters: torch.float32"):
        a(torch.randn(2, 3, 8), torch.randn(2, 4, dtype=torch.float64))  # F.linear's "mat1 and mat2" before
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts for the linear: taken
        assert a(torch.randn(2, 3, 8), torch.randn(2, 4).bfloat16()).shape == (2, 3, 8)
        # autocast never casts float64: F.linear's "mat1 and mat2" there before
        with pytest.raises(NormArgumentError, match="expected cond as the modulation's parameters"):
            a(torch.randn(2, 3, 8), torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(NormArgumentError, match="expected eps to be a finite number"):
        normlab.AdaLN(8, 4, eps="a")  # accepted, failing at the first forward


def test_is_norm_knows_norms_by_type_and_name_but_not_weight_parametrizations():
    # torch's weight-norm and spectral-norm parametrizations (_WeightNorm, _SpectralNorm)
    # end in "Norm": convert and the diagnostics took them for activation norms
    from normlab.norms import is_norm

    class T5LayerNorm(nn.Module):  # a norm known by its name alone
        def forward(self, x):
            return x

    m = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 4), T5LayerNorm(), nn.RMSNorm(4))
    torch.nn.utils.parametrizations.weight_norm(m[0])
    torch.nn.utils.parametrizations.spectral_norm(m[2])
    assert [n for n, x in m.named_modules() if is_norm(x)] == ["1", "3", "4"]
