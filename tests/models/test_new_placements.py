"""OLMo 2's and the parallel block's placements, and QK-norm: equations, dropout, norms,
and the model-level checks the older placements have (causality, autocast, checkpoints)."""

from __future__ import annotations

import math

import pytest
import torch

import normlab
from normlab.models import (
    Attention,
    Block,
    Seq2SeqTransformer,
    Stream,
    TransformerEncoder,
    TransformerLM,
    load_model,
    save_model,
)
from normlab.models.placement import PostNorm, get_placement
from normlab.norms import ResidualNorm
from tests.models.reference import (
    attention_ref,
    embed_ref,
    ffn_ref,
    head_norm_ref,
    linear,
    stack_ref,
)
from tests.models.test_placements import _cfg as placements_cfg
from tests.models.test_placements import _randomize_norms

NEW = [("olmo2", None), ("parallel", None), ("parallel", {"shared_norm": False})]
NEW_IDS = ["olmo2", "parallel", "parallel-two-norms"]


def _cfg(placement="pre", **kw):
    return placements_cfg(placement, **{"dropout": 0.0, **kw})


# ---------------------------------------------------------------------------- equations


@pytest.mark.parametrize("placement,options", NEW, ids=NEW_IDS)
def test_train_mode_without_dropout_matches_equation(placement, options):
    """The equation holds in training mode too (the eval-mode tests are in test_placements)."""
    torch.manual_seed(0)
    cfg = _cfg(placement, placement_options=options, residual_scale=0.8)
    model = _randomize_norms(TransformerLM(cfg)).double().train()
    tokens = torch.randint(0, cfg.vocab_size, (2, 7))
    h = stack_ref(placement, model, embed_ref(model.embed, tokens, cfg), cfg, causal=True)
    torch.testing.assert_close(model(tokens), linear(model.head, h), rtol=1e-10, atol=1e-10)


def test_parallel_with_two_norms_reads_each_norm():
    """With two norms the FFN reads ffn_in: the shared-norm equation on the same weights
    differs, so the equation test above can fail."""
    torch.manual_seed(1)
    cfg = _cfg("parallel", placement_options={"shared_norm": False})
    model = _randomize_norms(TransformerLM(cfg)).double().eval()
    tokens = torch.randint(0, cfg.vocab_size, (1, 6))
    x = embed_ref(model.embed, tokens, cfg)
    out = model.run_blocks(x)
    n = model.blocks[0].norms
    assert n["attn_in"] is not n["ffn_in"]
    shared = x
    for b in model.blocks:
        h = b.norms["attn_in"](shared)
        shared = shared + attention_ref(b.attn, h, causal=True) + ffn_ref(b.ffn, h)
    assert not torch.allclose(out, model.final_norm(shared), atol=1e-3)


def test_parallel_block_reads_one_stream_value_and_fuses_the_previous_add():
    """Both sublayers read the stream as the block received it (x + the previous block's
    pending branch, added by the first norm's fused op); the block returns the attention
    branch as pending and the FFN branch already added."""
    torch.manual_seed(2)
    cfg = _cfg("parallel", placement_options={"shared_norm": False}, n_layers=3)
    model = _randomize_norms(TransformerLM(cfg)).double().eval()
    seen, outs = {}, []
    block = model.blocks[1]

    def record(name):
        def hook(mod, args, kwargs, out):
            residual = args[1] if len(args) > 1 else kwargs.get("residual")
            seen[name] = (args[0] if residual is None else residual + args[0], residual is not None)
        return hook

    for name, norm in block.norms.items():
        norm.register_forward_hook(record(name), with_kwargs=True)
    block.register_forward_pre_hook(lambda mod, args: outs.append(args[0]))
    block.register_forward_hook(lambda mod, args, out: outs.append(out))
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (2, 8)))
    before, after = outs
    assert before.pending is not None  # the previous parallel block left its attention branch
    torch.testing.assert_close(seen["attn_in"][0], before.value)
    torch.testing.assert_close(seen["ffn_in"][0], before.value)
    assert seen["attn_in"][1] and not seen["ffn_in"][1]  # one fused add; the FFN norm reads the sum
    with torch.no_grad():
        x = before.value
        a = attention_ref(block.attn, block.norms["attn_in"](x), causal=True)
        f = ffn_ref(block.ffn, block.norms["ffn_in"](x))
    torch.testing.assert_close(after.pending, a)
    torch.testing.assert_close(after.x, x + f)
    torch.testing.assert_close(block.residual_stream(after), x + a + f)


# ---------------------------------------------------------------------------- dropout


def _masks(delta, branch, p, atol=1e-10):
    """Which coordinates of ``delta`` are ``branch / (1 - p)`` (kept) or 0 (dropped)."""
    kept = torch.isclose(delta, branch / (1 - p), rtol=0, atol=atol)
    dropped = delta.abs() <= atol
    return kept, dropped


@pytest.mark.parametrize("shared", [True, False])
def test_parallel_dropout_is_per_branch(shared):
    """x + dropout(Attn) + dropout(FFN) with two independent masks (GPT-NeoX), not one
    dropout on the sum: the stream after the block holds all four kept/dropped pairs."""
    torch.manual_seed(3)
    p = 0.5
    cfg = _cfg("parallel", n_layers=1, d_model=32, n_heads=2, dropout=p,
               placement_options={"shared_norm": shared})
    model = _randomize_norms(TransformerLM(cfg)).double().train()
    x = torch.randn(4, 10, 32, dtype=torch.float64)
    got = {}

    def record(mod, args, kwargs, out):
        got["stream"] = out[1]  # (Norm(residual + dropout(pending)), residual + dropout(pending))

    model.final_norm.register_forward_hook(record, with_kwargs=True)
    model.run_blocks(x)
    b = model.blocks[0]
    with torch.no_grad():
        a = attention_ref(b.attn, b.norms["attn_in"](x), causal=True)
        f = ffn_ref(b.ffn, (b.norms["attn_in"] if shared else b.norms["ffn_in"])(x))
    delta = got["stream"].detach() - x
    combos = {
        "both": torch.isclose(delta, (a + f) / (1 - p), rtol=0, atol=1e-10),
        "attn": torch.isclose(delta, a / (1 - p), rtol=0, atol=1e-10),
        "ffn": torch.isclose(delta, f / (1 - p), rtol=0, atol=1e-10),
        "none": delta.abs() <= 1e-10,
    }
    assert torch.stack(list(combos.values())).any(0).all()  # every coordinate is one of the four
    for name, hit in combos.items():
        assert 0.1 < hit.double().mean() < 0.4, name  # each about 1/4: independent masks


def test_olmo2_dropout_acts_on_the_normalized_branch():
    """x + dropout(Norm_out(F(x))): each coordinate of the added branch is kept and
    scaled by 1 / (1 - p), or dropped; nothing is left pending."""
    torch.manual_seed(4)
    p = 0.4
    model = _randomize_norms(TransformerLM(_cfg("olmo2", n_layers=1, dropout=p))).double().train()
    block = model.blocks[0]
    x = torch.randn(3, 9, 16, dtype=torch.float64)
    after = block.sublayer("attn", Stream(x), lambda h: block.attn(h, is_causal=True), p, None)
    assert after.pending is None
    with torch.no_grad():
        fa = block.norms["attn_out"](attention_ref(block.attn, x, causal=True))
    kept, dropped = _masks(after.x.detach() - x, fa, p)
    assert (kept | dropped).all() and 0.4 < kept.double().mean() < 0.8


@pytest.mark.parametrize("placement,options", NEW, ids=NEW_IDS)
def test_dropout_only_in_training(placement, options):
    torch.manual_seed(6)
    model = TransformerLM(_cfg(placement, placement_options=options, dropout=0.5, attention_dropout=0.5))
    quiet = TransformerLM(_cfg(placement, placement_options=options))
    quiet.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 23, (2, 8))
    torch.testing.assert_close(model.eval()(tokens), quiet.eval()(tokens), rtol=0, atol=0)
    model.train()
    assert (model(tokens) - model(tokens)).abs().max() > 1e-3


# ---------------------------------------------------------------------------- structure


def test_a_parallel_placement_takes_no_add_slot_and_no_cross_attention():
    class ParallelPost(PostNorm):
        parallel = True

    with pytest.raises(ValueError, match=r"parallel placement takes 'in', 'out' and 'inner' norm slots.*'add'"):
        Block(_cfg("post"), ParallelPost(), causal=True, cross_attention=False)
    parallel = get_placement("parallel")()
    with pytest.raises(ValueError, match="does not support cross-attention"):
        Block(_cfg("parallel"), parallel, causal=True, cross_attention=True)


def test_placement_options_reach_the_placement():
    model = TransformerLM(_cfg("parallel", placement_options={"shared_norm": False}))
    assert model.placement.shared_norm is False and all(b.placement.shared_norm is False for b in model.blocks)
    assert "shared_norm=False" in repr(model.blocks[0])
    assert TransformerLM(_cfg("parallel")).placement.shared_norm is True
    assert get_placement("parallel").options == ("shared_norm",) and get_placement("olmo2").options == ()


@pytest.mark.parametrize("placement,options", NEW, ids=NEW_IDS)
def test_lm_is_causal(placement, options):
    torch.manual_seed(7)
    model = TransformerLM(_cfg(placement, placement_options=options, positional="rope", qk_norm="rmsnorm")).eval()
    tokens = torch.randint(0, 23, (2, 9))
    changed = tokens.clone()
    changed[:, 5:] = (changed[:, 5:] + 7) % 23
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=1e-6)
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-3


@pytest.mark.parametrize("placement,options", NEW, ids=NEW_IDS)
def test_padding_changes_nothing_at_real_positions(placement, options):
    torch.manual_seed(8)
    model = TransformerEncoder(_cfg(placement, placement_options=options, norm="batchnorm")).train()
    tokens = torch.randint(0, 23, (3, 8))
    pad = torch.zeros(3, 8, dtype=torch.bool)
    pad[0, 5:] = True
    pad[2, 2:] = True
    state = {k: v.clone() for k, v in model.state_dict().items()}
    a = model(tokens, pad)
    model.load_state_dict(state)
    b = model(torch.where(pad, (tokens + 5) % 23, tokens), pad)
    torch.testing.assert_close(a[~pad], b[~pad], rtol=0, atol=1e-5)


def test_safetensors_round_trip_keeps_placement_options_and_qk_norm(tmp_path):
    torch.manual_seed(10)
    model = _randomize_norms(TransformerLM(_cfg("parallel", placement_options={"shared_norm": False},
                                                qk_norm="layernorm"))).eval()
    save_model(model, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors").eval()
    assert loaded.cfg == model.cfg and loaded.cfg.placement_options == {"shared_norm": False}
    assert "blocks.0.norms.ffn_in.weight" in loaded.state_dict()
    assert "blocks.0.attn.q_norm.bias" in loaded.state_dict()
    tokens = torch.randint(0, 23, (2, 6))
    torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)


# ---------------------------------------------------------------------------- QK-norm


def _attention_inputs(cross, rope):
    """x [2, 5, 24], a context [2, 7, 24] for cross-attention, and RoPE tables (head_dim 8)."""
    from normlab.models.attention import rope_tables

    x = torch.randn(2, 5, 24, dtype=torch.float64)
    ctx = torch.randn(2, 7, 24, dtype=torch.float64) if cross else None
    return x, ctx, rope_tables(5, 8, torch.float64, x.device) if rope else None


@pytest.mark.parametrize("qk_norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("cross,rope", [(False, False), (False, True), (True, False)])
def test_attention_with_qk_norm_matches_reference(qk_norm, cross, rope):
    """Q_h = Norm_q(W_q x)_h, K_h = Norm_k(W_k context)_h per head, before RoPE, written out."""
    torch.manual_seed(11)
    attn = _randomize_norms(Attention(24, 3, qk_norm=qk_norm, qk_norm_eps=1e-6)).double().eval()
    assert attn.q_norm.normalized_shape == (8,) and attn.q_norm.eps == 1e-6
    assert attn.q_norm is not attn.k_norm
    x, ctx, rope_t = _attention_inputs(cross, rope)
    out = attn(x, ctx, is_causal=not cross, rope=rope_t)
    ref = attention_ref(attn, x, ctx, causal=not cross, rope=rope)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    plain = Attention(24, 3).double()
    plain.load_state_dict(attn.state_dict(), strict=False)
    assert not torch.allclose(plain(x, ctx, is_causal=not cross, rope=rope_t), out, atol=1e-3)


@pytest.mark.parametrize("qk_norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("cross,rope", [(False, True), (True, False)])
def test_attention_with_qk_norm_over_the_projection_matches_reference(qk_norm, cross, rope):
    """OLMo 2's scope: Q = Norm_q(W_q x) over all d_model features, then the head split."""
    torch.manual_seed(15)
    attn = _randomize_norms(Attention(24, 3, qk_norm=qk_norm, qk_norm_eps=1e-6,
                                      qk_norm_scope="projection")).double().eval()
    assert attn.q_norm.normalized_shape == (24,) and attn.k_norm.normalized_shape == (24,)
    x, ctx, rope_t = _attention_inputs(cross, rope)
    out = attn(x, ctx, is_causal=not cross, rope=rope_t)
    torch.testing.assert_close(out, attention_ref(attn, x, ctx, causal=not cross, rope=rope), rtol=1e-10, atol=1e-10)
    # not the per-head norm: the heads share one statistic
    per_head = Attention(24, 3, qk_norm=qk_norm, qk_norm_eps=1e-6).double().eval()
    per_head.load_state_dict({k: v for k, v in attn.state_dict().items() if "_norm" not in k}, strict=False)
    assert not torch.allclose(per_head(x, ctx, is_causal=not cross, rope=rope_t), out, atol=1e-3)


def test_qk_norm_scope_in_the_config_reaches_every_attention():
    cfg = _cfg("pre", qk_norm="rmsnorm", qk_norm_scope="projection")
    model = Seq2SeqTransformer(cfg)
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    assert attns and all(a.qk_norm_scope == "projection" and a.q_norm.normalized_shape == (cfg.d_model,)
                         for a in attns)
    with pytest.raises(ValueError, match="qk_norm_scope"):
        _cfg("pre", qk_norm="rmsnorm", qk_norm_scope="heads")
    with pytest.raises(ValueError, match="qk_norm_scope"):
        Attention(24, 3, qk_norm="rmsnorm", qk_norm_scope="all")


@pytest.mark.parametrize("qk_norm", ["rmsnorm", "layernorm"])
def test_qk_norm_on_a_strided_head_view(qk_norm):
    """The norms normalize the last dim of any view: on [B, H, T, hd] from a transpose
    (not contiguous) they match the reference, forward and backward."""
    torch.manual_seed(12)
    norm = _randomize_norms(normlab.build_norm(qk_norm, 8, eps=None)).double()
    y = torch.randn(2, 5, 3, 8, dtype=torch.float64).transpose(1, 2).requires_grad_()
    assert not y.is_contiguous()
    out = norm(y)
    ref = head_norm_ref(norm, y)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [y, norm.weight], g)
    want = torch.autograd.grad(ref, [y, norm.weight], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scope", ["head", "projection"])
@pytest.mark.parametrize("placement,options", [("pre", None), *NEW], ids=["pre", *NEW_IDS])
def test_lm_with_qk_norm_matches_equation(placement, options, scope):
    torch.manual_seed(13)
    cfg = _cfg(placement, placement_options=options, qk_norm="rmsnorm", positional="rope", norm_eps=None,
               qk_norm_scope=scope)
    model = _randomize_norms(TransformerLM(cfg)).double().eval()
    assert model.blocks[0].attn.q_norm.eps is None  # norm_eps None: the norm's default
    tokens = torch.randint(0, cfg.vocab_size, (2, 7))
    h = stack_ref(placement, model, embed_ref(model.embed, tokens, cfg), cfg, causal=True)
    torch.testing.assert_close(model(tokens), linear(model.head, h), rtol=1e-10, atol=1e-10)


def test_seq2seq_with_qk_norm_normalizes_cross_attention_too():
    torch.manual_seed(14)
    cfg = _cfg("pre", qk_norm="layernorm", norm_eps=1e-6)
    model = _randomize_norms(Seq2SeqTransformer(cfg)).double().eval()
    cross = model.decoder.blocks[0].cross_attn
    assert isinstance(cross.q_norm, normlab.LayerNorm) and cross.k_norm.eps == 1e-6
    src, tgt = torch.randint(0, 23, (2, 6)), torch.randint(0, 23, (2, 4))
    memory = stack_ref("pre", model.encoder, embed_ref(model.embed, src, cfg), cfg, causal=False)
    h = stack_ref("pre", model.decoder, embed_ref(model.embed, tgt, cfg), cfg, causal=True, memory=memory)
    torch.testing.assert_close(model(src, tgt), linear(model.head, h), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("init", ["xavier", "gpt2"])
@pytest.mark.parametrize("placement,options", NEW, ids=NEW_IDS)
def test_init_leaves_norms_at_identity(placement, options, init):
    torch.manual_seed(15)
    model = TransformerLM(_cfg(placement, placement_options=options, qk_norm="layernorm", init=init))
    norms = {n: m for n, m in model.named_modules() if isinstance(m, ResidualNorm)}
    assert {"blocks.0.attn.q_norm", "blocks.0.attn.k_norm", "final_norm"} <= set(norms)
    for name, m in norms.items():
        assert torch.equal(m.weight, torch.ones_like(m.weight)), name
        assert torch.equal(m.bias, torch.zeros_like(m.bias)), name
    # the projections around them did get the scheme's init
    q = model.blocks[0].attn.q_proj.weight
    std = 0.02 if init == "gpt2" else math.sqrt(2 / 32)
    assert q.std().item() == pytest.approx(std, rel=0.3)
