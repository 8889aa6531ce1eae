"""normlab::fused_norm (and its per-example variant normlab::fused_norm_per_example) as
real PyTorch ops: opcheck, torch.compile(fullgraph=True), torch.export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab
from tests.ops.helpers import DEVICE, needs_kernels

if DEVICE == "cuda" or __import__("os").environ.get("TRITON_INTERPRET") == "1":
    import normlab.ops.triton  # noqa: F401  (registers the normlab:: ops)

pytestmark = needs_kernels


def _fwd_args(is_rms, residual, dropout, residual_dtype=None, dtype=torch.float32,
              weight_dtype=torch.float32, bias_dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    def t(*s, dt=dtype, grad=True):
        return (torch.randn(*s, generator=g).to(dt).to(DEVICE)).requires_grad_(grad)
    x = t(3, 5, 16)
    res = t(3, 5, 16) if residual else None
    w = t(16, dt=weight_dtype)
    b = None if is_rms else t(16, dt=bias_dtype)
    seed = torch.tensor(1234) if dropout else None
    store = residual or dropout or residual_dtype is not None
    return (x, res, w, b, seed, 1e-5, 16, is_rms, 0.25 if dropout else 0.0, residual_dtype, store)


@pytest.mark.parametrize("args", [
    _fwd_args(False, True, False),
    _fwd_args(True, False, False),
    _fwd_args(True, True, True),
    _fwd_args(False, True, False, torch.float32, torch.bfloat16),
    _fwd_args(False, True, False, weight_dtype=torch.bfloat16, bias_dtype=torch.float64),
], ids=["add_ln", "rms", "add_rms_dropout", "add_ln_bf16_fp32_residual", "add_ln_bf16_weight_fp64_bias"])
def test_opcheck_forward(args):
    torch.library.opcheck(torch.ops.normlab.fused_norm.default, args)


@pytest.mark.parametrize("is_rms", [False, True])
def test_opcheck_forward_of_rows_one_wide(is_rms):
    """hidden 1: the statistics keep every dim of x (``launch.row_shape``), as the fake says."""
    x = torch.randn(4, 1, device=DEVICE)
    w, b = torch.ones(1, device=DEVICE), None if is_rms else torch.zeros(1, device=DEVICE)
    args = (x, None, w, b, None, 1e-5, 1, is_rms, 0.0, None, False)
    _out, _res, mean, rstd = torch.ops.normlab.fused_norm(*args)
    assert rstd.shape == (4, 1) and (is_rms or mean.shape == (4, 1))
    torch.library.opcheck(torch.ops.normlab.fused_norm.default, args)


def _per_example(args):
    """``_fwd_args`` for ``fused_norm_per_example``: the [2, B] buffer after seed."""
    return (*args[:5], torch.zeros(2, args[0].shape[0], device=DEVICE), *args[5:])


def test_the_default_ops_carry_no_per_example_buffer():
    for op in (torch.ops.normlab.fused_norm, torch.ops.normlab.fused_norm_backward):
        schema = str(op.default._schema)
        assert "per_example" not in schema, schema
    fwd = str(torch.ops.normlab.fused_norm_per_example.default._schema)
    bwd = str(torch.ops.normlab.fused_norm_per_example_backward.default._schema)
    assert "Tensor per_example_grad_sq," in fwd and "Tensor per_example_grad_sq," in bwd
    assert bwd.endswith("-> (Tensor, Tensor, Tensor, Tensor, Tensor)")
    assert str(torch.ops.normlab.fused_norm_backward.default._schema).endswith("-> (Tensor, Tensor, Tensor, Tensor)")


@pytest.mark.parametrize("args", [
    _fwd_args(False, True, False),
    _fwd_args(True, True, True),
], ids=["add_ln", "add_rms_dropout"])
def test_opcheck_per_example_forward(args):
    torch.library.opcheck(torch.ops.normlab.fused_norm_per_example.default, _per_example(args))


def test_opcheck_backward_ops_and_the_per_example_buffer():
    x = torch.randn(3, 5, 16, device=DEVICE)
    w = torch.randn(16, device=DEVICE)
    out, new_res, mean, rstd = torch.ops.normlab.fused_norm(x, None, w, None, None, 1e-5, 16, False, 0.0, None, False)
    saved = (torch.randn_like(out), None, x, w, mean, rstd, None)
    settings = (16, False, 0.0, torch.float32, None, None)
    torch.library.opcheck(torch.ops.normlab.fused_norm_backward.default, (*saved, *settings))
    buf = torch.zeros(2, 3, device=DEVICE)
    args = (*saved, buf, *settings)
    torch.library.opcheck(torch.ops.normlab.fused_norm_per_example_backward.default, args)
    *grads, sq = torch.ops.normlab.fused_norm_per_example_backward(*args)
    # functional: the buffer gives the shape; the autograd formula copies sq into it
    assert (buf == 0).all()
    assert sq.shape == (2, 3) and sq[0].min() > 0 and (sq[1] == 0).all()
    # the plain backward op's gradients (dweight summed per example first: another order)
    for p, q in zip(grads, torch.ops.normlab.fused_norm_backward(*saved, *settings), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


class _Block(nn.Module):
    """x -> linear -> add+LayerNorm (Post-LN output) -> RMSNorm, the residual kept."""

    def __init__(self, d=32):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.ln = normlab.LayerNorm(d)
        self.rms = normlab.RMSNorm(d)

    def forward(self, x, residual):
        out, new_residual = self.ln(self.lin(x), residual)
        return self.rms(out) + new_residual


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 3, 32, generator=g).to(DEVICE),
            torch.randn(2, 3, 32, generator=g).to(DEVICE))


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    m = _Block().to(DEVICE)
    x, r = _inputs()
    torch._dynamo.reset()
    with normlab.set_backend("triton"):
        eager = m(x, r)
        eager_grads = torch.autograd.grad(eager.square().sum(), list(m.parameters()))
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        got = compiled(x, r)
        got_grads = torch.autograd.grad(got.square().sum(), list(m.parameters()))
    torch.testing.assert_close(got, eager)
    for p, q in zip(got_grads, eager_grads, strict=True):
        torch.testing.assert_close(p, q)


def test_compile_counts_no_graph_break():
    from torch._dynamo.testing import CompileCounterWithBackend
    m = _Block().to(DEVICE)
    x, r = _inputs()
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    with normlab.set_backend("triton"):
        torch.compile(m, backend=counter)(x, r)
    assert counter.frame_count == 1
    ops = [n.target for g in counter.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert sum("fused_norm" in str(t) for t in ops) == 2, ops


def test_export_runs_the_op():
    torch.manual_seed(0)
    m = _Block().to(DEVICE)
    x, r = _inputs()
    with normlab.set_backend("triton"):
        ep = torch.export.export(m, (x, r))
        expected = m(x, r)
    text = str(ep.graph)
    assert text.count("normlab.fused_norm") == 2, text
    torch.testing.assert_close(ep.module()(x, r), expected)


@pytest.mark.parametrize("per_example", [False, True], ids=["plain", "per_example"])
def test_eager_function_and_op_agree_bit_for_bit(per_example):
    """Eager calls on plain tensors take FusedNorm (FusedNormPerExample); compile/export
    take the op: the same kernels and formula, so the same bits, per-example buffer
    included."""
    from normlab.ops.triton import custom_ops
    results = []
    for path in ("function", "op"):
        args = _fwd_args(False, True, True)
        x, res, w, b = args[:4]
        spec = custom_ops.FusedSpec(*args[4:])
        buf = torch.zeros(2, 3, device=DEVICE)
        if path == "function" and per_example:
            out, new_res = custom_ops.FusedNormPerExample.apply(x, res, w, b, spec, buf)
        elif path == "function":
            out, new_res = custom_ops.FusedNorm.apply(x, res, w, b, spec)
        elif per_example:
            out, new_res, _mean, _rstd = torch.ops.normlab.fused_norm_per_example(*_per_example(args)[:5], buf,
                                                                                   *args[5:])
        else:
            out, new_res, _mean, _rstd = torch.ops.normlab.fused_norm(*args)
        g = torch.Generator().manual_seed(1)
        cots = [torch.randn(t.shape, generator=g).to(DEVICE) for t in (out, new_res)]
        grads = torch.autograd.grad((out * cots[0]).sum() + (new_res * cots[1]).sum(), (x, res, w, b))
        results.append((out, new_res, *grads, buf))
    for a, b_ in zip(*results, strict=True):
        assert torch.equal(a, b_)
    assert results[0][-1].min() > 0 if per_example else (results[0][-1] == 0).all()


def test_use_ops_picks_the_op_where_the_function_cannot_go():
    from torch.distributed.tensor import DTensor  # noqa: F401  (a subclass exists)

    from normlab.ops.triton import custom_ops
    x = torch.randn(2, 4)
    assert not custom_ops.use_ops(x, None)
    # a module's weights are Parameters: still the eager path
    assert not custom_ops.use_ops(x, torch.nn.Parameter(torch.randn(4)))
    assert custom_ops.use_ops(x, torch.randn(4).as_subclass(_Sub))
    seen = []

    def f(t):
        seen.append(custom_ops.use_ops(t))
        return t * 2
    torch.func.vmap(f)(x)
    torch.compile(f, backend="eager", fullgraph=True)(x)
    assert seen[0] is True and seen[-1] is True


class _Sub(torch.Tensor):
    pass


_SECOND_ORDER_OPS = {
    "rms_norm": lambda x, w: normlab.functional.rms_norm(x, 16, w),
    "layer_norm": lambda x, w: normlab.functional.layer_norm(x, 16, w, None),
    "add_rms_norm": lambda x, w: normlab.functional.add_rms_norm(x, 2 * x, w)[0],
    "add_layer_norm_both_outputs": lambda x, w: sum(normlab.functional.add_layer_norm(x, 2 * x, w, None)),
    "adaln_modulate": lambda x, w: normlab.functional.adaln_modulate(x, w, torch.zeros(16, device=DEVICE)),
}


@pytest.mark.parametrize("op", list(_SECOND_ORDER_OPS))
@pytest.mark.parametrize("penalty", ["square", "linear"])  # dL/dy depends on y, or is a constant
def test_a_second_derivative_raises_by_name_through_autograd_grad_too(op, penalty):
    # the kernels' backward is not differentiable. It used to be wrapped in torch's
    # once_differentiable, whose error node hangs on detached copies: .backward() raised,
    # but torch.autograd.grad of the inputs (a gradient penalty's usual form) returned
    # gradients without the second-order terms, off by hundreds, and no error
    torch.manual_seed(0)
    x0, w0 = torch.randn(4, 16, device=DEVICE), torch.randn(16, device=DEVICE)

    def penalized(backend):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        with normlab.set_backend(backend):
            y = _SECOND_ORDER_OPS[op](x, w)
        first = y.square().sum() if penalty == "square" else (y * torch.linspace(-1, 1, 16, device=DEVICE)).sum()
        (gx,) = torch.autograd.grad(first, x, create_graph=True)
        return torch.autograd.grad(y.sum() + gx.square().sum(), (x, w))

    with pytest.raises(RuntimeError, match="triton backend: no second derivative"):
        penalized("triton")
    dx, dw = penalized("torch")  # the torch backend's formulas are differentiable
    assert dx.abs().sum() > 0 and dw.abs().sum() > 0


def test_double_backward_is_refused_and_other_second_derivatives_run():
    x = torch.randn(3, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(16, device=DEVICE, requires_grad=True)
    with normlab.set_backend("triton"):
        y = normlab.functional.rms_norm(x, 16, w)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="triton backend: no second derivative"):
        gx.sum().backward()
    # under create_graph the first derivative is the plain backward's
    (plain,) = torch.autograd.grad(y.square().sum(), x, retain_graph=True)
    torch.testing.assert_close(gx, plain, rtol=0, atol=0)
    # a second derivative whose graph holds the norm's output, not its backward, runs
    lin = nn.Linear(16, 16).to(DEVICE)
    with normlab.set_backend("triton"):
        z = lin(normlab.functional.rms_norm(x, 16, w))
    (gw,) = torch.autograd.grad(z.square().sum(), lin.weight, create_graph=True)
    gw.square().sum().backward()
    assert lin.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_modules_take_the_eager_function_in_eager_mode():
    # a module's weights are Parameters; the op's dispatch would cost host time per call
    x = torch.randn(3, 16, device=DEVICE, requires_grad=True)
    with normlab.set_backend("triton"):
        y = normlab.LayerNorm(16).to(DEVICE)(x)
        out, _ = normlab.RMSNorm(16).to(DEVICE)(x, torch.randn_like(x))
    assert "FusedNorm" in type(y.grad_fn).__name__
    assert "FusedNorm" in type(out.grad_fn).__name__


@pytest.mark.parametrize("how", ["no_grad", "nothing_requires_grad", "inference_mode"])
def test_a_call_autograd_will_not_record_runs_the_kernel_without_an_autograd_node(how, monkeypatch):
    """Inference (no_grad, inference_mode, or no input requiring a gradient) skips
    FusedNorm: no node would be recorded, and the Function's host time is a third of the
    call's. The results are the Function's, bit for bit, with the residual and dropout."""
    import contextlib

    from normlab.ops.triton import custom_ops
    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(3, 5, 16, generator=g).to(DEVICE) for _ in range(2))
    w, b = torch.randn(16, generator=g).to(DEVICE), torch.randn(16, generator=g).to(DEVICE)
    expected = [custom_ops.FusedNorm.apply(x, None, w, b, custom_ops.FusedSpec(None, 1e-5, 16, False, 0.0, None,
                                                                                  False)),
                *custom_ops.FusedNorm.apply(x, r, w, None, custom_ops.FusedSpec(torch.tensor(7), 1e-6, 16, True,
                                                                                   0.25, None, True))]
    if how == "nothing_requires_grad":
        ctx = contextlib.nullcontext()
    else:
        x, r, w, b = (t.requires_grad_() for t in (x, r, w, b))
        ctx = torch.no_grad() if how == "no_grad" else torch.inference_mode()

    def refused(*args):
        raise AssertionError("FusedNorm ran")
    monkeypatch.setattr(custom_ops.FusedNorm, "apply", refused)
    monkeypatch.setattr(normlab.ops.triton, "_seed", lambda generator: torch.tensor(7))
    with normlab.set_backend("triton"), ctx:
        got = [normlab.functional.layer_norm(x, 16, w, b),
               *normlab.functional.add_rms_norm(x, r, w, 1e-6, dropout_p=0.25, training=True)]
    for a, e in zip(got, expected, strict=True):
        assert torch.equal(a, e) and a.grad_fn is None
