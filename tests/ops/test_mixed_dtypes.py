"""Parameters of any floating-point dtype with activations of another dtype.

torch's output-dtype rule (out keeps x's dtype, each gradient its tensor's dtype); the
values against ops/reference.py run in float64, and against torch's ops where torch
takes the pair; the weight and bias gradients summed in float32 (float64 for float64),
not in the activations' dtype, over many rows; on the torch backend and on the Triton
kernels (interpreted on CPU).

What torch does, on a CPU: ``layer_norm`` takes parameters in x's dtype, or float32 ones
for half-precision x (all of one dtype), and refuses every other pair; its backward sums
dweight and dbias in x's dtype for half-precision x. ``rms_norm`` takes any pair (out in
x's dtype, dweight summed in float32 and rounded to the weight's dtype). normlab takes
every pair for all four ops.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as TF

import normlab
from normlab.errors import NormArgumentError
from normlab.ops import reference
from tests._tolerances import BACKEND_OUTPUT, GRAD, OUTPUT, PARAM_GRAD_SUM, assert_close
from tests.ops.helpers import DEVICE, OPS, call, call_reference, needs_kernels

BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
# (x dtype, parameter dtype); torch's layer_norm takes the first two only
PAIRS = [(BF16, FP32), (FP16, FP32), (FP32, BF16), (FP32, FP16), (FP32, FP64), (BF16, FP16),
         (BF16, FP64), (FP16, BF16), (FP64, FP32)]
# torch's layer_norm with half-precision x: float32 parameters or x's dtype (the path that
# replaces its backward on a CPU, for float32 sums)
TORCH_LAYER_NORM_PAIRS = [(BF16, FP32), (FP16, FP32), (BF16, BF16), (FP16, FP16)]


def _ids(pairs):
    return [f"x_{str(a)[6:]}-p_{str(b)[6:]}" for a, b in pairs]


def _coarse(*dtypes):
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


def _grad_sum_dtype(x_dtype, p_dtype):
    """The dtype a parameter gradient's accuracy is bounded by: its own, or the compute
    dtype's (x_hat of fp16/bf16/fp32 x is a float32 value)."""
    return _coarse(p_dtype, reference.compute_dtype(x_dtype))


def _inputs(op, shape, x_dtype, p_dtype, *, bias_dtype=None, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)

    def rnd(s, dt, scale=1.0, shift=0.0):
        return (torch.randn(s, generator=g) * scale + shift).to(dt).to(device)

    hidden = shape[-1]
    return {"x": rnd(shape, x_dtype, 2.0, 0.5), "weight": rnd(hidden, p_dtype, 0.5, 1.0),
            "bias": rnd(hidden, bias_dtype or p_dtype, 0.5) if "layer" in op else None,
            "residual": rnd(shape, x_dtype) if op.startswith("add") else None}


def _names(a):
    return [n for n in ("x", "residual", "weight", "bias") if a.get(n) is not None]


def _forward_backward(fn, a, cotangents=None, seed=1):
    """fn(inputs) -> tuple of outputs, and the gradients of every input tensor for the
    cotangents (random ones in each output's dtype when not given)."""
    leaves = {n: a[n].detach().clone().requires_grad_() for n in _names(a)}
    outs = fn({**a, **leaves})
    if cotangents is None:
        gen = torch.Generator().manual_seed(seed)
        cotangents = [torch.randn(o.shape, generator=gen).to(o.dtype).to(o.device) for o in outs]
    grads = torch.autograd.grad(outs, list(leaves.values()),
                                [c.to(o.dtype) for o, c in zip(outs, cotangents, strict=True)])
    return outs, dict(zip(leaves, grads, strict=True)), cotangents


def _float64(a):
    return {n: (t.double() if isinstance(t, torch.Tensor) else t) for n, t in a.items()}


def _check_against_float64_reference(op, a, out_tol=BACKEND_OUTPUT):
    """normlab's op vs the reference run in float64 on the same values with the same
    cotangents: dtypes exact, values at the tolerance of each tensor's coarser dtype."""
    hidden = a["x"].shape[-1:]
    outs, grads, cot = _forward_backward(lambda t: call(op, t, hidden), a)
    ref_outs, ref_grads, _ = _forward_backward(lambda t: call_reference(op, t, hidden), _float64(a),
                                               [c.double() for c in cot])
    x_dtype = a["x"].dtype
    for i, (o, e) in enumerate(zip(outs, ref_outs, strict=True)):
        assert o.dtype == x_dtype, (op, i, o.dtype)  # out and new_residual keep x's dtype
        assert_close(o, e, x_dtype, out_tol, what=f"{op} output {i}")
    for n, g in grads.items():
        assert g.dtype == a[n].dtype, (op, n, g.dtype, a[n].dtype)
        assert_close(g, ref_grads[n], _coarse(x_dtype, a[n].dtype), GRAD, what=f"{op} d{n}")


# ---------------------------------------------------------------------- torch backend


@pytest.fixture
def torch_backend():
    with normlab.set_backend("torch"):
        yield


@pytest.mark.usefixtures("torch_backend")
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("x_dtype,p_dtype", PAIRS, ids=_ids(PAIRS))
def test_dtypes_and_values_against_float64_reference(op, x_dtype, p_dtype):
    _check_against_float64_reference(op, _inputs(op, (2, 5, 24), x_dtype, p_dtype))


@pytest.mark.usefixtures("torch_backend")
@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm"])
@pytest.mark.parametrize("weight_dtype,bias_dtype", [(FP32, BF16), (BF16, FP32), (FP64, BF16)])
def test_weight_and_bias_of_different_dtypes(op, weight_dtype, bias_dtype):
    # torch refuses a float32 weight with a bfloat16 bias even for bfloat16 x
    _check_against_float64_reference(op, _inputs(op, (3, 16), BF16, weight_dtype, bias_dtype=bias_dtype))


@pytest.mark.usefixtures("torch_backend")
@pytest.mark.parametrize("x_dtype,p_dtype", TORCH_LAYER_NORM_PAIRS, ids=_ids(TORCH_LAYER_NORM_PAIRS))
def test_layer_norm_against_torch(x_dtype, p_dtype):
    # the same output bits and dx as torch's op (torch's dweight/dbias are the ones
    # summed in x's dtype: see test_parameter_gradients_are_summed_in_float32)
    a = _inputs("layer_norm", (4, 6, 32), x_dtype, p_dtype)
    outs, grads, cot = _forward_backward(lambda t: call("layer_norm", t, (32,)), a)
    want, want_grads, _ = _forward_backward(
        lambda t: (TF.layer_norm(t["x"], (32,), t["weight"], t["bias"]),), a, cot)
    assert outs[0].dtype == want[0].dtype and torch.equal(outs[0], want[0])
    assert_close(grads["x"], want_grads["x"], x_dtype, GRAD, what="dx")


@pytest.mark.usefixtures("torch_backend")
@pytest.mark.parametrize("x_dtype,p_dtype", PAIRS, ids=_ids(PAIRS))
def test_rms_norm_against_torch(x_dtype, p_dtype):
    a = _inputs("rms_norm", (6, 8), x_dtype, p_dtype)
    outs, grads, cot = _forward_backward(lambda t: call("rms_norm", t, (8,)), a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "Mismatch dtype ... fused implementation"
        want, want_grads, _ = _forward_backward(lambda t: (TF.rms_norm(t["x"], (8,), t["weight"]),), a, cot)
    assert outs[0].dtype == want[0].dtype == x_dtype
    assert_close(outs[0], want[0], x_dtype, OUTPUT, what="out")
    for n in ("x", "weight"):
        assert grads[n].dtype == want_grads[n].dtype == a[n].dtype
        assert_close(grads[n], want_grads[n], _coarse(x_dtype, a[n].dtype), GRAD, what=f"d{n}")


# the pairs where a sum in x's dtype (half precision) would show, and a half-precision
# parameter of a float32 x
SUM_PAIRS = [(BF16, FP32), (BF16, BF16), (FP16, FP32), (FP16, FP16), (FP32, BF16), (BF16, FP64)]


def _check_param_grad_sums(op, x_dtype, p_dtype, rows, device="cpu"):
    """dweight/dbias over ``rows`` rows vs the float64 reference at PARAM_GRAD_SUM, and,
    for a cotangent of ones, dbias == rows exactly (a bfloat16 sum stops at 256, a
    float16 one at 2048)."""
    a = _inputs(op, (rows, 8), x_dtype, p_dtype, device=device)
    hidden = (8,)
    ref_in = _float64(a)
    for ones in (False, True):
        cot = None
        if ones:
            cot = [torch.ones(rows, 8, dtype=x_dtype, device=device)] * (2 if op.startswith("add") else 1)
        outs, grads, cot = _forward_backward(lambda t: call(op, t, hidden), a, cot, seed=3)
        if op.startswith("add"):  # the norm reads new_residual, as rounded to x's dtype
            ref_in["x"] = outs[1].detach().double()
            ref_in["residual"] = torch.zeros_like(ref_in["x"])
        _, ref, _ = _forward_backward(lambda t: call_reference(op, t, hidden), ref_in,
                                      [c.double() for c in cot])
        for n in ("weight", "bias"):
            if n in grads:
                assert grads[n].dtype == p_dtype
                assert_close(grads[n], ref[n], _grad_sum_dtype(x_dtype, p_dtype), PARAM_GRAD_SUM,
                             what=f"{op} d{n}, {rows} rows{', ones' if ones else ''}")
        if ones and "bias" in grads:
            assert (grads["bias"] == rows).all(), grads["bias"]


@pytest.mark.usefixtures("torch_backend")
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("x_dtype,p_dtype", SUM_PAIRS, ids=_ids(SUM_PAIRS))
def test_parameter_gradients_are_summed_in_float32(op, x_dtype, p_dtype):
    # 8192 rows: a sum in bfloat16 misses the float64 reference by ~1e-1 of the largest
    # |dweight| (torch's own CPU layer_norm backward does), one in float32 by ~1e-7
    _check_param_grad_sums(op, x_dtype, p_dtype, 8192)


@pytest.mark.usefixtures("torch_backend")
@pytest.mark.parametrize("cls", [normlab.LayerNorm, normlab.RMSNorm])
@pytest.mark.parametrize("residual", [False, True])
def test_module_with_float32_parameters_and_bfloat16_input(cls, residual):
    # the usual mixed-precision layout without autocast: float32 master weights,
    # bfloat16 activations
    torch.manual_seed(0)
    norm = cls(8)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.5)
    x = (torch.randn(4096, 8) * 2 + 0.5).bfloat16().requires_grad_()
    r = torch.randn(4096, 8).bfloat16() if residual else None
    out = norm(x, r)[0] if residual else norm(x)
    assert out.dtype == torch.bfloat16
    cot = torch.randn(out.shape).bfloat16()
    out.backward(cot)
    h = (x.detach() + r if residual else x.detach()).double()  # new_residual, rounded to bfloat16
    w = norm.weight.detach().double().requires_grad_()
    ref = (reference.layer_norm(h, (8,), w, None) if cls is normlab.LayerNorm
           else reference.rms_norm(h, (8,), w))
    ref.backward(cot.double())
    assert norm.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert_close(norm.weight.grad, w.grad, torch.float32, PARAM_GRAD_SUM, what="dweight")
    if cls is normlab.LayerNorm:
        torch.testing.assert_close(norm.bias.grad.double(), cot.double().sum(0), rtol=1e-6, atol=1e-4)


@pytest.mark.usefixtures("torch_backend")
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.complex64])
def test_non_floating_parameters_are_refused_by_name(op, dtype):
    a = _inputs(op, (3, 8), BF16, FP32)
    a["weight"] = a["weight"].to(dtype)
    with pytest.raises(NormArgumentError, match="weight.*floating-point"):
        call(op, a, (8,))


# ---------------------------------------------------------------------- Triton kernels

TRITON_PAIRS = [(BF16, FP32), (FP32, BF16), (FP16, BF16), (FP32, FP64)]


@needs_kernels
@pytest.mark.parametrize("op", ["layer_norm", "add_rms_norm"])
@pytest.mark.parametrize("x_dtype,p_dtype", TRITON_PAIRS, ids=_ids(TRITON_PAIRS))
def test_triton_against_float64_reference(op, x_dtype, p_dtype):
    # the kernels read each parameter in its dtype and compute in float32 (a float64
    # parameter too); gradients are stored in each parameter's dtype
    with normlab.set_backend("triton"):
        _check_against_float64_reference(op, _inputs(op, (6, 40), x_dtype, p_dtype, device=DEVICE))


@needs_kernels
def test_triton_weight_and_bias_of_different_dtypes():
    with normlab.set_backend("triton"):
        _check_against_float64_reference(
            "add_layer_norm", _inputs("add_layer_norm", (5, 24), BF16, FP32, bias_dtype=BF16, device=DEVICE))


@needs_kernels
@pytest.mark.parametrize("op,x_dtype", [("add_layer_norm", BF16), ("rms_norm", FP16)])
def test_triton_parameter_gradients_are_summed_in_float32(op, x_dtype):
    # 512 rows (past bfloat16's 256), in large tiles so the interpreter runs few steps;
    # float32 parameters (the interpreter rounds float32 to bfloat16 toward zero, which
    # a bfloat16 parameter's one rounding would show)
    from normlab.ops.triton import launch
    with normlab.set_backend("triton"), launch.tuning(fwd_rows=512, bwd_rows=128):
        _check_param_grad_sums(op, x_dtype, FP32, 512, device=DEVICE)


@pytest.mark.parametrize("x_dtype,p_dtype", [(BF16, BF16), (FP16, FP32)], ids=_ids([(BF16, BF16), (FP16, FP32)]))
@pytest.mark.parametrize("transposed", [False, True])
def test_layer_norm_backward_in_row_chunks(monkeypatch, x_dtype, p_dtype, transposed):
    # half-precision x is converted to float32 for the backward a chunk of rows at a time
    # (eager.LN_BACKWARD_CHUNK, at least 64 rows): 200 rows of a (3, 5) normalized shape
    # make chunks of 64, 64, 64 and 8 rows. dx is the same per row as in one call; the
    # chunks' dweight/dbias add in float32, so they meet the float64 reference as before.
    from normlab.ops import eager
    from normlab.ops.eager import layer_norm as eager_layer_norm

    g = torch.Generator().manual_seed(5)
    x0 = (torch.randn(3, 5, 200, generator=g) * 2 + 0.5).to(x_dtype)
    x0 = x0.permute(2, 0, 1) if transposed else x0.permute(2, 0, 1).contiguous()
    w0 = (torch.randn(3, 5, generator=g) * 0.5 + 1).to(p_dtype)
    b0 = torch.randn(3, 5, generator=g).to(p_dtype)
    dy = torch.randn(200, 3, 5, generator=g).to(x_dtype)

    def grads(chunk):
        monkeypatch.setattr(eager, "LN_BACKWARD_CHUNK", chunk)
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        out = eager_layer_norm(x, (3, 5), w, b, 1e-5)
        out.backward(dy)
        return out, x.grad, w.grad, b.grad

    whole, chunked = grads(1 << 30), grads(1)
    torch.testing.assert_close(chunked[0], whole[0], rtol=0, atol=0)
    torch.testing.assert_close(chunked[1], whole[1], rtol=0, atol=0)
    assert chunked[1].shape == x0.shape and chunked[2].dtype == p_dtype and chunked[3].dtype == p_dtype
    xd, wd, bd = (t.double().requires_grad_() for t in (x0, w0, b0))
    reference.layer_norm(xd, (3, 5), wd, bd, 1e-5).backward(dy.double())
    for ours, ref, name in ((chunked[2], wd.grad, "weight"), (chunked[3], bd.grad, "bias")):
        assert_close(ours, ref, _grad_sum_dtype(x_dtype, p_dtype), PARAM_GRAD_SUM, what=f"chunked d{name}")


@pytest.mark.parametrize("p_dtype", [BF16, FP16, FP64], ids=lambda d: f"p_{str(d)[6:]}")
def test_layer_norm_in_the_compute_dtype_runs_autograds_own_nodes(p_dtype):
    # float32 x with parameters of another dtype: torch's op on the parameters converted
    # (eager.layer_norm_upcast), whose gradients are autograd's own and rounded once:
    # the same bits as normlab's autograd.Function, and forward-mode AD works
    from normlab.ops import eager

    g = torch.Generator().manual_seed(11)
    x0 = torch.randn(37, 1000, generator=g) * 2 + 0.5
    w0, b0 = (torch.randn(1000, generator=g) * 0.5 + 1).to(p_dtype), torch.randn(1000, generator=g).to(p_dtype)
    dy = torch.randn(37, 1000, generator=g)
    results = []
    for fn in (lambda *a: normlab.functional.layer_norm(*a),
               lambda x, s, w, b, e: eager.LayerNormFunction.apply(x, [s], w, b, e)[0]):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        out = fn(x, 1000, w, b, 1e-5)
        out.backward(dy)
        results.append((out, x.grad, w.grad, b.grad))
    for ours, functions in zip(*results):
        assert ours.dtype == functions.dtype
        torch.testing.assert_close(ours, functions, rtol=0, atol=0)
    tx, tw = torch.randn_like(x0), torch.randn_like(w0)
    _, got = torch.func.jvp(lambda a, w: normlab.functional.layer_norm(a, 1000, w, b0), (x0, w0), (tx, tw))
    _, want = torch.func.jvp(lambda a, w: reference.layer_norm(a.double(), (1000,), w.double(), b0.double(), 1e-5),
                             (x0, w0), (tx, tw))
    assert got.dtype == FP32
    assert_close(got, want, FP32, GRAD, what="jvp")


@pytest.mark.parametrize("x_dtype", [BF16, FP16])
def test_half_x_with_a_float32_bias_and_no_weight_has_a_backward(x_dtype):
    # torch's layer_norm takes this pair forward and fails on it backward: normlab's own
    # path runs it (float32 sums), through the public op and its short path alike
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(64, 8, generator=g).to(x_dtype)
    b0 = torch.randn(8, generator=g)
    for frozen in (True, False):
        x, b = x0.clone().requires_grad_(), b0.clone().requires_grad_(not frozen)
        out = normlab.functional.layer_norm(x, 8, None, b)
        out.float().square().sum().backward()
        xd, bd = x0.double().requires_grad_(), b0.double().requires_grad_()
        reference.layer_norm(xd, (8,), None, bd, 1e-5).square().sum().backward()
        assert out.dtype == x_dtype and x.grad.dtype == x_dtype
        assert_close(x.grad, xd.grad, x_dtype, GRAD, what="dx")
        if not frozen:
            assert b.grad.dtype == FP32


def test_forward_mode_ad_keeps_half_precision_tangents():
    # bf16 x with an fp16 weight under jvp / jacfwd: torch's op in the compute dtype,
    # rounded to x's dtype, tangent included (nothing requires grad under forward-mode AD)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, 16, generator=g).to(BF16)
    w = (torch.randn(16, generator=g) * 0.5 + 1).to(FP16)
    tx = torch.randn(5, 16, generator=g).to(BF16)
    primal, tangent = torch.func.jvp(lambda a: normlab.functional.layer_norm(a, 16, w), (x,), (tx,))
    _, want = torch.func.jvp(lambda a: reference.layer_norm(a, (16,), w.double(), None, 1e-5),
                             (x.double(),), (tx.double(),))
    assert primal.dtype == tangent.dtype == BF16
    assert_close(tangent, want, BF16, GRAD, what="tangent")
    assert torch.func.jacfwd(lambda a: normlab.functional.layer_norm(a, 16, w))(x[:1]).dtype == BF16


@pytest.mark.parametrize("p_dtype", [BF16, FP16, FP64], ids=lambda d: f"p_{str(d)[6:]}")
def test_compiled_calls_take_parameters_of_another_dtype(p_dtype):
    # float32 x with bf16/fp16/fp64 parameters: torch's CPU kernel refuses the pair only when
    # it runs, so compiled calls skip the short path to it (backend aot_eager: the traced
    # ops run as they are)
    g = torch.Generator().manual_seed(8)
    x, r = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)
    w, b = torch.randn(16, generator=g).to(p_dtype), torch.randn(16, generator=g).to(p_dtype)
    module = normlab.LayerNorm(16).to(p_dtype)
    calls = {
        "layer_norm": (lambda x: normlab.functional.layer_norm(x, 16, w, b),
                       lambda: reference.layer_norm(x.double(), (16,), w.double(), b.double(), 1e-5)),
        "add_layer_norm": (lambda x: normlab.functional.add_layer_norm(x, r, w, b)[0],
                           lambda: reference.layer_norm((x + r).double(), (16,), w.double(), b.double(), 1e-5)),
        "LayerNorm module": (module, lambda: reference.layer_norm(
            x.double(), (16,), module.weight.double(), module.bias.double(), 1e-5)),
    }
    for name, (fn, ref) in calls.items():
        torch._dynamo.reset()
        got = torch.compile(fn, backend="aot_eager")(x)
        assert got.dtype == FP32, name
        assert_close(got, ref(), FP32, OUTPUT, what=name)
