"""The thin CPU path: torch's own rms_norm below a size, normlab's above, with the same
results; forward-mode AD; the float64-weight gradient; zero-size dims; torch's error
type for integer input; any finite eps; modules that check a call signature once."""

import pytest
import torch

import normlab
from normlab import functional as F
from normlab.errors import NormArgumentError
from normlab.ops import eager, reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# below, at and above the size where the torch backend switches to normlab's own path
SHAPES = ((8, 64), (5, 3), (1024, 64), (1025, 64), (3, 4097), (70, 1000))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_either_side_of_the_switch_matches_the_reference(shape, dtype):
    torch.manual_seed(0)
    x = (torch.randn(*shape, dtype=torch.float64) * 3).to(dtype)
    w = torch.randn(shape[-1], dtype=torch.float64).to(dtype)
    assert eager.native_rms_ok(x, w) == (x.numel() <= eager.NATIVE_RMS_MAX_NUMEL)
    y = F.rms_norm(x, shape[-1:], w, 1e-6)
    ref = reference.rms_norm(x, shape[-1:], w, 1e-6)
    tol = {torch.float32: 2e-6, torch.float64: 1e-12}.get(dtype, 1e-2)
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol)
    # gradients through whichever path ran
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    g = torch.randn_like(y)
    F.rms_norm(xg, shape[-1:], wg, 1e-6).backward(g)
    reference.rms_norm(xr, shape[-1:], wr, 1e-6).backward(g)
    gtol = {torch.float32: 1e-4, torch.float64: 1e-10}.get(dtype, 5e-2)
    torch.testing.assert_close(xg.grad, xr.grad, rtol=gtol, atol=gtol)
    torch.testing.assert_close(wg.grad, wr.grad, rtol=gtol, atol=gtol * shape[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_forward_gives_the_reference_bits(dtype):
    if eager._FUSED_RMS_FORWARD is None:
        pytest.skip("this torch has no fused rms_norm forward")
    torch.manual_seed(1)
    x = (torch.randn(7, 33, dtype=torch.float64) * 2).to(dtype)
    w = torch.randn(33, dtype=torch.float64).to(dtype)
    fused, rstd_f = eager._rms_forward(x, (33,), w, 1e-5, fused_ok=True)
    assert torch.equal(fused, reference.rms_norm(x, (33,), w, 1e-5))
    plain, rstd_p = eager._rms_forward(x, (33,), w, 1e-5, fused_ok=False)
    torch.testing.assert_close(rstd_f, rstd_p, rtol=1e-6, atol=0)


def test_the_torch_backend_path_is_chosen_by_size(monkeypatch):
    calls = []
    real = torch.rms_norm
    monkeypatch.setattr(torch, "rms_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    F.rms_norm(torch.randn(8, 64, requires_grad=True), 64)
    assert calls == [1]
    F.rms_norm(torch.randn(1025, 64, requires_grad=True), 64)
    assert calls == [1]  # above the size: normlab's forward and backward
    F.rms_norm(torch.randn(8, 64), 64, torch.ones(64, dtype=torch.float64))  # mixed dtypes: normlab's
    assert calls == [1]


@pytest.mark.parametrize("shape", [(6, 5), (90, 1000)])  # torch's path, normlab's Function
def test_forward_mode_ad_matches_the_reference(shape):
    torch.manual_seed(2)
    x = torch.randn(*shape, dtype=torch.float64)
    w = torch.randn(shape[-1], dtype=torch.float64)
    tx, tw = torch.randn_like(x), torch.randn_like(w)
    _, got = torch.func.jvp(lambda a, b: F.rms_norm(a, shape[-1:], b, 1e-6), (x, w), (tx, tw))
    _, want = torch.func.jvp(lambda a, b: reference.rms_norm(a, shape[-1:], b, 1e-6), (x, w), (tx, tw))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    small = torch.randn(3, 4, dtype=torch.float64)
    jac = torch.func.jacfwd(lambda a: F.rms_norm(a, 4))(small)
    torch.testing.assert_close(jac, torch.func.jacrev(lambda a: reference.rms_norm(a, (4,), None, None))(small))


def test_forward_mode_ad_through_normlabs_function():
    x = torch.randn(90, 1000, dtype=torch.float64)
    assert not eager.native_rms_ok(x, None)
    tx = torch.randn_like(x)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, tx)
        tangent = torch.autograd.forward_ad.unpack_dual(F.rms_norm(dual, 1000, None, 1e-6)).tangent
    _, want = torch.func.jvp(lambda a: reference.rms_norm(a, (1000,), None, 1e-6), (x,), (tx,))
    torch.testing.assert_close(tangent, want, rtol=1e-10, atol=1e-10)


def test_float64_weight_gets_a_float64_accurate_gradient():
    torch.manual_seed(3)
    x = torch.randn(300, 400)  # above the switch: normlab's backward
    w = torch.randn(400, dtype=torch.float64, requires_grad=True)
    g = torch.randn(300, 400)
    F.rms_norm(x, 400, w, 1e-6).backward(g)
    w64 = w.detach().clone().requires_grad_()
    reference.rms_norm(x.double(), (400,), w64, 1e-6).backward(g.double())
    rel = ((w.grad - w64.grad).norm() / w64.grad.norm()).item()
    assert w.grad.dtype == torch.float64 and rel < 2e-7, rel


def test_zero_size_normalized_dim_returns_empty_like_torch():
    x = torch.randn(3, 0)
    assert F.rms_norm(x, (0,)).shape == (3, 0)
    assert normlab.RMSNorm(0)(x).shape == torch.nn.RMSNorm(0)(x).shape == (3, 0)
    out, res = F.add_rms_norm(x, torch.randn(3, 0), None)
    assert out.shape == res.shape == (3, 0)
    assert F.layer_norm(x, (0,)).shape == (3, 0)


def test_integer_input_raises_torchs_error_type_too():
    x = torch.ones(2, 4, dtype=torch.long)
    for call in (lambda: F.layer_norm(x, 4), lambda: F.rms_norm(x, 4), lambda: normlab.LayerNorm(4)(x)):
        with pytest.raises(NotImplementedError, match="floating-point"):
            call()
        with pytest.raises(NormArgumentError):
            call()


def test_any_finite_eps_as_torch_and_a_0dim_tensor_eps():
    x = torch.randn(4, 6) * 3  # variances well above |eps|: finite results (torch gives nan below)
    torch.testing.assert_close(F.layer_norm(x, 6, eps=-0.5), torch.nn.functional.layer_norm(x, (6,), eps=-0.5))
    torch.testing.assert_close(F.rms_norm(x, 6, eps=-0.1), reference.rms_norm(x, (6,), None, -0.1))
    small = torch.full((1, 6), 0.01)
    assert F.layer_norm(small, 6, eps=-0.5).isnan().all()  # as torch: sqrt of a negative
    torch.testing.assert_close(F.layer_norm(x, 6, eps=torch.tensor(0.25)),
                               torch.nn.functional.layer_norm(x, (6,), eps=0.25))
    with pytest.raises(NormArgumentError, match="eps to be a finite number"):
        F.layer_norm(x, 6, eps=float("nan"))


class _Sub(torch.Tensor):
    """A tensor subclass: the modules' path for tensors other than plain CPU ones."""


@pytest.mark.parametrize("cls,op", [(normlab.LayerNorm, "layer_norm"), (normlab.RMSNorm, "rms_norm")])
def test_modules_check_a_call_signature_once(cls, op, monkeypatch):
    from normlab import functional

    checks = []
    real = functional._check_norm_args  # where the checks run, for the public op and its per-example variant
    monkeypatch.setattr(functional, "_check_norm_args", lambda *a, **k: checks.append(1) or real(*a, **k))
    norm = cls(16)
    x = torch.randn(4, 16).as_subclass(_Sub)
    first = norm(x)
    assert norm(x).equal(first) and len(checks) == 1  # the second call skips the checks
    norm(torch.randn(9, 16).as_subclass(_Sub))  # another row count: same signature
    assert len(checks) == 1
    norm(torch.randn(2, 3, 16).as_subclass(_Sub))  # another rank: checked
    assert len(checks) == 2
    with pytest.raises(NormArgumentError):  # a bad last dim is caught on its first call
        norm(torch.randn(4, 15).as_subclass(_Sub))
    norm.double()  # parameters moved: signatures forgotten
    norm(x.double())
    assert len(checks) == 4
    with normlab.set_backend("torch"):  # another backend: checked again
        norm(x.double())
    assert len(checks) == 5
    norm.collect_per_example_grad_sq = True  # per-example collection: every call checked
    norm(x.double())
    norm(x.double())
    assert len(checks) == 7


@pytest.mark.parametrize("cls,op", [(normlab.LayerNorm, "layer_norm"), (normlab.RMSNorm, "rms_norm")])
def test_modules_on_a_cpu_call_torchs_op_and_check_only_what_it_refuses(cls, op, monkeypatch):
    from normlab import functional

    checks = []
    real = getattr(functional, "_" + op)
    monkeypatch.setattr(functional, "_" + op, lambda *a, **k: checks.append(1) or real(*a, **k))
    norm = cls(16)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(4, 16)
    theirs = torch.nn.LayerNorm(16) if op == "layer_norm" else torch.nn.RMSNorm(16)
    theirs.load_state_dict(norm.state_dict())
    assert norm(x).equal(theirs(x)) and not checks  # torch's op, no check of normlab's
    with pytest.raises(NormArgumentError, match="normalized_shape"):  # torch refused: normlab's error
        norm(torch.randn(4, 15))
    assert len(checks) == 1
    norm.eps = float("inf")  # a value torch would take: the guard sends it to the checks
    with pytest.raises(NormArgumentError, match="eps"):
        norm(x)
    assert len(checks) == 2


@pytest.mark.parametrize("rows", [4, 64])  # torch's path and normlab's
def test_output_layout_matches_torch(rows):
    x = torch.randn(2, 8, rows, 300).contiguous(memory_format=torch.channels_last)
    ours, theirs = F.rms_norm(x, 300), torch.rms_norm(x, (300,), None, None)
    assert ours.stride() == theirs.stride()
    torch.testing.assert_close(ours, theirs)
    xt = torch.randn(300, rows * 10).t()
    assert F.rms_norm(xt, 300).stride() == torch.rms_norm(xt, (300,), None, None).stride()
    assert F.layer_norm(x, 300).stride() == torch.nn.functional.layer_norm(x, (300,)).stride()


def test_complex_input_and_integer_weight_are_refused_with_a_reason():
    from normlab.errors import NormDtypeError

    with pytest.raises(NormDtypeError, match="input.*floating-point.*complex64"):
        F.rms_norm(torch.randn(2, 4, dtype=torch.complex64), 4)
    with pytest.raises(NormDtypeError, match="weight.*floating-point.*int32"):
        F.rms_norm(torch.randn(2, 4), 4, torch.ones(4, dtype=torch.int32))


@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_under_compile_rms_norm_is_torchs_op_with_normlabs_dtype(dtype, wdtype):
    # torch.compile sees torch's own rms_norm (inductor fuses it); the result keeps x's dtype
    torch._dynamo.reset()
    x = torch.randn(300, 400).to(dtype).requires_grad_()  # above the eager switch
    w = torch.randn(400, dtype=wdtype, requires_grad=True)
    compiled = torch.compile(lambda a, b: F.rms_norm(a, 400, b, 1e-6), fullgraph=True)
    y = compiled(x, w)
    assert y.dtype == dtype
    ref = reference.rms_norm(x, (400,), w, 1e-6)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w), g)
    want = torch.autograd.grad(ref, (x, w), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=tol * 10, atol=tol * 10)
