"""The transforms on models they cannot change exactly: shared consumer weights, meta
parameters, hooks, references outside the module tree, parametrized layers, partly
folded torch encoder layers; and overlapping ``patch`` handles."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import normlab
from normlab.convert import ConversionError, fold_norm_affine, layernorm_to_rmsnorm, swap_norms
from tests.convert.models import hf_inputs, hf_model, perturb

transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install 'normlab[hf]')")


def _logits(model, kw):
    with torch.no_grad():
        return model.eval()(**kw).logits


class _QK(nn.Module):
    """One LayerNorm read by two projections (a shared-QK attention's q and k)."""

    def __init__(self, d=8):
        super().__init__()
        self.ln, self.q, self.k = nn.LayerNorm(d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        h = self.ln(x)
        return self.q(h) * self.k(h)


def _qk(**tie) -> _QK:
    m = perturb(_QK().double(), scale=0.5)
    for name, other in tie.items():  # e.g. k_weight="q": k.weight = q.weight
        mod, _, param = name.partition("_")
        setattr(getattr(m, mod), param, getattr(getattr(m, other), param))
    return m


# 1. consumers sharing one weight tensor


def test_a_weight_shared_by_two_consumers_of_the_norm_is_scaled_once():
    m = _qk(k_weight="q")
    x = torch.randn(3, 8, dtype=torch.float64)
    y0 = m(x)
    report = fold_norm_affine(m).normlab_report
    assert report.paths("folded") == ["ln"] and m.k.weight is m.q.weight
    torch.testing.assert_close(m(x), y0, atol=1e-12, rtol=1e-12)


def test_tied_q_and_k_projections_of_llama_fold_exactly():
    torch.manual_seed(0)
    model = perturb(hf_model("llama"), scale=0.3).eval()
    for layer in model.model.layers:
        layer.self_attn.k_proj.weight = layer.self_attn.q_proj.weight  # k_proj is as wide as q_proj here
    kw = hf_inputs("llama")
    y0 = _logits(model, kw)
    report = fold_norm_affine(model).normlab_report
    assert "model.layers.0.input_layernorm" in report.paths("folded")
    torch.testing.assert_close(_logits(model, kw), y0, atol=1e-5, rtol=1e-5)


def test_a_bias_shared_by_consumers_with_different_weights_leaves_the_norm():
    m = _qk(k_bias="q")
    x = torch.randn(3, 8, dtype=torch.float64)
    y0 = m(x)
    report = fold_norm_affine(m).normlab_report
    assert "share their bias but not their weight" in report.left["ln"]
    torch.testing.assert_close(m(x), y0, atol=0, rtol=0)


# 2. parameters on the meta device


def _meta(cls, cfg):
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return cls(cfg)


_GPT2 = dict(vocab_size=50, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)


@pytest.mark.parametrize("transform", [fold_norm_affine, layernorm_to_rmsnorm])
@pytest.mark.parametrize("cls", ["GPT2Model", "GPT2LMHeadModel"])
def test_fold_and_rms_refuse_meta_parameters_and_change_nothing(transform, cls):
    model = _meta(getattr(transformers, cls), transformers.GPT2Config(**_GPT2, tie_word_embeddings=False))
    keys = list(model.state_dict())
    with pytest.raises(ConversionError, match=r"meta device .*load the weights first"):
        transform(model)
    assert list(model.state_dict()) == keys
    assert all(type(m) is nn.LayerNorm for n, m in model.named_modules() if n.endswith(("ln_1", "ln_2", "ln_f")))


def test_swap_on_meta_swaps_torch_norms_and_leaves_probed_ones_for_their_values():
    gpt2 = _meta(transformers.GPT2LMHeadModel, transformers.GPT2Config(**_GPT2))
    assert len(swap_norms(gpt2).normlab_report.paths("swapped")) == 3  # exact by construction
    llama = _meta(transformers.LlamaForCausalLM, transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    left = swap_norms(llama).normlab_report.left
    assert left["model.norm"].startswith("parameters on the meta device")
    assert "forward differs" not in left["model.norm"]


# 3. hooks on a norm fold would change, or on its consumers


def _gpt2():
    torch.manual_seed(0)
    return perturb(hf_model("gpt2"), scale=0.3).eval()


def test_a_norm_with_a_forward_hook_is_left_by_fold():
    model = _gpt2()
    steer = torch.randn(32)
    model.transformer.h[0].ln_1.register_forward_hook(lambda mod, inp, out: out + steer)
    kw = hf_inputs("gpt2")
    y0 = _logits(model, kw)
    report = fold_norm_affine(model).normlab_report
    assert "forward hooks" in report.left["transformer.h.0.ln_1"]
    assert "transformer.h.0.ln_2" in report.paths("folded")
    torch.testing.assert_close(_logits(model, kw), y0, atol=1e-5, rtol=1e-5)


def test_a_consumer_with_a_forward_pre_hook_leaves_its_norm():
    m = _qk()
    m.q.register_forward_pre_hook(lambda mod, args: (args[0] + 1.0,))
    x = torch.randn(3, 8, dtype=torch.float64)
    y0 = m(x)
    report = fold_norm_affine(m).normlab_report
    assert "consumer q has forward pre-hooks" in report.left["ln"]
    torch.testing.assert_close(m(x), y0, atol=0, rtol=0)


# 4. the final norm folds into the head; the report names the hidden state that changes


def test_the_final_norm_folds_into_the_head_and_names_the_last_hidden_state():
    torch.manual_seed(0)
    model = perturb(hf_model("llama"), scale=0.3).eval()
    kw = hf_inputs("llama")
    with torch.no_grad():
        o0 = model(**kw, output_hidden_states=True)
    report = fold_norm_affine(model).normlab_report
    (entry,) = [e for e in report.entries if e.path == "model.norm"]
    assert entry.action == "folded" and "hidden_states[-1]" in entry.detail
    with torch.no_grad():
        o1 = model(**kw, output_hidden_states=True)
    torch.testing.assert_close(o1.logits, o0.logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(o1.hidden_states[-1], o0.hidden_states[-1])  # as the report says


# 5. a norm also held outside its registered paths


class _Pipeline(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln, self.q = nn.LayerNorm(8), nn.Linear(8, 8)
        self.pipeline = [self.ln]  # a plain list: not a registered path

    def forward(self, x):
        return self.q(self.pipeline[0](x))


def test_a_norm_held_in_a_plain_list_is_left_by_fold():
    m = perturb(_Pipeline().double(), scale=0.5)
    x = torch.randn(3, 8, dtype=torch.float64)
    y0 = m(x)
    report = fold_norm_affine(m).normlab_report
    assert "pipeline[0]" in report.left["ln"]
    torch.testing.assert_close(m(x), y0, atol=0, rtol=0)


# 6. parametrized consumers, and parametrizations are not norms


@pytest.mark.parametrize("kind", ["weight_norm", "old_weight_norm", "orthogonal"])
def test_a_parametrized_consumer_leaves_the_norm_with_the_reason(kind):
    m = _qk()
    if kind == "weight_norm":
        parametrizations.weight_norm(m.q)
    elif kind == "orthogonal":
        parametrizations.orthogonal(m.q)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.nn.utils.weight_norm(m.q)
    x = torch.randn(3, 8, dtype=torch.float64)
    y0 = m(x)
    report = fold_norm_affine(m).normlab_report
    assert report.left["ln"].startswith("cannot fold: consumer q is parametrized")
    torch.testing.assert_close(m(x), y0, atol=0, rtol=0)


class _Stream(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.ln1, self.w = nn.Embedding(10, 8), nn.LayerNorm(8), nn.Linear(8, 8)
        self.lnf, self.head = nn.LayerNorm(8), nn.Linear(8, 5)

    def forward(self, i):
        h = self.emb(i)
        h = h + self.w(self.ln1(h))
        return self.head(self.lnf(h))


def test_weight_norms_parametrization_module_is_not_a_norm():
    m = _Stream().double().eval()
    parametrizations.weight_norm(m.w)  # adds w.parametrizations.weight.0, a _WeightNorm
    paths = [e.path for e in swap_norms(m).normlab_report.entries]
    assert paths == ["ln1", "lnf"]
    m = _Stream().double().eval()
    parametrizations.weight_norm(m.w)
    with pytest.raises(ConversionError, match="writer of the residual stream w is parametrized"):
        layernorm_to_rmsnorm(m, example_inputs=torch.randint(0, 10, (2, 5)))


# 8. a partly folded torch encoder layer


def test_a_pre_ln_encoder_layer_whose_norm2_is_excluded_keeps_norm1_and_runs():
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, norm_first=True), 1,
                                enable_nested_tensor=False)
    enc = perturb(enc, scale=0.3).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        y0 = enc(x)
    report = fold_norm_affine(enc, exclude="*norm2").normlab_report
    assert "norm2 is left unfolded" in report.left["layers.0.norm1"]
    with torch.no_grad():  # (torch's fast-path check reads every norm's weight)
        torch.testing.assert_close(enc(x), y0, atol=1e-5, rtol=1e-5)


# 9. a hooked norm keeps its call: its block is not fused


def test_a_block_whose_fused_norm_has_a_hook_is_not_fused():
    model = _gpt2()
    steer = torch.randn(32)
    seen = []
    ln_2 = model.transformer.h[0].ln_2
    ln_2.register_forward_hook(lambda mod, inp, out: seen.append(len(inp)) or out + steer)
    kw = hf_inputs("gpt2")
    y0 = _logits(model, kw)
    report = swap_norms(model).normlab_report
    assert "ln_2 has forward hooks" in report.left["transformer.h.0"]
    assert "transformer.h.1" in report.paths("fused")
    assert isinstance(model.transformer.h[0].ln_2, normlab.LayerNorm)
    torch.testing.assert_close(_logits(model, kw), y0, atol=1e-5, rtol=1e-5)
    assert seen == [1, 1]


# 10. overlapping patch handles


def test_patch_handles_undone_in_any_order_restore_the_originals():
    from transformers.models.gpt2 import modeling_gpt2 as mg

    from normlab.integrations.hf import patch

    nn_, block = mg.nn, mg.GPT2Block
    try:
        a, b = patch("gpt2"), patch("gpt2")
        a.undo()
        assert mg.nn is not nn_ and mg.GPT2Block is not block  # b is still active
        a.undo()  # a second undo of one handle does nothing
        assert mg.GPT2Block is not block
        b.undo()
        assert mg.nn is nn_ and mg.GPT2Block is block
        with patch("gpt2"), patch("gpt2"):
            pass
        assert mg.nn is nn_ and mg.GPT2Block is block
    finally:
        mg.nn, mg.GPT2Block = nn_, block


class _KeywordConsumer(nn.Module):
    """A Linear reading the norm's output by keyword: ``fc(input=ln(x))``."""

    def __init__(self, d=8):
        super().__init__()
        self.ln, self.fc = nn.LayerNorm(d), nn.Linear(d, 4)

    def forward(self, x):
        return self.fc(input=self.ln(x))


class _KeywordNorm(_KeywordConsumer):
    """The norm itself called by keyword: ``fc(ln(input=x))`` (torch's name for it)."""

    def forward(self, x):
        return self.fc(self.ln(input=x))


class _KeywordAdd(nn.Module):
    """embedding -> a block adding by keyword (``torch.add(x, other=...)``) -> final norm."""

    def __init__(self, d=8):
        super().__init__()
        self.emb, self.ln, self.fc = nn.Embedding(10, d), nn.LayerNorm(d), nn.Linear(d, d)
        self.lnf, self.head = nn.LayerNorm(d), nn.Linear(d, 10)

    def forward(self, i):
        x = self.emb(i)
        x = torch.add(x, other=self.fc(self.ln(x)))
        return self.head(self.lnf(x))


def test_calls_by_keyword_are_left_with_a_reason_or_followed():
    x = torch.randn(3, 8, dtype=torch.float64)
    m = perturb(_KeywordConsumer().double(), scale=0.3)
    want = m(x)
    fold_norm_affine(m)  # the consumer's input is a keyword: not followed, the norm left
    assert "takes its input as a keyword argument" in str(m.normlab_report)
    torch.testing.assert_close(m(x), want)
    m = perturb(_KeywordNorm().double(), scale=0.3)
    want = m(x)
    fold_norm_affine(m)  # the norm's own input by keyword: folded, and still called so
    assert "1 folded" in str(m.normlab_report)
    torch.testing.assert_close(m(x), want)
    m = perturb(_KeywordAdd().double(), scale=0.3)
    i = torch.randint(0, 10, (2, 5))
    want = m(i)
    fold_norm_affine(m)
    torch.testing.assert_close(m(i), want)
    with pytest.raises(ConversionError, match="keyword argument"):
        layernorm_to_rmsnorm(perturb(_KeywordAdd().double(), scale=0.3))


def test_a_norm_that_cannot_be_copied_is_left_and_the_others_swapped():
    import threading

    class LockedRMSNorm(nn.Module):
        def __init__(self, d, eps=1e-6):
            super().__init__()
            self.weight, self.eps, self.lock = nn.Parameter(torch.ones(d)), eps, threading.Lock()

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    m = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), LockedRMSNorm(8))
    swap_norms(m)
    assert isinstance(m[0], normlab.LayerNorm) and type(m[2]).__name__ == "LockedRMSNorm"
    assert "cannot be copied to probe its forward" in str(m.normlab_report)


def test_a_subclass_of_normlab_layernorm_is_still_a_norm_of_the_protocol():
    from normlab.convert.detect import semantics

    class ScaledLN(normlab.LayerNorm):
        def normalize(self, x, padding_mask=None):
            return super().normalize(x, padding_mask)

    found = semantics(ScaledLN(8))
    assert not isinstance(found, str), found
    assert found.kind == "layernorm"
