"""PowerNorm: compiled and checkpointed training, 1-D input, numpy hyperparameters, and
the authors' group scaling (``groups``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from normlab.errors import NormArgumentError
from normlab.norms import DyT, MaskedBatchNorm, PowerNorm, ScaleNorm


@pytest.mark.parametrize("backend", ["aot_eager", "aot_eager_decomp_partition"])
def test_compiled_training_gives_eagers_gradients_and_statistics(backend):
    # traced, the backward divided by the psi after this step's update (aot_eager: wrong
    # gradients, 0.15 off) or failed on the buffer's in-place update (the partitioner's)
    torch.manual_seed(0)
    eager, compiled = PowerNorm(4, warmup_iters=1), PowerNorm(4, warmup_iters=1)
    fn = torch.compile(compiled, backend=backend)
    for _ in range(4):  # the first during warm-up, then on the running psi
        x = torch.randn(6, 4, requires_grad=True)
        ge = torch.autograd.grad(eager(x).square().sum(), x)[0]
        gc = torch.autograd.grad(fn(x).square().sum(), x)[0]
        torch.testing.assert_close(gc, ge, rtol=1e-6, atol=1e-6)
    for name in ("running_phi", "grad_ema", "iters"):
        torch.testing.assert_close(getattr(compiled, name), getattr(eager, name), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_checkpointed_training_forward_is_refused_where_it_is_recomputed(reentrant):
    # recomputed, it counted the step twice and divided by another psi (0.13 off)
    norm = PowerNorm(4, warmup_iters=1)
    norm(torch.randn(8, 4))
    x = torch.randn(8, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="Activation checkpointing"):
        checkpoint(norm, x, use_reentrant=reentrant).sum().backward()
    norm.eval()  # on running statistics it is recomputed exactly
    checkpoint(norm, x, use_reentrant=reentrant).sum().backward()
    assert x.grad is not None


def test_a_1d_input_is_one_position_with_a_statistic_per_channel():
    # sum(()) reduced every dim: running_phi became mean(x^2) of all channels (a ScaleNorm)
    norm = PowerNorm(4)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    y = norm(x)
    torch.testing.assert_close(norm.running_phi, torch.tensor([1.0, 4.0, 9.0, 16.0]))
    torch.testing.assert_close(y, torch.ones(4), rtol=1e-4, atol=1e-4)
    (y * torch.tensor([1.0, -1.0, 2.0, 0.5])).sum().backward()
    # nu <- (1 - alpha_bkw) * (Lambda - Gamma * nu) with nu = 0: per channel g * x_hat
    torch.testing.assert_close(norm.grad_ema, 0.1 * torch.tensor([1.0, -1.0, 2.0, 0.5]), rtol=1e-3, atol=1e-4)


def test_numpy_and_other_real_hyperparameters_are_taken_as_floats():
    assert ScaleNorm(4, eps=np.float32(1e-5)).eps == pytest.approx(1e-5)
    assert type(ScaleNorm(4, eps=np.float64(1e-5)).eps) is float
    assert MaskedBatchNorm(4, eps=np.float32(1e-5), momentum=np.float64(0.1)).momentum == pytest.approx(0.1)
    p = PowerNorm(4, eps=np.float32(1e-5), alpha_fwd=np.float64(0.9), warmup_iters=np.int64(3))
    assert type(p.alpha_fwd) is float and type(p.warmup_iters) is int and p.warmup_iters == 3
    assert DyT(4, alpha_init=np.float32(0.5)).alpha.item() == 0.5
    for bad in (True, float("nan"), "0.1", torch.tensor(1e-5)):
        with pytest.raises(NormArgumentError, match="eps"):
            ScaleNorm(4, eps=bad)


def _group_scaled(x, groups, eps=1e-5):
    # the authors' GroupScaling1D: each position over each group of channels
    *lead, c = x.shape
    g = x.reshape(*lead, groups, c // groups)
    return (g / torch.sqrt((g * g).mean(dim=-1, keepdim=True) + eps)).reshape(x.shape)


def test_groups_divide_each_position_by_its_group_rms_first():
    torch.manual_seed(0)
    grouped, plain = PowerNorm(8, warmup_iters=2, groups=2), PowerNorm(8, warmup_iters=2)
    for step in range(4):
        x = torch.randn(3, 5, 8) * (1 + step)
        x[0, 0] *= 100  # one loud position: group scaling takes its scale out
        torch.testing.assert_close(grouped(x), plain(_group_scaled(x, 2)))
    grouped.eval()
    plain.eval()
    x = torch.randn(2, 8)
    torch.testing.assert_close(grouped(x), plain(_group_scaled(x, 2)))
    x2 = x.clone()
    x2[0] *= 100
    torch.testing.assert_close(grouped(x2)[0], grouped(x)[0], rtol=1e-4, atol=1e-4)  # scale-blind per position


def test_groups_differentiate_exactly_and_keep_padded_positions_out():
    norm = PowerNorm(6, groups=3, dtype=torch.float64).eval()
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(norm, (x,))
    train = PowerNorm(6, groups=3, dtype=torch.float64)
    mask = torch.tensor([[False, False, True], [False, True, True]])
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    x[mask] = float("nan")
    y = train(x, padding_mask=mask)
    assert torch.isfinite(y).all() and (y[mask] == 0).all()


@pytest.mark.parametrize("bad", [0, 3, -2, True, 2.0, "2"])
def test_groups_must_divide_the_channels(bad):
    with pytest.raises(NormArgumentError, match="groups"):
        PowerNorm(8, groups=bad)


def test_groups_are_shown_and_built_through_the_registry():
    from normlab.norms import build_norm

    norm = build_norm("powernorm", 8, groups=4)
    assert norm.groups == 4 and "groups=4" in repr(norm)
    assert "groups" not in repr(PowerNorm(8))


@pytest.mark.parametrize("preset", ["quick", "full"])
def test_the_studies_run_powernorm_with_one_group_per_head(preset):
    from normlab.models import TransformerConfig, TransformerLM
    from normlab.studies.presets import get_study

    runs = [r for r in get_study(preset).runs if r.model.get("norm") == "powernorm"]
    assert runs
    for r in runs:
        assert r.model["norm_options"] == {"groups": r.model["n_heads"]}
    model = TransformerLM(TransformerConfig(**{**runs[0].model, "vocab_size": 16, "max_seq_len": 8}))
    assert {m.groups for m in model.modules() if isinstance(m, PowerNorm)} == {runs[0].model["n_heads"]}


def test_a_powernorm_pickled_before_groups_existed_still_runs():
    norm = PowerNorm(8)
    del norm.__dict__["groups"]  # as a module pickled before the argument existed unpickles
    assert "groups" not in repr(norm)
    assert norm(torch.randn(3, 8)).shape == (3, 8)
