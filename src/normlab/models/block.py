"""The pieces every model is made of, in data-flow order: Embedding, FeedForward, Block, Stack.

There is one Block class. Its placement (``normlab.models.placement``) decides which
norms each sublayer has and how each sublayer's output joins the residual stream.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.models.attention import (
    Attention,
    cross_attention_mask,
    rope_tables,
    self_attention_mask,
    sinusoidal_table,
)
from normlab.models.config import TransformerConfig
from normlab.models.placement import Placement
from normlab.norms import build_norm


def _build_norm(cfg: TransformerConfig, dim: int) -> nn.Module:
    return build_norm(cfg.norm, dim, eps=cfg.norm_eps, **(cfg.norm_options or {}))


def check_tokens(where: str, tokens: Tensor, max_seq_len: int) -> None:
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int):
        got = f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"{where}: expected tokens of shape [batch, seq_len] and dtype torch.long, got {got}")
    if tokens.shape[1] > max_seq_len:
        raise ValueError(f"{where}: expected seq_len <= max_seq_len={max_seq_len}, got {tokens.shape[1]}")


def check_padding_mask(where: str, name: str, mask: Tensor | None, tokens: Tensor) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != tokens.shape:
        got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(
            f"{where}: expected {name} of shape {tuple(tokens.shape)} (the tokens' shape) and dtype "
            f"torch.bool (True = padded), got {got}"
        )


class Embedding(nn.Module):
    """x_0 = dropout(Norm_emb(scale * E[token] + P[position])).

    ``tokens`` is E; ``positions`` is P for learned positions (a fixed sinusoidal table
    for "sinusoidal", nothing for RoPE, which acts inside attention). ``scale`` is
    sqrt(d_model) under the "xavier" init (Vaswani et al.: E ~ N(0, 1/d_model), so
    scale * E has unit variance per coordinate) and 1 under "gpt2"."""

    def __init__(self, cfg: TransformerConfig, norm: bool) -> None:
        super().__init__()
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.positions = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.positional == "learned" else None
        self.sinusoidal = cfg.positional == "sinusoidal"
        self.scale = math.sqrt(cfg.d_model) if cfg.init == "xavier" else 1.0
        self.norm = _build_norm(cfg, cfg.d_model) if norm else None
        self.dropout = cfg.dropout

    def forward(self, tokens: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        x = self.tokens(tokens)
        if self.scale != 1.0:
            x = x * self.scale
        t = tokens.shape[1]
        if self.positions is not None:
            x = x + self.positions.weight[:t]
        elif self.sinusoidal:
            x = x + sinusoidal_table(t, x.shape[-1], x.dtype, x.device)
        if self.norm is not None:
            x = self.norm(x, padding_mask=padding_mask)
        return F.dropout(x, self.dropout, self.training)


class FeedForward(nn.Module):
    """FFN(x) = W_2 act(W_1 x + b_1) + b_2 (``w1``, ``w2``); Sub-LN: W_2 Norm_inner(act(W_1 x + b_1)) + b_2."""

    def __init__(self, d_model: int, d_ff: int, activation: str) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff)
        self.w2 = nn.Linear(d_ff, d_model)
        self.activation = activation

    def forward(self, x: Tensor, *, inner_norm: nn.Module | None = None,
                padding_mask: Tensor | None = None) -> Tensor:
        h = self.w1(x)
        h = F.gelu(h) if self.activation == "gelu" else F.relu(h)
        if inner_norm is not None:
            h = inner_norm(h, padding_mask=padding_mask)
        return self.w2(h)

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


class Block(nn.Module):
    """One transformer layer: self-attention (``attn``), cross-attention (``cross_attn``, in
    seq2seq decoders), FFN (``ffn``); each sublayer gets the norms its placement names,
    held in ``norms`` as ``<sublayer>_<slot>`` (``attn_in``, ``ffn_add``, ...)."""

    def __init__(self, cfg: TransformerConfig, placement: Placement, *, causal: bool,
                 cross_attention: bool) -> None:
        super().__init__()
        self.placement, self.causal, self.dropout = placement, causal, cfg.dropout
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.cross_attn = Attention(cfg.d_model, cfg.n_heads, cfg.attention_dropout) if cross_attention else None
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation)
        self.norms = nn.ModuleDict()
        for sub in self.sublayer_names:
            for slot in placement.norm_slots(sub):
                dim = cfg.d_ff if (sub, slot) == ("ffn", "inner") else cfg.d_model
                self.norms[f"{sub}_{slot}"] = _build_norm(cfg, dim)

    @property
    def sublayer_names(self) -> tuple[str, ...]:
        return ("attn", "cross_attn", "ffn") if self.cross_attn is not None else ("attn", "ffn")

    def _inner(self, sub: str) -> nn.Module | None:
        key = f"{sub}_inner"
        return self.norms[key] if key in self.norms else None

    def forward(self, stream: tuple, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                rope: tuple[Tensor, Tensor] | None = None, padding_mask: Tensor | None = None,
                context: Tensor | None = None, context_mask: Tensor | None = None) -> tuple:
        place = self.placement
        kw = {"dropout_p": self.dropout if self.training else 0.0, "padding_mask": padding_mask}
        stream = place.sublayer(self.norms, "attn", lambda h: self.attn(
            h, attn_mask=attn_mask, is_causal=is_causal, rope=rope, inner_norm=self._inner("attn"),
            padding_mask=padding_mask), stream, **kw)
        if self.cross_attn is not None:
            stream = place.sublayer(self.norms, "cross_attn", lambda h: self.cross_attn(
                h, context, attn_mask=context_mask, inner_norm=self._inner("cross_attn"),
                padding_mask=padding_mask), stream, **kw)
        return place.sublayer(self.norms, "ffn", lambda h: self.ffn(
            h, inner_norm=self._inner("ffn"), padding_mask=padding_mask), stream, **kw)

    def residual_stream(self, output: tuple) -> Tensor:
        """The residual stream after this block, from its ``forward`` output (the protocol
        ``normlab.diagnostics.ActivationMonitor`` reads)."""
        return self.placement.stream_value(output)

    def extra_repr(self) -> str:
        return f"placement={self.placement!r}, causal={self.causal}"


class Stack(nn.Module):
    """A stack of Blocks (``blocks``) and the placement's ``final_norm`` (None if it has none).

    ``run_blocks(x)`` maps the embedded input [B, T, d] to the stack's output [B, T, d]."""

    def __init__(self, cfg: TransformerConfig, placement: Placement, n_layers: int, *,
                 causal: bool, cross_attention: bool = False) -> None:
        super().__init__()
        self.placement, self.causal, self.dropout = placement, causal, cfg.dropout
        self.rope_dim = cfg.head_dim if cfg.positional == "rope" else None
        self.blocks = nn.ModuleList(
            Block(cfg, placement, causal=causal, cross_attention=cross_attention) for _ in range(n_layers)
        )
        self.final_norm = _build_norm(cfg, cfg.d_model) if placement.final_norm else None

    def run_blocks(self, x: Tensor, *, padding_mask: Tensor | None = None, context: Tensor | None = None,
                   context_padding_mask: Tensor | None = None) -> Tensor:
        attn_mask, is_causal = self_attention_mask(padding_mask, self.causal)
        rope = None if self.rope_dim is None else rope_tables(x.shape[1], self.rope_dim, x.dtype, x.device)
        context_mask = cross_attention_mask(context_padding_mask)
        stream = self.placement.start(x)
        for block in self.blocks:
            stream = block(stream, attn_mask=attn_mask, is_causal=is_causal, rope=rope,
                           padding_mask=padding_mask, context=context, context_mask=context_mask)
        return self.placement.finish(self.final_norm, stream, padding_mask=padding_mask,
                                     dropout_p=self.dropout if self.training else 0.0)

    def forward(self, x: Tensor, *, padding_mask: Tensor | None = None, context: Tensor | None = None,
                context_padding_mask: Tensor | None = None) -> Tensor:
        return self.run_blocks(x, padding_mask=padding_mask, context=context,
                               context_padding_mask=context_padding_mask)
