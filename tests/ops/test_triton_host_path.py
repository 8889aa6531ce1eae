"""The Triton path's host-side shortcuts give the results of the long way round: a call
no backward follows stores no statistics, ``FusedNorm`` is applied through the C apply
(dead functorch wrappers still unwrapped), the backward finds both parameter partial
buffers from one pointer, and launch keywords are cached per configuration."""

from __future__ import annotations

import pytest
import torch

import normlab
from normlab import functional as F
from normlab.ops.triton import custom_ops, launch, norm
from tests.ops.helpers import DEVICE, needs_kernels

pytestmark = needs_kernels


def _inputs(rows, hidden, dtype=torch.float32, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, hidden, generator=g) * 2 + 0.5).to(dtype).to(DEVICE)
    r = torch.randn(rows, hidden, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(hidden, generator=g) * 0.5 + 1).to(dtype).to(DEVICE)
    b = torch.randn(hidden, generator=g).to(dtype).to(DEVICE)
    return [t.requires_grad_(grad) for t in (x, r, w, b)]


@pytest.mark.parametrize("looped", [False, True])
@pytest.mark.parametrize("is_rms", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_a_forward_without_statistics_gives_the_same_bits(looped, is_rms, residual):
    x, r, w, b = _inputs(6, 100)
    kw = dict(hidden=100, is_rms=is_rms, dropout=None, residual_dtype=None, store_residual=residual)
    args = (x, r if residual else None, w, None if is_rms else b, 1e-5)
    ctx = launch.force_looped(32) if looped else torch.no_grad()
    with ctx:
        out, res, mean, rstd = norm.norm_forward(*args, **kw)
        out2, res2, mean2, rstd2 = norm.norm_forward(*args, **kw, store_stats=False)
    assert mean2 is None and rstd2 is None
    assert rstd is not None and rstd.shape == (6,) and (mean is None) == is_rms
    assert out2.equal(out)
    assert (res2 is None and res is None) if not residual else res2.equal(res)


def test_inference_calls_match_the_graph_calls_and_record_nothing():
    x, r, w, b = _inputs(5, 48)
    with normlab.set_backend("triton"):
        with torch.no_grad():
            a = F.layer_norm(x, 48, w, b)
            c, h = F.add_rms_norm(x, r, w)
        xg, rg, wg, bg = (t.detach().requires_grad_() for t in (x, r, w, b))
        a2 = F.layer_norm(xg, 48, wg, bg)
        c2, h2 = F.add_rms_norm(xg, rg, wg)
    assert a.grad_fn is None and c.grad_fn is None
    assert a2.grad_fn is not None and c2.grad_fn is not None
    assert a.equal(a2.detach()) and c.equal(c2.detach()) and h.equal(h2.detach())


@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm"])
@pytest.mark.parametrize("per_example", [False, True])
def test_weight_and_bias_partials_share_one_buffer_without_overlap(op, per_example):
    """Both partial buffers are found from one pointer (the bias's ``db_offset`` on): each
    gradient must be its own sum, over several programs' partials."""
    x, r, w, b = _inputs(37, 24, torch.float64)
    ref_x, ref_r, ref_w, ref_b = (t.detach().clone().requires_grad_() for t in (x, r, w, b))
    x, r, w, b = (t.float().detach().requires_grad_() for t in (x, r, w, b))
    dy = torch.randn(37, 24, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with normlab.set_backend("triton"):
        if per_example:
            from normlab.diagnostics import per_example as pe
            buf = torch.zeros(2, 37, device=DEVICE)
            out = (pe.layer_norm(x, 24, w, b, 1e-5, per_example_grad_sq=buf) if op == "layer_norm"
                   else pe.add_layer_norm(x, r, w, b, 1e-5, per_example_grad_sq=buf)[0])
        else:
            out = F.layer_norm(x, 24, w, b) if op == "layer_norm" else F.add_layer_norm(x, r, w, b)[0]
    out.backward(dy)
    h = ref_x if op == "layer_norm" else ref_x + ref_r
    torch.nn.functional.layer_norm(h, (24,), ref_w, ref_b).backward(dy.double())
    torch.testing.assert_close(w.grad.double(), ref_w.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad.double(), ref_b.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=1e-4, atol=1e-4)
    if per_example:  # rows are examples here: each row's ||dy * xhat||^2 and ||dy||^2
        xhat = torch.nn.functional.layer_norm(h.detach(), (24,))
        torch.testing.assert_close(buf[1].double(), (dy.double() ** 2).sum(1), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(buf[0].double(), ((dy.double() * xhat) ** 2).sum(1), rtol=1e-4, atol=1e-5)


def test_a_dead_functorch_wrapper_is_unwrapped_as_torchs_apply_does():
    """A tensor that escaped a torch.func transform reaches the eager Function: the C
    apply under ``Function.apply`` is called directly, and the unwrapping that method's
    Python layer did is done by ``apply_fused``."""
    leaked = []

    def f(t):
        leaked.append(t)
        return t.sum()

    x, _, w, b = _inputs(4, 16)
    torch.func.grad(f)(x)
    dead = leaked[0]
    assert torch._C._functorch.is_functorch_wrapped_tensor(dead)
    w.requires_grad_()
    with normlab.set_backend("triton"):
        out = F.layer_norm(dead, 16, w, b)
        expected = F.layer_norm(x, 16, w, b)
    assert not torch._C._functorch.is_functorch_wrapped_tensor(out)
    assert out.equal(expected)
    out.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_launch_keywords_are_built_once_per_configuration():
    norm._fwd_keywords.cache_clear()
    x, r, w, b = _inputs(4, 32)
    with normlab.set_backend("triton"), torch.no_grad():
        for _ in range(3):
            F.layer_norm(x, 32, w, b)
        F.rms_norm(x, 32, w)
    info = norm._fwd_keywords.cache_info()
    assert info.misses == 2 and info.hits == 2
    cfg = launch.block_config(32)
    kw = norm._fwd_keywords(cfg, False, False, False, False, False, True, True, False, 0.0, "torch")
    assert kw["STORE_STATS"] is False and kw["BLOCK"] == cfg.block and "offset" not in kw
    kw = norm._fwd_keywords(cfg, True, False, False, False, False, True, False, True, 1.0, "llama")
    assert "STORE_STATS" not in kw and kw["offset"] == 1.0 and kw["HAS_OFFSET"] and kw["LLAMA"]


def test_the_eager_path_applies_fused_norm_without_functions_python_layer(monkeypatch):
    calls = []
    monkeypatch.setattr(custom_ops, "_fused_c_apply",
                        lambda *a: calls.append(1) or super(torch.autograd.Function, custom_ops.FusedNorm).apply(*a))
    x, r, w, b = _inputs(3, 8, grad=True)
    with normlab.set_backend("triton"):
        out = F.layer_norm(x, 8, w, b)
    assert calls and type(out.grad_fn).__name__ == "FusedNormBackward"


@pytest.mark.parametrize("cls", [normlab.LayerNorm, normlab.RMSNorm])
def test_modules_under_a_forced_triton_backend_check_a_call_signature_once(cls, monkeypatch):
    """CPU tensors under ``set_backend("triton")`` (the interpreter) take the modules'
    checked-once path, as CUDA tensors do, not functional's CPU short path to torch's op."""
    from normlab import functional

    checks = []
    real = functional._check_norm_args
    monkeypatch.setattr(functional, "_check_norm_args", lambda *a, **k: checks.append(1) or real(*a, **k))
    m = cls(16).to(DEVICE)
    x = _inputs(4, 16)[0]
    with normlab.set_backend("triton"):
        first = m(x)
        assert m(x).equal(first) and len(checks) == 1
    with normlab.set_backend("torch"):
        torch.testing.assert_close(m(x), first, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_fused_add_norm_with_a_symbolic_parameter_size_exports(backend_name):
    """normalized_shape None: the parameter's size (a SymInt under symbolic tracing) is
    the normalized shape."""

    class M(torch.nn.Module):
        def forward(self, x, r, w, b):
            return F.add_layer_norm(x, r, w, b, 1e-5)

    auto = torch.export.Dim.AUTO
    args = tuple(torch.randn(*s, device=DEVICE) for s in ((3, 8), (3, 8), (8,), (8,)))
    with normlab.set_backend(backend_name):
        ep = torch.export.export(M(), args, dynamic_shapes=({0: auto, 1: auto}, {0: auto, 1: auto}, {0: auto},
                                                            {0: auto}), strict=False)
        expected = F.add_layer_norm(*args, 1e-5)
    for got, want in zip(ep.module()(*args), expected, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("cls", [normlab.LayerNorm, normlab.RMSNorm])
def test_modules_remember_no_signature_under_forward_mode_ad(cls):
    """Forward-mode AD runs the torch path whatever the backend (``backend.resolve``): a
    module's checked-once cache neither sends dual tensors to the kernels nor keeps the
    torch path for later plain calls."""
    import torch.autograd.forward_ad as fwad

    x, t = _inputs(4, 8)[0], torch.randn(4, 8, device=DEVICE)
    with normlab.set_backend("torch"):
        ref = cls(8).to(DEVICE)
        with fwad.dual_level():
            want = fwad.unpack_dual(ref(fwad.make_dual(x, t))).tangent
    with normlab.set_backend("triton"):
        m = cls(8).to(DEVICE)
        m(x)  # a plain call first: the kernels remembered
        with fwad.dual_level():
            got = fwad.unpack_dual(m(fwad.make_dual(x, t))).tangent
        torch.testing.assert_close(got, want)
        m2 = cls(8).to(DEVICE)
        with fwad.dual_level():  # forward AD first: nothing remembered
            m2(fwad.make_dual(x, t))
        assert type(m2(x.detach().requires_grad_()).grad_fn).__name__ == "FusedNormBackward"
