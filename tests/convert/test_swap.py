"""swap_norms: same outputs and gradients, same state_dict, a truthful report."""

import pickle

import pytest
import torch
from torch import nn

import normlab
from normlab.convert import swap_norms
from normlab.convert.fused import is_fused, unfuse
from tests.convert.models import PreLNLM, hf_inputs, hf_model, perturb


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _fwd_bwd(model, *args, **kw):
    model.zero_grad(set_to_none=True)
    out = model(*args, **kw)
    out = out.logits if hasattr(out, "logits") else out
    (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), _grads(model)


def _assert_same(before, after, atol=2e-5, rtol=2e-5):
    (y0, g0), (y1, g1) = before, after
    torch.testing.assert_close(y1, y0, atol=atol, rtol=rtol)
    assert g0.keys() == g1.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], atol=atol * 10, rtol=rtol * 10, msg=k)


@pytest.mark.parametrize("norm_first", [True, False])
def test_torch_encoder_layers_swapped_and_fused(norm_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first)
    model = perturb(nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(32), enable_nested_tensor=False))
    x = torch.randn(2, 5, 32)
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    before = _fwd_bwd(model, x, src_key_padding_mask=mask)
    keys = list(model.state_dict())
    report = swap_norms(model).normlab_report
    after = _fwd_bwd(model, x, src_key_padding_mask=mask)
    _assert_same(before, after)
    assert list(model.state_dict()) == keys
    assert report.paths("swapped") == ["layers.0.norm1", "layers.0.norm2", "layers.1.norm1", "layers.1.norm2", "norm"]
    assert report.paths("fused") == ["layers.0", "layers.1"]
    assert all(isinstance(model.get_submodule(p), normlab.LayerNorm) for p in report.paths("swapped"))
    assert isinstance(model.layers[0], nn.TransformerEncoderLayer) and is_fused(model.layers[0])


@pytest.mark.parametrize("masks", ["bool", "float", "causal"])
def test_fused_torch_encoder_layer_takes_every_mask_form(masks):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
    model = perturb(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
    x = torch.randn(2, 5, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(5)  # float, -inf above the diagonal
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    kw = {"bool": dict(mask=causal.isinf(), src_key_padding_mask=pad),
          "float": dict(mask=causal, src_key_padding_mask=torch.zeros(2, 5).masked_fill(pad, float("-inf"))),
          "causal": dict(mask=causal, is_causal=True)}[masks]
    before = _fwd_bwd(model, x, **kw)
    swap_norms(model)
    assert is_fused(model.layers[0])
    _assert_same(before, _fwd_bwd(model, x, **kw))


def test_torch_transformer_eval_matches_fast_path():
    torch.manual_seed(0)
    model = perturb(nn.Transformer(32, 4, 2, 2, 64, dropout=0.0, batch_first=True, norm_first=True)).eval()
    src, tgt = torch.randn(2, 6, 32), torch.randn(2, 5, 32)
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        y0 = model(src, tgt, tgt_mask=mask)
        report = swap_norms(model).normlab_report
        y1 = model(src, tgt, tgt_mask=mask)
    torch.testing.assert_close(y1, y0, atol=2e-5, rtol=2e-5)
    assert len(report.paths("swapped")) == 12 and len(report.paths("fused")) == 4


def test_parameters_are_the_same_objects_and_optimizer_keeps_working():
    model = perturb(PreLNLM())
    params = {n: p for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    swap_norms(model)
    assert all(p is params[n] for n, p in model.named_parameters())
    before = model.ln_f.weight.detach().clone()
    model(torch.randint(0, 64, (2, 5))).square().mean().backward()
    opt.step()
    assert not torch.equal(model.ln_f.weight, before)  # the optimizer updated the swapped norm


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_preserved(dtype):
    model = perturb(PreLNLM()).to(dtype)
    idx = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        y0 = model(idx)
        swap_norms(model)
        y1 = model(idx)
    assert model.ln_f.weight.dtype == dtype and isinstance(model.ln_f, normlab.LayerNorm)
    tol = {torch.float64: 1e-10, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(y1, y0, atol=tol, rtol=tol)


def test_include_exclude_and_already_normlab():
    model = PreLNLM()
    report = swap_norms(model, exclude="encoder.*").normlab_report
    assert report.paths("swapped") == ["ln_f"]
    assert report.left["encoder.layers.0.norm1"] == "filtered out by include/exclude"
    assert type(model.encoder.layers[0].norm1) is nn.LayerNorm
    again = swap_norms(model, include=["ln_f"]).normlab_report
    assert again.left["ln_f"] == "already a normlab module"


def test_batchnorm_and_hooks():
    model = nn.Sequential(nn.BatchNorm1d(8), nn.LayerNorm(8))
    seen = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    report = swap_norms(model).normlab_report
    assert report.paths("swapped") == ["1"]
    assert "normalizes over channels or the batch" in report.left["0"]
    model.eval()(torch.randn(3, 8))
    assert seen == ["LayerNorm"] and isinstance(model[1], normlab.LayerNorm)


def test_shared_norm_swapped_once_at_every_path():
    ln = nn.LayerNorm(8)
    model = nn.ModuleDict({"a": ln, "b": ln})
    report = swap_norms(model).normlab_report
    assert report.paths("swapped") == ["a"] and model["a"] is model["b"]


def test_fused_model_pickles_and_unfuses():
    model = perturb(PreLNLM()).eval()
    idx = torch.randint(0, 64, (2, 5))
    swap_norms(model)
    y = model(idx)
    clone = pickle.loads(pickle.dumps(model))
    assert is_fused(clone.encoder.layers[0])
    torch.testing.assert_close(clone(idx), y)
    unfuse(model.encoder.layers[0])
    assert type(model.encoder.layers[0]) is nn.TransformerEncoderLayer
    torch.testing.assert_close(model(idx), y, atol=1e-6, rtol=1e-6)


class _HalfCastRMSNorm(nn.Module):
    """Llama-style: normalizes in fp32, casts, then multiplies by weight."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)


class _OnePlusRMSNorm(_HalfCastRMSNorm):
    def forward(self, x):
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1 + self.weight)).to(x.dtype)


class _MeanFreeNorm(_HalfCastRMSNorm):
    """Neither normlab norm: the variance around the mean, but no mean subtracted."""

    def forward(self, x):
        v = x.var(-1, unbiased=False, keepdim=True)
        return self.weight * x * torch.rsqrt(v + self.variance_epsilon)


def test_custom_norms_verified_on_a_probe():
    model = nn.Sequential(_HalfCastRMSNorm(16), _OnePlusRMSNorm(16), _MeanFreeNorm(16))
    x = torch.randn(3, 16)
    y = model(x)
    report = swap_norms(model).normlab_report
    assert report.paths("swapped") == ["0", "1"] and isinstance(model[0], normlab.RMSNorm)
    assert model[0].eps == 1e-6
    # (1 + weight) in float32: normlab's RMSNorm with offset 1, casting "gemma"
    assert (model[1].offset, model[1].casting_mode) == (1.0, "gemma")
    assert report.left["2"].startswith(
        "forward differs from normlab's rmsnorm")
    assert type(model[2]) is _MeanFreeNorm
    torch.testing.assert_close(model(x), y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "gpt2", "bert", "t5", "cohere", "olmo2"])
def test_hf_models_logits_and_gradients(name):
    torch.manual_seed(0)
    model = perturb(hf_model(name), scale=0.05)
    kw = hf_inputs(name)
    before = _fwd_bwd(model, **kw)
    keys = list(model.state_dict())
    report = swap_norms(model).normlab_report
    after = _fwd_bwd(model, **kw)
    _assert_same(before, after, atol=5e-5, rtol=5e-5)
    assert list(model.state_dict()) == keys
    assert not report.left and report.paths("swapped")
    fused = {"llama": 2, "mistral": 2, "qwen2": 2, "gpt2": 2, "bert": 4, "t5": 0, "cohere": 0, "olmo2": 0}[name]
    assert len(report.paths("fused")) == fused


@pytest.mark.parametrize("name,norms", [("gemma", 5), ("gemma2", 9), ("gemma3", 13)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hf_gemma_norms_swapped_bit_for_bit(name, norms, dtype):
    torch.manual_seed(0)
    model = perturb(hf_model(name), scale=0.05).to(dtype).eval()
    kw = hf_inputs(name)
    with torch.no_grad():
        y0 = model(**kw).logits
    report = swap_norms(model).normlab_report
    assert len(report.paths("swapped")) == norms and not report.left  # Gemma3: its q/k norms too
    assert all("offset=1, casting_mode='gemma'" in e.detail for e in report.entries if e.action == "swapped")
    with torch.no_grad():
        assert torch.equal(model(**kw).logits, y0)


# the families with norms on the query and key heads, each norm swapped (q/k norms included).
# Logits bit for bit, except where normlab's norm rounds in another order: Cohere's block
# LayerNorms in float32 (torch's fused kernel forms the mean and variance in another order
# than Cohere's ops: ~2e-8 on the logits) and Qwen3's RMSNorm in bfloat16 (it rounds
# before the weight multiply, as Llama's: one bfloat16 rounding).
QK_FAMILIES = {"cohere": 7, "olmo2": 9, "qwen3": 9}
NOT_BITWISE = {("cohere", torch.float32), ("qwen3", torch.bfloat16)}


@pytest.mark.parametrize("name", list(QK_FAMILIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hf_qk_norm_families_swap_every_norm(name, dtype):
    torch.manual_seed(0)
    model = perturb(hf_model(name), scale=0.05).to(dtype).eval()
    kw = hf_inputs(name)
    params = dict(model.named_parameters())
    with torch.no_grad():
        y0 = model(**kw).logits
    report = swap_norms(model).normlab_report
    assert len(report.paths("swapped")) == QK_FAMILIES[name] and not report.left
    assert all(p is params[n] for n, p in model.named_parameters())  # the same Parameter objects
    with torch.no_grad():
        y1 = model(**kw).logits
    if (name, dtype) in NOT_BITWISE:
        bf16 = dtype == torch.bfloat16
        torch.testing.assert_close(y1, y0, atol=6e-2 if bf16 else 1e-6, rtol=5e-2 if bf16 else 1e-6)
    else:
        assert torch.equal(y1, y0)


def test_cohere_per_head_qk_norms_become_layer_norms_with_a_weight_per_head():
    torch.manual_seed(0)
    model = perturb(hf_model("cohere"), scale=0.05).eval()
    attn = model.model.layers[0].self_attn
    q_weight = attn.q_norm.weight
    report = swap_norms(model).normlab_report
    assert isinstance(attn.q_norm, normlab.LayerNorm) and attn.q_norm.weight is q_weight
    assert (attn.q_norm.normalized_shape, attn.q_norm.weight_shape, attn.q_norm.bias) == ((8,), (4, 8), None)
    assert attn.k_norm.weight_shape == (2, 8)
    assert "a weight per head" in report.entries[0].detail
    assert list(model.state_dict()["model.layers.0.self_attn.q_norm.weight"].shape) == [4, 8]


def test_hf_llama_bf16_swapped_within_rounding():
    torch.manual_seed(0)
    model = perturb(hf_model("llama"), scale=0.05).to(torch.bfloat16).eval()
    kw = hf_inputs("llama")
    with torch.no_grad():
        y0 = model(**kw).logits.float()
        report = swap_norms(model).normlab_report
        y1 = model(**kw).logits.float()
    assert len(report.paths("swapped")) == 5
    assert "bfloat16 probe" in report.entries[0].detail
    torch.testing.assert_close(y1, y0, atol=6e-2, rtol=5e-2)


def test_transforms_return_the_model_with_its_report():
    from normlab.convert import fold_norm_affine, layernorm_to_rmsnorm

    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
    model = nn.Sequential(layer).eval()
    x = torch.randn(2, 5, 16)
    before = model(x)
    assert swap_norms(model) is model  # in place: `model = swap_norms(model)` keeps working
    assert model.normlab_report.transform == "swap_norms"
    assert set(model.normlab_report.paths("swapped")) == {"0.norm1", "0.norm2"}
    torch.testing.assert_close(model(x), before)
    assert fold_norm_affine(model) is model
    assert model.normlab_report.transform == "fold_norm_affine"
    assert model.normlab_report.paths("folded") == ["0.norm1", "0.norm2"]
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    # a refusal raises and leaves the model (and its last report) as it was
    from normlab.convert import ConversionError

    with pytest.raises(ConversionError, match="starts at the model input"):
        layernorm_to_rmsnorm(model)
    assert model.normlab_report.transform == "fold_norm_affine"
