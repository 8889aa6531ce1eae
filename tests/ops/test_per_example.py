"""Per-example squared gradient norms of the norm's weight and bias (Gray et al. 2024),
from the fused backward, against torch.func's vmap(grad(...)) of the reference."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, vmap

import normlab
import normlab.diagnostics.per_example as per_example
from normlab.errors import NormArgumentError
from tests.ops.helpers import DEVICE, OPS, backend, call, call_reference, make_inputs, needs_kernels

BACKENDS = ["torch", pytest.param("triton", marks=needs_kernels)]


def oracle(op, a, shape, cotangents):
    """[2, B] per-example ||dL_b/dweight||^2, ||dL_b/dbias||^2 by vmap(grad) on the reference."""
    has_b, has_r = a.get("bias") is not None, a.get("residual") is not None

    def loss(w, b, xb, rb, *gs):
        inp = {"x": xb.unsqueeze(0), "weight": w, "bias": b if has_b else None,
               "residual": rb.unsqueeze(0) if has_r else None}
        outs = call_reference(op, inp, shape)
        return sum((o.float() * g.unsqueeze(0)).sum() for o, g in zip(outs, gs, strict=True))

    x = a["x"]
    b = a["bias"] if has_b else torch.zeros((), device=x.device)
    r = a["residual"] if has_r else torch.zeros(x.shape[0], device=x.device)
    argnums = (0, 1) if has_b else (0,)
    per = vmap(grad(loss, argnums=argnums), in_dims=(None, None, 0, 0, *[0] * len(cotangents)))(
        a["weight"], b, x, r, *cotangents)
    sq = torch.zeros(2, x.shape[0], device=x.device)
    for i, g in enumerate(per):
        sq[i] = g.float().flatten(1).square().sum(1)
    return sq


def run(op, a, shape, name, **kw):
    buf = torch.full((2, a["x"].shape[0]), float("nan"), device=a["x"].device)
    leaves = [t.requires_grad_() for t in (a["x"], a["weight"], a.get("bias")) if t is not None]
    with backend(name):
        outs = call(op, a, shape, per_example_grad_sq=buf, **kw)
    gen = torch.Generator().manual_seed(5)
    cot = [torch.randn(o.shape, generator=gen).to(o.device) for o in outs]
    torch.autograd.grad(sum((o.float() * c).sum() for o, c in zip(outs, cot, strict=True)), leaves)
    for t in leaves:
        t.requires_grad_(False)
    return buf, cot


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape,hidden", [((3, 5, 17), (17,)), ((4, 16), (16,)), ((2, 3, 4, 6), (4, 6))])
def test_matches_vmap_grad(name, op, shape, hidden):
    a = make_inputs(op, shape, hidden, torch.float32, device=DEVICE)
    buf, cot = run(op, a, hidden, name)
    expected = oracle(op, a, hidden, cot)
    assert expected[0].min() > 0
    torch.testing.assert_close(buf, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("op", ["layer_norm", "add_rms_norm"])
@pytest.mark.parametrize("x_dtype,weight_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float64)])
def test_mixed_dtypes_match_vmap_grad(name, op, x_dtype, weight_dtype):
    # parameters in another dtype than x (float16 x: the Triton interpreter rounds float32
    # to bfloat16 toward zero, which the stored new_residual would show against the oracle)
    a = make_inputs(op, (3, 5, 17), (17,), x_dtype, weight_dtype=weight_dtype, device=DEVICE)
    buf, cot = run(op, a, (17,), name)
    torch.testing.assert_close(buf, oracle(op, a, (17,), cot), rtol=1e-4, atol=1e-6)


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@needs_kernels
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("fixed_order", [False, True], ids=["atomic", "deterministic"])
def test_sums_over_column_blocks(op, fixed_order, request):
    # 100 columns: several column blocks of the reduction add into each example's sum
    # (atomically by default; in a fixed order under deterministic algorithms)
    if fixed_order:
        request.getfixturevalue("deterministic")
    a = make_inputs(op, (3, 4, 100), (100,), torch.float32, device=DEVICE)
    bufs = []
    for _ in range(2):
        buf, cot = run(op, a, (100,), "triton")
        bufs.append(buf)
    torch.testing.assert_close(bufs[0], oracle(op, a, (100,), cot), rtol=1e-4, atol=1e-6)
    if fixed_order:
        assert torch.equal(bufs[0], bufs[1])


@needs_kernels
@pytest.mark.parametrize("op", ["layer_norm", "add_rms_norm"])
def test_column_split_backward_matches_vmap_grad(op):
    from normlab.ops.triton import launch
    a = make_inputs(op, (3, 4, 40), (40,), torch.float32, device=DEVICE)
    with launch.tuning(bwd_split=2):
        buf, cot = run(op, a, (40,), "triton")
    torch.testing.assert_close(buf, oracle(op, a, (40,), cot), rtol=1e-4, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("op", ["layer_norm", "add_rms_norm"])
def test_looped_kernel_matches_vmap_grad(op):
    from normlab.ops.triton import force_looped
    a = make_inputs(op, (3, 4, 40), (40,), torch.float32, device=DEVICE)
    with force_looped(16):
        buf, cot = run(op, a, (40,), "triton")
    torch.testing.assert_close(buf, oracle(op, a, (40,), cot), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", BACKENDS)
def test_without_bias_the_bias_row_is_zero(name):
    a = make_inputs("layer_norm", (3, 4, 8), (8,), torch.float32, bias=False, device=DEVICE)
    buf, cot = run("layer_norm", a, (8,), name)
    torch.testing.assert_close(buf, oracle("layer_norm", a, (8,), cot), rtol=1e-4, atol=1e-6)
    assert (buf[1] == 0).all()


@pytest.mark.parametrize("name", BACKENDS)
def test_gradients_unchanged_by_per_example(name):
    a = make_inputs("add_layer_norm", (3, 5, 12), (12,), torch.float32, device=DEVICE)
    res = []
    for buf in (None, torch.zeros(2, 3, device=DEVICE)):
        leaves = [a[k].detach().requires_grad_() for k in ("x", "residual", "weight", "bias")]
        with backend(name):
            out, new_res = per_example.add_layer_norm(*leaves, per_example_grad_sq=buf)
        res.append(torch.autograd.grad(out.square().sum() + new_res.sum(), leaves))
    # dx, dresidual bit-identical; dweight/dbias summed in another (fixed) order
    for i, (p, q) in enumerate(zip(*res, strict=True)):
        torch.testing.assert_close(p, q, rtol=0 if i < 2 else 1e-6, atol=0 if i < 2 else 1e-6)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("cls", [normlab.LayerNorm, normlab.RMSNorm])
def test_module_collects_per_example_grad_sq(name, cls):
    m = cls(10).to(DEVICE)
    with torch.no_grad():
        m.weight.copy_(torch.linspace(0.5, 2.0, 10))
    m.collect_per_example_grad_sq = True
    x = torch.randn(4, 3, 10, device=DEVICE)
    with backend(name):
        y = m(x)
    cot = torch.randn_like(y)
    (y * cot).sum().backward()
    op = "layer_norm" if cls is normlab.LayerNorm else "rms_norm"
    a = {"x": x, "weight": m.weight.detach(), "bias": getattr(m, "bias", None)}
    if a["bias"] is not None:
        a["bias"] = a["bias"].detach()
    torch.testing.assert_close(m.per_example_grad_sq, oracle(op, a, (10,), [cot]),
                               rtol=1e-4, atol=1e-6)
    m.collect_per_example_grad_sq = False
    m.per_example_grad_sq = None
    m(x)
    assert m.per_example_grad_sq is None



@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("cls", [normlab.LayerNorm, normlab.RMSNorm])
def test_compiled_module_collects_per_example_grad_sq(name, cls):
    # the module allocates each call's buffer outside the compiled graph, which the
    # backward then writes (allocated inside, the partitioner could not hand it back)
    m = cls(8).to(DEVICE)
    m.collect_per_example_grad_sq = True
    x = torch.randn(3, 4, 8, device=DEVICE)
    torch._dynamo.reset()
    with backend(name):
        y = torch.compile(m, backend="aot_eager")(x.requires_grad_())
    cot = torch.randn_like(y)
    (y * cot).sum().backward()
    op = "layer_norm" if cls is normlab.LayerNorm else "rms_norm"
    a = {"x": x.detach(), "weight": m.weight.detach(), "bias": getattr(m, "bias", None)}
    if a["bias"] is not None:
        a["bias"] = a["bias"].detach()
    torch.testing.assert_close(m.per_example_grad_sq, oracle(op, a, (8,), [cot]), rtol=1e-4, atol=1e-6)

def test_bad_buffers_are_rejected():
    F = per_example
    x, w = torch.randn(3, 4, 8), torch.ones(8)
    with pytest.raises(NormArgumentError, match=r"shape \[2, 3\]"):
        F.layer_norm(x, 8, w, per_example_grad_sq=torch.zeros(3, 2))
    with pytest.raises(NormArgumentError, match="float32"):
        F.rms_norm(x, 8, w, per_example_grad_sq=torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(NormArgumentError, match="needs weight"):
        F.rms_norm(x, 8, None, per_example_grad_sq=torch.zeros(2, 3))
    with pytest.raises(NormArgumentError, match="example dim"):
        F.layer_norm(torch.randn(8), 8, w, per_example_grad_sq=torch.zeros(2, 8))


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("op", ["layer_norm", "add_rms_norm"])
def test_retain_graph_each_backward_writes_the_buffer(name, op):
    a = make_inputs(op, (3, 4, 8), (8,), torch.float32, device=DEVICE)
    leaves = [t.requires_grad_() for t in (a["x"], a["weight"], a.get("bias")) if t is not None]
    buf = torch.full((2, 3), float("nan"), device=DEVICE)
    with backend(name):
        outs = call(op, a, (8,), per_example_grad_sq=buf)
    gen = torch.Generator().manual_seed(7)
    for retain in (True, True, False):
        cot = [torch.randn(o.shape, generator=gen).to(o.device) for o in outs]
        buf.fill_(float("nan"))
        torch.autograd.grad(sum((o * c).sum() for o, c in zip(outs, cot, strict=True)), leaves,
                            retain_graph=retain)
        torch.testing.assert_close(buf, oracle(op, a, (8,), cot), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_writes_the_buffer(name, compiler):
    import torch._inductor.config

    def f(x, residual, weight, buf):
        out, new_residual = per_example.add_rms_norm(x, residual, weight,
                                              per_example_grad_sq=buf)
        return out, new_residual

    a = make_inputs("add_rms_norm", (3, 4, 8), (8,), torch.float32, device=DEVICE)
    leaves = [a[k].requires_grad_() for k in ("x", "residual", "weight")]
    buf = torch.full((2, 3), float("nan"), device=DEVICE)
    torch._dynamo.reset()
    # inductor's on-disk caches do not key on the op's Python fake: compile afresh
    with backend(name), torch._inductor.config.patch(force_disable_caches=True):
        outs = torch.compile(f, fullgraph=True, backend=compiler)(*leaves, buf)
    gen = torch.Generator().manual_seed(3)
    cot = [torch.randn(o.shape, generator=gen).to(o.device) for o in outs]
    torch.autograd.grad(sum((o * c).sum() for o, c in zip(outs, cot, strict=True)), leaves)
    torch.testing.assert_close(buf, oracle("add_rms_norm", a, (8,), cot), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cls", [normlab.LayerNorm, normlab.RMSNorm])
def test_module_buffer_refuses_a_norm_called_twice_before_backward(cls):
    # shared parameters: the per-example gradient is g1_b + g2_b, which per-call buffers
    # cannot give; reading must raise, not return the last call's numbers
    torch.manual_seed(0)
    m = cls(6)
    m.collect_per_example_grad_sq = True
    x = torch.randn(3, 4, 6)
    loss = m(x).square().sum() + m(2 * x + 1).square().sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="ran 2 times before its backward"):
        _ = m.per_example_grad_sq
    # once per backward works again, step after step (earlier calls are done)
    for _ in range(2):
        m(x).square().sum().backward()
        assert m.per_example_grad_sq.shape == (2, 3)
    # a forward whose graph is still held and whose backward never ran, then a normal
    # step: the pending call makes reading refuse (its backward may still come)
    held = m(x)
    m(x).square().sum().backward()
    with pytest.raises(RuntimeError, match="ran 2 times"):
        _ = m.per_example_grad_sq
    del held  # its graph freed: no backward can come, and the call is forgotten
    assert m.per_example_grad_sq.shape == (2, 3)
    m.per_example_grad_sq = None
    assert m.per_example_grad_sq is None
