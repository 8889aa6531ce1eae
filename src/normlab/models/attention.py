"""Multi-head attention through ``F.scaled_dot_product_attention``, its masks, and positions.

Attention(x, context) = W_out [softmax(Q K^T / sqrt(d_head) + mask) V]_heads with
Q = W_q x, K = W_k context, V = W_v context (context = x for self-attention);
QK-norm normalizes each head's query and key (before RoPE); Sub-LN puts a norm on the
heads' output before W_out.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.models.config import QK_NORM_SCOPES
from normlab.norms import build_norm
from normlab.norms.registry import check_size


class Attention(nn.Module):
    """Self- or cross-attention with separate q/k/v/out projections (``q_proj``, ``k_proj``,
    ``v_proj``, ``out_proj``), so an init or a diagnostic can address each one.

    ``qk_norm`` ("rmsnorm" | "layernorm" | None): QK-norm, ``q_norm`` and ``k_norm`` over
    each head's head_dim features (eps ``qk_norm_eps``, None: the norm's default, with an
    elementwise affine shared by the heads), applied to Q and K after the projection
    and head split, before RoPE (as Qwen3 and Gemma 3 do):
    Q_h = Norm_q(W_q x)_h, K_h = Norm_k(W_k context)_h.
    ``qk_norm_scope="projection"``: one norm over the whole d_model-wide projection, before
    the head split (as OLMo 2 does): Q_h = Norm_q(W_q x)_h with Norm_q over d_model
    features, so the heads share one statistic and each feature has its own gain. The
    normalized width must be >= 2: over one feature a normalized query or key keeps only
    its sign (rmsnorm) or its bias (layernorm)."""

    def __init__(self, d_model: int, n_heads: int, attention_dropout: float = 0.0, *,
                 qk_norm: str | None = None, qk_norm_eps: float | None = None,
                 qk_norm_scope: str = "head") -> None:
        super().__init__()
        d_model, n_heads = check_size("Attention", "d_model", d_model), check_size("Attention", "n_heads", n_heads)
        if d_model % n_heads:
            raise ValueError(f"Attention: expected d_model ({d_model}) to be divisible by n_heads ({n_heads})")
        if (isinstance(attention_dropout, bool) or not isinstance(attention_dropout, numbers.Real)
                or not 0.0 <= attention_dropout <= 1.0):
            raise ValueError(f"Attention: expected attention_dropout in [0, 1], got {attention_dropout!r}")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.attention_dropout = attention_dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        if qk_norm not in (None, "rmsnorm", "layernorm"):
            raise ValueError(f"Attention: expected qk_norm to be None, 'rmsnorm' or 'layernorm', got {qk_norm!r}")
        if qk_norm_scope not in QK_NORM_SCOPES:
            raise ValueError(f"Attention: expected qk_norm_scope to be 'head' or 'projection', got {qk_norm_scope!r}")
        self.qk_norm_scope = qk_norm_scope
        width = self.head_dim if qk_norm_scope == "head" else d_model
        if qk_norm and width < 2:
            raise ValueError(f"Attention: qk_norm={qk_norm!r} with qk_norm_scope={qk_norm_scope!r} needs "
                             f"{'head_dim' if qk_norm_scope == 'head' else 'd_model'} >= 2, got 1: over one "
                             f"feature it leaves each query and key only its sign or its bias")
        self.q_norm = build_norm(qk_norm, width, eps=qk_norm_eps) if qk_norm else None
        self.k_norm = build_norm(qk_norm, width, eps=qk_norm_eps) if qk_norm else None

    def forward(self, x: Tensor, context: Tensor | None = None, *, attn_mask: Tensor | None = None,
                is_causal: bool = False, rope: tuple[Tensor, Tensor] | None = None,
                inner_norm: nn.Module | None = None, padding_mask: Tensor | None = None) -> Tensor:
        """x: [B, T, d]; context: [B, S, d] for cross-attention; attn_mask: bool, True = may
        attend, broadcastable to [B, H, T, S]; rope: (cos, sin) of the T positions;
        inner_norm: Sub-LN's norm before ``out_proj`` (given ``padding_mask`` of x)."""
        kv = x if context is None else context
        q, k, v = (self._heads(p(t), n) for p, t, n in ((self.q_proj, x, self.q_norm), (self.k_proj, kv, self.k_norm),
                                                         (self.v_proj, kv, None)))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.attention_dropout if self.training else 0.0,
        )
        y = y.transpose(1, 2).flatten(2)
        if inner_norm is not None:
            y = inner_norm(y, padding_mask=padding_mask)
        return self.out_proj(y)

    def _heads(self, t: Tensor, norm: nn.Module | None = None) -> Tensor:
        """[B, T, d] -> [B, H, T, head_dim], normalized by ``norm`` (QK-norm): each head on
        the [B, T, H, head_dim] view before the transpose, or, with the "projection"
        scope, the whole [B, T, d] projection before the split."""
        if norm is not None and self.qk_norm_scope == "projection":
            t = norm(t)
        t = t.unflatten(-1, (self.n_heads, self.head_dim))
        if norm is not None and self.qk_norm_scope == "head":
            t = norm(t)
        return t.transpose(1, 2)


def self_attention_mask(padding_mask: Tensor | None, causal: bool) -> tuple[Tensor | None, bool]:
    """(attn_mask, is_causal) for self-attention over [B, T] with ``padding_mask`` (True = padded).

    Without padding the causal case is SDPA's ``is_causal``. With padding, keys at padded
    positions are masked out; every position may also attend to itself, so a padded
    query (e.g. the first one under left padding and a causal mask) never has an empty
    row, and real positions are unaffected (they attend to themselves anyway)."""
    if padding_mask is None:
        return None, causal
    t = padding_mask.shape[-1]
    allowed = ~padding_mask[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(t, t, dtype=torch.bool, device=padding_mask.device).tril()
    return allowed | torch.eye(t, dtype=torch.bool, device=padding_mask.device), False


def cross_attention_mask(context_padding_mask: Tensor | None) -> Tensor | None:
    """attn_mask for cross-attention to a context with ``context_padding_mask`` [B, S]."""
    return None if context_padding_mask is None else ~context_padding_mask[:, None, None, :]


# ---------------------------------------------------------------------------- positions


def rope_tables(seq_len: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """RoPE's (cos, sin) [seq_len, head_dim / 2] of the angles t * theta_i,
    theta_i = base^(-2i / head_dim) (Su et al. 2021, "RoFormer"); computed in float32
    (float64 for float64 models) on every call, so they never go stale or lose precision."""
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=ct, device=device) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=ct, device=device), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x_i, x_{i + d/2}) of x [B, H, T, d] by the angle of its position."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def sinusoidal_table(seq_len: int, d_model: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """PE[t, 2i] = sin(t / 10000^(2i/d)), PE[t, 2i+1] = cos(t / 10000^(2i/d)) (Vaswani et al. 2017),
    computed in float32 (float64 for float64 models)."""
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    t = torch.arange(seq_len, dtype=ct, device=device)[:, None]
    angles = t * torch.exp(torch.arange(0, d_model, 2, dtype=ct, device=device) * (-math.log(10000.0) / d_model))
    pe = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)[:, :d_model]
    return pe.to(dtype)
