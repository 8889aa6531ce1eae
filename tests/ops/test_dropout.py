"""Fused dropout in add_layer_norm/add_rms_norm, on both backends: the mask is random,
so the checks are p=0 equivalence, the kept fraction, exact reproducibility from a
seeded generator, values given the mask, and the same mask in the backward."""

from __future__ import annotations

import pytest
import torch

import normlab
from normlab.ops import reference
from tests.ops.helpers import DEVICE, backend, make_inputs, needs_kernels

BACKENDS = ["torch", pytest.param("triton", marks=needs_kernels)]
FUSED = ["add_layer_norm", "add_rms_norm"]


def _run(op, a, **kw):
    F = normlab.functional
    if op == "add_layer_norm":
        return F.add_layer_norm(a["x"], a["residual"], a["weight"], a["bias"], **kw)
    return F.add_rms_norm(a["x"], a["residual"], a["weight"], **kw)


def _norm_ref(op, h, a):
    n = h.shape[-1]
    if op == "add_layer_norm":
        return reference.layer_norm(h, (n,), a["weight"], a["bias"])
    return reference.rms_norm(h, (n,), a["weight"])


def _gen(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("op", FUSED)
def test_p_zero_and_eval_mean_no_dropout(name, op):
    a = make_inputs(op, (8, 40), (40,), torch.float32)
    with backend(name):
        plain = _run(op, a)
        for kw in ({"dropout_p": 0.0, "training": True}, {"dropout_p": 0.5, "training": False}):
            got = _run(op, a, generator=_gen(0), **kw)
            for p, q in zip(plain, got, strict=True):
                assert torch.equal(p, q), kw


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("op", FUSED)
def test_values_given_the_mask_and_reproducibility(name, op):
    p = 0.3
    a = make_inputs(op, (64, 128), (128,), torch.float32)
    a["x"] = a["x"].abs() + 0.1  # nonzero, so a dropped element is visible in new_residual
    with backend(name):
        out, new_res = _run(op, a, dropout_p=p, training=True, generator=_gen(1234))
        out2, new_res2 = _run(op, a, dropout_p=p, training=True, generator=_gen(1234))
        _, new_res3 = _run(op, a, dropout_p=p, training=True, generator=_gen(4321))
    assert torch.equal(out, out2) and torch.equal(new_res, new_res2)
    assert not torch.equal(new_res, new_res3)
    kept = (new_res - a["residual"]).abs() > 0.05
    frac = kept.float().mean().item()
    assert abs(frac - (1 - p)) < 4 * ((p * (1 - p)) / kept.numel()) ** 0.5 + 1e-3, frac
    expected = a["residual"] + torch.where(kept, a["x"] / (1 - p), 0.0)
    torch.testing.assert_close(new_res, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, _norm_ref(op, new_res, a), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("op", FUSED)
def test_backward_uses_the_forward_mask(name, op):
    # dnew_residual reaches x through the same mask: dx == where(kept, dresidual / (1-p), 0)
    p = 0.5
    a = make_inputs(op, (16, 48), (48,), torch.float32)
    a["x"] = (a["x"].abs() + 0.1).requires_grad_()
    a["residual"] = a["residual"].requires_grad_()
    with backend(name):
        out, new_res = _run(op, a, dropout_p=p, training=True, generator=_gen(7))
    kept = (new_res - a["residual"]).abs() > 0.05
    g1, g2 = torch.randn_like(out), torch.randn_like(new_res)
    dx, dres = torch.autograd.grad((out * g1).sum() + (new_res * g2).sum(), (a["x"], a["residual"]))
    torch.testing.assert_close(dx, torch.where(kept, dres / (1 - p), 0.0), rtol=1e-6, atol=1e-6)
    assert (dx[~kept] == 0).all() and (dx[kept] != 0).all()


@pytest.mark.parametrize("name", BACKENDS)
def test_p_one_drops_everything(name):
    a = make_inputs("add_layer_norm", (4, 16), (16,), torch.float32)
    with backend(name):
        _, new_res = _run("add_layer_norm", a, dropout_p=1.0, training=True)
    torch.testing.assert_close(new_res, a["residual"])


@pytest.mark.parametrize("name", BACKENDS)
def test_bf16_with_fp32_residual_stream(name):
    p = 0.25
    a = make_inputs("add_rms_norm", (32, 64), (64,), torch.bfloat16, weight_dtype=torch.float32,
                    residual_in_dtype=torch.float32)
    a["x"] = a["x"].abs() + 0.1
    with backend(name):
        out, new_res = _run("add_rms_norm", a, dropout_p=p, training=True, generator=_gen(3),
                            residual_dtype=torch.float32)
    assert new_res.dtype == torch.float32 and out.dtype == torch.bfloat16
    kept = (new_res - a["residual"]).abs() > 0.05
    expected = a["residual"] + torch.where(kept, a["x"].float() / (1 - p), 0.0)
    torch.testing.assert_close(new_res, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, _norm_ref("add_rms_norm", new_res, a).to(torch.bfloat16),
                               rtol=1.6e-2, atol=1.6e-2)
