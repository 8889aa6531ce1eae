"""The audit judges a norm by what it computes: Gemma's gain is 1 + weight (a zero weight
is its init, a weight of -1 is dead), eps is read under every name Hugging Face uses
and judged in the statistics' dtype (float32 for half precision)."""

import warnings

import pytest
import torch

import normlab
from normlab.diagnostics import audit

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=16, num_attention_heads=2, num_hidden_layers=2, intermediate_size=32, vocab_size=64)


def _kinds(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [(f.severity, f.kind, f.module) for f in audit(model)]


def _gemma():
    torch.manual_seed(0)
    return transformers.GemmaForCausalLM(transformers.GemmaConfig(**SMALL, num_key_value_heads=2, head_dim=8))


def test_a_fresh_gemma_has_no_dead_norm():
    assert not [k for k in _kinds(_gemma()) if k[1] in ("dead-norm", "norm-far-from-init")]


def test_a_gemma_norm_whose_gain_is_zero_is_dead():
    model = _gemma()
    with torch.no_grad():
        model.model.norm.weight.fill_(-1.0)  # gain 1 + w = 0
    dead = [k for k in _kinds(model) if k[1] == "dead-norm"]
    assert dead == [("error", "dead-norm", "model.norm")]
    with torch.no_grad():
        model.model.norm.weight.fill_(0.0)
        model.model.layers[0].input_layernorm.weight.fill_(19.0)  # gain 20 where it started at 1
    assert ("warning", "norm-far-from-init", "model.layers.0.input_layernorm") in _kinds(model)


def test_normlab_offset_norms_are_judged_on_the_gain():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), normlab.RMSNorm(8, offset=1.0))
    assert not [k for k in _kinds(model) if k[1] == "dead-norm"]
    with torch.no_grad():
        model[1].weight.fill_(-1.0)
    assert ("error", "dead-norm", "1") in _kinds(model)


def test_eps_is_read_under_hugging_faces_names():
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, num_key_value_heads=2, rms_norm_eps=0.0))
    found = {k[2] for k in _kinds(llama) if k[1] == "eps-underflow"}
    assert "model.norm" in found and len(found) == 5  # variance_epsilon = 0 on every norm


def test_a_tiny_eps_in_half_precision_is_fine():
    """torch (and Hugging Face's norms) form the statistics in float32: eps=1e-12 on fp16
    parameters is no division by zero (a constant row normalizes to zeros)."""
    bert = transformers.BertModel(transformers.BertConfig(**SMALL, max_position_embeddings=32)).half()
    assert not [k for k in _kinds(bert) if k[1] == "eps-underflow"]
    ln = torch.nn.LayerNorm(8, eps=1e-12).half()
    assert torch.equal(ln(torch.full((1, 8), 3.0, dtype=torch.half)), torch.zeros(1, 8, dtype=torch.half))
    assert ("error", "eps-underflow", "1") in _kinds(torch.nn.Sequential(torch.nn.Linear(8, 8),
                                                                         torch.nn.LayerNorm(8, eps=0.0)))
