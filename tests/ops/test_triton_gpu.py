"""The real (compiled) Triton kernels on a CUDA device, at the benchmark shapes:
accuracy vs the float32 reference, torch.compile with inductor, determinism, and the
per-example gradient norms. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

import normlab
import normlab.diagnostics.per_example as per_example
from normlab.ops import reference
from tests._tolerances import BACKEND_OUTPUT, GRAD, assert_close
from tests.ops.helpers import OPS, call, call_reference, make_inputs

pytestmark = pytest.mark.gpu

SHAPES = [(4096, 768), (4096, 4096), (4096, 16384), (512, 65536)]


def _upcast(a):
    return {k: (v.detach().float().requires_grad_() if v is not None else None) for k, v in a.items()}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("rows,hidden", SHAPES)
def test_bf16_against_fp32_reference(op, rows, hidden):
    a = make_inputs(op, (rows, hidden), (hidden,), torch.bfloat16, weight_dtype=torch.float32,
                    device="cuda")
    a = {k: (v.requires_grad_() if v is not None else None) for k, v in a.items()}
    ref_in = _upcast(a)
    with normlab.set_backend("triton"):
        outs = call(op, a, (hidden,))
    expected = call_reference(op, ref_in, (hidden,))
    for o, e in zip(outs, expected, strict=True):
        assert_close(o.float(), e, torch.bfloat16, BACKEND_OUTPUT)
    cot = [torch.randn_like(e) for e in expected]
    leaves = [k for k in ("x", "residual", "weight", "bias") if a.get(k) is not None]
    got = torch.autograd.grad(sum((o.float() * c).sum() for o, c in zip(outs, cot, strict=True)), [a[k] for k in leaves])
    want = torch.autograd.grad(sum((e * c).sum() for e, c in zip(expected, cot, strict=True)), [ref_in[k] for k in leaves])
    for k, g, w in zip(leaves, got, want, strict=True):
        assert_close(g.float(), w, torch.bfloat16, GRAD, what=f"d{k}")


def test_backward_bitwise_deterministic():
    a = make_inputs("add_rms_norm", (16384, 4096), (4096,), torch.bfloat16,
                    weight_dtype=torch.float32, device="cuda")
    w = a["weight"].requires_grad_()
    dws = []
    for _ in range(3):
        with normlab.set_backend("triton"):
            out, new_res = normlab.functional.add_rms_norm(a["x"], a["residual"], w)
        dws.append(torch.autograd.grad(out.float().square().sum(), w)[0])
    assert all(torch.equal(dws[0], d) for d in dws[1:])


def test_inductor_compile_fullgraph():
    m = torch.nn.Sequential(torch.nn.Linear(1024, 1024), normlab.RMSNorm(1024),
                            torch.nn.Linear(1024, 1024), normlab.LayerNorm(1024)).cuda()
    x = torch.randn(64, 1024, device="cuda")
    torch._dynamo.reset()
    eager = m(x)
    got = torch.compile(m, fullgraph=True)(x)
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)


def test_per_example_grad_sq_at_scale():
    b, t, n = 8, 512, 4096
    x = torch.randn(b, t, n, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, device="cuda", requires_grad=True)
    bias = torch.randn(n, device="cuda", requires_grad=True)
    buf = torch.zeros(2, b, device="cuda")
    with normlab.set_backend("triton"):  # below auto's size for the kernels
        y = per_example.layer_norm(x, n, w, bias, per_example_grad_sq=buf)
    g = torch.randn_like(y)
    torch.autograd.grad(y, (w, bias), g)
    xf = x.float()
    xhat = (xf - xf.mean(-1, keepdim=True)) * torch.rsqrt(xf.var(-1, unbiased=False, keepdim=True) + 1e-5)
    sq_w, sq_b = reference.per_example_param_grad_sq(g.float(), xhat, (n,))
    torch.testing.assert_close(buf[0], sq_w, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(buf[1], sq_b, rtol=2e-2, atol=1e-3)


def test_per_example_grad_sq_deterministic_mode_is_bitwise_repeatable():
    b, t, n = 8, 512, 4096
    x = torch.randn(b, t, n, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, device="cuda", requires_grad=True)
    g = torch.randn_like(x)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        bufs = []
        for _ in range(3):
            buf = torch.full((2, b), float("nan"), device="cuda")
            with normlab.set_backend("triton"):
                y = per_example.rms_norm(x, n, w, per_example_grad_sq=buf)
            torch.autograd.grad(y, (w,), g)
            bufs.append(buf)
    finally:
        torch.use_deterministic_algorithms(before)
    assert all(torch.equal(bufs[0], u) for u in bufs[1:]) and bufs[0][1].eq(0).all()
