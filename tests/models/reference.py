"""Hand-written references of the transformer pieces and of each placement's equation.

Written from the papers' equations with explicit matmuls and softmax, reading the
weights of a normlab model, so a test can compare a model's forward with them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def linear(lin, x):
    y = x @ lin.weight.T
    return y if lin.bias is None else y + lin.bias


def rope_ref(x, base=10000.0):
    """Rotate pair (x_i, x_{i+d/2}) at position t by t * base^(-2i/d); x [B, H, T, d]."""
    t_len, d = x.shape[-2], x.shape[-1]
    out = x.clone()
    for t in range(t_len):
        for i in range(d // 2):
            a = t * base ** (-2 * i / d)
            c, s = math.cos(a), math.sin(a)
            x1, x2 = x[..., t, i], x[..., t, i + d // 2]
            out[..., t, i] = x1 * c - x2 * s
            out[..., t, i + d // 2] = x2 * c + x1 * s
    return out


def head_norm_ref(norm, y):
    """QK-norm over the last dim of y, written out: RMSNorm y / sqrt(mean(y^2) + eps) * w,
    LayerNorm (y - mean) / sqrt(var + eps) * w + b (biased variance); eps None: y's
    dtype's machine epsilon (torch.nn.RMSNorm's default)."""
    eps = norm.eps if norm.eps is not None else torch.finfo(y.dtype).eps
    if type(norm).__name__ == "RMSNorm":
        out = y / torch.sqrt((y * y).mean(-1, keepdim=True) + eps)
        return out * norm.weight
    mu = y.mean(-1, keepdim=True)
    var = ((y - mu) ** 2).mean(-1, keepdim=True)
    return (y - mu) / torch.sqrt(var + eps) * norm.weight + norm.bias


def attention_ref(attn, x, context=None, *, causal=False, key_padding=None, rope=False, inner_norm=None):
    """W_out [softmax(Q K^T / sqrt(d_head) + mask) V]; Q and K through the attention's
    q_norm / k_norm where it has them (QK-norm, before RoPE: per head, or over the whole
    projection before the head split with qk_norm_scope "projection"); inner_norm
    before W_out (Sub-LN)."""
    kv = x if context is None else context
    b, t, d = x.shape
    s = kv.shape[1]
    h = attn.n_heads
    hd = d // h

    def heads(y):
        return y.reshape(b, -1, h, hd).transpose(1, 2)

    q, k, v = linear(attn.q_proj, x), linear(attn.k_proj, kv), linear(attn.v_proj, kv)
    normed = getattr(attn, "q_norm", None) is not None
    if normed and attn.qk_norm_scope == "projection":  # OLMo 2: over the whole projection
        q, k = head_norm_ref(attn.q_norm, q), head_norm_ref(attn.k_norm, k)
    q, k, v = heads(q), heads(k), heads(v)
    if normed and attn.qk_norm_scope == "head":
        q, k = head_norm_ref(attn.q_norm, q), head_norm_ref(attn.k_norm, k)
    if rope:
        q, k = rope_ref(q), rope_ref(k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    allowed = torch.ones(t, s, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    allowed = allowed.expand(b, 1, t, s)
    if key_padding is not None:
        allowed = allowed & ~key_padding[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
    if inner_norm is not None:
        y = inner_norm(y)
    return linear(attn.out_proj, y)


def ffn_ref(ffn, x, inner_norm=None):
    h = linear(ffn.w1, x)
    h = F.relu(h) if ffn.activation == "relu" else 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    if inner_norm is not None:
        h = inner_norm(h)
    return linear(ffn.w2, h)


def embed_ref(embed, tokens, cfg):
    """scale * E[tokens] + P[positions] (sinusoidal written out), no norm, no dropout."""
    scale = math.sqrt(cfg.d_model) if cfg.init == "xavier" else 1.0
    x = embed.tokens.weight[tokens] * scale
    t = tokens.shape[1]
    if cfg.positional == "learned":
        x = x + embed.positions.weight[:t]
    elif cfg.positional == "sinusoidal":
        pe = torch.zeros(t, cfg.d_model, dtype=x.dtype)
        for pos in range(t):
            for i in range(0, cfg.d_model, 2):
                pe[pos, i] = math.sin(pos / 10000 ** (i / cfg.d_model))
                if i + 1 < cfg.d_model:
                    pe[pos, i + 1] = math.cos(pos / 10000 ** (i / cfg.d_model))
        x = x + pe
    return x


def sublayers_ref(block, cfg, *, causal, padding=None, memory=None, memory_padding=None, subln=False):
    """[(name, F)] of one block, F written by hand (Sub-LN's inner norms inside F)."""
    n = block.norms
    rope = cfg.positional == "rope"
    out = [("attn", lambda h: attention_ref(block.attn, h, causal=causal, rope=rope, key_padding=padding,
                                             inner_norm=n["attn_inner"] if subln else None))]
    if block.cross_attn is not None:
        out.append(("cross_attn", lambda h: attention_ref(block.cross_attn, h, memory,
                                                          key_padding=memory_padding)))
    out.append(("ffn", lambda h: ffn_ref(block.ffn, h, n["ffn_inner"] if subln else None)))
    return out


def stack_ref(placement, stack, x, cfg, *, causal, alpha=1.0, padding=None, memory=None, memory_padding=None):
    """The placement's equation over every sublayer of every block of ``stack``."""
    lam = cfg.residual_scale
    layers = [(b.norms, sublayers_ref(b, cfg, causal=causal, padding=padding, memory=memory,
                                      memory_padding=memory_padding, subln=placement == "subln"))
              for b in stack.blocks]
    if placement == "post":                       # x = Norm(x + lam F(x))
        for n, subs in layers:
            for name, f in subs:
                x = n[f"{name}_add"](x + lam * f(x))
        return x
    if placement == "deepnorm":                   # x = Norm(alpha x + lam F(x))
        for n, subs in layers:
            for name, f in subs:
                x = n[f"{name}_add"](alpha * x + lam * f(x))
        return x
    if placement in ("pre", "subln"):             # x = x + lam F(Norm(x)); Norm_final(x)
        for n, subs in layers:
            for name, f in subs:
                x = x + lam * f(n[f"{name}_in"](x))
        return stack.final_norm(x)
    if placement in ("sandwich", "peri"):         # x = x + lam Norm(F(Norm(x))); Norm_final(x)
        for n, subs in layers:
            for name, f in subs:
                x = x + lam * n[f"{name}_out"](f(n[f"{name}_in"](x)))
        return stack.final_norm(x)
    if placement == "resi_dual":                  # x = Norm(x + f), d = d + f; x + Norm_final(d)
        d = x
        for n, subs in layers:
            for name, f in subs:
                fx = lam * f(x)
                d = d + fx
                x = n[f"{name}_add"](x + fx)
        return x + stack.final_norm(d)
    if placement == "olmo2":                      # x = x + lam Norm(F(x)); Norm_final(x)
        for n, subs in layers:
            for name, f in subs:
                x = x + lam * n[f"{name}_out"](f(x))
        return stack.final_norm(x)
    if placement == "parallel":                   # x = x + lam (Attn(Norm_a(x)) + FFN(Norm_f(x))); Norm_final(x)
        for n, subs in layers:
            fs = dict(subs)
            assert set(fs) == {"attn", "ffn"}
            norm_f = n["ffn_in"] if "ffn_in" in n else n["attn_in"]  # one shared norm, or two
            x = x + lam * (fs["attn"](n["attn_in"](x)) + fs["ffn"](norm_f(x)))
        return stack.final_norm(x)
    if placement == "none":                       # x = x + lam F(x)
        for _, subs in layers:
            for _, f in subs:
                x = x + lam * f(x)
        return x
    raise AssertionError(placement)


def deepnorm_alpha(role, n, m):
    """DeepNet Table 1, typed from the paper."""
    if n and m:
        return 0.81 * (n**4 * m) ** (1 / 16) if role == "encoder" else (3 * m) ** 0.25
    return (2 * (n or m)) ** 0.25


def deepnorm_beta(role, n, m):
    if n and m:
        return 0.87 * (n**4 * m) ** (-1 / 16) if role == "encoder" else (12 * m) ** -0.25
    return (8 * (n or m)) ** -0.25
