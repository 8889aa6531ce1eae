"""normlab.functional vs torch and vs ops/reference.py: values, gradients, errors."""

import math

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

from normlab import NormArgumentError
from normlab import functional as F
from normlab.ops import reference as R
from tests._tolerances import DTYPES, GRAD, OUTPUT, assert_close

HIDDEN = [1, 3, 64, 1000, 4097]
LEADING = [(), (0,), (2,), (3, 5)]


def _params(shape, dtype, affine, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.5 + 1).to(dtype) if affine != "none" else None
    b = (torch.randn(shape, generator=g) * 0.5).to(dtype) if affine == "weight+bias" else None
    return w, b


def _grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=g).to(out.dtype)
    leaves = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, leaves, go)


def _amplification(x, ns):
    """sum over rows of |x| * rstd (rstd = |x_hat| / |x - mean| bounds): how much rounding
    in x can move a gradient; large only for rows of near-equal values."""
    if x.numel() == 0:
        return 0.0
    xd = x.detach().double()
    rows = xd.reshape(-1, math.prod(ns))
    spread = (rows - rows.mean(-1, keepdim=True)).abs().amax(-1).clamp_min(1e-300)
    rstd = torch.minimum(1 / spread, torch.tensor(1 / math.sqrt(1e-5), dtype=torch.float64))
    return (rows.abs().amax(-1) * rstd * 3).sum().item() * math.prod(ns)


def _case(lead, hidden, nsdims, dtype, affine):
    ns = (hidden,) if nsdims == 1 else (2, hidden)
    # a ramp keeps every row spread out (no near-equal rows whose gradients are
    # ill-conditioned); hidden size 1 rows stay degenerate on purpose
    ramp = torch.linspace(-1, 1, math.prod(ns)).reshape(ns) if math.prod(ns) > 1 else 0.0
    x = (torch.randn(*lead, *ns) + 1 + 4 * ramp).to(dtype).requires_grad_(True)
    w, b = _params(ns, dtype, affine)
    for t in (w, b):
        if t is not None:
            t.requires_grad_(True)
    return x, ns, w, b


@pytest.mark.parametrize("affine", ["none", "weight", "weight+bias"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nsdims", [1, 2])
@pytest.mark.parametrize("lead", LEADING)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_layer_norm_matches_torch_and_reference(hidden, lead, nsdims, dtype, affine):
    x, ns, w, b = _case(lead, hidden, nsdims, dtype, affine)
    ours = F.layer_norm(x, ns, w, b, 1e-5)
    theirs = TF.layer_norm(x, ns, w, b, 1e-5)
    ref = R.layer_norm(x, ns, w, b, 1e-5)
    assert ours.dtype == dtype and ours.shape == x.shape
    assert_close(ours, theirs, dtype, OUTPUT)
    assert_close(ref, theirs, dtype, OUTPUT)
    amp = _amplification(x, ns)
    for mine, torchs, refs in zip(_grads(ours, (x, w, b)), _grads(theirs, (x, w, b)),
                                  _grads(ref, (x, w, b))):
        assert_close(mine, torchs, dtype, GRAD, amplification=amp)
        assert_close(refs, torchs, dtype, GRAD, amplification=amp)


@pytest.mark.parametrize("affine", ["none", "weight"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nsdims", [1, 2])
@pytest.mark.parametrize("lead", LEADING)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_rms_norm_matches_torch_and_reference(hidden, lead, nsdims, dtype, affine):
    x, ns, w, _ = _case(lead, hidden, nsdims, dtype, affine)
    for eps in (None, 1e-6):
        ours = F.rms_norm(x, ns, w, eps)
        theirs = TF.rms_norm(x, ns, w, eps)
        assert ours.dtype == dtype
        assert_close(ours, theirs, dtype, OUTPUT)
        assert_close(R.rms_norm(x, ns, w, eps), theirs, dtype, OUTPUT)
        for mine, torchs in zip(_grads(ours, (x, w)), _grads(theirs, (x, w))):
            assert_close(mine, torchs, dtype, GRAD, amplification=_amplification(x, ns))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_input_with_float32_params_is_allowed(dtype):
    x = torch.randn(4, 33).to(dtype)
    w, b = torch.randn(33), torch.randn(33)
    assert_close(F.layer_norm(x, 33, w, b), TF.layer_norm(x, (33,), w, b), dtype, OUTPUT)
    out = F.rms_norm(x, 33, w)
    assert out.dtype == dtype
    assert_close(out, TF.rms_norm(x, (33,), w), dtype, OUTPUT)


def test_rms_norm_default_eps_follows_torch_code():
    # fp16/bf16/fp32: float32's eps; fp64: float64's. Visible on a row of zeros + tiny values.
    for dtype, eps in [(torch.float16, torch.finfo(torch.float32).eps),
                       (torch.float32, torch.finfo(torch.float32).eps),
                       (torch.float64, torch.finfo(torch.float64).eps)]:
        x = torch.full((1, 4), 1e-4, dtype=dtype)
        expected = x.double() / math.sqrt(x.double().square().mean().item() + eps)
        torch.testing.assert_close(F.rms_norm(x, 4).double(), expected, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(F.rms_norm(x, 4), TF.rms_norm(x, (4,)))


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_non_contiguous_and_channels_last_inputs(op):
    fn, tfn = getattr(F, op), getattr(TF, op)
    base = torch.randn(6, 40, 8)
    x = base.transpose(0, 1)  # [40, 6, 8], non-contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(fn(x, 8), fn(x.contiguous(), 8))
    torch.testing.assert_close(fn(x, 8), tfn(x, (8,)))
    img = torch.randn(2, 5, 4, 4).to(memory_format=torch.channels_last)
    torch.testing.assert_close(fn(img, (4, 4)), fn(img.contiguous(), (4, 4)))
    sliced = torch.randn(5, 16)[:, ::2]  # strided last dim
    torch.testing.assert_close(fn(sliced, 8), fn(sliced.contiguous(), 8))


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_empty_batch_gives_empty_outputs_and_grads(op):
    x = torch.randn(0, 7, requires_grad=True)
    w = torch.randn(7, requires_grad=True)
    out = getattr(F, op)(x, 7, w)
    assert out.shape == (0, 7)
    gx, gw = torch.autograd.grad(out.sum(), (x, w))
    assert gx.shape == (0, 7)
    assert torch.equal(gw, torch.zeros(7))


def test_constant_rows_are_finite():
    x = torch.full((3, 16), 2.5, requires_grad=True)
    for out in (F.layer_norm(x, 16), F.rms_norm(x, 16), F.add_layer_norm(x, x, None, None)[0]):
        assert torch.isfinite(out).all()
        (g,) = torch.autograd.grad(out.sum(), x)
        assert torch.isfinite(g).all()
    torch.testing.assert_close(F.layer_norm(x, 16), torch.zeros(3, 16))


def test_gradcheck_float64_every_op():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    checks = {
        "layer_norm": (lambda x, w, b: F.layer_norm(x, 5, w, b), (x, w, b)),
        "layer_norm_2d": (lambda x, w: F.layer_norm(x, (2, 5), w), (x, w2)),
        "rms_norm": (lambda x, w: F.rms_norm(x, 5, w, 1e-6), (x, w)),
        "rms_norm_2d": (lambda x, w: F.rms_norm(x, (2, 5), w), (x, w2)),
        "dropout_add": (lambda x, r: F.dropout_add(x, r), (x, r)),
        "add_layer_norm": (lambda x, r, w, b: F.add_layer_norm(x, r, w, b), (x, r, w, b)),
        "add_rms_norm": (lambda x, r, w: F.add_rms_norm(x, r, w), (x, r, w)),
    }
    for name, (fn, args) in checks.items():
        assert torch.autograd.gradcheck(fn, args), name
        assert torch.autograd.gradgradcheck(fn, args), name


# ---------------------------------------------------------------- fused add + norm


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(0, 4), min_size=0, max_size=3),
    hidden=st.integers(1, 70),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    residual_dtype=st.sampled_from([None, torch.float32, torch.float64]),
    has_residual=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fused_add_norm_equals_unfused_composition(lead, hidden, dtype, residual_dtype, has_residual, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, hidden, generator=g, dtype=dtype)
    r = torch.randn(*lead, hidden, generator=g, dtype=dtype) if has_residual else None
    w = torch.randn(hidden, generator=g, dtype=dtype)
    b = torch.randn(hidden, generator=g, dtype=dtype)
    rd = residual_dtype or dtype
    summed = (x.to(rd) + r.to(rd)) if r is not None else x.to(rd)
    out, new_r = F.add_layer_norm(x, r, w, b, 1e-5, residual_dtype=residual_dtype)
    assert new_r.dtype == rd and out.dtype == dtype
    torch.testing.assert_close(new_r, summed)
    # float32 somewhere (x or the residual): float32-level agreement
    tol = {} if dtype == rd == torch.float64 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(out, TF.layer_norm(summed, (hidden,), w.to(rd), b.to(rd)).to(dtype), **tol)
    out, new_r = F.add_rms_norm(x, r, w, None, residual_dtype=residual_dtype)
    torch.testing.assert_close(new_r, summed)
    torch.testing.assert_close(out, TF.rms_norm(summed, (hidden,), w.to(rd)).to(dtype), **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_add_norm_low_precision_with_float32_residual(dtype):
    torch.manual_seed(0)
    x = torch.randn(4, 9, 96).to(dtype)
    r = torch.randn(4, 9, 96)
    w = torch.randn(96)
    out, new_r = F.add_rms_norm(x, r, w, residual_dtype=torch.float32)
    assert new_r.dtype == torch.float32 and out.dtype == dtype
    torch.testing.assert_close(new_r, r + x.float())
    assert_close(out, TF.rms_norm(r + x.float(), (96,), w), dtype, OUTPUT)


def test_fused_add_norm_with_two_dim_normalized_shape_and_no_affine():
    x, r = torch.randn(3, 4, 6), torch.randn(3, 4, 6)
    out, new_r = F.add_layer_norm(x, r, None, None, normalized_shape=(4, 6))
    torch.testing.assert_close(out, TF.layer_norm(x + r, (4, 6)))
    out, _ = F.add_layer_norm(x, r, None, None)  # default: the last dim
    torch.testing.assert_close(out, TF.layer_norm(x + r, (6,)))


def test_dropout_statistics_and_reproducibility():
    x = torch.randn(64, 256) + 3.0
    r = torch.randn(64, 256)
    p = 0.25
    w = torch.ones(256)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    out1, nr1 = F.add_layer_norm(x, r, w, None, dropout_p=p, training=True, generator=g1)
    out2, nr2 = F.add_layer_norm(x, r, w, None, dropout_p=p, training=True, generator=g2)
    assert torch.equal(out1, out2) and torch.equal(nr1, nr2)
    delta = nr1 - r
    dropped = delta == 0
    assert abs(dropped.float().mean().item() - p) < 0.02
    torch.testing.assert_close(delta[~dropped], (x / (1 - p))[~dropped])
    torch.testing.assert_close(out1, TF.layer_norm(nr1, (256,), w))
    # eval mode and p=0 are exactly the undropped sum
    assert torch.equal(F.add_layer_norm(x, r, w, None, dropout_p=p, training=False)[1], r + x)
    assert torch.equal(F.add_layer_norm(x, r, w, None, dropout_p=0.0, training=True)[1], r + x)
    assert torch.equal(F.dropout_add(x, r, dropout_p=1.0, training=True), r)


def test_dropout_gradient_uses_the_forward_mask():
    x = torch.randn(16, 32, requires_grad=True)
    r = torch.randn(16, 32, requires_grad=True)
    g = torch.Generator().manual_seed(3)
    _, nr = F.add_rms_norm(x, r, None, dropout_p=0.5, training=True, generator=g)
    gx, gr = torch.autograd.grad(nr.sum(), (x, r))
    kept = (nr - r) != 0
    torch.testing.assert_close(gx, kept.float() * 2.0)
    torch.testing.assert_close(gr, torch.ones_like(r))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: F.layer_norm(torch.randn(2, 3), 4), r"normalized_shape=\[4\].*\[\*, 4\].*size\[2, 3\]"),
        (lambda: F.rms_norm(torch.randn(2, 3), (2, 3, 1)), r"normalized_shape"),
        (lambda: F.layer_norm(torch.randn(2, 3), ()), r"normalized_shape"),
        (lambda: F.layer_norm(torch.randn(2, 3), 3, torch.ones(4)), r"weight.*shape \[4\].*normalized_shape = \[3\]"),
        (lambda: F.layer_norm(torch.randn(2, 3), 3, None, torch.ones(2)), r"bias.*shape \[2\]"),
        (lambda: F.layer_norm(torch.arange(6).view(2, 3), 3), r"input.*floating-point.*torch.int64"),
        (lambda: F.rms_norm(torch.randn(2, 3), 3, torch.ones(3, dtype=torch.int32)), r"weight.*floating-point"),
        (lambda: F.layer_norm(torch.randn(2, 3), 3, eps=float("-inf")), r"eps to be a finite number.*-inf"),
        (lambda: F.layer_norm(torch.randn(2, 3), 3, eps=float("nan")), r"eps"),
        (lambda: F.rms_norm(torch.randn(2, 3), 3, eps=float("inf")), r"eps"),
        # any floating-point parameter dtype is taken (tests/ops/test_mixed_dtypes.py), no other
        (lambda: F.layer_norm(torch.randn(2, 3), 3, None, torch.ones(3, dtype=torch.int32)), r"bias.*floating-point"),
        (lambda: F.add_layer_norm(torch.randn(2, 3), None, torch.ones(3, dtype=torch.complex64), None),
         r"weight.*floating-point.*complex64"),
        (lambda: F.add_layer_norm(torch.randn(2, 3), torch.randn(3, 2), None, None), r"residual.*\[2, 3\].*\[3, 2\]"),
        (lambda: F.add_rms_norm(torch.randn(2, 3), None, None, dropout_p=1.5), r"dropout_p.*\[0, 1\].*1.5"),
        (lambda: F.add_rms_norm(torch.randn(2, 3), None, None, residual_dtype=torch.int32), r"residual_dtype"),
        (lambda: F.add_layer_norm(torch.randn(2, 3), None, torch.ones(4), None), r"expected weight of shape \[3\] .*got weight of shape \[4\]"),
        (lambda: F.dropout_add(torch.randn(2, 3), torch.randn(2, 3).half().long(), dropout_p=0.1), r"residual.*floating"),
    ],
)
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(NormArgumentError, match=match):
        call()


def test_errors_are_value_and_runtime_errors():
    # code written against torch (RuntimeError) or against ValueError keeps working
    with pytest.raises(RuntimeError):
        F.layer_norm(torch.randn(2, 3), 4)
    with pytest.raises(ValueError):
        F.layer_norm(torch.randn(2, 3), 4)
    with pytest.raises(TypeError, match="input.*torch.Tensor.*list"):
        F.layer_norm([1.0, 2.0], 2)
    with pytest.raises(TypeError, match="generator"):
        F.dropout_add(torch.randn(2), None, generator=3)
