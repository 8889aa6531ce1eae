"""torch.fx tracing, compile's dynamic shapes and strict export of rms_norm, eps of the
wrong type, rms_norm's input gradient layout, and the fused ops' messages for a weight
that does not fit the input."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab
from normlab import functional as F


@pytest.mark.parametrize("make", [lambda: normlab.LayerNorm(8), lambda: normlab.RMSNorm(8),
                                  lambda: normlab.LayerNorm(8, bias=False),
                                  lambda: normlab.RMSNorm(8, elementwise_affine=False)])
def test_fx_symbolic_trace_of_the_modules(make):
    torch.manual_seed(0)
    m = nn.Sequential(make(), nn.Linear(8, 2))
    gm = torch.fx.symbolic_trace(m)
    x = torch.randn(3, 8)
    torch.testing.assert_close(gm(x), m(x), rtol=0, atol=0)
    assert {n.target for n in gm.graph.nodes if n.op == "call_function"} <= {F.layer_norm, F.rms_norm}


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x, r):
        a = F.layer_norm(x, (8,), self.w)
        b = F.rms_norm(x, 8, self.w, offset=1.0)
        c, h = F.add_rms_norm(x, r, self.w)
        d, h2 = F.add_layer_norm(x, r, self.w, None, normalized_shape=8)
        e, h3 = F.add_rms_norm(x, r, self.w, casting_mode="llama")
        return a + b + c + d + e + h + h2 + h3


def test_fx_symbolic_trace_of_the_functional_ops():
    m = _Functional()
    gm = torch.fx.symbolic_trace(m)
    x, r = torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(gm(x, r), m(x, r), rtol=0, atol=0)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    for op in (F.layer_norm, F.rms_norm, F.add_rms_norm, F.add_layer_norm):
        assert op in targets


def test_rms_norm_compiles_once_over_batch_sizes():
    from torch._dynamo.testing import CompileCounter

    normlab.get_backend()  # (the backend read before the trace)
    torch._dynamo.reset()
    counter = CompileCounter()
    m = torch.compile(normlab.RMSNorm(256), fullgraph=True, dynamic=True, backend=counter)
    for rows in (100, 200, 300, 400):
        x = torch.randn(rows, 256)
        torch.testing.assert_close(m(x), torch.nn.functional.rms_norm(x, (256,), m.weight))
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_rms_norm_strict_export_with_a_dynamic_batch():
    from torch.export import Dim

    ep = torch.export.export(normlab.RMSNorm(256), (torch.randn(300, 256),),
                             dynamic_shapes={"x": {0: Dim("b", max=4096)}}, strict=True)
    x = torch.randn(7, 256)
    torch.testing.assert_close(ep.module()(x), normlab.RMSNorm(256)(x))


@pytest.mark.parametrize("eps", ["a", [1e-5], object()])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_an_eps_that_is_no_number_is_also_a_type_error(op, eps):
    x = torch.randn(2, 8)
    with pytest.raises(TypeError, match="expected eps to be"):
        getattr(F, op)(x, (8,), None, *([None] if op == "layer_norm" else []), eps)
    with pytest.raises(normlab.NormArgumentError):
        getattr(F, op)(x, (8,), None, *([None] if op == "layer_norm" else []), eps)


def test_an_infinite_eps_is_a_value_error_only():
    with pytest.raises(ValueError) as info:
        F.layer_norm(torch.randn(2, 8), (8,), None, None, float("inf"))
    assert not isinstance(info.value, TypeError)


@pytest.mark.parametrize("dtype_w", [torch.float32, torch.float64])
@pytest.mark.parametrize("dy_layout", ["channels_last", "expanded"])
def test_rms_norm_input_gradient_in_torchs_layout(dtype_w, dy_layout):
    # normlab's own backward (a weight of another dtype) and torch's op: the input gradient
    # in dy's layout, as computed (autograd.grad: a leaf's .grad is restrided by the engine)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float32).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.rand(5, dtype=dtype_w) + 0.5

    def grad(y):
        dy = torch.ones_like(y) if dy_layout == "channels_last" else torch.ones(()).expand(y.shape)
        return torch.autograd.grad(y, x, dy)[0]

    got, want = grad(F.rms_norm(x, (5,), w)), grad(torch.nn.functional.rms_norm(x, (5,), w.to(x.dtype)))
    assert got.stride() == want.stride()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call, name", [
    (lambda x, r: F.add_layer_norm(x, r, torch.randn(7), torch.randn(8)), "weight"),
    (lambda x, r: F.add_rms_norm(x, r, torch.randn(7)), "weight"),
    (lambda x, r: F.add_layer_norm(x, r, None, torch.randn(7)), "bias"),
])
def test_a_fused_ops_parameter_that_does_not_fit_is_named(call, name):
    with normlab.set_backend("torch"), pytest.raises(
            normlab.NormArgumentError, match=f"expected {name} of shape \\[8\\] .*got {name} of shape \\[7\\]"):
        call(torch.randn(2, 8), torch.randn(2, 8))


def test_triton_backend_names_empty_rows():
    pytest.importorskip("triton")
    x = torch.randn(2, 3, 0)
    with normlab.set_backend("triton"), pytest.raises(normlab.NormArgumentError, match="for empty rows"):
        F.add_rms_norm(x, x, torch.randn(0))


def test_vmap_of_grad_through_rms_norms_own_backward():
    # a channels_last cotangent per sample (a permute after the norm) into normlab's own
    # backward (a weight of another dtype): vmap's clone takes no channels_last
    w = (torch.rand(8) + 0.5).double()
    xb = torch.randn(2, 3, 4, 5, 8)
    c = torch.randn(3, 5, 8, 4)

    def loss(x):
        return (F.rms_norm(x, 8, w).permute(0, 2, 3, 1) * c).sum()

    got = torch.func.vmap(torch.func.grad(loss))(xb)
    want = torch.stack([torch.func.grad(loss)(x) for x in xb])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("make", [lambda: normlab.LayerNorm(8), lambda: normlab.RMSNorm(8)])
def test_a_norm_traced_as_the_root_module(make):
    m = make()
    with pytest.raises(normlab.NormArgumentError, match="concrete_args=\\{'residual': None\\}"):
        torch.fx.symbolic_trace(m)
    gm = torch.fx.symbolic_trace(m, concrete_args={"residual": None})
    x = torch.randn(3, 8)
    out = gm(x)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, m(x), rtol=0, atol=0)


def test_add_rms_norm_compiles_once_over_batch_sizes():
    from torch._dynamo.testing import CompileCounter

    normlab.get_backend()
    torch._dynamo.reset()
    counter = CompileCounter()
    norm = normlab.RMSNorm(256)
    m = torch.compile(lambda x, r: norm(x, r), fullgraph=True, dynamic=True, backend=counter)
    for rows in (100, 200, 300, 400):
        x, r = torch.randn(rows, 256), torch.randn(rows, 256)
        out, h = m(x, r)
        torch.testing.assert_close(h, r + x)
        torch.testing.assert_close(out, torch.nn.functional.rms_norm(r + x, (256,), norm.weight))
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_a_0_dim_input_to_a_fused_op_is_named():
    with pytest.raises(normlab.NormArgumentError, match="at least one dimension, got a 0-dim tensor"):
        F.add_layer_norm(torch.tensor(1.0), torch.tensor(0.0), torch.ones(1), None)


class _PassesResidual(nn.Module):
    def __init__(self, norm, required: bool):
        super().__init__()
        self.lin, self.norm, self.required = nn.Linear(8, 8), norm, required

    def forward(self, x, residual=None):
        return self.norm(self.lin(x), residual)


class _RequiresResidual(_PassesResidual):
    def forward(self, x, residual):
        return self.norm(self.lin(x), residual)


@pytest.mark.parametrize("make", [lambda: normlab.LayerNorm(8), lambda: normlab.RMSNorm(8)])
def test_a_model_passing_its_residual_on(make):
    x, r = torch.randn(3, 8), torch.randn(3, 8)
    # a required residual: traced as the fused op
    m = _RequiresResidual(make(), True)
    gm = torch.fx.symbolic_trace(m)
    for got, want in zip(gm(x, r), m(x, r)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # residual=None by default: the graph could not tell the calls apart, refused naming it
    m = _PassesResidual(make(), False)
    with pytest.raises(normlab.NormArgumentError, match="graph's input 'residual', None by default.*"
                                                        "concrete_args=\\{'residual': None\\}"):
        torch.fx.symbolic_trace(m)
    gm = torch.fx.symbolic_trace(m, concrete_args={"residual": None})
    torch.testing.assert_close(gm(x), m(x), rtol=0, atol=0)


def _cl_loss(w, c, rms):
    return lambda x: (rms(x, w).permute(0, 2, 3, 1) * c).sum()


def test_rms_norm_gradient_layout_under_torch_func_is_torchs():
    # normlab's own backward (a float64 weight) against torch's op: grad and vmap(grad)
    w = (torch.rand(8) + 0.5).double()
    c = torch.randn(3, 5, 8, 4)
    ours = _cl_loss(w, c, lambda x, w: F.rms_norm(x, 8, w))
    theirs = _cl_loss(w, c, lambda x, w: torch.nn.functional.rms_norm(x, (8,), w.float()))
    x = torch.randn(3, 4, 5, 8)
    got, want = torch.func.grad(ours)(x), torch.func.grad(theirs)(x)
    assert got.stride() == want.stride()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    xb = torch.randn(2, 3, 4, 5, 8)
    got, want = torch.func.vmap(torch.func.grad(ours))(xb), torch.func.vmap(torch.func.grad(theirs))(xb)
    assert got.stride() == want.stride()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_vmap_of_rms_norm_over_channels_last_samples():
    w = (torch.rand(8) + 0.5).double()  # (normlab's own forward)
    samples = [torch.randn(3, 5, 8, 4).contiguous(memory_format=torch.channels_last) for _ in range(2)]
    xb = torch.stack(samples)
    got = torch.func.vmap(lambda a: F.rms_norm(a, 4, w.new_ones(4)))(xb)
    want = torch.stack([F.rms_norm(a, 4, w.new_ones(4)) for a in samples])
    torch.testing.assert_close(got, want)
