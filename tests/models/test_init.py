"""init: Xavier and GPT-2 schemes measured on the weights; DeepNorm and Sub-LN constants."""

from __future__ import annotations

import math

import pytest
import torch

from normlab.models import (
    Seq2SeqTransformer,
    TransformerConfig,
    TransformerEncoder,
    TransformerLM,
    deepnorm_constants,
    subln_gains,
)
from tests.models.reference import deepnorm_alpha, deepnorm_beta

PAIRS = [(6, 6), (18, 18), (100, 100), (0, 12), (12, 0)]


@pytest.mark.parametrize("n,m", PAIRS)
def test_deepnorm_constants(n, m):
    consts = deepnorm_constants(n, m)
    assert set(consts) == ({"encoder"} if n else set()) | ({"decoder"} if m else set())
    for role, c in consts.items():
        assert c.alpha == pytest.approx(deepnorm_alpha(role, n, m), rel=1e-12)
        assert c.beta == pytest.approx(deepnorm_beta(role, n, m), rel=1e-12)


def test_deepnorm_constants_published_values():
    # numbers worked out by hand from DeepNet's Table 1
    assert deepnorm_constants(0, 12)["decoder"].alpha == pytest.approx(24 ** 0.25)      # 2.2134
    assert deepnorm_constants(0, 12)["decoder"].beta == pytest.approx(96 ** -0.25)      # 0.3195
    assert deepnorm_constants(12, 0)["encoder"].alpha == pytest.approx(2.21336, rel=1e-5)
    enc, dec = deepnorm_constants(6, 6)["encoder"], deepnorm_constants(6, 6)["decoder"]
    assert enc.alpha == pytest.approx(0.81 * 6 ** (5 / 16))
    assert enc.beta == pytest.approx(0.87 * 6 ** (-5 / 16))
    assert dec.alpha == pytest.approx(18 ** 0.25) and dec.beta == pytest.approx(72 ** -0.25)
    assert deepnorm_constants(100, 100)["encoder"].alpha == pytest.approx(0.81 * 100 ** (5 / 16))
    with pytest.raises(ValueError, match="at least one stack"):
        deepnorm_constants(0, 0)
    with pytest.raises(ValueError, match="n_encoder_layers to be an int >= 0"):
        deepnorm_constants(-1, 3)


def test_subln_gains():
    assert subln_gains(0, 12) == {"decoder": pytest.approx(math.sqrt(math.log(24)))}
    g = subln_gains(6, 12)
    assert g["encoder"] == pytest.approx(math.sqrt(math.log(36) * math.log(12) / 3))
    assert g["decoder"] == pytest.approx(math.sqrt(math.log(36)))


def _same_seed(cls, cfg, **kw):
    torch.manual_seed(123)
    return cls(cfg, **kw)


BRANCH = ("attn.v_proj", "attn.out_proj", "ffn.w1", "ffn.w2")
PLAIN = ("attn.q_proj", "attn.k_proj")


@pytest.mark.parametrize("init", ["xavier", "gpt2"])
def test_deepnorm_beta_scales_ffn_value_and_output_projections(init):
    """The same seed gives the same draws; DeepNorm's are beta x Post-LN's exactly where
    DeepNet scales them (FFN, value, output projections) and equal elsewhere."""
    kw = dict(vocab_size=17, d_model=16, n_heads=2, n_layers=3, init=init)
    post = _same_seed(TransformerLM, TransformerConfig(placement="post", **kw))
    deep = _same_seed(TransformerLM, TransformerConfig(placement="deepnorm", **kw))
    beta = (8 * 3) ** -0.25
    p, d = dict(post.named_parameters()), dict(deep.named_parameters())
    for i in range(3):
        for name in BRANCH:
            torch.testing.assert_close(d[f"blocks.{i}.{name}.weight"], beta * p[f"blocks.{i}.{name}.weight"])
        for name in PLAIN:
            torch.testing.assert_close(d[f"blocks.{i}.{name}.weight"], p[f"blocks.{i}.{name}.weight"])
    torch.testing.assert_close(d["embed.tokens.weight"], p["embed.tokens.weight"])
    # measured: the branch weights' std is beta times the scheme's std
    if init == "xavier":
        w = torch.cat([d[f"blocks.{i}.attn.v_proj.weight"].flatten() for i in range(3)])
        assert w.std().item() == pytest.approx(beta * math.sqrt(2 / 32), rel=0.1)


def test_deepnorm_seq2seq_uses_encoder_and_decoder_betas():
    kw = dict(vocab_size=17, d_model=16, n_heads=2, n_layers=2, n_decoder_layers=4)
    post = dict(_same_seed(Seq2SeqTransformer, TransformerConfig(placement="post", **kw)).named_parameters())
    deep = dict(_same_seed(Seq2SeqTransformer, TransformerConfig(placement="deepnorm", **kw)).named_parameters())
    betas = {"encoder": deepnorm_beta("encoder", 2, 4), "decoder": deepnorm_beta("decoder", 2, 4)}
    names = list(BRANCH) + ["cross_attn.v_proj", "cross_attn.out_proj"]
    for stack, beta in betas.items():
        for name in names:
            key = f"{stack}.blocks.1.{name}.weight"
            if key in post:
                torch.testing.assert_close(deep[key], beta * post[key])
        torch.testing.assert_close(deep[f"{stack}.blocks.1.attn.q_proj.weight"],
                                   post[f"{stack}.blocks.1.attn.q_proj.weight"])
    assert "decoder.blocks.1.cross_attn.v_proj.weight" in post


def test_subln_gain_skips_cross_attention():
    kw = dict(vocab_size=17, d_model=16, n_heads=2, n_layers=2, n_decoder_layers=3)
    pre = dict(_same_seed(Seq2SeqTransformer, TransformerConfig(placement="pre", **kw)).named_parameters())
    sub = dict(_same_seed(Seq2SeqTransformer, TransformerConfig(placement="subln", **kw)).named_parameters())
    gains = subln_gains(2, 3)
    for stack in ("encoder", "decoder"):
        for name in BRANCH:
            key = f"{stack}.blocks.0.{name}.weight"
            torch.testing.assert_close(sub[key], gains[stack] * pre[key])
    for name in ("cross_attn.v_proj", "cross_attn.out_proj", "cross_attn.q_proj"):
        key = f"decoder.blocks.0.{name}.weight"
        torch.testing.assert_close(sub[key], pre[key])


def test_xavier_init():
    cfg = TransformerConfig(vocab_size=512, d_model=64, n_heads=4, n_layers=2, d_ff=128,
                            positional="rope", tie_embeddings=False)
    torch.manual_seed(0)
    model = TransformerLM(cfg)
    for name, p in model.named_parameters():
        if name.endswith(".bias") and "norms" not in name:
            assert torch.count_nonzero(p) == 0, name
    w1 = model.blocks[0].ffn.w1.weight
    bound = math.sqrt(6 / (64 + 128))
    assert w1.abs().max() <= bound
    assert w1.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    # each coordinate of the first block's input has unit variance
    x = model.eval().embed(torch.arange(512)[None])
    assert x.var().item() == pytest.approx(1.0, rel=0.05)
    assert x.var(dim=(0, 1)).min().item() > 0.6 and x.var(dim=(0, 1)).max().item() < 1.5


def test_xavier_tied_head_keeps_embedding_init():
    cfg = TransformerConfig(vocab_size=512, d_model=64, n_heads=4, n_layers=1)
    model = TransformerLM(cfg)
    assert model.head.weight is model.embed.tokens.weight
    assert model.embed.tokens.weight.std().item() == pytest.approx(64 ** -0.5, rel=0.05)


@pytest.mark.parametrize("cls", [TransformerLM, TransformerEncoder])
def test_gpt2_init(cls):
    n_layers = 4
    cfg = TransformerConfig(vocab_size=256, d_model=64, n_heads=4, n_layers=n_layers, init="gpt2")
    torch.manual_seed(0)
    model = cls(cfg)
    params = dict(model.named_parameters())
    q = torch.cat([params[f"blocks.{i}.attn.q_proj.weight"].flatten() for i in range(n_layers)])
    out = torch.cat([params[f"blocks.{i}.attn.out_proj.weight"].flatten() for i in range(n_layers)])
    w2 = torch.cat([params[f"blocks.{i}.ffn.w2.weight"].flatten() for i in range(n_layers)])
    assert q.std().item() == pytest.approx(0.02, rel=0.05)
    assert params["embed.tokens.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert out.std().item() == pytest.approx(0.02 / math.sqrt(2 * n_layers), rel=0.05)
    assert w2.std().item() == pytest.approx(0.02 / math.sqrt(2 * n_layers), rel=0.05)
    assert model.embed.scale == 1.0
