"""RMSNorm's weight offset and casting modes: bit for bit Hugging Face's GemmaRMSNorm and
LlamaRMSNorm, forward and backward, in fp32, bf16 and fp16; the offset formed in float32;
gradients in float64; clear errors for bad values. LayerNorm's offset (LayerNorm1p) and
its weight per head (Cohere's q/k norm)."""

from __future__ import annotations

import pytest
import torch

import normlab
from normlab import functional as F
from normlab.errors import NormArgumentError
from normlab.ops import reference
from tests._tolerances import GRAD, assert_close

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _hf(cls_name):
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    module = {"GemmaRMSNorm": "gemma", "LlamaRMSNorm": "llama"}[cls_name]
    return getattr(getattr(transformers.models, module), f"modeling_{module}").__dict__[cls_name]


def _fwd_bwd(module, x, dy):
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(dy)
    return y.detach(), x.grad, module.weight.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hf_name,offset,mode", [("GemmaRMSNorm", 1.0, "gemma"), ("LlamaRMSNorm", 0.0, "llama")])
def test_bit_for_bit_hugging_faces_norms(hf_name, offset, mode, dtype):
    torch.manual_seed(0)
    theirs = _hf(hf_name)(96, eps=1e-6).to(dtype)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(96) * 0.1 + (1.0 - offset))
    ours = normlab.RMSNorm(96, eps=1e-6, offset=offset, casting_mode=mode, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    x = (torch.randn(3, 5, 96) * 4 + 1).to(dtype)
    dy = torch.randn(3, 5, 96).to(dtype)
    for a, b in zip(_fwd_bwd(theirs, x, dy), _fwd_bwd(ours, x, dy)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    y = F.rms_norm(x, 96, theirs.weight.detach(), 1e-6, offset=offset, casting_mode=mode)
    assert torch.equal(y, theirs(x).detach())


def test_the_offset_is_added_in_float32_not_to_a_half_precision_weight():
    w = torch.full((8,), 2.0 ** -9, dtype=torch.bfloat16)  # 1 + 2^-9 rounds to 1 in bfloat16
    assert (w + 1.0).eq(1.0).all()
    x = torch.randn(4, 8)
    x_hat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    for mode in ("torch", "gemma"):
        y = F.rms_norm(x, 8, w, 1e-6, offset=1.0, casting_mode=mode)
        torch.testing.assert_close(y, x_hat * (1.0 + 2.0 ** -9), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(y, x_hat, rtol=1e-4, atol=0)


@pytest.mark.parametrize("mode", ["torch", "llama", "gemma"])
def test_gradients_in_float64(mode):
    torch.manual_seed(1)
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: F.rms_norm(a, 7, b, 1e-5, offset=0.5, casting_mode=mode), (x, w))
    r = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: F.add_rms_norm(a, b, c, 1e-5, offset=0.5, casting_mode=mode)[0], (x, r, w))


def test_torch_mode_with_offset_is_the_reference_times_offset_plus_weight():
    torch.manual_seed(2)
    x, w = torch.randn(5, 33, dtype=torch.float64), torch.randn(33, dtype=torch.float64)
    want = reference.rms_norm(x, (33,), w + 0.25, 1e-5)
    torch.testing.assert_close(F.rms_norm(x, 33, w, 1e-5, offset=0.25), want, rtol=1e-12, atol=1e-12)
    # offset 0 and mode "torch" is the plain op, through the same path as before
    assert torch.equal(F.rms_norm(x, 33, w, 1e-5, offset=0.0), F.rms_norm(x, 33, w, 1e-5))


def test_add_rms_norm_with_an_offset_is_the_add_then_the_norm():
    torch.manual_seed(3)
    x, r, w = torch.randn(4, 16), torch.randn(4, 16), torch.randn(16)
    out, new_residual = F.add_rms_norm(x, r, w, 1e-6, offset=1.0, casting_mode="gemma")
    assert torch.equal(new_residual, r + x)
    assert torch.equal(out, F.rms_norm(r + x, 16, w, 1e-6, offset=1.0, casting_mode="gemma"))
    module = normlab.RMSNorm(16, eps=1e-6, offset=1.0, casting_mode="gemma")
    with torch.no_grad():
        module.weight.copy_(w)
    m_out, m_res = module(x, r)
    assert torch.equal(m_out, out) and torch.equal(m_res, new_residual)


def test_the_module_starts_at_an_effective_gain_of_one_and_keeps_torchs_state_dict():
    m = normlab.RMSNorm(6, offset=1.0, casting_mode="gemma")
    assert torch.equal(m.weight, torch.zeros(6)) and list(m.state_dict()) == ["weight"]
    x = torch.randn(2, 6)
    torch.testing.assert_close(m(x), torch.nn.RMSNorm(6)(x))
    assert "offset=1.0, casting_mode='gemma'" in repr(m) and "offset" not in repr(normlab.RMSNorm(6))


def test_bad_offset_and_casting_mode_are_refused_by_name():
    x = torch.randn(2, 4)
    with pytest.raises(NormArgumentError, match="expected casting_mode to be one of torch, llama, gemma, got 'bf16'"):
        F.rms_norm(x, 4, casting_mode="bf16")
    with pytest.raises(NormArgumentError, match="expected offset to be a finite number, got inf"):
        F.rms_norm(x, 4, offset=float("inf"))
    with pytest.raises(NormArgumentError, match="RMSNorm: expected casting_mode"):
        normlab.RMSNorm(4, casting_mode="fp32")
    m = normlab.RMSNorm(4, offset=1.0)
    m.collect_per_example_grad_sq = True
    with pytest.raises(NotImplementedError, match="per-example gradient norms do not take offset"):
        m(x)


def test_convert_reads_the_offset_and_folding_declines_it_with_the_reason():
    from normlab.convert import fold_norm_affine
    from normlab.convert.detect import semantics

    sem = semantics(normlab.RMSNorm(4, offset=1.0, casting_mode="gemma"))
    assert (sem.kind, sem.offset, sem.casting_mode, sem.plain) == ("rmsnorm", 1.0, "gemma", False)
    model = torch.nn.Sequential(normlab.RMSNorm(4, offset=1.0, casting_mode="gemma"), torch.nn.Linear(4, 2))
    report = fold_norm_affine(model).normlab_report
    assert "folding does not take a weight offset yet" in report.left["0"]


# ------------------------------------------------------------------ LayerNorm's offset


def test_layer_norm_offset_is_the_reference_with_offset_plus_weight():
    torch.manual_seed(4)
    x = torch.randn(5, 33, dtype=torch.float64, requires_grad=True)
    w = torch.randn(33, dtype=torch.float64, requires_grad=True)
    b = torch.randn(33, dtype=torch.float64, requires_grad=True)
    got = F.layer_norm(x, 33, w, b, 1e-5, offset=1.0)
    torch.testing.assert_close(got, reference.layer_norm(x, (33,), w + 1.0, b, 1e-5), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, c, d: F.layer_norm(a, 33, c, d, 1e-5, offset=0.5), (x, w, b))
    r = torch.randn(5, 33, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c, d: F.add_layer_norm(a, c, d, None, offset=0.5)[0], (x, r, w))
    out, res = F.add_layer_norm(x, r, w, b, offset=1.0)
    assert torch.equal(res, r + x) and torch.equal(out, F.layer_norm(r + x, 33, w, b, offset=1.0))


def test_layer_norm_offset_in_float32_and_the_module_starts_at_gain_one():
    w = torch.full((8,), 2.0 ** -9, dtype=torch.bfloat16)
    x = torch.randn(4, 8)
    x_hat = torch.nn.functional.layer_norm(x, (8,))
    torch.testing.assert_close(F.layer_norm(x, 8, w, None, offset=1.0), x_hat * (1.0 + 2.0 ** -9))
    m = normlab.LayerNorm(8, offset=1.0)
    assert torch.equal(m.weight, torch.zeros(8)) and list(m.state_dict()) == ["weight", "bias"]
    torch.testing.assert_close(m(x), torch.nn.LayerNorm(8)(x))
    assert "offset=1.0" in repr(m) and "offset" not in repr(normlab.LayerNorm(8))
    with pytest.raises(NormArgumentError, match="expected offset to be a finite number"):
        normlab.LayerNorm(8, offset=float("nan"))


def test_convert_leaves_a_layernorm_with_an_offset():
    from normlab.convert import ConversionError, fold_norm_affine, layernorm_to_rmsnorm

    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), normlab.LayerNorm(8, offset=1.0), torch.nn.Linear(8, 3))
    report = fold_norm_affine(model).normlab_report
    assert "folding does not take a weight offset yet" in report.left["1"]
    with pytest.raises(ConversionError, match="offset"):
        layernorm_to_rmsnorm(model)


# ------------------------------------------------------------------ LayerNorm's weight per head


def _per_head_layer_norm(x, weight, eps=1e-5):
    """Cohere's q/k norm, op for op (transformers' CohereLayerNorm): over the last dim in
    float32, times a [heads, head_dim] weight in float32, rounded once."""
    h = x.to(torch.float32)
    mean = h.mean(-1, keepdim=True)
    var = (h - mean).pow(2).mean(-1, keepdim=True)
    return (weight.to(torch.float32) * ((h - mean) * torch.rsqrt(var + eps))).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_layer_norm_with_a_weight_per_head_is_coheres_qk_norm_bit_for_bit(dtype):
    torch.manual_seed(0)
    m = normlab.LayerNorm(8, bias=False, weight_shape=(4, 8), dtype=dtype)
    assert m.weight.shape == (4, 8) and torch.equal(m.weight, torch.ones(4, 8, dtype=dtype))
    assert list(m.state_dict()) == ["weight"] and "weight_shape=(4, 8)" in repr(m)
    with torch.no_grad():
        m.weight.normal_(1.0, 0.5)
    x = (torch.randn(2, 5, 4, 8) * 3 + 1).to(dtype).requires_grad_()
    y = m(x)
    assert y.dtype == dtype and torch.equal(y, _per_head_layer_norm(x, m.weight))
    g = torch.randn(y.shape).to(dtype)
    got = torch.autograd.grad(y, (x, m.weight), g)
    want = torch.autograd.grad(_per_head_layer_norm(x, m.weight), (x, m.weight), g)
    for a, b in zip(got, want, strict=True):  # autograd of the same math, summed in another order
        assert a.dtype == b.dtype
        assert_close(a, b, dtype, GRAD)


def test_layer_norm_weight_per_head_in_float64_with_bias_and_residual():
    torch.manual_seed(1)
    m = normlab.LayerNorm(6, weight_shape=(3, 6), dtype=torch.float64)
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    x = torch.randn(4, 3, 6, dtype=torch.float64, requires_grad=True)
    ref = reference.layer_norm(x, (6,), m.weight, m.bias)  # the reference broadcasts the affine
    torch.testing.assert_close(m(x), ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, w, b: F._layer_norm_torch_ops(a, 6, w, b, 1e-5, 0.0, (3, 6)),
                                    (x, m.weight, m.bias))
    r = torch.randn(4, 3, 6, dtype=torch.float64)
    out, new_res = m(x, r)
    assert torch.equal(new_res, r + x) and torch.equal(out, m(r + x))


def test_layer_norm_weight_shape_errors_name_the_argument():
    with pytest.raises(NormArgumentError, match="weight_shape to end with normalized_shape"):
        normlab.LayerNorm(8, weight_shape=(8, 4))
    m = normlab.LayerNorm(8, weight_shape=(4, 8))
    with pytest.raises(NormArgumentError, match=r"weight_shape=\[4, 8\].*\[\*, 4, 8\]"):
        m(torch.randn(2, 3, 8))
    assert normlab.LayerNorm(8, weight_shape=8).weight_shape is None  # the normalized shape: a plain LayerNorm
    m.collect_per_example_grad_sq = True
    with pytest.raises(NotImplementedError, match="weight_shape"):
        m(torch.randn(2, 4, 8))
