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
    # the keys the mask allows, for the real queries only (a padded query's row is discarded)
    allowed = ((~pad[:, None, None, :]) | torch.eye(10, dtype=torch.bool)) & ~pad[:, None, :, None]
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


def test_padded_queries_do_not_count():
    # a pad token with a huge embedding: its queries' logits are large, and discarded by
    # the model; the monitor reads the real positions' logits only
    from normlab.models import TransformerLM

    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=64, d_model=16, n_heads=2, n_layers=1, d_ff=32, dropout=0.0, placement="none")
    model = TransformerLM(cfg).eval()
    with torch.no_grad():
        model.embed.tokens.weight[0] *= 30
    real = torch.randint(1, 64, (1, 8))
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), real[:, :6]], dim=1)
    pad = torch.zeros(1, 8, dtype=torch.bool)
    pad[0, :2] = True
    with AttentionLogitMonitor(model) as monitor:
        model(padded, padding_mask=pad)
    with torch.no_grad():
        hooked = []
        h = model.blocks[0].attn.register_forward_hook(
            lambda m, a, kw, o: hooked.append((a[0] if a else kw["x"], kw)), with_kwargs=True)
        model(padded, padding_mask=pad)
        h.remove()
    x, kw = hooked[0]
    from normlab.diagnostics.attention import max_logit
    every = max_logit(model.blocks[0].attn, x, attn_mask=kw.get("attn_mask"), is_causal=kw.get("is_causal", False),
                      rope=kw.get("rope"))
    assert float(every) > 10 * monitor.by_layer()[0]  # the padded queries' logits were the largest
    # what the monitor read: the real queries' rows of the same logits, by hand
    q = model.blocks[0].attn
    with torch.no_grad():
        logits = _logits_by_hand(q, x, kw.get("rope"), causal=True,
                                 allowed=(~pad[:, None, None, :]) | torch.eye(8, dtype=torch.bool))
    assert monitor.by_layer()[0] == pytest.approx(float(logits[:, :, 2:, :].amax()), rel=1e-5)


def test_an_all_padded_call_reads_nan_and_a_float_mask_is_read_as_nonzero():
    from normlab.models.attention import Attention

    torch.manual_seed(0)
    attn = Attention(16, 2).eval()

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, x, pad):
            return self.attn(x, padding_mask=pad)

    model, x = One(), torch.randn(2, 5, 16)
    with AttentionLogitMonitor(model) as monitor:
        model(x, torch.ones(2, 5, dtype=torch.bool))
    assert math.isnan(monitor.by_layer()[0])
    pad = torch.zeros(2, 5)
    pad[0, 3:] = 1.0
    with AttentionLogitMonitor(model) as as_float:
        model(x, pad)
    with AttentionLogitMonitor(model) as as_bool:
        model(x, pad.bool())
    assert as_float.by_layer() == as_bool.by_layer() and math.isfinite(as_bool.by_layer()[0])


def test_entering_a_monitor_again_while_attached_adds_no_second_set_of_hooks():
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=64, d_model=16, n_heads=2, n_layers=2, d_ff=32))
    monitor = AttentionLogitMonitor(model)
    with monitor, monitor:  # (each hook recomputed every logit: twice the work)
        assert all(len(m._forward_hooks) == 1 for _, m in monitor.modules)
        model(torch.randint(0, 64, (2, 8)))
        assert all(math.isfinite(v) for v in monitor.by_layer())
    assert all(not m._forward_hooks for _, m in monitor.modules)
