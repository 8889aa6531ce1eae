"""normlab::adaln_modulate as a real PyTorch op: opcheck, torch.compile(fullgraph=True),
torch.export, and which path an eager call, a compiled call and a torch.func transform take."""

from __future__ import annotations

import pytest
import torch

import normlab
from normlab import functional as F
from normlab.ops import reference as R
from tests._tolerances import BACKEND_OUTPUT, GRAD, assert_close
from tests.ops.helpers import DEVICE, needs_kernels

if DEVICE == "cuda" or __import__("os").environ.get("TRITON_INTERPRET") == "1":
    from normlab.ops.triton import adaln  # registers the normlab:: ops

pytestmark = needs_kernels


def _t(shape, dtype=torch.float32, *, seed, std=1.0, mean=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * std + mean).to(dtype).to(DEVICE).requires_grad_()


def _op_args(x_shape, scale_shape, shift_shape, dtype, *, is_rms, weight_dtype=None, bias_dtype=None,
             scale_dtype=None):
    d = x_shape[-1]
    return (_t(x_shape, dtype, seed=0, std=2.0, mean=0.5), _t(scale_shape, scale_dtype or dtype, seed=1, std=0.5),
            _t(shift_shape, scale_dtype or dtype, seed=2, std=0.5),
            _t((d,), weight_dtype, seed=3, std=0.5, mean=1.0) if weight_dtype else None,
            _t((d,), bias_dtype, seed=4, std=0.5) if bias_dtype else None, 1e-6, is_rms)


OPCHECK_SAMPLES = {
    "per_example_ln_affine_fp32": _op_args((2, 5, 16), (2, 1, 16), (2, 1, 16), torch.float32, is_rms=False,
                                           weight_dtype=torch.float32, bias_dtype=torch.float32),
    "per_token_rms_weight_bf16": _op_args((2, 3, 8), (2, 3, 8), (2, 3, 8), torch.bfloat16, is_rms=True,
                                          weight_dtype=torch.bfloat16),
    "shared_ln_bf16": _op_args((3, 4, 8), (8,), (1, 1, 8), torch.bfloat16, is_rms=False),
    "shared_rms_fp32": _op_args((4, 8), (8,), (8,), torch.float32, is_rms=True),
    "mixed_dtypes_expanded": _op_args((2, 3, 8), (1, 3, 8), (2, 1, 8), torch.bfloat16, is_rms=False,
                                      scale_dtype=torch.float32, weight_dtype=torch.float64,
                                      bias_dtype=torch.bfloat16),
    "no_rows": _op_args((0, 3, 8), (0, 1, 8), (0, 1, 8), torch.float32, is_rms=False,
                        weight_dtype=torch.float32, bias_dtype=torch.float32),
}


@pytest.mark.parametrize("name", list(OPCHECK_SAMPLES))
def test_opcheck_forward(name):
    # schema, fake (shapes, dtypes, strides), autograd registration, aot dispatch with
    # static and dynamic shapes (the backward op included)
    torch.library.opcheck(torch.ops.normlab.adaln_modulate.default, OPCHECK_SAMPLES[name])


def test_op_outputs_and_saved_statistics():
    x, scale, shift, w, b, eps, _ = OPCHECK_SAMPLES["per_example_ln_affine_fp32"]
    y, mean, rstd = torch.ops.normlab.adaln_modulate(x, scale, shift, w, b, eps, False)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert mean.shape == rstd.shape == (2, 5) and mean.dtype == rstd.dtype == torch.float32
    xd = x.detach().double()
    torch.testing.assert_close(mean, xd.mean(-1).float())
    torch.testing.assert_close(rstd, torch.rsqrt(xd.var(-1, correction=0) + eps).float())
    _y, mean_rms, _ = torch.ops.normlab.adaln_modulate(x, scale, shift, w, None, eps, True)
    assert mean_rms.shape == (0,)
    # y in the promoted dtype of x, scale and shift; weight and bias do not promote it
    x16, s32, h16, w64, b16, *_ = OPCHECK_SAMPLES["mixed_dtypes_expanded"]
    assert torch.ops.normlab.adaln_modulate(x16, s32, h16, w64, b16, eps, False)[0].dtype == torch.float32


@pytest.mark.parametrize("is_rms", [False, True])
def test_opcheck_backward(is_rms):
    x, scale, shift, w, b, eps, _ = OPCHECK_SAMPLES["mixed_dtypes_expanded"]
    b = None if is_rms else b
    y, mean, rstd = torch.ops.normlab.adaln_modulate(x, scale, shift, w, b, eps, is_rms)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.dtype).to(DEVICE)
    args = (dy, x.detach(), scale.detach(), w.detach(), None if b is None else b.detach(), mean, rstd,
            list(shift.shape), shift.dtype, is_rms)
    torch.library.opcheck(torch.ops.normlab.adaln_modulate_backward.default, args)
    dx, dscale, dshift, dweight, dbias = torch.ops.normlab.adaln_modulate_backward(*args)
    assert [(t.shape, t.dtype) for t in (dx, dscale, dshift, dweight)] == [
        (x.shape, x.dtype), (scale.shape, scale.dtype), (shift.shape, shift.dtype), (w.shape, w.dtype)]
    assert dbias.shape == ((0,) if is_rms else b.shape)


def test_eager_function_and_op_agree_bit_for_bit():
    """Eager calls take AdaLNFunction, compile and export take the op: the same kernels and
    host sums, so the same bits."""
    results = []
    for path in ("function", "op"):
        x, scale, shift, w, b, eps, is_rms = _op_args((2, 6, 24), (2, 1, 24), (24,), torch.bfloat16,
                                                      is_rms=False, weight_dtype=torch.float32,
                                                      bias_dtype=torch.bfloat16)
        if path == "function":
            y = adaln.AdaLNFunction.apply(x, scale, shift, w, b, eps, is_rms)
        else:
            y = torch.ops.normlab.adaln_modulate(x, scale, shift, w, b, eps, is_rms)[0]
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype).to(DEVICE)
        results.append((y, *torch.autograd.grad(y, (x, scale, shift, w, b), dy)))
    for a, b_ in zip(*results, strict=True):
        assert a.dtype == b_.dtype and torch.equal(a, b_)


# ------------------------------------------------------------------- compile and export


def _block(x, cond_scale, cond_shift, weight, bias):
    """A DiT-style step around the op: the modulation from a conditioning, then a GELU."""
    y = F.adaln_modulate(x * 2.0, cond_scale.unsqueeze(1), cond_shift.unsqueeze(1), 1e-6,
                         weight=weight, bias=bias)
    return torch.nn.functional.gelu(y)


def _block_inputs(dtype=torch.float32):
    return (_t((2, 5, 16), dtype, seed=0, std=2.0), _t((2, 16), dtype, seed=1, std=0.5),
            _t((2, 16), dtype, seed=2, std=0.5), _t((16,), dtype, seed=3, std=0.5, mean=1.0),
            _t((16,), dtype, seed=4, std=0.5))


def _call_targets(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_fullgraph_runs_the_op_and_matches_eager(dtype):
    from torch._dynamo.testing import CompileCounterWithBackend

    leaves = _block_inputs(dtype)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    with normlab.set_backend("triton"):
        expected = _block(*leaves)
        expected_grads = torch.autograd.grad(expected.float().square().sum(), leaves)
        got = torch.compile(_block, fullgraph=True, backend=counter)(*leaves)
        got_grads = torch.autograd.grad(got.float().square().sum(), leaves)
    assert counter.frame_count == 1
    targets = _call_targets(counter.graphs[0])
    assert sum("normlab.adaln_modulate" in t for t in targets) == 1, targets
    assert not any("var_mean" in t or "rsqrt" in t for t in targets), targets  # no torch fallback
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for a, b in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compile_backward_graph_runs_the_backward_op():
    from functorch.compile import aot_function, make_boxed_func

    graphs = []

    def keep(gm, _inputs):
        graphs.append(_call_targets(gm))
        return make_boxed_func(gm.forward)

    leaves = _block_inputs()
    with normlab.set_backend("triton"):
        f = aot_function(lambda *a: torch.ops.normlab.adaln_modulate(*a, 1e-6, False)[0],
                         fw_compiler=keep, bw_compiler=keep)
        torch.autograd.grad(f(leaves[0], leaves[1].unsqueeze(1), leaves[2].unsqueeze(1), *leaves[3:]).sum(),
                            leaves)
    forward, backward = graphs
    assert any("normlab.adaln_modulate.default" in t for t in forward), forward
    assert any("normlab.adaln_modulate_backward" in t for t in backward), backward


def test_compile_inductor_dynamic_shapes():
    import torch._inductor.config

    torch._dynamo.reset()
    with normlab.set_backend("triton"), torch._inductor.config.patch(force_disable_caches=True):
        compiled = torch.compile(_block, fullgraph=True, dynamic=True)
        for rows in (5, 7):  # one graph for both
            leaves = (_t((2, rows, 16), seed=rows, std=2.0), *_block_inputs()[1:])
            got = compiled(*leaves)
            got_grads = torch.autograd.grad(got.sum(), leaves)
            expected = _block(*leaves)
            expected_grads = torch.autograd.grad(expected.sum(), leaves)
            assert_close(got, expected, torch.float32, BACKEND_OUTPUT)
            for a, b in zip(got_grads, expected_grads, strict=True):
                assert_close(a, b, torch.float32, GRAD)


def test_export_holds_the_op():
    class Block(torch.nn.Module):
        def forward(self, x, scale, shift, weight, bias):
            return _block(x, scale, shift, weight, bias)

    leaves = [t.detach() for t in _block_inputs()]
    with normlab.set_backend("triton"):
        ep = torch.export.export(Block(), tuple(leaves))
        expected = _block(*leaves)
    text = str(ep.graph)
    assert text.count("normlab.adaln_modulate.default") == 1, text
    assert "var_mean" not in text
    torch.testing.assert_close(ep.module()(*leaves), expected, rtol=0, atol=0)


def test_compiled_module_matches_eager():
    torch.manual_seed(0)
    m = normlab.AdaLN(16, cond_dim=4).to(DEVICE)
    with torch.no_grad():
        m.modulation.weight.normal_(0, 0.3)
    x, c = _t((2, 5, 16), seed=0), _t((2, 4), seed=1)
    torch._dynamo.reset()
    with normlab.set_backend("triton"):
        expected = m(x, c)
        expected_grads = torch.autograd.grad(expected.sum(), [x, c, *m.parameters()])
        got = torch.compile(m, fullgraph=True, backend="aot_eager")(x, c)
        got_grads = torch.autograd.grad(got.sum(), [x, c, *m.parameters()])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for a, b in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------- which path runs


def test_eager_calls_take_the_autograd_function():
    x, scale, shift, w, b, *_ = _block_inputs()
    with normlab.set_backend("triton"):
        y = F.adaln_modulate(x, scale.unsqueeze(1), shift.unsqueeze(1), weight=w, bias=b)
        with torch.no_grad():
            y_no_grad = F.adaln_modulate(x, scale.unsqueeze(1), shift.unsqueeze(1), weight=w, bias=b)
    assert type(y.grad_fn).__name__ == "AdaLNFunctionBackward"
    assert y_no_grad.grad_fn is None and torch.equal(y_no_grad, y.detach())


def test_double_backward_is_refused():
    # the kernels' backward is not differentiable twice (the torch backend's is)
    x, scale, shift, w, b, *_ = _block_inputs()
    with normlab.set_backend("triton"):
        y = F.adaln_modulate(x, scale.unsqueeze(1), shift.unsqueeze(1), weight=w, bias=b)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="triton backend: no second derivative"):
        torch.autograd.grad(gx.sum(), x)
    with pytest.raises(RuntimeError, match="triton backend: no second derivative"):
        torch.autograd.grad(gx.square().sum(), (x, w))


def test_torch_func_transforms_run_the_torch_ops():
    # vmap, grad and jvp see through the torch path's ops (the custom op has no vmap rule)
    x, scale, shift, w, b = [t.detach() for t in _block_inputs()]
    scale, shift = scale.unsqueeze(1), shift.unsqueeze(1)

    def f(x, scale, shift, w, b):
        return F.adaln_modulate(x, scale, shift, weight=w, bias=b)

    with normlab.set_backend("triton"):
        expected = f(x, scale, shift, w, b)
        per_example = torch.vmap(f, in_dims=(0, 0, 0, None, None))(x, scale, shift, w, b)
        dw = torch.func.grad(lambda w_: f(x, scale, shift, w_, b).square().sum())(w)
        _, tangent = torch.func.jvp(lambda w_: f(x, scale, shift, w_, b), (w,), (torch.ones_like(w),))
    assert_close(per_example, expected, torch.float32, BACKEND_OUTPUT)
    ref_w = w.double().requires_grad_()
    ref = R.adaln_modulate(x.double(), (16,), scale.double(), shift.double(), 1e-6, ref_w, b.double())
    (expected_dw,) = torch.autograd.grad(ref.square().sum(), ref_w)
    assert_close(dw, expected_dw, torch.float32, GRAD)
    # d y / d w along ones: xhat * (1 + scale)
    xhat = torch.nn.functional.layer_norm(x.double(), (16,), eps=1e-6)
    assert_close(tangent, xhat * (1 + scale.double()), torch.float32, BACKEND_OUTPUT)
