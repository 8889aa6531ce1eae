"""Fused AdaLN (``normlab.functional.adaln_modulate``, ``normlab.AdaLN``): the torch path
and the Triton kernels against ops/reference.py and against the unfused AdaLN math."""

from __future__ import annotations

import pytest
import torch

import normlab
from normlab import functional as F
from normlab.errors import NormArgumentError, NormDtypeError
from normlab.ops import reference as R
from tests._tolerances import BACKEND_OUTPUT, GRAD, OUTPUT, PARAM_GRAD_SUM, assert_close
from tests.ops.helpers import DEVICE, needs_kernels

NORMS = ("layernorm", "rmsnorm")

# x's shape, scale's shape, shift's shape
KINDS = {
    "per_example": ((2, 3, 5), (2, 1, 5), (2, 1, 5)),
    "per_token": ((2, 3, 5), (2, 3, 5), (2, 3, 5)),
    "shared": ((2, 3, 5), (5,), (1, 1, 5)),
    "shared_scale_per_example_shift": ((2, 3, 5), (1, 5), (2, 1, 5)),
}


@pytest.fixture(params=["native", "function", "by_example"])
def plan(request, monkeypatch):
    """The torch path as it runs at these sizes ("native": torch ops with torch's autograd),
    and as larger calls run: "function" (the autograd.Function: its general path, and one
    layer_norm call with the gains for shared modulation) and "by_example" (every
    per-example call on the by-example layer_norm path too)."""
    from normlab.ops import eager

    if request.param != "native":
        monkeypatch.setattr(eager, "ADALN_NATIVE_MAX_NUMEL", -1)
    if request.param == "by_example":
        monkeypatch.setattr(eager, "ADALN_BY_EXAMPLE_MIN", 1)
    return request.param


def _inputs(x_shape, scale_shape, shift_shape, dtype, *, device="cpu", seed=0, scale_dtype=None):
    g = torch.Generator().manual_seed(seed)

    def rnd(shape, dt, std=1.0, mean=0.0):
        return (torch.randn(shape, generator=g) * std + mean).to(dt).to(device).requires_grad_()

    # x far from normalized; scale, shift ~ the size a trained modulation reaches
    return (rnd(x_shape, dtype, 2.0, 0.5), rnd(scale_shape, scale_dtype or dtype, 0.5),
            rnd(shift_shape, scale_dtype or dtype, 0.5))


def _affine(d, norm, dtype, *, device="cpu", seed=3, bias_dtype=None):
    """(weight, bias) of a norm with elementwise_affine=True (bias None for rmsnorm)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(d, generator=g) * 0.5 + 1.0).to(dtype).to(device).requires_grad_()
    b = (torch.randn(d, generator=g) * 0.5).to(bias_dtype or dtype).to(device).requires_grad_()
    return w, (b if norm == "layernorm" else None)


def _unfused(x, scale, shift, eps, norm, weight=None, bias=None):
    """The module's former math: the norm (torch's op, with its affine), then two
    elementwise ops."""
    d = x.shape[-1]
    y = (torch.layer_norm(x, (d,), weight, bias, eps) if norm == "layernorm"
         else torch.rms_norm(x, (d,), weight, eps))
    return y * (1 + scale) + shift


def _grads(y, leaves, seed=1):
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype).to(y.device)
    return torch.autograd.grad(y, leaves, g), g


# ------------------------------------------------------------------- torch path


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_torch_path_gradcheck_float64(norm, kind, plan):
    with normlab.set_backend("torch"):
        x, scale, shift = _inputs(*KINDS[kind], torch.float64)

        def fn(x, scale, shift):
            return F.adaln_modulate(x, scale, shift, 1e-6, norm=norm)

        assert torch.autograd.gradcheck(fn, (x, scale, shift))
        assert torch.autograd.gradgradcheck(fn, (x, scale, shift))
        assert_close(fn(x, scale, shift), R.adaln_modulate(x, (5,), scale, shift, 1e-6, norm=norm),
                     torch.float64, OUTPUT)
        with torch.no_grad():  # the path without autograd gives the same values
            assert_close(fn(x, scale, shift), R.adaln_modulate(x, (5,), scale, shift, 1e-6, norm=norm),
                         torch.float64, OUTPUT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_torch_path_matches_unfused(dtype, norm, kind, plan):
    x_shape, s_shape, h_shape = KINDS[kind]
    x_shape, s_shape, h_shape = (4, 16, 40), s_shape[:-1] + (40,), h_shape[:-1] + (40,)
    s_shape = tuple(4 if d == 2 else 16 if d == 3 else d for d in s_shape)
    h_shape = tuple(4 if d == 2 else 16 if d == 3 else d for d in h_shape)
    leaves = _inputs(x_shape, s_shape, h_shape, dtype)
    with normlab.set_backend("torch"):
        y = F.adaln_modulate(*leaves, 1e-6, norm=norm)
        grads, g = _grads(y, leaves)
    expected = _unfused(*leaves, 1e-6, norm)
    expected_grads = torch.autograd.grad(expected, leaves, g)
    assert y.dtype == expected.dtype == dtype
    assert_close(y, expected, dtype, OUTPUT, what="y")
    for name, a, b in zip(("dx", "dscale", "dshift"), grads, expected_grads):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert_close(a, b, dtype, GRAD, what=name)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_torch_path_gradcheck_float64_with_weight_and_bias(norm, kind, plan):
    with normlab.set_backend("torch"):
        x, scale, shift = _inputs(*KINDS[kind], torch.float64)
        w, b = _affine(5, norm, torch.float64)
        leaves = (x, scale, shift, w) + ((b,) if b is not None else ())

        def fn(x, scale, shift, w, b=None):
            return F.adaln_modulate(x, scale, shift, 1e-6, norm=norm, weight=w, bias=b)

        assert torch.autograd.gradcheck(fn, leaves)
        assert torch.autograd.gradgradcheck(fn, leaves)
        expected = R.adaln_modulate(x, (5,), scale, shift, 1e-6, w, b, norm=norm)
        assert_close(fn(*leaves), expected, torch.float64, OUTPUT)
        with torch.no_grad():
            assert_close(fn(*leaves), expected, torch.float64, OUTPUT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", NORMS)
def test_torch_path_with_weight_and_bias_matches_unfused(dtype, norm, plan):
    leaves = _inputs((4, 16, 40), (4, 1, 40), (4, 1, 40), dtype)
    w, b = _affine(40, norm, dtype)
    params = (w,) + ((b,) if b is not None else ())
    with normlab.set_backend("torch"):
        y = F.adaln_modulate(*leaves, 1e-6, norm=norm, weight=w, bias=b)
        grads, g = _grads(y, leaves + params)
    expected = _unfused(*leaves, 1e-6, norm, w, b)
    expected_grads = torch.autograd.grad(expected, leaves + params, g)
    assert y.dtype == expected.dtype == dtype
    assert_close(y, expected, dtype, OUTPUT, what="y")
    for name, a, e in zip(("dx", "dscale", "dshift", "dweight", "dbias"), grads, expected_grads):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert_close(a, e, dtype, GRAD, what=name)


# x, scale/shift, weight, bias dtypes: y in the promoted dtype of x, scale and shift
MIXED = {
    "bf16_x_fp32_weight": (torch.bfloat16, torch.bfloat16, torch.float32, torch.bfloat16),
    "bf16_x_fp32_modulation_fp64_bias": (torch.bfloat16, torch.float32, torch.bfloat16, torch.float64),
    "fp32_x_bf16_weight_fp16_bias": (torch.float32, torch.float32, torch.bfloat16, torch.float16),
}


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_kernels)])
@pytest.mark.parametrize("case", list(MIXED))
def test_weight_and_bias_of_mixed_dtypes(backend, case, plan):
    # the parameter gradients summed over 2 x 256 rows in float32, rounded once to each
    # parameter's dtype
    x_dt, mod_dt, w_dt, b_dt = MIXED[case]
    device = DEVICE if backend == "triton" else "cpu"
    leaves = _inputs((2, 256, 8), (2, 1, 8), (2, 1, 8), x_dt, device=device, scale_dtype=mod_dt)
    w, b = _affine(8, "layernorm", w_dt, device=device, bias_dtype=b_dt)
    with normlab.set_backend(backend):
        y = F.adaln_modulate(*leaves, 1e-6, weight=w, bias=b)
        grads, g = _grads(y, leaves + (w, b))
    ref = [t.detach().double().requires_grad_() for t in leaves + (w, b)]
    expected = R.adaln_modulate(ref[0], (8,), ref[1], ref[2], 1e-6, ref[3], ref[4])
    expected_grads = torch.autograd.grad(expected, ref, g.double())
    assert y.dtype == torch.promote_types(x_dt, mod_dt)
    assert [d.dtype for d in grads] == [x_dt, mod_dt, mod_dt, w_dt, b_dt]
    assert_close(y, expected, torch.promote_types(x_dt, mod_dt), BACKEND_OUTPUT, what="y")
    assert_close(grads[0], expected_grads[0], x_dt, GRAD, what="dx")
    for name, a, e in zip(("dscale", "dshift", "dweight", "dbias"), grads[1:], expected_grads[1:]):
        # one rounding of a float32 sum to the gradient's dtype (bf16 x: x_hat from bf16 x)
        assert_close(a, e, a.dtype if a.dtype != torch.float64 else torch.float32, PARAM_GRAD_SUM, what=name)


def test_weight_and_bias_argument_errors_name_the_argument():
    x = torch.randn(2, 3, 8)
    s = torch.randn(2, 1, 8)
    w = torch.randn(8)
    with pytest.raises(NormArgumentError, match=r"Expected weight to be of same shape as the input's last dim, "
                                                r"but got weight of shape \[7\]"):
        F.adaln_modulate(x, s, s, weight=torch.randn(7))
    with pytest.raises(NormArgumentError, match=r"bias of shape \[1, 8\] and the input's last dim = \[8\]"):
        F.adaln_modulate(x, s, s, weight=w, bias=torch.randn(1, 8))
    with pytest.raises(NormArgumentError, match="expected weight on cpu"):
        F.adaln_modulate(x, s, s, weight=w.to("meta"))
    with pytest.raises(NormArgumentError, match="expected bias on cpu"):
        F.adaln_modulate(x, s, s, bias=w.to("meta"))
    with pytest.raises(NormDtypeError, match="expected weight to have a floating-point dtype"):
        F.adaln_modulate(x, s, s, weight=torch.ones(8, dtype=torch.int64))
    with pytest.raises(NormDtypeError, match="expected bias to have a floating-point dtype"):
        F.adaln_modulate(x, s, s, bias=torch.ones(8, dtype=torch.bool))
    with pytest.raises(TypeError, match="expected weight to be a torch.Tensor"):
        F.adaln_modulate(x, s, s, weight=1.0)
    with pytest.raises(NormArgumentError, match=r"norm='rmsnorm' takes no bias .*got bias of shape \[8\]"):
        F.adaln_modulate(x, s, s, norm="rmsnorm", weight=w, bias=w)
    # weight alone and bias alone are both taken
    torch.testing.assert_close(F.adaln_modulate(x, s, s, bias=torch.zeros(8)), F.adaln_modulate(x, s, s))
    torch.testing.assert_close(F.adaln_modulate(x, s, s, norm="rmsnorm", weight=torch.ones(8)),
                               F.adaln_modulate(x, s, s, norm="rmsnorm"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_summed_modulation_grads_are_float32_sums(dtype, plan):
    # per-example dscale/dshift over 512 tokens: summed in float32, rounded once
    leaves = _inputs((2, 512, 8), (2, 1, 8), (2, 1, 8), dtype)
    with normlab.set_backend("torch"):
        grads, g = _grads(F.adaln_modulate(*leaves, 1e-6), leaves)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    expected = torch.autograd.grad(R.adaln_modulate(ref[0], (8,), ref[1], ref[2], 1e-6), ref, g.double())
    for name, a, b in zip(("dscale", "dshift"), grads[1:], expected[1:]):
        assert_close(a, b, dtype, PARAM_GRAD_SUM, what=name)


def test_mixed_dtypes_follow_the_unfused_promotion(plan):
    x, scale, shift = _inputs((2, 3, 8), (2, 1, 8), (2, 1, 8), torch.bfloat16, scale_dtype=torch.float32)
    y = F.adaln_modulate(x, scale, shift)
    grads, _ = _grads(y, (x, scale, shift))
    assert y.dtype == torch.float32
    assert [d.dtype for d in grads] == [torch.bfloat16, torch.float32, torch.float32]
    assert_close(y, _unfused(x, scale, shift, 1e-6, "layernorm"), torch.bfloat16, OUTPUT)


def test_argument_errors_name_the_argument():
    x = torch.randn(2, 3, 8)
    s = torch.randn(2, 1, 8)
    with pytest.raises(NormArgumentError, match=r"scale to broadcast .* last dim 8.*got scale of shape \[2, 1, 7\]"):
        F.adaln_modulate(x, torch.randn(2, 1, 7), s)
    with pytest.raises(NormArgumentError, match=r"shift .*\(\[2, 1, \.\.\., 8\] per example.*\[3, 1, 8\]"):
        F.adaln_modulate(x, s, torch.randn(3, 1, 8))
    with pytest.raises(NormArgumentError, match=r"scale .*got scale of shape \[1, 2, 3, 8\]"):
        F.adaln_modulate(x, torch.randn(1, 2, 3, 8), s)
    with pytest.raises(NormDtypeError, match="expected shift to have a floating-point dtype"):
        F.adaln_modulate(x, s, torch.ones(2, 1, 8, dtype=torch.int64))
    with pytest.raises(NormArgumentError, match="expected scale on cpu"):
        F.adaln_modulate(x, s.to("meta"), s)
    with pytest.raises(TypeError, match="expected shift to be a torch.Tensor"):
        F.adaln_modulate(x, s, 0.0)
    with pytest.raises(NormArgumentError, match="expected norm to be one of layernorm, rmsnorm"):
        F.adaln_modulate(x, s, s, norm="batchnorm")
    with pytest.raises(NormArgumentError, match="last dim only"):
        F.adaln_modulate(x, s, s, normalized_shape=(3, 8))
    with pytest.raises(NormArgumentError, match="expected eps"):
        F.adaln_modulate(x, s, s, float("inf"))
    torch.testing.assert_close(F.adaln_modulate(x, s, s, normalized_shape=8), F.adaln_modulate(x, s, s))


# ------------------------------------------------------------------- the module


@pytest.mark.parametrize("norm", NORMS)
def test_module_matches_unfused_math_and_keeps_its_state_dict(norm):
    torch.manual_seed(0)
    m = normlab.AdaLN(8, cond_dim=5, norm=norm)
    assert list(m.state_dict()) == ["modulation.weight", "modulation.bias"]
    with torch.no_grad():
        m.modulation.weight.normal_(0, 0.3)
        m.modulation.bias.normal_(0, 0.3)
    x = torch.randn(2, 3, 4, 8, requires_grad=True)
    c = torch.randn(2, 5, requires_grad=True)
    y = m(x, c)
    shift, scale = m.modulation(torch.nn.functional.silu(c)).chunk(2, dim=-1)
    expected = _unfused(x, scale.view(2, 1, 1, 8), shift.view(2, 1, 1, 8), 1e-6, norm)
    assert_close(y, expected, torch.float32, OUTPUT)
    g = torch.randn_like(y)
    params = [x, c, *m.parameters()]
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(expected, params, g)):
        assert_close(a, b, torch.float32, GRAD)
    assert ("norm='rmsnorm'" in repr(m)) == (norm == "rmsnorm")
    with pytest.raises(NormArgumentError, match="expected norm to be one of"):
        normlab.AdaLN(8, 5, norm="dyt")


# ------------------------------------------------------------------- Triton kernels

TRITON_CASES = {
    # name: (x, scale, shift)
    "per_example": ((2, 5, 33), (2, 1, 33), (2, 1, 33)),
    "per_token": ((3, 4, 17), (3, 4, 17), (3, 4, 17)),
    "shared_and_per_example": ((2, 6, 8), (8,), (2, 1, 8)),
    "per_token_and_shared": ((4, 9, 8), (4, 9, 8), (1, 8)),
    "expanded_broadcast": ((2, 3, 8), (1, 3, 8), (2, 1, 8)),
    "4d_per_head_and_per_example": ((2, 3, 4, 16), (2, 3, 1, 16), (2, 1, 1, 16)),
    "hidden_1": ((2, 3, 1), (2, 1, 1), (2, 3, 1)),
    "wide_row": ((2, 2, 300), (2, 1, 300), (2, 1, 300)),
    "rows_0": ((0, 3, 8), (0, 1, 8), (0, 1, 8)),
}


@needs_kernels
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_triton_matches_reference(norm, case, affine):
    x_shape, s_shape, h_shape = TRITON_CASES[case]
    leaves = _inputs(x_shape, s_shape, h_shape, torch.float32, device=DEVICE)
    w, b = _affine(x_shape[-1], norm, torch.float32, device=DEVICE) if affine else (None, None)
    params = tuple(t for t in (w, b) if t is not None)
    with normlab.set_backend("triton"):
        y = F.adaln_modulate(*leaves, 1e-6, norm=norm, weight=w, bias=b)
        grads, g = _grads(y, leaves + params)
    ref = [t.detach().double().requires_grad_() for t in leaves + params]
    ref_w, ref_b = (ref[3], ref[4] if b is not None else None) if affine else (None, None)
    expected = R.adaln_modulate(ref[0], x_shape[-1:], ref[1], ref[2], 1e-6, ref_w, ref_b, norm=norm)
    expected_grads = torch.autograd.grad(expected, ref, g.double(), allow_unused=True)
    assert y.dtype == torch.float32 and y.shape == x_shape
    assert_close(y, expected, torch.float32, BACKEND_OUTPUT, what="y")
    for name, a, e, t in zip(("dx", "dscale", "dshift", "dweight", "dbias"), grads, expected_grads,
                             leaves + params):
        assert a.shape == t.shape and a.dtype == t.dtype
        e = torch.zeros_like(a, dtype=torch.float64) if e is None else e
        assert_close(a, e, torch.float32, GRAD, what=name)


@needs_kernels
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
@pytest.mark.parametrize("norm", NORMS)
def test_triton_bf16_matches_torch_path(norm, affine):
    leaves = _inputs((2, 64, 24), (2, 1, 24), (2, 1, 24), torch.bfloat16, device=DEVICE)
    w, b = _affine(24, norm, torch.bfloat16, device=DEVICE) if affine else (None, None)
    params = tuple(t for t in (w, b) if t is not None)
    out = []
    for backend in ("triton", "torch"):
        with normlab.set_backend(backend):
            y = F.adaln_modulate(*leaves, 1e-6, norm=norm, weight=w, bias=b)
            out.append((y, *_grads(y, leaves + params)[0]))
    for name, a, e in zip(("y", "dx", "dscale", "dshift", "dweight", "dbias"), *out):
        assert a.dtype == e.dtype == torch.bfloat16
        assert_close(a, e, torch.bfloat16, BACKEND_OUTPUT if name == "y" else GRAD, what=name)


@needs_kernels
def test_triton_summed_modulation_grads_are_float32_sums():
    # per-example partial sums over 2 x 256 rows, several programs per example
    leaves = _inputs((2, 256, 8), (2, 1, 8), (2, 1, 8), torch.float32, device=DEVICE)
    with normlab.set_backend("triton"):
        grads, g = _grads(F.adaln_modulate(*leaves, 1e-6), leaves)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    expected = torch.autograd.grad(R.adaln_modulate(ref[0], (8,), ref[1], ref[2], 1e-6), ref, g.double())
    for name, a, b in zip(("dscale", "dshift"), grads[1:], expected[1:]):
        assert_close(a, b, torch.float32, PARAM_GRAD_SUM, what=name)


@needs_kernels
def test_triton_module_matches_torch_path_and_refuses_what_it_does_not_run():
    torch.manual_seed(0)
    m = normlab.AdaLN(16, cond_dim=4).to(DEVICE)
    with torch.no_grad():
        m.modulation.weight.normal_(0, 0.3)
    x, c = torch.randn(2, 5, 16, device=DEVICE), torch.randn(2, 4, device=DEVICE)
    with normlab.set_backend("triton"):
        y = m(x, c)
    with normlab.set_backend("torch"):
        expected = m(x, c)
    assert_close(y, expected, torch.float32, BACKEND_OUTPUT)
    with normlab.set_backend("triton"):
        x64 = torch.randn(2, 3, 8, dtype=torch.float64, device=DEVICE)
        with pytest.raises(NormArgumentError, match="supports input dtypes .* got torch.float64"):
            F.adaln_modulate(x64, x64[:, :1], x64[:, :1])
        wide = torch.randn(1, 16385, device=DEVICE)
        with pytest.raises(NormArgumentError, match="last dim from 1 to 16384"):
            F.adaln_modulate(wide, wide, wide)


def test_torch_func_transforms_pass_through():
    x, scale, shift = _inputs((2, 3, 8), (2, 1, 8), (2, 1, 8), torch.float32)
    y = torch.vmap(lambda xb, sb, hb: F.adaln_modulate(xb, sb, hb))(x, scale, shift)
    assert_close(y, F.adaln_modulate(x, scale, shift), torch.float32, OUTPUT)
    dx = torch.func.grad(lambda t: F.adaln_modulate(t, scale, shift).square().sum())(x)
    (expected,) = torch.autograd.grad(F.adaln_modulate(x, scale, shift).square().sum(), x)
    assert_close(dx, expected, torch.float32, GRAD)


SM90_SCRIPT = r"""
import inspect
import triton
from triton.compiler import ASTSource
from tests.ops import sm90
from normlab.ops.triton import adaln

def compile_aligned(kernel, types, constexprs, warps):
    # as a launch compiles it where D and every pointer are multiples of 16 (Triton
    # specializes on that): vectorized loads and stores, no per-element pointers
    sig, ce, attrs = {}, {}, {}
    for i, name in enumerate(inspect.signature(kernel.fn).parameters):
        if name in constexprs or types.get(name) is None:
            sig[name], ce[(i,)] = "constexpr", constexprs.get(name)
        else:
            sig[name] = types[name]
            if types[name].startswith("*") or name == "hidden":
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=sig, constexprs=ce, attrs=attrs)
    return triton.compile(src, target=sm90.TARGET, options={"num_warps": warps, "num_stages": 3})

stack = []
for hidden in (1, 100, 4096, 8192, 16384):
    for rms in (False, True):
        for affine in (False, True) if 1 < hidden < 16384 else (False,):
            # the affine variants as launched for D a multiple of 16; unaligned, their
            # per-token backward spills from D = 4096 (docs/kernels.md, "Fused AdaLN")
            compile = compile_aligned if affine and hidden % 16 == 0 else sm90.compile_sm90
            w, b = ("*fp32", None if rms else "*bf16") if affine else (None, None)
            flags = dict(IS_RMS=rms, HAS_WEIGHT=affine, HAS_BIAS=b is not None)
            block, rows, warps = adaln.launch_config(hidden, backward=False)
            c = compile(adaln._adaln_fwd_kernel, dict(
                X="*bf16", SCALE="*fp32", SHIFT="*bf16", W=w, B=b, Y="*fp32", MEAN=None if rms else "*fp32",
                RSTD="*fp32", rows="i32", hidden="i32", scale_group="i32", shift_group="i32", eps="fp32"),
                dict(flags, BLOCK=block, ROWS=rows), warps)
            stack.append(("fwd", hidden, rms, affine, 64, sm90.resource_usage(c).get("STACK", 0)))
            for sc_row, sh_row in ((False, False), (True, True), (True, False)):
                if rms and sc_row != sh_row:
                    continue
                block, rows, warps = adaln.launch_config(hidden, backward=True)
                c = compile(adaln._adaln_bwd_kernel, dict(
                    DY="*fp32", X="*bf16", SCALE="*fp32", W=w, B=b, MEAN=None if rms else "*fp32",
                    RSTD="*fp32", DX="*bf16", DSCALE="*fp32" if sc_row else None,
                    DSHIFT="*bf16" if sh_row else None, SCALE_PART=None if sc_row else "*fp32",
                    SHIFT_PART=None if sh_row else "*fp32", W_PART="*fp32" if w else None,
                    B_PART="*fp32" if b else None, hidden="i32", scale_group="i32",
                    rows_per_example="i32", rows_per_program="i32"),
                    dict(flags, SCALE_PER_ROW=sc_row, SHIFT_PER_ROW=sh_row, BLOCK=block, ROWS=rows),
                    warps)
                # a scale per token, a summed shift and weight and bias: three sums in
                # registers beside the per-row store; 192 bytes spill at D = 8192
                limit = 256 if affine and sc_row and not sh_row else 64
                stack.append(("bwd", hidden, rms, affine, limit, sm90.resource_usage(c).get("STACK", 0)))
heavy = [s for s in stack if s[-1] > s[-2] and s[1] <= 8192]
assert not heavy, heavy
print("compiled", len(stack))
"""


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90():
    # the interpreter never compiles: compile every launched variant with Triton's own
    # ptxas (no GPU needed), and require no heavy register spills up to 8192 wide
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), str(root), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", SM90_SCRIPT], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "compiled" in proc.stdout


def test_which_torch_path_a_call_takes(monkeypatch):
    # one scale and shift for every row: torch's layer_norm kernel with the gains, once;
    # one per example: once per example on a CPU with large enough examples; else the
    # general path (per-token modulation, RMSNorm, small examples)
    from normlab.ops import eager

    def plan(x_shape, s_shape, h_shape, is_rms=False):
        return eager._adaln_plan(torch.empty(x_shape), torch.empty(s_shape), torch.empty(h_shape), is_rms)

    assert plan(*KINDS["shared"]) == "shared" and plan((7,), (7,), (7,)) == "shared"
    assert plan(*KINDS["per_example"]) is None  # 15 elements per example
    assert plan(*KINDS["per_token"]) is None and plan(*KINDS["shared"], is_rms=True) is None
    assert plan((2, 128, 128), (2, 1, 128), (1, 128)) == "example"  # 16384 elements each
    assert plan((2, 127, 128), (2, 1, 128), (2, 1, 128)) is None
    assert plan((2, 0, 128), (128,), (128,)) is None  # no rows
    assert plan((2, 128, 128), (128, 128), (2, 1, 128)) is None  # per position: not per example
    monkeypatch.setattr(eager, "ADALN_BY_EXAMPLE_MIN", 1)
    assert plan(*KINDS["per_example"]) == "example" and plan(*KINDS["shared_scale_per_example_shift"]) == "example"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("affine", [False, True])
def test_by_example_path_at_its_real_size_matches_the_reference(dtype, affine):
    # 2 examples of 320 x 128 (above ADALN_NATIVE_MAX_NUMEL in all, and each above
    # ADALN_BY_EXAMPLE_MIN), against the float64 reference
    from normlab.ops import eager

    leaves = _inputs((2, 320, 128), (2, 1, 128), (2, 1, 128), dtype)
    assert eager._adaln_plan(*leaves, False) == "example" and leaves[0].numel() > eager.ADALN_NATIVE_MAX_NUMEL
    params = _affine(128, "layernorm", dtype) if affine else ()
    kw = dict(zip(("weight", "bias"), params))
    with normlab.set_backend("torch"):
        y = F.adaln_modulate(*leaves, 1e-6, **kw)
        grads, g = _grads(y, leaves + params)
        with torch.no_grad():
            y_no_grad = F.adaln_modulate(*leaves, 1e-6, **kw)
    ref = [t.detach().double().requires_grad_() for t in leaves + params]
    expected = R.adaln_modulate(ref[0], (128,), ref[1], ref[2], 1e-6, *ref[3:])
    expected_grads = torch.autograd.grad(expected, ref, g.double())
    assert y.dtype == dtype and torch.equal(y, y_no_grad)
    assert_close(y, expected, dtype, BACKEND_OUTPUT, what="y")
    assert_close(grads[0], expected_grads[0], dtype, GRAD, what="dx")
    for name, a, e in zip(("dscale", "dshift", "dweight", "dbias"), grads[1:], expected_grads[1:]):
        assert a.dtype == dtype and a.shape == e.shape
        assert_close(a, e, dtype, PARAM_GRAD_SUM, what=name)
