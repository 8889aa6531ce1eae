"""The public ops' short path on a CPU (torch's op first, normlab's checks only for what
torch refuses) behaves as the checked path, call for call: same result bits, or the same
error, over good and bad arguments alike."""

from __future__ import annotations

import itertools

import pytest
import torch

import normlab
from normlab import functional as F
from tests.ops.helpers import float64_leaves

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _outcome(fn, *args, **kwargs):
    """('ok', result) or ('error', exception type)."""
    try:
        return "ok", fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - comparing what each path raises
        return "error", type(err)


def _assert_same(public, checked, *args, **kwargs):
    got, want = _outcome(public, *args, **kwargs), _outcome(checked, *args, **kwargs)
    assert got[0] == want[0], (got, want)
    if got[0] == "error":
        assert got[1] is want[1], (got[1], want[1])
        return
    outs = got[1] if isinstance(got[1], tuple) else (got[1],)
    refs = want[1] if isinstance(want[1], tuple) else (want[1],)
    for a, b in zip(outs, refs, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # bits (eps<0 gives nan)


def _weights(hidden, dtype):
    yield None
    for wd in _DTYPES:
        yield torch.randn(hidden, dtype=wd)
    yield torch.ones(hidden + 1, dtype=dtype)  # wrong shape
    yield torch.ones(hidden, dtype=torch.int32)  # integer
    yield torch.ones(hidden, dtype=torch.complex64)  # complex
    yield [1.0] * hidden  # not a tensor


_EPS = (1e-5, -0.5, 0.0, float("inf"), float("nan"), 1, torch.tensor(1e-3), "1e-5", None)
_SHAPES = (6, (6,), [6], (3, 6), 5, (7,), 0, ())


@pytest.mark.parametrize("dtype", [*_DTYPES, torch.complex64, torch.int64])
def test_layer_norm_short_path_matches_the_checked_path(dtype):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6).to(dtype)
    for w, eps, shape in itertools.product(_weights(6, dtype), _EPS, _SHAPES):
        b = w.flip(0) if isinstance(w, torch.Tensor) and w.dim() == 1 else w
        _assert_same(F.layer_norm, F._layer_norm, x, shape, w, b, eps)


@pytest.mark.parametrize("dtype", [*_DTYPES, torch.complex64, torch.int64])
def test_rms_norm_short_path_matches_the_checked_path(dtype):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6).to(dtype)
    for w, eps, shape in itertools.product(_weights(6, dtype), _EPS, _SHAPES):
        _assert_same(F.rms_norm, F._rms_norm, x, shape, w, eps)


def _residuals(x):
    yield x.flip(0)
    yield x[0, 0]  # broadcasts in torch's add: refused
    yield x.flip(0).double() if x.dtype != torch.float64 else x.float()  # another dtype
    yield x.flip(0).t() if x.dim() == 2 else x.flip(0).transpose(0, 1)  # strided
    yield None


_DROPOUT = ((0.0, True), (0.0, False), (0.3, False), (0.3, True), (1.5, False), (-0.1, False), (0, False))


@pytest.mark.parametrize("dtype", _DTYPES)
@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
def test_fused_add_short_path_matches_the_checked_path(op, dtype):
    torch.manual_seed(0)
    public, checked = getattr(F, op), getattr(F, "_" + op)
    x = torch.randn(5, 6).to(dtype)
    for r, w, (p, training), eps, shape, rdt in itertools.product(
            _residuals(x), _weights(6, dtype), _DROPOUT, (1e-5, None, float("nan")), (None, 6, (6,), 5),
            (None, dtype, torch.float32)):
        if op == "add_layer_norm" and eps is None:
            continue
        kwargs = dict(dropout_p=p, training=training, residual_dtype=rdt, normalized_shape=shape,
                      generator=torch.Generator().manual_seed(3) if training and p else None)
        if kwargs["generator"] is not None:  # dropout draws: both paths from the same generator state
            got = _outcome(public, x, r, w, *((w,) if op == "add_layer_norm" else ()), eps, **kwargs)
            kwargs["generator"] = torch.Generator().manual_seed(3)
            want = _outcome(checked, x, r, w, *((w,) if op == "add_layer_norm" else ()), eps, **kwargs)
            assert got[0] == want[0]
            continue
        args = (x, r, w, *((w,) if op == "add_layer_norm" else ()), eps)
        _assert_same(public, checked, *args, **kwargs)


def test_a_generator_of_the_wrong_type_and_a_non_tensor_residual_are_refused():
    x = torch.randn(2, 4)
    with pytest.raises(TypeError, match="generator"):
        F.add_layer_norm(x, x, None, None, generator=object(), normalized_shape=4)
    with pytest.raises(TypeError, match="residual"):
        F.add_rms_norm(x, [[0.0] * 4] * 2, torch.ones(4))


def test_the_short_path_is_torchs_op_and_the_triton_backend_skips_it(monkeypatch):
    calls = []
    real = torch.layer_norm
    monkeypatch.setattr(torch, "layer_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(3, 8)
    F.layer_norm(x, 8)
    assert calls == [1]
    with normlab.set_backend("torch"):
        F.layer_norm(x, 8)
    assert calls == [1, 1]
    monkeypatch.setattr(F, "_layer_norm", lambda *a, **k: "checked")
    with normlab.set_backend("triton"):  # the interpreter's kernels, never torch's op
        assert F.layer_norm(x, 8) == "checked"


def test_the_short_path_keeps_gradients_and_autograd_transforms():
    x, w, b, r = float64_leaves()
    assert torch.autograd.gradcheck(lambda a, c, d: F.layer_norm(a, 5, c, d), (x, w, b))
    assert torch.autograd.gradcheck(lambda a, c: F.rms_norm(a, 5, c), (x, w))
    assert torch.autograd.gradcheck(lambda a, c, d: F.add_layer_norm(a, c, d, None)[0], (x, r, w))
    assert torch.autograd.gradcheck(lambda a, c, d: F.add_rms_norm(a, c, d)[0], (x, r, w))
    jac = torch.func.jacfwd(lambda a: F.rms_norm(a, 5, w.detach()))(x.detach())
    want = torch.func.jacrev(lambda a: torch.rms_norm(a, (5,), w.detach(), None))(x.detach())
    torch.testing.assert_close(jac, want)
