"""Calls under torch.func, torch.compile and at the edges of the argument checks, each
compared with the same call in plain eager (or with torch's op)."""
import copy

import pytest
import torch
from torch.func import functional_call, grad, stack_module_state, vmap

import normlab
import normlab.functional as NF
from normlab.errors import NormDtypeError


@pytest.mark.parametrize("numel_rows", [4, 10_000])  # the short path, and the checked one
@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64, torch.bool])
def test_adaln_refuses_non_float_input(numel_rows, dtype):
    x = torch.ones(numel_rows, 8, dtype=dtype)
    scale, shift = torch.zeros(8), torch.zeros(8)
    with pytest.raises(NormDtypeError, match="expected input to have a floating-point dtype"):
        NF.adaln_modulate(x, scale, shift)


@pytest.mark.parametrize("x_dtype,p_dtype", [(torch.float32, torch.float64), (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.float32)])
def test_layer_norm_vmap_batched_params_of_another_dtype(x_dtype, p_dtype):
    """Per-sample weights of another dtype: under vmap torch's op promotes; normlab's output
    keeps x's dtype, as in eager, and vmap(grad) runs."""
    g = torch.Generator().manual_seed(0)
    B, H = 3, 16
    x = torch.randn(B, 5, H, generator=g).to(x_dtype)
    w = torch.randn(B, H, generator=g).to(p_dtype)
    b = torch.randn(B, H, generator=g).to(p_dtype)
    out = vmap(lambda x, w, b: NF.layer_norm(x, (H,), w, b))(x, w, b)
    loop = torch.stack([NF.layer_norm(x[i], (H,), w[i], b[i]) for i in range(B)])
    assert out.dtype == x_dtype
    torch.testing.assert_close(out, loop, atol=0, rtol=0) if x_dtype is torch.float32 else \
        torch.testing.assert_close(out.float(), loop.float(), atol=1e-2, rtol=1e-2)

    if x_dtype is torch.float32:
        def loss(x, w, b):
            return (NF.layer_norm(x, (H,), w, b) * torch.arange(H)).sum()
        gx, gw = vmap(grad(loss, argnums=(0, 1)))(x, w, b)
        for i in range(B):
            xi, wi = x[i].clone().requires_grad_(), w[i].clone().requires_grad_()
            loss(xi, wi, b[i]).backward()
            torch.testing.assert_close(gx[i], xi.grad)
            torch.testing.assert_close(gw[i], wi.grad)
            assert gw.dtype == torch.float64


@pytest.mark.parametrize("shape", [(8, 64), (128, 1024)])  # torch's op, and normlab's Function
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.float64])
def test_rms_norm_model_ensembling(shape, w_dtype):
    """stack_module_state + vmap over the parameters, the input shared (not batched)."""
    torch.manual_seed(0)
    models = [normlab.RMSNorm(shape[-1], dtype=w_dtype) for _ in range(3)]
    for m in models:
        with torch.no_grad():
            m.weight.normal_()
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(shape)
    out = vmap(lambda p, b, x: functional_call(base, (p, b), (x,)), in_dims=(0, 0, None))(params, buffers, x)
    torch.testing.assert_close(out, torch.stack([m(x) for m in models]))


def test_compiled_ops_take_a_traced_eps():
    """A second eps value makes eps symbolic under torch.compile; the ops still trace whole."""
    x = torch.randn(4, 64)
    for f in (lambda x, e: NF.layer_norm(x, (64,), eps=e), lambda x, e: NF.rms_norm(x, (64,), None, e)):
        torch._dynamo.reset()
        cf = torch.compile(f, backend="eager", fullgraph=True)
        for eps in (1e-5, 1e-6, 0.5):
            torch.testing.assert_close(cf(x, eps), f(x, eps), atol=0, rtol=0)


def test_compiled_module_dynamic():
    torch._dynamo.reset()
    m = normlab.LayerNorm(64)
    x = torch.randn(4, 64)
    torch.testing.assert_close(torch.compile(m, backend="eager", fullgraph=True, dynamic=True)(x), m(x),
                               atol=0, rtol=0)


def test_compiled_add_rms_norm_without_weight():
    torch._dynamo.reset()
    x, r = torch.randn(4, 64), torch.randn(4, 64)
    f = lambda x, r: NF.add_rms_norm(x, r, None)  # noqa: E731
    got = torch.compile(f, backend="eager", fullgraph=True)(x, r)
    want = f(x, r)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float64),
                                             (torch.float32, torch.float32)])
def test_rms_norm_zero_size_hidden_any_weight_dtype(x_dtype, w_dtype):
    x = torch.randn(4, 3, 0).to(x_dtype).requires_grad_()
    w = torch.randn(0, dtype=w_dtype, requires_grad=True)
    y = NF.rms_norm(x, (0,), w)
    assert y.shape == (4, 3, 0) and y.dtype == x_dtype
    y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape


@pytest.mark.parametrize("shape", [[8.7], (8.0,), ["8"]])
def test_normalized_shape_must_hold_ints(shape):
    with pytest.raises(TypeError, match="normalized_shape to be an int or a sequence of ints"):
        NF.layer_norm(torch.randn(2, 8), shape)
    with pytest.raises(TypeError, match="normalized_shape"):
        NF.rms_norm(torch.randn(2, 8), shape)


def test_compiled_code_recompiles_for_another_offset():
    # the second offset for the same code is traced as a symbolic float: the argument
    # checks take it (as they take a symbolic eps) instead of breaking the graph
    def f(m, x):
        return m(x)

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 16)
    mods = [normlab.LayerNorm(16, offset=1.0), normlab.LayerNorm(16, offset=2.0),
            normlab.RMSNorm(16, offset=1.0, casting_mode="gemma"), normlab.RMSNorm(16, offset=0.5, casting_mode="gemma"),
            normlab.LayerNorm(16), normlab.LayerNorm(16, offset=3.0)]
    for m in mods:
        with torch.no_grad():
            m.weight.normal_()
        torch.testing.assert_close(cf(m, x), m(x))
