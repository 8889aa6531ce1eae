"""fold_norm_affine: outputs unchanged, norms left non-affine, refusals with reasons."""

import pytest
import torch
from torch import nn

import normlab
from normlab.convert import fold_norm_affine
from tests.convert.models import MLPStack, PreLNLM, ResidualTap, hf_inputs, hf_model, perturb


def _out(model, *args, **kw):
    with torch.no_grad():
        y = model.eval()(*args, **kw)
    return y.logits if hasattr(y, "logits") else y


def test_torch_prenorm_lm_folds_blocks_and_reports_head_without_bias():
    model = perturb(PreLNLM())
    idx = torch.randint(0, 64, (2, 7))
    y0 = _out(model, idx)
    report = fold_norm_affine(model).normlab_report
    torch.testing.assert_close(_out(model, idx), y0, atol=1e-5, rtol=1e-5)
    assert report.paths("folded") == [f"encoder.layers.{i}.norm{j}" for i in (0, 1) for j in (1, 2)]
    assert report.left["ln_f"] == ("cannot fold: consumer head has no bias to absorb the norm's beta "
                                   "(add_bias=True gives it one)")
    norm1 = model.encoder.layers[0].norm1
    assert isinstance(norm1, normlab.LayerNorm) and norm1.weight is None and norm1.bias is None


def test_head_with_bias_folds_the_final_norm_too():
    model = perturb(PreLNLM(head_bias=True))
    idx = torch.randint(0, 64, (2, 7))
    y0 = _out(model, idx)
    report = fold_norm_affine(model).normlab_report
    assert "ln_f" in report.paths("folded")
    torch.testing.assert_close(_out(model, idx), y0, atol=1e-5, rtol=1e-5)


def test_fx_traced_stack():
    model = perturb(MLPStack())
    idx = torch.randint(0, 50, (2, 9))
    y0 = _out(model, idx)
    report = fold_norm_affine(model).normlab_report
    assert report.paths("folded") == ["blocks.0.ln", "blocks.1.ln", "blocks.2.ln", "norm"]
    torch.testing.assert_close(_out(model, idx), y0, atol=1e-5, rtol=1e-5)


def test_refuses_norm_feeding_the_residual():
    model = perturb(ResidualTap())
    x = torch.randn(3, 16)
    y0 = _out(model, x)
    report = fold_norm_affine(model).normlab_report
    assert report.left["ln"].startswith("cannot fold: its output also feeds `%add")
    assert "not a Linear layer (a non-linear path or the residual stream)" in report.left["ln"]
    torch.testing.assert_close(_out(model, x), y0)
    assert model.ln.weight is not None


def test_refuses_post_ln():
    model = perturb(nn.TransformerEncoder(
        nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 1, enable_nested_tensor=False))
    report = fold_norm_affine(model).normlab_report
    assert report.left["layers.0.norm1"].startswith("cannot fold: Post-LN: its output is the residual stream")


def test_refuses_tied_consumer():
    model = perturb(PreLNLM(tie=True))
    with torch.no_grad():
        model.ln_f.bias.zero_()
    report = fold_norm_affine(model).normlab_report
    assert "tied weights" in report.left["ln_f"] and "tok.weight" in report.left["ln_f"]


def test_torch_transformer_encoder_norm_folds_into_cross_attention_kv():
    torch.manual_seed(0)
    model = perturb(nn.Transformer(32, 4, 2, 2, 64, dropout=0.0, batch_first=True, norm_first=True))
    src, tgt = torch.randn(2, 6, 32), torch.randn(2, 5, 32)
    y0 = _out(model, src, tgt)
    report = fold_norm_affine(model).normlab_report
    assert "encoder.norm" in report.paths("folded")
    assert "decoder.layers.1.multihead_attn[kv]" in next(e.detail for e in report.entries if e.path == "encoder.norm")
    assert "decoder.layers.0.norm2" in report.paths("folded")  # the query rows only
    assert report.left["decoder.norm"].endswith("its output leaves the model (a model output); no consumer to fold into")
    torch.testing.assert_close(_out(model, src, tgt), y0, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name,folded,left", [
    ("llama", 5, {}),
    ("gpt2", 4, {"transformer.ln_f": "tied weights"}),
    ("t5", 10, {"encoder.final_layer_norm": "leaves the model", "decoder.final_layer_norm": "tied weights"}),
    ("bert", 0, {"bert.encoder.layer.0.output.LayerNorm": "Post-LN"}),
])
def test_hf_models(name, folded, left):
    torch.manual_seed(0)
    model = perturb(hf_model(name), scale=0.05)
    kw = hf_inputs(name)
    y0 = _out(model, **kw)
    report = fold_norm_affine(model).normlab_report
    assert len(report.paths("folded")) == folded
    for path, why in left.items():
        assert why in report.left[path]
    torch.testing.assert_close(_out(model, **kw), y0, atol=5e-5, rtol=5e-5)
