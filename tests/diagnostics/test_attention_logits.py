"""AttentionLogitMonitor: the largest attention logit per self-attention layer, recomputed
from each call's inputs, over the positions the call may attend to."""

import math

import pytest
import torch

from normlab.diagnostics import AttentionLogitMonitor
from normlab.models import Seq2SeqTransformer, TransformerConfig, TransformerEncoder, TransformerLM


def _logits_by_hand(attn, x, rope=None, causal=True, allowed=None):
    """softmax's input for ``attn`` on ``x``, written out: heads, QK-norm, RoPE, scale."""
    b, t, d = x.shape
    h, hd = attn.n_heads, attn.head_dim
    q = attn.q_proj(x).view(b, t, h, hd)
    k = attn.k_proj(x).view(b, t, h, hd)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    if rope is not None:
        cos, sin = rope

        def rot(z):
            z1, z2 = z.chunk(2, dim=-1)
            return torch.cat((z1 * cos - z2 * sin, z2 * cos + z1 * sin), dim=-1)

        q, k = rot(q), rot(k)
    logits = q @ k.transpose(-2, -1) / math.sqrt(hd)
    mask = torch.ones(t, t, dtype=torch.bool).tril() if causal else torch.ones(t, t, dtype=torch.bool)
    if allowed is not None:
        mask = mask & allowed
    return logits.masked_fill(~mask, -math.inf)


@pytest.mark.parametrize("qk_norm,positional", [(None, "learned"), ("layernorm", "rope"), ("rmsnorm", "learned")])
def test_the_largest_logit_of_each_layer_is_what_softmax_sees(qk_norm, positional):
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=64, d_model=16, n_heads=2, n_layers=3, d_ff=32, dropout=0.0,
                            qk_norm=qk_norm, positional=positional, max_seq_len=32)
    model = TransformerLM(cfg).eval()
    tokens = torch.randint(0, 64, (3, 20))
    inputs = []
    hooks = [b.attn.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for b in model.blocks]
    reference = model(tokens)
    for h in hooks:
        h.remove()
    with AttentionLogitMonitor(model) as monitor:
        out = model(tokens)
    assert torch.equal(out, reference)  # the model's own forward is untouched
    rope = None
    if positional == "rope":
        from normlab.models.attention import rope_tables

        rope = rope_tables(20, cfg.head_dim, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        expected = [float(_logits_by_hand(b.attn, x, rope).amax()) for b, x in zip(model.blocks, inputs)]
    assert monitor.by_layer() == pytest.approx(expected, rel=1e-5)
    # the causal mask matters: the largest logit over every pair is at least as large
    with torch.no_grad():
        unmasked = [float(_logits_by_hand(b.attn, x, rope, causal=False).amax())
                    for b, x in zip(model.blocks, inputs)]
    assert all(u >= e for u, e in zip(unmasked, expected))


def test_several_calls_keep_the_maximum_and_hooks_go_away():
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=64, d_model=16, n_heads=2, n_layers=2, d_ff=32))
    small, large = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 16))
    with AttentionLogitMonitor(model) as monitor:
        model(small)
        first = monitor.by_layer()
        model(large)
    both = monitor.by_layer()
    assert all(b >= f for b, f in zip(both, first))
    assert all(not m._forward_hooks for _, m in monitor.modules)
    with AttentionLogitMonitor(model) as again:
        pass
    assert all(math.isnan(v) for v in again.by_layer())  # not called: no value


def test_padding_masks_and_cross_attention():
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=64, d_model=16, n_heads=2, n_layers=1, d_ff=32, dropout=0.0)
    enc = TransformerEncoder(cfg).eval()
    tokens = torch.randint(0, 64, (2, 10))
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[0, 6:] = True
    seen = []
    hook = enc.blocks[0].attn.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with AttentionLogitMonitor(enc) as monitor:
        enc(tokens, padding_mask=pad)
    hook.remove()
    x = seen[0]
    allowed = (~pad[:, None, None, :]) | torch.eye(10, dtype=torch.bool)
    with torch.no_grad():
        expected = _logits_by_hand(enc.blocks[0].attn, x, causal=False, allowed=allowed).amax()
    assert monitor.by_layer() == pytest.approx([float(expected)], rel=1e-5)
    # seq2seq: the encoder's and decoder's self-attention, not the cross-attention
    s2s = Seq2SeqTransformer(TransformerConfig(vocab_size=64, d_model=16, n_heads=2, n_layers=2, d_ff=32))
    names = [n for n, _ in AttentionLogitMonitor(s2s).modules]
    assert len(names) == 4 and not any(n.endswith("cross_attn") for n in names)


@pytest.mark.parametrize("scope", ["head", "projection"])
def test_recomputing_the_logits_is_recorded_by_no_other_monitor(scope):
    # ActivationMonitor beside it sees each QK-norm once per forward, as without it; the
    # modules' own hooks still run for the recomputation (FSDP's unshard, casts)
    from collections import Counter

    from normlab.diagnostics import ActivationMonitor

    torch.manual_seed(0)
    lm = TransformerLM(TransformerConfig(vocab_size=50, d_model=16, n_heads=2, n_layers=2, d_ff=32, dropout=0.0,
                                         qk_norm="rmsnorm", qk_norm_scope=scope, max_seq_len=16))
    tok = torch.randint(0, 50, (2, 5))
    calls = Counter()
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: calls.update([n]))
               for n, m in lm.named_modules() if n.endswith(("q_proj", "k_proj", "q_norm", "k_norm"))]
    with ActivationMonitor(lm) as alone:
        lm(tok)
    before = dict(calls)
    calls.clear()
    with ActivationMonitor(lm) as am, AttentionLogitMonitor(lm) as logits:
        lm(tok)
    for h in handles:
        h.remove()
    assert dict(calls) == {name: 2 * n for name, n in before.items()} and len(before) == 8
    assert [(r.site, r.module) for r in am.step_records()] == [(r.site, r.module) for r in alone.step_records()]
    assert all(math.isfinite(v) for v in logits.by_layer())
