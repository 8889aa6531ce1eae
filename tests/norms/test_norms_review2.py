"""Norm modules, from a review: a forward that never gets its backward does not block
per-example collection, parameters swapped through ``.data`` are checked again, empty
batches in training as torch's BatchNorm, float8 refused by every norm, numpy sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import normlab
from normlab.errors import NormArgumentError, NormDtypeError
from normlab.norms.zoo import DyT, MaskedBatchNorm, PowerNorm, ScaleNorm


@pytest.mark.parametrize("cls", [normlab.LayerNorm, normlab.RMSNorm])
def test_dropped_forward_is_forgotten(cls):
    m = cls(4)
    m.collect_per_example_grad_sq = True
    x = torch.randn(3, 4)
    m(x).sum().backward()
    _ = m(x)  # a forward whose graph goes with no backward (a skipped step)
    for _ in range(3):
        m(x).sum().backward()
        assert m.per_example_grad_sq.shape == (2, 3)
        assert len(m._per_example_calls) == 1


@pytest.mark.parametrize("cls", [normlab.LayerNorm, normlab.RMSNorm])
def test_refused_and_frozen_calls_leave_no_pending_call(cls):
    m = cls(4)
    m.collect_per_example_grad_sq = True
    x = torch.randn(3, 4)
    with pytest.raises(NormArgumentError):
        m(torch.randn(2, 5))  # refused by the op: no backward will come
    m.requires_grad_(False)
    m(x), m(x)  # nothing requires grad
    m.requires_grad_(True)
    y = m(x)
    y.sum().backward()
    ref = cls(4)
    g = torch.autograd.grad(ref(x[:1]).sum(), ref.weight)[0]
    assert float(m.per_example_grad_sq[0, 0]) == pytest.approx(float(g.square().sum()), rel=1e-5)


def test_collecting_norm_names_a_bad_input():
    m = normlab.RMSNorm(4)
    m.collect_per_example_grad_sq = True
    with pytest.raises(TypeError, match="expected input to be a torch.Tensor"):
        m(None)
    with pytest.raises(NormArgumentError, match=r"\[\*, 4\]"):
        m(torch.tensor(1.0))


@pytest.mark.parametrize("cls", [nn.LayerNorm, normlab.LayerNorm, normlab.RMSNorm])
def test_recorder_survives_a_skipped_step(cls):
    from normlab.diagnostics import per_example_grad_norms

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), cls(8))
    with per_example_grad_norms(m) as rec:
        m(torch.randn(4, 8)).sum().backward()
        loss = m(torch.randn(4, 8)).sum() * float("nan")
        del loss  # the step is skipped: no backward
        x = torch.randn(4, 8)
        m(x).sum().backward()
        got = rec["1"]["weight"]
    for b in range(4):
        g = torch.autograd.grad(m(x[b:b + 1]).sum(), m[1].weight)[0]
        assert float(got[b]) == pytest.approx(float(g.square().sum()), rel=1e-4)


@pytest.mark.parametrize("cls", [normlab.LayerNorm, normlab.RMSNorm])
def test_weight_swapped_through_data_is_checked_again(cls):
    x = torch.randn(2, 6)
    with normlab.set_backend("triton"):  # the remembered-signature path (Triton interpreter on CPU)
        m = cls(6)
        m(x)
        m.weight.data = torch.ones(3)
        with pytest.raises(NormArgumentError):
            m(x)
        m.weight.data = torch.ones(6, dtype=torch.float64)
        out = m(x)  # another dtype: checked, and computed as the functional op computes it
    with normlab.set_backend("torch"):
        ref = cls(6)
        ref.weight.data = torch.ones(6, dtype=torch.float64)
        torch.testing.assert_close(out, ref(x))


def test_empty_batch_in_training_as_torch_batchnorm():
    torch.manual_seed(0)
    ours, theirs = MaskedBatchNorm(3), nn.BatchNorm1d(3)
    ours(torch.randn(5, 3))
    theirs(torch.randn(5, 3))
    mean, var = ours.running_mean.clone(), ours.running_var.clone()
    x = torch.randn(0, 3, requires_grad=True)
    y, ty = ours(x), theirs(torch.randn(0, 3))
    assert y.shape == ty.shape == (0, 3)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 2
    assert torch.equal(ours.running_mean, mean) and torch.equal(ours.running_var, var)
    y.sum().backward()
    assert torch.equal(ours.weight.grad, torch.zeros(3))
    with pytest.raises(NormArgumentError, match="more than 1 real"):  # a batch of padding alone still is refused
        ours(torch.randn(2, 3), padding_mask=torch.ones(2, dtype=torch.bool))


def test_powernorm_empty_batch_counts_no_step():
    m = PowerNorm(4)
    m(torch.randn(6, 4))
    phi, iters = m.running_phi.clone(), int(m.iters)
    y = m(torch.randn(2, 0, 4))
    assert y.shape == (2, 0, 4)
    assert int(m.iters) == iters and torch.equal(m.running_phi, phi)


@pytest.mark.parametrize("name", ["layernorm", "rmsnorm", "scalenorm", "dyt", "none", "batchnorm", "powernorm"])
def test_float8_refused_by_every_norm(name):
    x = torch.randn(2, 4).to(torch.float8_e4m3fn)
    with pytest.raises(NormDtypeError, match="float16, bfloat16, float32 or float64"):
        normlab.build_norm(name, 4)(x)


def test_numpy_sizes_taken_as_torch_takes_them():
    assert normlab.build_norm("layernorm", np.int64(8)).normalized_shape == torch.nn.LayerNorm(np.int64(8)).normalized_shape
    m = ScaleNorm(np.int64(8))
    assert type(m.dim) is int and float(m.g.detach()) == pytest.approx(8 ** 0.5)
    with pytest.raises(NormArgumentError, match="dim to be an int >= 1"):
        normlab.build_norm("dyt", np.float64(8))


def test_messages():
    with pytest.raises(NormArgumentError, match=r"in \(-inf, inf\), got nan"):
        DyT(8, alpha_init=float("nan"))
    with pytest.raises(NormArgumentError, match="elementwise_affine=False"):
        normlab.LayerNorm(5, elementwise_affine=False, weight_shape=(3, 5))


@pytest.mark.parametrize("name", ["scalenorm", "dyt", "batchnorm", "powernorm"])
def test_a_bad_residual_is_named_as_the_norms_call(name):
    norm = normlab.build_norm(name, 4)
    with pytest.raises(NormArgumentError, match=rf"^{type(norm).__name__}: expected residual"):
        norm(torch.randn(2, 4), torch.randn(3, 4))


def test_masked_batchnorm_compiles_whole_with_a_padding_mask():
    torch.manual_seed(0)
    m, ref = MaskedBatchNorm(8), MaskedBatchNorm(8)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 5, 8)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 3:] = True
    torch.testing.assert_close(compiled(x, padding_mask=mask), ref(x, padding_mask=mask))
    torch.testing.assert_close(m.running_var, ref.running_var)
    with pytest.raises(RuntimeError, match="more than 1 real|assertion failed"):  # checked as the graph runs
        compiled(x, padding_mask=torch.ones(2, 5, dtype=torch.bool))
