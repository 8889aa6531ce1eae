"""The torch backend (the CPU path) against ops/reference.py: values, gradients, and
torch.autograd.gradcheck in float64 for the hand-written backwards."""

from __future__ import annotations

import inspect

import pytest
import torch

import normlab
from normlab.ops import eager
from tests.ops.helpers import OPS, check_against_reference, make_inputs


@pytest.fixture(autouse=True)
def _torch_backend():
    with normlab.set_backend("torch"):
        yield


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape,hidden", [((7, 1), (1,)), ((2, 5, 33), (33,)), ((3, 4, 6), (4, 6)),
                                          ((0, 8), (8,))])
def test_matches_reference(op, dtype, shape, hidden):
    a = make_inputs(op, shape, hidden, dtype, device="cpu")
    check_against_reference(op, a, hidden, dtype)


@pytest.mark.parametrize("op,weight_dtype", [("rms_norm", torch.float32), ("rms_norm", torch.float64),
                                             ("add_rms_norm", torch.float32)])
def test_rms_mixed_weight_dtypes(op, weight_dtype):
    a = make_inputs(op, (4, 20), (20,), torch.bfloat16, weight_dtype=weight_dtype, device="cpu")
    check_against_reference(op, a, (20,), torch.bfloat16)


@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
@pytest.mark.parametrize("x_dtype,res_in,res_out", [
    (torch.bfloat16, torch.float32, torch.float32),
    (torch.float32, torch.float32, torch.bfloat16),
    (torch.float16, torch.float16, torch.float32),
])
def test_residual_dtypes(op, x_dtype, res_in, res_out):
    a = make_inputs(op, (5, 24), (24,), x_dtype, weight_dtype=torch.float32, residual_in_dtype=res_in,
                    device="cpu")
    coarse = res_out if x_dtype == torch.float32 else x_dtype
    check_against_reference(op, a, (24,), coarse, residual_dtype=res_out)


@pytest.mark.parametrize("op", OPS)
def test_without_affine(op):
    a = make_inputs(op, (4, 24), (24,), torch.float32, weight=False, bias=False, device="cpu")
    check_against_reference(op, a, (24,), torch.float32)


def test_non_contiguous():
    x = torch.randn(6, 10, 16).transpose(0, 1)[::2]
    a = {"x": x, "weight": torch.randn(16), "bias": None}
    check_against_reference("rms_norm", a, (16,), torch.float32)


def _gradcheck(fn, *inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_rms_norm():
    x = torch.randn(3, 4, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    _gradcheck(lambda x, w: eager.RMSNormFunction.apply(x, (7,), w, 1e-6), x, w)
    _gradcheck(lambda x: eager.RMSNormFunction.apply(x, (7,), None, 1e-6), x)
    x2 = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    _gradcheck(lambda x, w: eager.RMSNormFunction.apply(x, (3, 4), w, 1e-6), x2, w2)


def test_gradcheck_layer_norm_with_per_example():
    x = torch.randn(3, 4, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    buf = torch.zeros(2, 3)
    _gradcheck(lambda x, w, b: eager.LayerNormFunction.apply(x, [7], w, b, 1e-5), x, w, b)
    _gradcheck(lambda x, w, b: eager.LayerNormPerExampleFunction.apply(x, [7], w, b, 1e-5, buf), x, w, b)
    _gradcheck(lambda x, w: eager.RMSNormPerExampleFunction.apply(x, (7,), w, 1e-6, buf), x, w)


def test_default_functions_and_ops_take_no_per_example_buffer():
    # the buffer is the variants' alone: the default Functions and entry points take none
    for fn in (eager.LayerNormFunction, eager._LayerNormEager, eager.RMSNormFunction, eager._RMSNormEager):
        assert "per_example_grad_sq" not in inspect.signature(fn.forward).parameters, fn
    for name in ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"):
        assert "per_example_grad_sq" not in inspect.signature(getattr(eager, name)).parameters, name
        assert "per_example_grad_sq" in inspect.signature(getattr(eager, name + "_per_example")).parameters, name
    for fn in (eager.LayerNormPerExampleFunction, eager._LayerNormPerExampleEager,
               eager.RMSNormPerExampleFunction, eager._RMSNormPerExampleEager):
        assert "per_example_grad_sq" in inspect.signature(fn.forward).parameters, fn


def test_per_example_variant_matches_the_op_and_writes_the_buffer():
    # same outputs and gradients as the default op; the buffer holds each example's squared norms
    a = make_inputs("add_rms_norm", (3, 5, 12), (12,), torch.bfloat16, weight_dtype=torch.float32, device="cpu")
    res = []
    for variant in (False, True):
        x, r, w = (a[k].detach().requires_grad_() for k in ("x", "residual", "weight"))
        buf = torch.full((2, 3), float("nan"))
        if variant:
            out, new_res = eager.add_rms_norm_per_example(x, r, w, None, buf, normalized_shape=(12,))
        else:
            out, new_res = eager.add_rms_norm(x, r, w, None, normalized_shape=(12,))
        g = torch.autograd.grad(out.float().square().sum() + new_res.float().sum(), (x, r, w))
        res.append((out, new_res, *g))
    for p, q in zip(*res, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert (buf[0] > 0).all() and (buf[1] == 0).all()


def test_gradcheck_fused_ops():
    F = normlab.functional
    x, r = (torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w, b = (torch.randn(6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    _gradcheck(lambda x, r, w, b: F.add_layer_norm(x, r, w, b), x, r, w, b)
    _gradcheck(lambda x, r, w: F.add_rms_norm(x, r, w), x, r, w)


def test_dropout_add_without_dropout_is_the_reference_exactly():
    from normlab.ops import reference
    for xd, rd, od in [(torch.bfloat16, torch.bfloat16, None), (torch.bfloat16, torch.float32, torch.float32),
                       (torch.float16, torch.float16, torch.float32), (torch.float32, torch.float32, torch.bfloat16)]:
        x, r = torch.randn(64, 32).to(xd), torch.randn(64, 32).to(rd)
        got = normlab.functional.dropout_add(x, r, residual_dtype=od)
        assert torch.equal(got, reference.dropout_add(x, r, residual_dtype=od)), (xd, rd, od)
