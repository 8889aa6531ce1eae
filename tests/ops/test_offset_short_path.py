"""The offset / casting-mode norms' short path on a CPU (rms_norm, layer_norm and the fused
adds with an ``offset`` or a ``casting_mode``: torch's ops first, normlab's checks only for
what they refuse) behaves as the checked path, call for call: same result bits and
layout, or the same error, over good and bad arguments; rms_norm's keeps the reference's
bits (Hugging Face's GemmaRMSNorm / LlamaRMSNorm), forward and backward; layer_norm's
offset runs torch's fused op in float32, with float32 parameter-gradient sums."""

from __future__ import annotations

import itertools

import pytest
import torch

import normlab
from normlab import functional as F
from normlab.errors import NormArgumentError
from normlab.ops import eager, reference
from tests.ops.helpers import float64_leaves
from tests.ops.test_short_path import _DTYPES, _EPS, _SHAPES, _assert_same, _weights

_CASTS = ((1.0, "torch"), (0.5, "torch"), (0.0, "llama"), (1.0, "llama"), (0.0, "gemma"), (1.0, "gemma"))


def _inputs(dtype):
    x = torch.randn(4, 3, 6).to(dtype)
    yield x
    yield x.transpose(0, 1)  # strided: the checked path keeps rms_norm's strides
    yield x.contiguous(memory_format=torch.contiguous_format)[:, :, :5]  # a slice: not contiguous


@pytest.mark.parametrize("dtype", [*_DTYPES, torch.int64])
def test_rms_norm_offset_and_casting_short_path_matches_the_checked_path(dtype):
    torch.manual_seed(0)
    for x, w, eps, shape, (offset, mode) in itertools.product(
            _inputs(dtype), _weights(6, dtype), _EPS, _SHAPES, _CASTS):
        _assert_same(lambda *a, o=offset, m=mode: F.rms_norm(*a, offset=o, casting_mode=m),
                     lambda *a, o=offset, m=mode: F._rms_norm_cast(*a, o, m), x, shape, w, eps)


@pytest.mark.parametrize("dtype", [*_DTYPES, torch.int64])
def test_layer_norm_offset_short_path_matches_the_checked_path(dtype):
    torch.manual_seed(0)
    for x, w, eps, shape, offset in itertools.product(_inputs(dtype), _weights(6, dtype), _EPS, _SHAPES, (1.0, -0.5)):
        b = w.flip(0) if isinstance(w, torch.Tensor) and w.dim() == 1 else w
        for bias in (b, None, torch.zeros(1)):  # (a bias of the wrong shape, with a good weight)
            _assert_same(lambda *a, o=offset: F.layer_norm(*a, offset=o),
                         lambda *a, o=offset: F._layer_norm_torch_ops(*a, o), x, shape, w, bias, eps)


def _residuals(x):
    yield x.flip(0)
    yield x.flip(0).transpose(0, 1).contiguous().transpose(0, 1)  # strided
    yield x[0]  # broadcasts in torch's add: refused
    yield x.flip(0).double() if x.dtype != torch.float64 else x.float()  # another dtype
    yield None


@pytest.mark.parametrize("dtype", _DTYPES)
@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
def test_fused_add_with_an_offset_short_path_matches_the_checked_path(op, dtype):
    torch.manual_seed(0)
    x = torch.randn(5, 6).to(dtype)
    is_rms = op == "add_rms_norm"
    for r, w, (p, training), eps, shape, rdt, (offset, mode) in itertools.product(
            _residuals(x), _weights(6, dtype), ((0.0, True), (0.3, False), (1.5, False)),
            (1e-5, None, float("nan")), (None, 6, (6,), 5), (None, torch.float32), _CASTS):
        if not is_rms and (eps is None or mode != "torch"):
            continue
        cast = dict(offset=offset, **({"casting_mode": mode} if is_rms else {}))
        kwargs = dict(dropout_p=p, training=training, residual_dtype=rdt, normalized_shape=shape)
        args = (x, r, w, *(() if is_rms else (w,)), eps)
        def public(*a, c=cast, **k):
            return getattr(F, op)(*a, **k, **c)

        def checked(*a, o=offset, m=mode, **k):
            return F._add_then_norm(op, *a[:3], None if is_rms else a[3], a[-1], k["dropout_p"], k["training"],
                                    None, k["residual_dtype"], k["normalized_shape"], o, m)

        _assert_same(public, checked, *args, **kwargs)


@pytest.mark.parametrize("hidden", [1, 3, 1000, 4097, 65536])
@pytest.mark.parametrize("dtype", _DTYPES)
def test_rms_norm_casting_short_path_is_the_references_bits_forward_and_backward(dtype, hidden):
    torch.manual_seed(0)
    rows = 2 if hidden == 65536 else 5
    x0 = (torch.randn(rows, hidden, dtype=torch.float64) * 3).to(dtype)
    for (offset, mode), wd, eps in itertools.product(_CASTS, (dtype, torch.float32), (1e-6, None)):
        w0 = (torch.randn(hidden, dtype=torch.float64) * 0.3).to(wd)
        outs = []
        for fn in (lambda a, c, e=eps, o=offset, m=mode: F.rms_norm(a, hidden, c, e, offset=o, casting_mode=m),
                   lambda a, c, e=eps, o=offset, m=mode: reference.rms_norm_cast(a, (hidden,), c, e, offset=o,
                                                                                casting_mode=m)):
            x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
            y = fn(x, w)
            y.backward(torch.ones_like(y))
            outs.append((y, x.grad, w.grad))
        for a, b in zip(*outs, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b), (mode, offset, wd, eps)


def test_the_short_paths_run_torchs_ops_not_the_checked_path(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the checked path ran")

    for name in ("_rms_norm_cast", "_layer_norm_torch_ops", "_add_then_norm"):
        monkeypatch.setattr(F, name, refuse)
    x, r, w = torch.randn(3, 8), torch.randn(3, 8), torch.randn(8)
    F.rms_norm(x, 8, w, offset=1.0, casting_mode="gemma")
    F.rms_norm(x, 8, None, 1e-6, casting_mode="llama")
    F.layer_norm(x, 8, w, w, offset=1.0)
    F.add_rms_norm(x, r, w, offset=1.0, casting_mode="gemma")
    F.add_layer_norm(x, r, w, None, offset=1.0)
    normlab.RMSNorm(8, offset=1.0, casting_mode="gemma")(x)
    normlab.LayerNorm(8, offset=1.0)(x)
    with normlab.set_backend("triton"), pytest.raises(AssertionError, match="checked path"):
        F.rms_norm(x, 8, w, offset=1.0, casting_mode="gemma")


def test_a_weight_that_broadcasts_is_refused_in_the_llama_order():
    # (w * h broadcasts a weight of shape [1]: the short path checks the weight's shape)
    x = torch.randn(3, 8)
    for fn in (lambda: F.rms_norm(x, 8, torch.ones(1), casting_mode="llama"),
               lambda: F.add_rms_norm(x, x, torch.ones(1), casting_mode="llama", normalized_shape=8),
               lambda: F.layer_norm(x, 8, torch.ones(1), offset=1.0)):
        with pytest.raises(NormArgumentError, match="weight"):
            fn()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_norm_offset_sums_parameter_gradients_in_float32(dtype):
    # torch's CPU backward sums dweight/dbias in x's dtype (a bfloat16 sum of ones stops at
    # 256): the offset path takes normlab's float32 sums, in the short and the checked path
    torch.manual_seed(0)
    x0 = torch.randn(8192, 64, dtype=torch.float64)
    for wd in (torch.float32, dtype):
        w0, b0 = torch.randn(64, dtype=torch.float64) * 0.1, torch.randn(64, dtype=torch.float64) * 0.1
        for fn in (lambda a, c, d: F.layer_norm(a, 64, c, d, offset=1.0),
                   lambda a, c, d: F.add_layer_norm(a, torch.zeros_like(a), c, d, offset=1.0)[0],
                   lambda a, c, d: F.layer_norm(a.t().contiguous().t(), 64, c, d, offset=1.0)):
            x, w, b = x0.to(dtype).requires_grad_(), w0.to(wd).requires_grad_(), b0.to(wd).requires_grad_()
            y = fn(x, w, b)
            assert y.dtype == dtype
            y.backward(torch.ones_like(y))
            xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
            torch.layer_norm(xr, (64,), wr + 1.0, br, 1e-5).backward(torch.ones(8192, 64, dtype=torch.float64))
            tol = 1e-5 if wd == torch.float32 else 1e-2
            for got, want in ((w.grad, wr.grad), (b.grad, br.grad)):
                assert got.dtype == wd
                torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_layer_norm_offset_is_the_float32_norm_rounded_once(dtype):
    torch.manual_seed(0)
    for hidden in (1, 3, 1000, 4097):
        x = (torch.randn(4, hidden, dtype=torch.float64) * 3 + 1).to(dtype)
        w = (torch.randn(hidden, dtype=torch.float64) * 0.1).to(dtype)
        b = (torch.randn(hidden, dtype=torch.float64) * 0.1).to(dtype)
        ct = torch.float64 if dtype == torch.float64 else torch.float32
        want = reference.layer_norm(x, (hidden,), w.to(ct) + 1.0, b.to(ct), 1e-5)
        for got in (F.layer_norm(x, hidden, w, b, offset=1.0), F.add_layer_norm(x, None, w, b, offset=1.0)[0],
                    F.add_layer_norm(x, torch.zeros_like(x), w, b, offset=1.0)[0]):
            assert got.dtype == dtype
            if dtype in (torch.float32, torch.float64):
                torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-5
                                           if dtype == torch.float32 else 1e-12)
            else:  # one rounding of the float32 norm: at most an ulp from the reference's
                ulp = torch.finfo(dtype).eps * want.double().abs().clamp_min(torch.finfo(dtype).tiny)
                assert ((got.double() - want.double()).abs() <= ulp * 1.01 + 1e-6).all()


def test_offset_short_paths_keep_gradients_and_autograd_transforms():
    x, w, b, r = float64_leaves()
    fns = [(lambda a, c, d: F.layer_norm(a, 5, c, d, offset=1.0), (x, w, b)),
           (lambda a, c, d: F.add_layer_norm(a, c, d, None, offset=0.5)[0], (x, r, w))]
    for mode in ("torch", "llama", "gemma"):
        fns.append((lambda a, c, m=mode: F.rms_norm(a, 5, c, offset=1.0, casting_mode=m), (x, w)))
        fns.append((lambda a, c, d, m=mode: F.add_rms_norm(a, c, d, offset=1.0, casting_mode=m)[0], (x, r, w)))
    for fn, args in fns:
        assert torch.autograd.gradcheck(fn, args)
        assert torch.autograd.gradgradcheck(fn, args)
    xd, wd = x.detach(), w.detach()
    jac = torch.func.jacfwd(lambda a: F.rms_norm(a, 5, wd, offset=1.0, casting_mode="gemma"))(xd)
    want = torch.func.jacrev(lambda a: reference.rms_norm_cast(a, (5,), wd, None, offset=1.0, casting_mode="gemma"))(xd)
    torch.testing.assert_close(jac, want)
    ws = torch.randn(4, 5, dtype=torch.float64)
    got = torch.vmap(lambda c: F.layer_norm(xd, 5, c, None, offset=1.0))(ws)
    torch.testing.assert_close(got, torch.stack([reference.layer_norm(xd, (5,), c + 1.0, None) for c in ws]))
    got = torch.vmap(lambda c: F.rms_norm(xd, 5, c, offset=1.0, casting_mode="gemma"))(ws)
    torch.testing.assert_close(got, torch.stack([reference.rms_norm_cast(xd, (5,), c, None, offset=1.0,
                                                                         casting_mode="gemma") for c in ws]))


def test_eager_rms_norm_cast_is_the_reference_on_any_layout():
    # the short path's op on its own: the reference's bits on a transposed x too (torch's
    # op returns it contiguous, which is why the short path takes contiguous x only)
    torch.manual_seed(0)
    x, w = torch.randn(6, 4, dtype=torch.float64).t(), torch.randn(6)
    for offset, mode in _CASTS:
        got = eager.rms_norm_cast(x, (6,), w, None, offset, mode)
        want = reference.rms_norm_cast(x, (6,), w, None, offset=offset, casting_mode=mode)
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_half_precision_layer_norm_backward_takes_batched_gradients(offset):
    # more rows than one backward chunk (LN_BACKWARD_CHUNK): the chunks' in-place writes
    # cannot take a gradient batched by autograd.grad(is_grads_batched=True); it runs whole
    torch.manual_seed(0)
    x = torch.randn(65, 4096, dtype=torch.bfloat16, requires_grad=True)
    w = torch.zeros(4096, dtype=torch.bfloat16, requires_grad=True)
    assert 65 > max(64, eager.LN_BACKWARD_CHUNK // 4096)
    y = F.layer_norm(x, 4096, w, None, offset=offset)
    v = torch.randn(2, *y.shape, dtype=y.dtype)
    (gx,) = torch.autograd.grad(y, x, v, is_grads_batched=True, retain_graph=True)
    for i in range(2):
        (want,) = torch.autograd.grad(y, x, v[i], retain_graph=True)
        assert torch.equal(gx[i], want)
