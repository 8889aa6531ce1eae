"""Each placement's forward equals its paper's equation, written by hand (reference.py)."""

from __future__ import annotations

import pytest
import torch

from normlab.models import (
    Seq2SeqTransformer,
    TransformerConfig,
    TransformerEncoder,
    TransformerLM,
    placement_names,
)
from normlab.norms import ResidualNorm
from tests.models.reference import deepnorm_alpha, embed_ref, linear, stack_ref

PLACEMENTS = ["post", "pre", "sandwich", "deepnorm", "subln", "resi_dual", "peri", "olmo2", "parallel", "none"]
# a parallel block has no cross-attention: a seq2seq model refuses it
SEQ2SEQ = [p for p in PLACEMENTS if p != "parallel"]
# (placement, placement_options): every placement, and the parallel block with two norms
VARIANTS = [(p, None) for p in PLACEMENTS] + [("parallel", {"shared_norm": False})]
VARIANT_IDS = [p if o is None else f"{p}-two-norms" for p, o in VARIANTS]


def test_registry_lists_every_placement():
    assert placement_names() == PLACEMENTS


def _cfg(placement, **kw):
    base = dict(vocab_size=23, d_model=16, n_heads=2, n_layers=2, d_ff=24, dropout=0.1,
                placement=placement, max_seq_len=16)
    base.update(kw)
    return TransformerConfig(**base)


def _randomize_norms(model, seed=0):
    """Norm affine parameters away from ones/zeros, so a norm in the wrong slot shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ResidualNorm):
                for p in m.parameters():
                    p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _prepare(model):
    return _randomize_norms(model).double().eval()


def _embedded(model, tokens, cfg):
    x = embed_ref(model.embed, tokens, cfg)
    if cfg.placement == "peri":                      # Peri-LN: x_0 = Norm(embeddings)
        x = model.embed.norm(x)
    else:
        assert model.embed.norm is None
    return x


@pytest.mark.parametrize("placement,options", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("residual_scale,positional", [(1.0, "learned"), (0.7, "sinusoidal")])
def test_lm_matches_equation(placement, options, residual_scale, positional):
    torch.manual_seed(0)
    cfg = _cfg(placement, residual_scale=residual_scale, positional=positional, placement_options=options)
    model = _prepare(TransformerLM(cfg))
    tokens = torch.randint(0, cfg.vocab_size, (2, 7))
    x = _embedded(model, tokens, cfg)
    h = stack_ref(placement, model, x, cfg, causal=True, alpha=deepnorm_alpha("decoder", 0, cfg.n_layers))
    torch.testing.assert_close(model(tokens), linear(model.head, h), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("placement,options", VARIANTS, ids=VARIANT_IDS)
def test_lm_with_rope_matches_equation(placement, options):
    torch.manual_seed(1)
    cfg = _cfg(placement, positional="rope", init="gpt2", placement_options=options)
    model = _prepare(TransformerLM(cfg))
    tokens = torch.randint(0, cfg.vocab_size, (2, 6))
    x = _embedded(model, tokens, cfg)
    h = stack_ref(placement, model, x, cfg, causal=True, alpha=deepnorm_alpha("decoder", 0, cfg.n_layers))
    torch.testing.assert_close(model(tokens), linear(model.head, h), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("placement,options", VARIANTS, ids=VARIANT_IDS)
def test_encoder_matches_equation(placement, options):
    torch.manual_seed(2)
    cfg = _cfg(placement, n_layers=3, activation="relu", residual_scale=1.3, placement_options=options)
    model = _prepare(TransformerEncoder(cfg, n_outputs=5))
    tokens = torch.randint(0, cfg.vocab_size, (3, 5))
    x = _embedded(model, tokens, cfg)
    h = stack_ref(placement, model, x, cfg, causal=False, alpha=deepnorm_alpha("encoder", 3, 0))
    torch.testing.assert_close(model.encode(tokens), h, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(model(tokens), linear(model.head, h), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("placement", SEQ2SEQ)
def test_seq2seq_matches_equation(placement):
    torch.manual_seed(3)
    cfg = _cfg(placement, n_layers=2, n_decoder_layers=3)
    model = _prepare(Seq2SeqTransformer(cfg))
    src = torch.randint(0, cfg.vocab_size, (2, 6))
    tgt = torch.randint(0, cfg.vocab_size, (2, 4))
    src_pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    memory = stack_ref(placement, model.encoder, _embedded(model, src, cfg), cfg, causal=False,
                       alpha=deepnorm_alpha("encoder", 2, 3), padding=src_pad)
    h = stack_ref(placement, model.decoder, _embedded(model, tgt, cfg), cfg, causal=True,
                  alpha=deepnorm_alpha("decoder", 2, 3), memory=memory, memory_padding=src_pad)
    # the memory at padded source positions is never read, so the logits match everywhere
    # (there the reference attends to real keys only, the model also to the position itself)
    torch.testing.assert_close(model(src, tgt, src_padding_mask=src_pad), linear(model.head, h),
                               rtol=1e-10, atol=1e-10)
    real = ~src_pad
    torch.testing.assert_close(model.encode(src, src_pad)[real], memory[real], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_placements_differ_from_each_other(placement):
    """The references above can fail: each placement's stack differs from every other
    placement's equation on the same weights (Sandwich and Peri-LN share the block and
    differ only by the embedding norm)."""
    torch.manual_seed(4)
    cfg = _cfg(placement)
    model = _prepare(TransformerLM(cfg))
    tokens = torch.randint(0, cfg.vocab_size, (1, 5))
    out = model.run_blocks(_embedded(model, tokens, cfg))
    compared = 0
    for other in PLACEMENTS:
        if other == placement or {placement, other} == {"sandwich", "peri"}:
            continue
        try:
            ref = stack_ref(other, model, _embedded(model, tokens, cfg), cfg, causal=True,
                            alpha=deepnorm_alpha("decoder", 0, cfg.n_layers))
        except (KeyError, TypeError):
            continue  # the other equation needs norms this placement does not have
        assert not torch.allclose(out, ref, atol=1e-3), other
        compared += 1
    assert compared >= 1 or placement == "none"  # every other equation has norms


def test_seq2seq_refuses_the_parallel_block():
    with pytest.raises(ValueError, match=r"placement 'parallel' .* does not support cross-attention"):
        Seq2SeqTransformer(_cfg("parallel"))
    with pytest.raises(ValueError, match=r"placement 'parallel' .* does not support cross-attention"):
        Seq2SeqTransformer(_cfg("parallel", placement_options={"shared_norm": False}))


# ---------------------------------------------------------------------------- norm counts

# per block: norms per sublayer (+ Sub-LN's inner norms on self-attention and FFN);
# per stack: the final norm; per model: Peri-LN's embedding norm
PER_SUBLAYER = {"post": 1, "pre": 1, "sandwich": 2, "deepnorm": 1, "subln": 1, "resi_dual": 1,
                "peri": 2, "olmo2": 1, "none": 0}
FINAL = {"post": 0, "pre": 1, "sandwich": 1, "deepnorm": 0, "subln": 1, "resi_dual": 1, "peri": 1,
         "olmo2": 1, "none": 0}
INNER = {"subln": 2}
EMBED = {"peri": 1}


def _norms(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, ResidualNorm)}


@pytest.mark.parametrize("placement", SEQ2SEQ)
@pytest.mark.parametrize("embedding_norm", [False, True])
def test_norm_counts(placement, embedding_norm):
    n, m = 3, 2
    cfg = _cfg(placement, n_layers=n, n_decoder_layers=m, embedding_norm=embedding_norm)
    emb = 1 if embedding_norm else EMBED.get(placement, 0)
    stack = lambda layers, subs: layers * (subs * PER_SUBLAYER[placement] + INNER.get(placement, 0)) + FINAL[placement]  # noqa: E731
    assert len(_norms(TransformerLM(cfg))) == stack(n, 2) + emb
    assert len(_norms(TransformerEncoder(cfg))) == stack(n, 2) + emb
    assert len(_norms(Seq2SeqTransformer(cfg))) == stack(n, 2) + stack(m, 3) + emb


@pytest.mark.parametrize("shared,per_block", [(True, 1), (False, 2)])
@pytest.mark.parametrize("embedding_norm", [False, True])
def test_parallel_norm_counts(shared, per_block, embedding_norm):
    """One shared input norm per block (GPT-J, PaLM), or one per branch (GPT-NeoX); plus
    the final norm."""
    n = 3
    cfg = _cfg("parallel", n_layers=n, embedding_norm=embedding_norm, placement_options={"shared_norm": shared})
    for model in (TransformerLM(cfg), TransformerEncoder(cfg)):
        assert len(_norms(model)) == n * per_block + 1 + embedding_norm
        assert set(model.blocks[0].norms) == ({"attn_in"} if shared else {"attn_in", "ffn_in"})


EXPECTED_BLOCK_NORMS = {
    "post": {"attn_add", "ffn_add"},
    "deepnorm": {"attn_add", "ffn_add"},
    "pre": {"attn_in", "ffn_in"},
    "sandwich": {"attn_in", "attn_out", "ffn_in", "ffn_out"},
    "peri": {"attn_in", "attn_out", "ffn_in", "ffn_out"},
    "subln": {"attn_in", "attn_inner", "ffn_in", "ffn_inner"},
    "resi_dual": {"attn_add", "ffn_add"},
    "olmo2": {"attn_out", "ffn_out"},
    "parallel": {"attn_in"},
    "none": set(),
}


@pytest.mark.parametrize("placement", SEQ2SEQ)
def test_module_names(placement):
    """The naming scheme diagnostics rely on (see the normlab.models docstring)."""
    cfg = _cfg(placement, norm="rmsnorm")
    model = Seq2SeqTransformer(cfg)
    for name in _norms(model):
        assert "norm" in name
    assert set(model.encoder.blocks[1].norms) == EXPECTED_BLOCK_NORMS[placement]
    cross = {k.replace("attn", "cross_attn") for k in EXPECTED_BLOCK_NORMS[placement] if k.startswith("attn")}
    if placement == "subln":
        cross = {"cross_attn_in"}  # Magneto: no inner norm, no gain on cross-attention
    assert set(model.decoder.blocks[0].norms) == EXPECTED_BLOCK_NORMS[placement] | cross
    params = dict(model.named_parameters())
    for stack in ("encoder", "decoder"):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert params[f"{stack}.blocks.1.attn.{proj}.weight"].shape == (16, 16)
        assert params[f"{stack}.blocks.1.ffn.w1.weight"].shape == (24, 16)
        assert params[f"{stack}.blocks.1.ffn.w2.weight"].shape == (16, 24)
    assert "decoder.blocks.0.cross_attn.v_proj.weight" in params
    if placement == "subln":
        assert params["decoder.blocks.0.norms.ffn_inner.weight"].shape == (24,)
    lm_names = dict(TransformerLM(cfg).named_modules())
    assert {"blocks.1.attn.out_proj", "blocks.1.ffn.w2", "embed.tokens", "head"} <= set(lm_names)
    assert ("final_norm" in lm_names) == (placement in {"pre", "sandwich", "subln", "resi_dual", "peri", "olmo2"})


def test_parallel_module_names():
    lm = TransformerLM(_cfg("parallel", norm="rmsnorm"))
    assert set(lm.blocks[1].norms) == EXPECTED_BLOCK_NORMS["parallel"]
    assert {"blocks.1.norms.attn_in", "final_norm"} <= set(_norms(lm))
