"""layernorm_to_rmsnorm: Pre-LN -> Pre-RMSNorm with equal outputs, refusals otherwise."""

import pytest
import torch
from torch import nn

import normlab
from normlab.convert import ConversionError, RMSNormWithBias, fold_norm_affine, layernorm_to_rmsnorm
from tests.convert.models import MLPStack, PreLNLM, hf_inputs, hf_model, perturb


def _out(model, *args, **kw):
    with torch.no_grad():
        y = model.eval()(*args, **kw)
    return y.logits if hasattr(y, "logits") else y


@pytest.mark.parametrize("make,vocab", [(PreLNLM, 64), (MLPStack, 50)])
def test_hand_built_prenorm_models(make, vocab):
    model = perturb(make(), scale=0.3)
    idx = torch.randint(0, vocab, (2, 9))
    y0 = _out(model, idx)
    keys = list(model.state_dict())
    report = layernorm_to_rmsnorm(model, example_inputs=idx).normlab_report
    assert report.paths("verified") == ["<root>"]
    torch.testing.assert_close(_out(model, idx), y0, atol=1e-5, rtol=1e-5)
    assert list(model.state_dict()) == keys  # beta kept in RMSNormWithBias
    assert not any(isinstance(m, nn.LayerNorm) and not isinstance(m, RMSNormWithBias) for m in model.modules())
    # the residual stream is now zero-mean: every embedding row is centered
    emb = model.tok if make is PreLNLM else model.emb
    assert emb.weight.mean(-1).abs().max() < 1e-6
    # then beta and gamma fold away where a Linear with a bias reads the norm
    folded = fold_norm_affine(model).normlab_report
    assert folded.paths("folded")
    torch.testing.assert_close(_out(model, idx), y0, atol=2e-5, rtol=2e-5)


def test_gpt2_unties_embedding_and_stays_exact():
    torch.manual_seed(0)
    model = perturb(hf_model("gpt2"), scale=0.05)
    kw = hf_inputs("gpt2")
    y0 = _out(model, **kw)
    head = model.lm_head.weight.detach().clone()
    report = layernorm_to_rmsnorm(model, example_inputs=kw).normlab_report
    assert report.paths("untied") == ["transformer.wte"]
    assert len(report.paths("converted")) == 5
    assert isinstance(model.transformer.h[0].ln_1, normlab.RMSNorm)
    assert torch.equal(model.lm_head.weight, head) and model.config.tie_word_embeddings is False
    torch.testing.assert_close(_out(model, **kw), y0, atol=2e-5, rtol=2e-5)


def test_refuses_post_ln():
    model = hf_model("bert")
    with pytest.raises(ConversionError, match="Post-LN blocks"):
        layernorm_to_rmsnorm(model)


def test_refuses_stream_from_model_input():
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.LayerNorm(32))
    with pytest.raises(ConversionError, match="starts at the model input"):
        layernorm_to_rmsnorm(model)


def test_refuses_rmsnorm_on_the_stream():
    model = hf_model("llama")
    with pytest.raises(ConversionError, match="is not a LayerNorm: centering the stream would change its output"):
        layernorm_to_rmsnorm(model)


class _StreamAsOutput(MLPStack):
    def forward(self, idx):
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x)
        return self.out(self.norm(x)), x


def test_refuses_stream_used_as_output_and_leaves_model_unchanged():
    model = perturb(_StreamAsOutput())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConversionError, match="residual stream is itself a model output"):
        layernorm_to_rmsnorm(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert isinstance(model.norm, nn.LayerNorm)
