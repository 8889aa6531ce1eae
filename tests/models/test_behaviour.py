"""Causality, padding masks, dropout in eval, RoPE's relative positions, input checks."""

from __future__ import annotations

import pytest
import torch

from normlab.models import Seq2SeqTransformer, TransformerConfig, TransformerEncoder, TransformerLM
from normlab.models.attention import apply_rope, rope_tables

PLACEMENTS = ["post", "pre", "sandwich", "deepnorm", "subln", "resi_dual", "peri", "none"]


def _cfg(**kw):
    base = dict(vocab_size=19, d_model=16, n_heads=2, n_layers=2, d_ff=32, dropout=0.0, max_seq_len=12)
    base.update(kw)
    return TransformerConfig(**base)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_lm_is_causal(placement):
    torch.manual_seed(0)
    model = TransformerLM(_cfg(placement=placement, positional="rope")).eval()
    tokens = torch.randint(0, 19, (2, 9))
    changed = tokens.clone()
    changed[:, 5:] = (changed[:, 5:] + 7) % 19
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=1e-6)
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-3  # the future did change


def test_seq2seq_decoder_is_causal_and_reads_the_source():
    torch.manual_seed(1)
    model = Seq2SeqTransformer(_cfg(placement="pre")).eval()
    src, tgt = torch.randint(0, 19, (2, 6)), torch.randint(0, 19, (2, 8))
    tgt2 = tgt.clone()
    tgt2[:, 4:] = (tgt2[:, 4:] + 3) % 19
    a, b = model(src, tgt), model(src, tgt2)
    torch.testing.assert_close(a[:, :4], b[:, :4], rtol=0, atol=1e-6)
    assert (model(src.flip(1), tgt) - a).abs().max() > 1e-3


@pytest.mark.parametrize("norm", ["layernorm", "batchnorm", "powernorm"])
@pytest.mark.parametrize("placement", ["post", "peri", "subln", "resi_dual"])
def test_padding_changes_nothing_at_real_positions(placement, norm):
    """Train mode, so batch-statistics norms use batch statistics: they must skip padding."""
    torch.manual_seed(2)
    cfg = _cfg(placement=placement, norm=norm, embedding_norm=True)
    model = TransformerEncoder(cfg).train()
    tokens = torch.randint(0, 19, (3, 8))
    pad = torch.zeros(3, 8, dtype=torch.bool)
    pad[0, 5:] = True
    pad[2, 2:] = True
    other = torch.where(pad, (tokens + 5) % 19, tokens)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    a = model(tokens, pad)
    model.load_state_dict(state)  # running statistics back to where they were
    b = model(other, pad)
    torch.testing.assert_close(a[~pad], b[~pad], rtol=0, atol=1e-5)
    assert (other[pad] != tokens[pad]).all()  # the padded tokens did change
    if norm not in ("batchnorm", "powernorm"):
        # (a batch-statistics norm zeroes padded values: after one that ends the stack,
        # Post-LN's or Peri-LN's, every padded output is the same)
        assert (a[pad] - b[pad]).abs().max() > 1e-3


def test_padded_batch_equals_unpadded_sequences():
    torch.manual_seed(3)
    model = TransformerEncoder(_cfg(placement="pre")).eval()
    tokens = torch.randint(0, 19, (2, 7))
    pad = torch.tensor([[False] * 7, [False] * 4 + [True] * 3])
    out = model(tokens, pad)
    torch.testing.assert_close(out[1, :4], model(tokens[1:, :4])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0], model(tokens[:1])[0], rtol=1e-5, atol=1e-5)


def test_lm_left_padding_is_finite_and_changes_nothing():
    torch.manual_seed(4)
    model = TransformerLM(_cfg(placement="pre")).eval()
    tokens = torch.randint(0, 19, (2, 9))
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[0, :3] = True  # left padding: the first query has no real key at or before it
    out = model(tokens, pad)
    assert torch.isfinite(out).all()
    other = model(torch.where(pad, (tokens + 1) % 19, tokens), pad)
    torch.testing.assert_close(out[~pad], other[~pad], rtol=0, atol=1e-6)


def test_seq2seq_source_padding_changes_nothing():
    torch.manual_seed(5)
    model = Seq2SeqTransformer(_cfg(placement="sandwich", norm="batchnorm")).train()
    src, tgt = torch.randint(0, 19, (2, 6)), torch.randint(0, 19, (2, 5))
    src_pad = torch.tensor([[False] * 6, [False] * 3 + [True] * 3])
    tgt_pad = torch.tensor([[False] * 5, [False] * 4 + [True]])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    a = model(src, tgt, src_pad, tgt_pad)
    model.load_state_dict(state)
    b = model(torch.where(src_pad, 0, src), torch.where(tgt_pad, 0, tgt), src_pad, tgt_pad)
    torch.testing.assert_close(a[~tgt_pad], b[~tgt_pad], rtol=0, atol=1e-5)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_dropout_only_in_training(placement):
    torch.manual_seed(6)
    cfg = _cfg(placement=placement, dropout=0.5, attention_dropout=0.5)
    model = TransformerLM(cfg)
    quiet = TransformerLM(_cfg(placement=placement))
    quiet.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 19, (2, 8))
    model.eval()
    torch.testing.assert_close(model(tokens), quiet.eval()(tokens), rtol=0, atol=0)
    model.train()
    assert (model(tokens) - model(tokens)).abs().max() > 1e-3


def test_rope_scores_depend_on_relative_position_only():
    torch.manual_seed(7)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    cos, sin = rope_tables(20, 8, torch.float32, torch.device("cpu"))

    def score(tq, tk):
        return (apply_rope(q, cos[tq:tq + 1], sin[tq:tq + 1]) * apply_rope(k, cos[tk:tk + 1], sin[tk:tk + 1])).sum()

    torch.testing.assert_close(score(5, 2), score(15, 12), rtol=1e-5, atol=1e-5)
    assert (score(5, 2) - score(5, 4)).abs() > 1e-3
    assert (apply_rope(q, cos[:1], sin[:1]) - q).abs().max() == 0  # position 0 is not rotated


def test_bad_inputs_give_clear_errors():
    model = TransformerLM(_cfg())
    with pytest.raises(ValueError, match=r"with seq_len <= max_seq_len=12, got seq_len 13"):
        model(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match=r"tokens of shape \[batch, seq_len\] and dtype torch.long"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"padding_mask of shape \(1, 4\).*torch.bool"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="n_outputs"):
        TransformerEncoder(_cfg(), n_outputs=0)


def test_lm_loss_leaves_out_padded_positions():
    from normlab.models import TransformerConfig, TransformerLM

    torch.manual_seed(0)
    m = TransformerLM(TransformerConfig(vocab_size=50, d_model=32, n_heads=2, n_layers=1, dropout=0.0)).eval()
    tokens = torch.randint(1, 50, (2, 8))
    targets = torch.randint(1, 50, (2, 8))
    pad = torch.zeros(2, 8, dtype=torch.bool)
    pad[1, 5:] = True
    got = m.loss(tokens, targets, pad)
    # the mean cross-entropy over the real positions alone, written out
    logp = torch.log_softmax(m(tokens, pad).float(), dim=-1)
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    want = nll[~pad].sum() / (~pad).sum()
    torch.testing.assert_close(got, want)
    every = nll.mean()
    assert not torch.allclose(got, every)  # (the padded positions would have counted)


def test_seq2seq_decode_names_a_bad_memory_or_source_mask():
    # decode took any memory and src_padding_mask: a float or int mask, one of the wrong
    # length or memory of another width failed inside attention with torch's messages
    m = Seq2SeqTransformer(TransformerConfig(vocab_size=20, d_model=16, n_heads=2, n_layers=1, dropout=0.0)).eval()
    src, tgt = torch.randint(0, 20, (2, 4)), torch.randint(0, 20, (2, 3))
    memory = m.encode(src)
    for bad in (torch.zeros(2, 4, 8), torch.zeros(3, 4, 16), torch.zeros(2, 4, 16, dtype=torch.long), "memory"):
        with pytest.raises(ValueError, match=r"expected memory to be a floating-point tensor of shape \[2, S, 16\]"):
            m.decode(tgt, bad)
    for mask in (torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 3, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"expected src_padding_mask of shape \(2, 4\)"):
            m.decode(tgt, memory, mask)
    pad = torch.tensor([[False, False, True, True], [False] * 4])
    torch.testing.assert_close(m.decode(tgt, m.encode(src, pad), pad), m(src, tgt, pad), rtol=0, atol=0)


def test_config_names_an_eps_its_norm_refuses():
    # TransformerConfig(norm="scalenorm", norm_eps=0.0) was accepted; building the model
    # then failed naming ScaleNorm's own "eps"
    with pytest.raises(ValueError, match=r"norm 'scalenorm' refuses norm_eps=0.0: ScaleNorm: expected eps"):
        TransformerConfig(norm="scalenorm", norm_eps=0.0)
    assert TransformerConfig(norm="layernorm", norm_eps=0.0).norm_eps == 0.0  # torch's LayerNorm takes it


def test_config_builds_its_norm_at_d_model(monkeypatch):
    # the config's check built the norm at size 1: a registered norm with a rule on its
    # size (divisible by its groups) was refused at any d_model, and the message blamed
    # norm_eps
    from torch import nn

    from normlab.norms import registry

    class GroupFeatNorm(nn.LayerNorm):
        """y = LN over groups of features (a test norm)."""

        def __init__(self, dim, eps=1e-5, groups=4):
            if dim % groups:
                raise ValueError(f"GroupFeatNorm: dim {dim} not divisible by groups {groups}")
            super().__init__(dim, eps=eps)

    monkeypatch.setitem(registry._REGISTRY, "groupfeat", registry.NormEntry("groupfeat", GroupFeatNorm, True))
    assert TransformerConfig(d_model=16, n_heads=2, norm="groupfeat").norm == "groupfeat"
    with pytest.raises(ValueError, match=r"norm 'groupfeat' refuses d_model=18: GroupFeatNorm: dim 18"):
        TransformerConfig(d_model=18, n_heads=2, norm="groupfeat")
    with pytest.raises(ValueError, match=r"norm 'groupfeat' refuses norm_eps=1e-05, norm_options \{'groups': 3\}"):
        TransformerConfig(d_model=16, n_heads=2, norm="groupfeat", norm_options={"groups": 3})


@pytest.mark.parametrize("positional", ["learned", "sinusoidal", "rope"])
def test_left_padding_keeps_the_real_tokens_positions(positional):
    # learned and sinusoidal positions were 0..T-1 whatever the padding: left-padded real
    # tokens were shifted (their outputs off by 0.1-1.9)
    torch.manual_seed(5)
    model = TransformerLM(_cfg(placement="pre", positional=positional, dropout=0.0)).eval()
    real = torch.randint(0, 19, (1, 6))
    tokens = torch.cat([torch.zeros(1, 3, dtype=torch.long), real], dim=1)
    pad = torch.zeros(1, 9, dtype=torch.bool)
    pad[0, :3] = True
    torch.testing.assert_close(model(tokens, pad)[0, 3:], model(real)[0], rtol=0, atol=1e-5)
    right = torch.cat([real, torch.zeros(1, 3, dtype=torch.long)], dim=1)  # right padding: bit for bit
    assert torch.equal(model(right, pad.flip(1))[0, :6], model(right)[0, :6])


def test_token_ids_outside_the_vocabulary_are_named():
    model = TransformerLM(_cfg())
    for bad in (19, -1):
        tokens = torch.zeros(2, 4, dtype=torch.long)
        tokens[1, 2] = bad
        with pytest.raises(ValueError, match=rf"TransformerLM: expected tokens in \[0, 19\) \(vocab_size\), "
                                             rf"got values from {min(bad, 0)} to {max(bad, 0)}"):
            model(tokens)
    s2s = Seq2SeqTransformer(_cfg())
    with pytest.raises(ValueError, match=r"expected tgt in \[0, 19\)"):
        s2s(torch.zeros(1, 3, dtype=torch.long), torch.full((1, 2), 25))


def test_lm_loss_checks_its_targets_and_keeps_float64():
    torch.manual_seed(6)
    model = TransformerLM(_cfg()).double().eval()
    tokens = torch.randint(0, 19, (2, 3))
    with pytest.raises(ValueError, match=r"expected targets of tokens' shape \(2, 3\) and an integer dtype, "
                                         r"got \(3, 2\)"):
        model.loss(tokens, torch.randint(0, 19, (3, 2)))  # the same number of elements: it was taken
    with pytest.raises(ValueError, match="integer dtype, got .*float"):
        model.loss(tokens, tokens.double())
    targets = torch.randint(0, 19, (2, 3))
    logp = torch.log_softmax(model(tokens), dim=-1)
    want = -logp.gather(-1, targets.unsqueeze(-1)).mean()
    assert model.loss(tokens, targets).dtype == torch.float64
    torch.testing.assert_close(model.loss(tokens, targets), want, rtol=1e-14, atol=0)


def test_lm_loss_of_uint8_targets_with_padding():
    # the padding fill (-100) ran before the cast: in uint8 it wrapped to 156, a real token
    torch.manual_seed(7)
    model = TransformerLM(_cfg(vocab_size=256)).eval()
    tokens = torch.randint(0, 256, (2, 6))
    targets = torch.randint(0, 256, (2, 6))
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0, 4:] = True
    torch.testing.assert_close(model.loss(tokens, targets.to(torch.uint8), pad), model.loss(tokens, targets, pad),
                               rtol=0, atol=0)


def test_token_check_leaves_fake_tensors_alone():
    # fake tensors report is_cpu: the range check read their values and raised
    # DataDependentOutputException under FakeTensorMode
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = TransformerLM(_cfg())
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        out = model(mode.from_tensor(torch.zeros(2, 4, dtype=torch.long)))
    assert tuple(out.shape) == (2, 4, 19)
