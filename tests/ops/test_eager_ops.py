"""The torch backend (the CPU path) against ops/reference.py: values, gradients, and
torch.autograd.gradcheck in float64 for the hand-written backwards."""

from __future__ import annotations

import inspect

import pytest
import torch

import normlab
from normlab import functional as F
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


# ---------------------------------------------------------------- forward-mode AD with dual tensors


def _dual_tangent(f, args, tangents):
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level():
        out = f(*(fwad.make_dual(a, t) for a, t in zip(args, tangents)))
        out = out[0] if isinstance(out, tuple) else out
        return fwad.unpack_dual(out).tangent


@pytest.mark.parametrize("case", ["layernorm-bf16-module", "rms-large", "rms-mixed-weight", "adaln-large",
                                  "add-rms-large"])
def test_dual_tensors_take_the_paths_with_a_forward_formula(case):
    # the paths through normlab's autograd Functions (half-precision LayerNorm with a
    # trained weight, rms_norm over 65,536 elements or with a weight of another dtype,
    # adaln_modulate over 65,536) raised "You must implement the jvp function"; torch's
    # ops give the tangent, which normlab's must equal
    import torch.nn.functional as F

    import normlab.functional as NF

    torch.manual_seed(0)
    if case == "layernorm-bf16-module":
        m = normlab.LayerNorm(64, dtype=torch.bfloat16)
        ref = torch.nn.LayerNorm(64, dtype=torch.bfloat16)
        args = (torch.randn(2, 64).bfloat16(),)
        mine, theirs = m, ref
    elif case in ("rms-large", "rms-mixed-weight"):
        n = 40_000 if case == "rms-large" else 8
        w = torch.randn(n, dtype=torch.float32 if case == "rms-large" else torch.float64, requires_grad=True)
        args = (torch.randn(2, n),)
        mine = lambda x: NF.rms_norm(x, (n,), w)  # noqa: E731
        theirs = lambda x: F.rms_norm(x.to(w.dtype), (n,), w).to(x.dtype) if w.dtype != x.dtype \
            else F.rms_norm(x, (n,), w)  # noqa: E731
    elif case == "adaln-large":
        args = (torch.randn(2, 256, 256, dtype=torch.float64), torch.randn(2, 1, 256, dtype=torch.float64),
                torch.randn(2, 1, 256, dtype=torch.float64))
        mine = lambda x, s, b: NF.adaln_modulate(x, s, b)  # noqa: E731
        theirs = lambda x, s, b: F.layer_norm(x, (256,), eps=1e-6) * (1 + s) + b  # noqa: E731
    else:
        w = torch.randn(40_000, dtype=torch.float64, requires_grad=True)
        args = (torch.randn(2, 40_000, dtype=torch.float64), torch.randn(2, 40_000, dtype=torch.float64))
        mine = lambda x, r: NF.add_rms_norm(x, r, w)  # noqa: E731
        theirs = lambda x, r: F.rms_norm(r + x, (40_000,), w)  # noqa: E731
    tangents = tuple(torch.randn_like(a) for a in args)
    got, want = _dual_tangent(mine, args, tangents), _dual_tangent(theirs, args, tangents)
    assert got is not None and got.dtype == want.dtype
    torch.testing.assert_close(got.double(), want.double(), rtol=2e-2 if got.dtype == torch.bfloat16 else 1e-5,
                               atol=2e-2 if got.dtype == torch.bfloat16 else 1e-5)


def test_vmap_different_randomness_takes_float64_dropout():
    # the float64 reference drew its mask in place (bernoulli_), which vmap's "different"
    # randomness refuses on an unbatched tensor
    from torch.func import vmap

    import normlab.functional as NF

    x, r = torch.randn(4, 3, 8, dtype=torch.float64), torch.randn(4, 3, 8, dtype=torch.float64)
    w = torch.ones(8, dtype=torch.float64)
    out = vmap(lambda a, b: NF.add_rms_norm(a, b, w, dropout_p=0.5, training=True)[1], randomness="different")(x, r)
    dropped = out - r  # the new residual: r + x * keep / 0.5
    kept = dropped != 0
    assert 0.2 < kept.double().mean() < 0.8
    torch.testing.assert_close(dropped[kept], 2 * x[kept], rtol=1e-15, atol=0)
    assert not torch.equal(kept[0], kept[1])  # a mask per batch element


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_the_eager_functions_unwrap_a_dead_functorch_wrapper(op):
    """The CPU path applies its autograd.Functions through the C apply (``eager.c_apply``),
    unwrapping what escaped a torch.func transform as ``Function.apply`` would."""
    leaked = []

    def f(t):
        leaked.append(t)
        return t.float().sum()

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, generator=g).bfloat16()
    torch.func.grad(f)(x)
    dead = leaked[0]
    assert torch._C._functorch.is_functorch_wrapped_tensor(dead)
    # bfloat16 LayerNorm with a parameter gradient, and RMSNorm with a float32 weight:
    # normlab's own Functions on a CPU, not torch's op
    w = torch.randn(16, generator=g).to(torch.bfloat16 if op == "layer_norm" else torch.float32).requires_grad_()
    call = (lambda t: F.layer_norm(t, 16, w, None)) if op == "layer_norm" else (lambda t: F.rms_norm(t, 16, w))
    out = call(dead)
    assert not torch._C._functorch.is_functorch_wrapped_tensor(out)
    assert type(out.grad_fn).__name__ in ("_LayerNormEagerBackward", "_RMSNormEagerBackward")
    assert out.equal(call(x))
    out.float().sum().backward()
    assert torch.isfinite(w.grad).all()
