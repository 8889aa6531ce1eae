"""Exactness at the edges of the analysis: a norm used at several places, parameters the
forward reads directly, norms over several dims, a stream without a final norm, and
norms whose forward, training-mode behaviour or state normlab's do not reproduce."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import normlab
from normlab.convert import ConversionError, fold_norm_affine, layernorm_to_rmsnorm, swap_norms
from tests.convert.models import MLPBlock, hf_model, perturb


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, state):
    now = model.state_dict()
    return list(now) == list(state) and all(torch.equal(now[k], state[k]) for k in state)


def _affine(norm, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) * 1.5 + 0.5)
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=g))
    return norm


# --- a norm used at several places -------------------------------------------------------

class _CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = _affine(nn.LayerNorm(8))
        self.a = nn.Linear(8, 4)
        self.b = nn.Linear(8, 4)

    def forward(self, x, y):
        return self.a(self.ln(x)) + self.b(self.ln(y))


def test_a_norm_called_twice_folds_into_the_consumers_of_every_call():
    torch.manual_seed(0)
    model = _CalledTwice().double().eval()
    x, y = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    want = model(x, y)
    report = fold_norm_affine(model).normlab_report
    assert report.paths("folded") == ["ln"]
    assert report.entries[0].detail == "gamma and beta -> a, b"
    assert model.ln.weight is None and model.ln.bias is None
    torch.testing.assert_close(model(x, y), want, atol=1e-12, rtol=1e-12)


def test_hf_norm_shared_by_two_layers_folds_into_both_layers():
    torch.manual_seed(0)
    model = perturb(hf_model("llama"), scale=0.3).eval()
    layers = model.model.layers
    layers[1].input_layernorm = layers[0].input_layernorm
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    report = fold_norm_affine(model).normlab_report
    (entry,) = [e for e in report.entries if e.path == "model.layers.0.input_layernorm"]
    assert entry.action == "folded"
    assert all(f"model.layers.{i}.self_attn.{p}_proj" in entry.detail for i in (0, 1) for p in "qkv")
    assert layers[1].input_layernorm is layers[0].input_layernorm and layers[0].input_layernorm.weight is None
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, atol=1e-4, rtol=1e-4)


class _SharedWithPostLN(nn.Module):
    """``ln`` feeds only ``head`` where the model calls it, but it is also a Post-LN
    layer's norm1, whose output is the residual stream."""

    def __init__(self):
        super().__init__()
        self.ln = _affine(nn.LayerNorm(16))
        self.post = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.post.norm1 = self.ln
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.ln(self.post(x)))


def test_a_norm_shared_with_a_use_that_cannot_fold_is_left():
    torch.manual_seed(0)
    model = _SharedWithPostLN().eval()
    x = torch.randn(2, 5, 16)
    want, state = model(x), _state(model)
    report = fold_norm_affine(model).normlab_report
    assert report.left["ln"].startswith("cannot fold: shared norm (used at ln, post.norm1): Post-LN")
    assert _same_state(model, state) and model.post.norm1 is model.ln
    torch.testing.assert_close(model(x), want, atol=0, rtol=0)


# --- parameters the forward reads directly ------------------------------------------------

class _HeadAsEmbedding(nn.Module):
    """The input embedding is the head's weight, read functionally."""

    def __init__(self, vocab=20, d=8):
        super().__init__()
        self.head = nn.Linear(d, vocab, bias=False)
        self.ln = _affine(nn.LayerNorm(d, bias=False))
        self.fc = nn.Linear(d, d)

    def forward(self, idx):
        x = F.embedding(idx, self.head.weight)
        x = x + self.fc(x)
        return self.head(self.ln(x))


def test_fold_leaves_a_norm_whose_consumer_weight_is_read_directly():
    torch.manual_seed(0)
    model = _HeadAsEmbedding().double().eval()
    idx = torch.randint(0, 20, (2, 5))
    want, state = model(idx), _state(model)
    report = fold_norm_affine(model).normlab_report
    why = report.left["ln"]
    assert "consumer head's parameter `head.weight` is also read directly by `embedding(...)`" in why
    assert _same_state(model, state)
    torch.testing.assert_close(model(idx), want, atol=0, rtol=0)


class _ReadsItsNormWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 4)
        with torch.no_grad():
            self.ln.weight.uniform_(0.5, 1.5)
            self.ln.bias.uniform_(-1, 1)

    def forward(self, x):
        return self.fc(self.ln(x)) * self.ln.weight


def test_fold_leaves_a_norm_whose_own_weight_is_read_directly():
    # the norm's gamma was folded away (weight None) though the forward reads it: the
    # converted model raised TypeError
    model = _ReadsItsNormWeight().double().eval()
    x = torch.randn(2, 4, dtype=torch.float64)
    want, state = model(x), _state(model)
    why = fold_norm_affine(model).normlab_report.left["ln"]
    assert "the norm's own parameter `ln.weight` is also read directly by `mul(...)`" in why, why
    assert _same_state(model, state)
    torch.testing.assert_close(model(x), want, atol=0, rtol=0)


class _TiedByFunctionalHead(nn.Module):
    """minGPT-style: the head reuses the token embedding functionally."""

    def __init__(self, vocab=30, d=16):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([MLPBlock(d), MLPBlock(d)])
        self.ln_f = nn.LayerNorm(d)

    def forward(self, idx):
        x = self.wte(idx)
        for b in self.blocks:
            x = b(x)
        return F.linear(self.ln_f(x), self.wte.weight)


def test_rms_refuses_a_writer_whose_weight_is_read_directly():
    torch.manual_seed(0)
    model = perturb(_TiedByFunctionalHead().double()).eval()
    state = _state(model)
    with pytest.raises(ConversionError, match=r"writer of the residual stream wte's parameter `wte.weight` is "
                                              r"also read directly by `linear\(\.\.\.\)`"):
        layernorm_to_rmsnorm(model)
    assert _same_state(model, state) and isinstance(model.ln_f, nn.LayerNorm)


# --- a norm over several dims ------------------------------------------------------------

class _NormOverTwoDims(nn.Module):
    def __init__(self, bias):
        super().__init__()
        self.ln = _affine(nn.LayerNorm((4, 8), bias=bias))
        self.a = nn.Linear(8, 4)

    def forward(self, x):
        return self.a(self.ln(x))


@pytest.mark.parametrize("bias", [False, True])
def test_a_norm_over_several_dims_is_left(bias):
    torch.manual_seed(0)
    model = _NormOverTwoDims(bias).double().eval()
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    want, state = model(x), _state(model)
    report = fold_norm_affine(model).normlab_report
    assert report.left["ln"].startswith("cannot fold: it normalizes over several dims [4, 8]")
    assert _same_state(model, state)
    torch.testing.assert_close(model(x), want, atol=0, rtol=0)


# --- a residual stream without a final norm ----------------------------------------------

def test_rms_refuses_opt_without_its_final_norm():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=32, word_embed_proj_dim=32,
                                 do_layer_norm_before=True, _remove_final_layer_norm=True,
                                 tie_word_embeddings=False)
    model = perturb(transformers.OPTForCausalLM(cfg), scale=0.3).eval()
    assert model.model.decoder.final_layer_norm is None
    state = _state(model)
    with pytest.raises(ConversionError, match="the residual stream is itself a model output .no final norm reads it"):
        layernorm_to_rmsnorm(model)
    assert _same_state(model, state)


# --- norms whose forward normlab's does not reproduce -----------------------------------

class _CondRMSNorm(nn.Module):
    """An RMSNorm with an optional conditioning shift; plain RMSNorm without it."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.eps = eps

    def forward(self, x, cond=None):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        return y if cond is None else y + cond


class _DropoutRMSNorm(_CondRMSNorm):
    """An RMSNorm with functional dropout on its output in training."""

    def forward(self, x):
        return F.dropout(super().forward(x), 0.5, self.training)


class _TwoNorms(nn.Module):
    def __init__(self):
        super().__init__()
        self.cond = _CondRMSNorm(8)
        self.drop = _DropoutRMSNorm(8)
        self.plain = _affine(nn.LayerNorm(8))

    def forward(self, x, c):
        return self.cond(x, c), self.drop(x), self.plain(x)


def test_a_norm_taking_a_second_argument_or_dropout_is_left():
    model = _TwoNorms().train()
    x, c = torch.randn(2, 8), torch.randn(2, 8)
    torch.manual_seed(1)
    want = model(x, c)
    torch.manual_seed(5)
    report = swap_norms(model).normlab_report
    after = torch.random.get_rng_state()
    torch.manual_seed(5)
    assert torch.equal(after, torch.random.get_rng_state())  # the probes leave the global RNG as it was
    assert report.left["cond"].startswith("its forward takes (x, cond=None), not one input")
    assert report.left["drop"].startswith("forward differs from normlab's rmsnorm: in training mode two calls "
                                          "on the same input differ")
    assert report.paths("swapped") == ["plain"]
    assert type(model.cond) is _CondRMSNorm and type(model.drop) is _DropoutRMSNorm
    torch.manual_seed(1)
    for got, y in zip(model(x, c), want):
        torch.testing.assert_close(got, y, atol=1e-6, rtol=1e-6)


# --- norms with state normlab's do not carry -----------------------------------------------

class _TaggedLayerNorm(nn.LayerNorm):
    def __init__(self, d):
        super().__init__(d)
        self.register_buffer("act_scale", torch.full((d,), 0.5))


class _Softplus(nn.Module):
    def forward(self, w):
        return F.softplus(w)


def test_torch_norm_subclass_with_a_buffer_and_a_parametrized_norm_are_left():
    torch.manual_seed(0)
    model = nn.Sequential(_affine(_TaggedLayerNorm(8)), _affine(nn.LayerNorm(8)), _affine(nn.LayerNorm(8)),
                          nn.Linear(8, 4)).double().eval()
    parametrize.register_parametrization(model[1], "weight", _Softplus())
    x = torch.randn(3, 8, dtype=torch.float64)
    want, state = model(x), _state(model)
    report = swap_norms(model).normlab_report
    assert report.left["0"] == "has state besides weight/bias (act_scale)"
    assert report.left["1"].startswith("parametrized (weight computed by torch.nn.utils.parametrize)")
    assert report.paths("swapped") == ["2"] and isinstance(model[2], normlab.LayerNorm)
    assert type(model[0]) is _TaggedLayerNorm and parametrize.is_parametrized(model[1])
    assert _same_state(model, state)
    torch.testing.assert_close(model(x), want, atol=1e-12, rtol=1e-12)


# --- documented: a swapped torch encoder leaves the nested-tensor fast path ----------------

def test_swapped_post_ln_encoder_keeps_valid_positions_and_computes_padded_ones():
    """docs/convert.md (swap_norms): torch's nested-tensor fast path returns 0 at padded
    positions; the swapped encoder runs the slow path, whose padded outputs are not 0."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = perturb(nn.TransformerEncoder(layer, 2)).eval()
    slow = copy.deepcopy(model)
    slow.use_nested_tensor = False
    x = torch.randn(2, 5, 16)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad():
        fast, reference = model(x, src_key_padding_mask=pad), slow(x, src_key_padding_mask=pad)
        swap_norms(model)
        after = model(x, src_key_padding_mask=pad)
    assert torch.equal(fast[pad], torch.zeros_like(fast[pad])) and after[pad].abs().min() > 0
    torch.testing.assert_close(after[~pad], fast[~pad], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after, reference, atol=1e-5, rtol=1e-5)
