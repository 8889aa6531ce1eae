"""normlab.LayerNorm / RMSNorm are drop-in for torch.nn.LayerNorm / torch.nn.RMSNorm."""

import inspect

import pytest
import torch
from torch import nn

import normlab
from normlab import functional as F
from normlab.backend import triton_interpreter_on
from normlab.ops import reference as R
from tests._tolerances import DTYPES, OUTPUT, assert_close

PAIRS = [(normlab.LayerNorm, nn.LayerNorm), (normlab.RMSNorm, nn.RMSNorm)]


@pytest.mark.parametrize("ours, theirs", PAIRS)
def test_constructor_signature_and_defaults_match_torch(ours, theirs):
    sig_ours = list(inspect.signature(ours.__init__).parameters.values())
    sig_theirs = list(inspect.signature(theirs.__init__).parameters.values())
    # torch's arguments, in torch's order and with torch's defaults; normlab's own come after,
    # keyword-only, with defaults that keep torch's numerics (RMSNorm: offset 0, casting "torch";
    # LayerNorm: offset 0, a weight of the normalized shape)
    assert [(p.name, p.default, p.kind) for p in sig_ours[:len(sig_theirs)]] == [
        (p.name, p.default, p.kind) for p in sig_theirs
    ]
    extra = {p.name: p.default for p in sig_ours[len(sig_theirs):]}
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in sig_ours[len(sig_theirs):])
    assert extra == ({"offset": 0.0, "casting_mode": "torch"} if ours is normlab.RMSNorm
                     else {"offset": 0.0, "weight_shape": None})


@pytest.mark.parametrize("ours, theirs", PAIRS)
def test_forward_takes_its_input_by_torchs_name(ours, theirs):
    """A drop-in called as ``norm(input=x)`` (nn.LayerNorm) or ``norm(x=x)`` (nn.RMSNorm)."""
    name = list(inspect.signature(theirs.forward).parameters)[1]
    assert list(inspect.signature(ours.forward).parameters)[1] == name
    m, t = ours(8), theirs(8)
    x = torch.randn(3, 8)
    torch.testing.assert_close(m(**{name: x}), t(**{name: x}))


@pytest.mark.parametrize("kw", [{}, {"elementwise_affine": False}, {"eps": 1e-3}, {"bias": False}])
@pytest.mark.parametrize("shape", [7, (3, 7)])
@pytest.mark.parametrize("ours, theirs", PAIRS)
def test_modules_match_torch_and_load_each_others_state(ours, theirs, shape, kw):
    if theirs is nn.RMSNorm and "bias" in kw:
        pytest.skip("RMSNorm has no bias")
    torch.manual_seed(0)
    t = theirs(shape, **kw)
    with torch.no_grad():
        for p in t.parameters():
            p.normal_()
    m = ours(shape, **kw)
    m.load_state_dict(t.state_dict())  # torch -> normlab
    assert list(m.state_dict()) == list(t.state_dict())
    assert repr(m) == repr(t)
    x = torch.randn(4, 3, 7, requires_grad=True)
    y_ours, y_theirs = m(x), t(x)
    torch.testing.assert_close(y_ours, y_theirs)
    go = torch.randn_like(y_ours)
    g_ours = torch.autograd.grad(y_ours, [x, *m.parameters()], go)
    g_theirs = torch.autograd.grad(y_theirs, [x, *t.parameters()], go)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    t2 = theirs(shape, **kw)
    t2.load_state_dict(m.state_dict())  # normlab -> torch
    torch.testing.assert_close(t2(x), y_ours)


@pytest.mark.parametrize("ours, theirs", PAIRS)
def test_factory_kwargs_and_reset_parameters(ours, theirs):
    m = ours(5, dtype=torch.float64, device="cpu")
    assert m.weight.dtype == torch.float64 and m.weight.device.type == "cpu"
    with torch.no_grad():
        m.weight.fill_(3.0)
    m.reset_parameters()
    assert torch.equal(m.weight, torch.ones(5, dtype=torch.float64))
    assert isinstance(m, theirs)  # code that checks isinstance(m, nn.LayerNorm) keeps working


def test_rms_norm_eps_none_behaves_like_torch():
    m, t = normlab.RMSNorm(4), nn.RMSNorm(4)
    assert m.eps is None
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = (torch.randn(3, 4) * 1e-4).to(dtype)
        y = m.to(dtype)(x)
        assert y.dtype == dtype
        torch.testing.assert_close(y, t.to(dtype)(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls", [normlab.LayerNorm, normlab.RMSNorm])
def test_forward_with_residual_is_the_fused_add_norm(cls, dtype):
    torch.manual_seed(0)
    m = cls(33).to(dtype)
    with torch.no_grad():
        m.weight.normal_()
    x, r = torch.randn(2, 5, 33).to(dtype), torch.randn(2, 5, 33).to(dtype)
    out, new_r = m(x, r)
    expected_r = R.dropout_add(x, r)
    assert torch.equal(new_r, expected_r)
    assert_close(out, m(expected_r), dtype, OUTPUT)


def test_module_dropout_follows_training_mode():
    m = normlab.LayerNorm(64)
    x, r = torch.randn(8, 64), torch.randn(8, 64)
    _, nr_eval = m.eval()(x, r, dropout_p=0.5)
    assert torch.equal(nr_eval, r + x)
    _, nr_train = m.train()(x, r, dropout_p=0.5)
    dropped = (nr_train - r == 0).float().mean().item()
    assert 0.35 < dropped < 0.65


def test_two_dim_normalized_shape_without_affine_with_residual():
    m = normlab.LayerNorm((4, 6), elementwise_affine=False)
    x, r = torch.randn(3, 4, 6), torch.randn(3, 4, 6)
    out, _ = m(x, r)
    torch.testing.assert_close(out, F.layer_norm(x + r, (4, 6)))


def test_module_bad_input_names_expected_shape():
    with pytest.raises(RuntimeError, match=r"expected input with shape \[\*, 8\]"):
        normlab.LayerNorm(8)(torch.randn(2, 7))



def test_a_remembered_signature_does_not_bypass_torch_func_transforms():
    # a signature's first call caches the implementation the backend resolved; under
    # torch.func transforms every call takes the checked path, which runs the torch path
    # (the kernels' ops have no functorch rules), even after a triton call was cached
    m = normlab.RMSNorm(16)
    x = torch.randn(3, 2, 16)

    def call(t):
        return m._call("rms_norm", F.rms_norm, t, m.normalized_shape, m.weight, m.eps)

    with normlab.set_backend("triton" if triton_interpreter_on() else "torch"):
        call(x[0])  # remembers the signature
        got = torch.func.vmap(call)(x)
        jac = torch.func.jacrev(call)(x[0])
    with normlab.set_backend("torch"):
        want, want_jac = torch.func.vmap(call)(x), torch.func.jacrev(call)(x[0])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(jac, want_jac, rtol=0, atol=0)
