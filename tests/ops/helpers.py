"""Shared pieces of the op tests: the device the kernels run on, inputs, and a runner that
compares an op's outputs and gradients with ops/reference.py (at the tolerances of
tests/_tolerances.py: BACKEND_OUTPUT, GRAD)."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

import normlab
from normlab.ops import reference
from tests._tolerances import BACKEND_OUTPUT, GRAD, assert_close

# the kernels run on CUDA where present, else on the CPU under the Triton interpreter
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1",
)


def backend(name):
    return normlab.set_backend(name) if name else contextlib.nullcontext()


OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")


def float64_leaves(seed=1, rows=3, hidden=5):
    """x, weight, bias and a residual in float64 requiring grad (gradcheck's inputs)."""
    torch.manual_seed(seed)
    x = torch.randn(rows, hidden, dtype=torch.float64, requires_grad=True)
    w, b = (torch.randn(hidden, dtype=torch.float64, requires_grad=True) for _ in range(2))
    return x, w, b, torch.randn(rows, hidden, dtype=torch.float64, requires_grad=True)


def make_inputs(op, shape, hidden_shape, dtype, *, weight_dtype=None, bias=True, weight=True,
                residual=True, residual_in_dtype=None, seed=0, device=DEVICE):
    """Inputs of ``op`` with x ~ N(0.5, 2^2) (far from normalized), on ``device``."""
    g = torch.Generator().manual_seed(seed)
    def rnd(s, dt, scale=1.0, shift=0.0):
        return (torch.randn(s, generator=g) * scale + shift).to(dt).to(device)
    args = {"x": rnd(shape, dtype, 2.0, 0.5)}
    wdt = weight_dtype or dtype
    args["weight"] = rnd(hidden_shape, wdt, 0.5, 1.0) if weight else None
    args["bias"] = rnd(hidden_shape, wdt, 0.5) if (bias and "layer" in op) else None
    if op.startswith("add"):
        args["residual"] = rnd(shape, residual_in_dtype or dtype) if residual else None
    return args


def call(op, a, hidden_shape, **kw):
    """Run ``normlab.functional.<op>`` on the input dict (its per-example variant in
    ``normlab.diagnostics.per_example`` when ``per_example_grad_sq`` is given); returns a
    tuple of outputs."""
    import normlab.diagnostics.per_example as per_example

    F = per_example if "per_example_grad_sq" in kw else normlab.functional
    if op == "layer_norm":
        return (F.layer_norm(a["x"], hidden_shape, a["weight"], a["bias"], **kw),)
    if op == "rms_norm":
        return (F.rms_norm(a["x"], hidden_shape, a["weight"], **kw),)
    if op == "add_layer_norm":
        return F.add_layer_norm(a["x"], a["residual"], a["weight"], a["bias"],
                                normalized_shape=hidden_shape, **kw)
    return F.add_rms_norm(a["x"], a["residual"], a["weight"], normalized_shape=hidden_shape, **kw)


def call_reference(op, a, hidden_shape, **kw):
    if op == "layer_norm":
        return (reference.layer_norm(a["x"], hidden_shape, a["weight"], a["bias"]),)
    if op == "rms_norm":
        return (reference.rms_norm(a["x"], hidden_shape, a["weight"]),)
    if op == "add_layer_norm":
        return reference.add_layer_norm(a["x"], a["residual"], a["weight"], a["bias"],
                                        normalized_shape=hidden_shape, **kw)
    return reference.add_rms_norm(a["x"], a["residual"], a["weight"],
                                  normalized_shape=hidden_shape, **kw)


def grads(outs, inputs, seed=1):
    """Gradients of sum(out_i * G_i) with fixed random G_i w.r.t. the tensors in ``inputs``."""
    g = torch.Generator().manual_seed(seed)
    loss = 0
    for o in outs:
        loss = loss + (o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum()
    present = [t for t in inputs if t is not None]
    got = iter(torch.autograd.grad(loss, present))
    return [next(got) if t is not None else None for t in inputs]


def check_against_reference(op, a, hidden_shape, dtype, *, backward=True, **kw):
    """The op under the current backend vs the reference: outputs and all gradients."""
    names = [n for n in ("x", "residual", "weight", "bias") if a.get(n) is not None]
    leaves = {n: a[n].detach().clone().requires_grad_(backward) for n in names}
    ours_in = {**a, **leaves}
    ref_in = {**a, **{n: t.detach().clone().requires_grad_(backward) for n, t in leaves.items()}}
    ours = call(op, ours_in, hidden_shape, **kw)
    with normlab.set_backend("torch"):
        expected = call_reference(op, ref_in, hidden_shape, **kw)
    for i, (o, e) in enumerate(zip(ours, expected, strict=True)):
        assert o.shape == e.shape and o.dtype == e.dtype, (i, o.shape, e.shape, o.dtype, e.dtype)
        assert_close(o, e, dtype, BACKEND_OUTPUT, what=f"{op} output {i}")
    if not backward or ours[0].numel() == 0 and not any(t.numel() for t in leaves.values()):
        return
    got = grads(ours, [ours_in[n] for n in names])
    want = grads(expected, [ref_in[n] for n in names])
    for n, gg, ww in zip(names, got, want, strict=True):
        assert gg.dtype == ww.dtype and gg.shape == ww.shape, (n, gg.dtype, ww.dtype)
        assert_close(gg, ww, dtype, GRAD, what=f"{op} d{n}")
