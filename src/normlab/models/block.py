"""The pieces every model is made of, in data-flow order: Embedding, FeedForward, Block, Stack.

There is one Block class. Its placement (``normlab.models.placement``) declares which
norms each sublayer has; ``Block.sublayer`` (``Block.parallel_sublayers`` for a parallel
placement) writes out what each of them computes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab import functional as NF
from normlab.models.attention import (
    Attention,
    cross_attention_mask,
    rope_tables,
    self_attention_mask,
    sinusoidal_table,
)
from normlab.models.config import TransformerConfig
from normlab.models.placement import SLOT_ROLES, Placement
from normlab.norms import build_norm


def _build_norm(cfg: TransformerConfig, dim: int) -> nn.Module:
    return build_norm(cfg.norm, dim, eps=cfg.norm_eps, **(cfg.norm_options or {}))


def check_tokens(where: str, tokens: Tensor, max_seq_len: int, vocab_size: int | None = None,
                 name: str = "tokens") -> None:
    """[batch, seq_len] integer token ids within max_seq_len; on the CPU in eager mode also
    within [0, vocab_size) (on a GPU that check would wait for the device at every call:
    the embedding's own device-side assert stays; under torch.compile and torch.func the
    values are not at hand)."""
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int):
        got = f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"{where}: expected {name} of shape [batch, seq_len] and dtype torch.long (or "
                         f"torch.int), got {got}")
    if tokens.shape[1] > max_seq_len:
        raise ValueError(f"{where}: expected {name} with seq_len <= max_seq_len={max_seq_len}, got "
                         f"seq_len {tokens.shape[1]}")
    if (vocab_size is not None and type(tokens) is Tensor and tokens.is_cpu and tokens.numel()
            and not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()):
        # (plain tensors only: a fake tensor, a DTensor or a traced value has no values to read)
        lo, hi = tokens.min().item(), tokens.max().item()
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{where}: expected {name} in [0, {vocab_size}) (vocab_size), got values from {lo} "
                             f"to {hi}")


def check_padding_mask(where: str, name: str, mask: Tensor | None, tokens: Tensor | torch.Size,
                       what: str = "the tokens' shape") -> None:
    """``mask`` None, or bool of ``tokens``' shape (a tensor's, or a shape given as it is:
    [B, T] of a stack's input, ``what`` says which). Shape and dtype only: no values read."""
    if mask is None:
        return
    shape = tokens.shape if isinstance(tokens, Tensor) else tokens
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != shape:
        got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(
            f"{where}: expected {name} of shape {tuple(shape)} ({what}) and dtype "
            f"torch.bool (True = padded), got {got}"
        )


def check_context(where: str, context: Tensor, batch: int, d_model: int | None,
                  context_padding_mask: Tensor | None = None) -> None:
    """A cross-attention's context: [B, S, d_model], B the batch of the stream it meets,
    and its ``context_padding_mask``: None or bool [B, S]."""
    if (not isinstance(context, Tensor) or context.dim() != 3 or context.shape[0] != batch
            or (d_model is not None and context.shape[-1] != d_model)):
        got = f"{list(context.shape)}" if isinstance(context, Tensor) else type(context).__name__
        raise ValueError(f"{where}: expected context of shape [B, S, d_model] = [{batch}, S, "
                         f"{'d_model' if d_model is None else d_model}] (the encoder's output for the input's "
                         f"batch), got {got}")
    check_padding_mask(where, "context_padding_mask", context_padding_mask, context.shape[:2],
                       "[B, S] of the context")


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
        # with a padding mask, a position counts the real tokens before it, so left padding
        # leaves the real tokens' positions (0, 1, ...) as they are without it
        pos = None if padding_mask is None else ((~padding_mask).cumsum(1) - 1).clamp_min(0)
        if self.positions is not None:
            x = x + (self.positions.weight[:t] if pos is None else self.positions.weight[pos])
        elif self.sinusoidal:
            table = sinusoidal_table(t, x.shape[-1], x.dtype, x.device)
            x = x + (table if pos is None else table[pos])
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


class Stream(NamedTuple):
    """The residual state between sublayers.

    ``x``: the residual stream. ``pending``: a sublayer output not added yet (Pre-LN
    placements: the next norm's fused op adds it, so the stream is ``x + pending``).
    ``dual``: ResiDual's second stream d."""

    x: Tensor
    pending: Tensor | None = None
    dual: Tensor | None = None

    @property
    def value(self) -> Tensor:
        """The residual stream this state stands for (with a pending output added, its
        dropout left out)."""
        return self.x if self.pending is None else self.x + self.pending


def _add_norm(norm: nn.Module, f: Tensor | None, residual: Tensor, dropout_p: float,
              padding_mask: Tensor | None, *, out_is_stream: bool = False) -> tuple[Tensor, Tensor]:
    """(Norm(residual + dropout(f)), residual + dropout(f)) as one fused op; f=None: no add.

    The new residual keeps the residual's dtype (float32 under autocast). With
    ``out_is_stream`` (an 'add' slot: Post-LN, DeepNorm, ResiDual; and a stack's final norm)
    the normalized output is the next residual (the stack's output), so it has the
    residual's dtype too, as torch's LayerNorm(x + f) promotes to it: f is converted first
    (a bf16 branch under autocast rounded the float32 stream to bf16 at every sublayer).
    Where f already has the residual's dtype (no autocast) nothing changes."""
    if f is None:
        return norm(residual, padding_mask=padding_mask), residual
    if out_is_stream and f.dtype != residual.dtype:
        f = f.to(residual.dtype)
    return norm(f, residual, dropout_p=dropout_p, residual_dtype=residual.dtype, padding_mask=padding_mask)


def _check_slots(placement: Placement, sublayers: tuple[str, ...]) -> None:
    """Refuse norm slots ``Block.sublayer`` does not run: a name outside ``SLOT_ROLES``, an
    'in' norm beside an 'add' norm (the sublayer takes its input from one or the other),
    and a dual stream (ResiDual's) in a sublayer without the 'add' norm that feeds it.
    Built, such norms would hold parameters that never touch the output."""
    for sub in sublayers:
        slots = tuple(placement.norm_slots(sub))
        unknown = [slot for slot in slots if slot not in SLOT_ROLES]
        problem = (f"declares {', '.join(map(repr, unknown))}, not a norm slot ({', '.join(SLOT_ROLES)})" if unknown
                   else "declares both 'in' and 'add', which one sublayer does not combine (its input is the "
                        "normalized stream, or the stream a Post-LN norm closes)" if {"in", "add"} <= set(slots)
                   else "keeps a dual stream (final_norm_reads='dual'), which only an 'add' norm feeds; it has none"
                   if placement.dual_stream and "add" not in slots and not placement.parallel else None)
        if problem:
            raise ValueError(f"Block: placement {placement.name!r} {problem} for its {sub} sublayer (slots "
                             f"{slots}); a norm in such a slot would never run")


class Block(nn.Module):
    """One transformer layer: self-attention (``attn``), cross-attention (``cross_attn``, in
    seq2seq decoders), FFN (``ffn``); each sublayer gets the norms its placement names,
    held in ``norms`` as ``<sublayer>_<slot>`` (``attn_in``, ``ffn_add``, ...). The
    sublayers run one after another (``sublayer``), or side by side where the placement
    is ``parallel`` (``parallel_sublayers``; a shared input norm is one module, held by
    the sublayer ``input_norm_of`` names). With ``cfg.qk_norm`` each attention holds
    ``q_norm`` and ``k_norm``."""

    rope_dim: int | None = None  # (a Block pickled before it held its own: no RoPE tables of its own)
    d_model: int | None = None  # (likewise: its context's width is then left to the projections)

    def __init__(self, cfg: TransformerConfig, placement: Placement, *, causal: bool,
                 cross_attention: bool) -> None:
        super().__init__()
        if placement.parallel:
            if cross_attention:
                raise ValueError(
                    f"Block: placement {placement.name!r} runs attention and FFN side by side on the same "
                    f"input and does not support cross-attention (the decoder of a Seq2SeqTransformer); "
                    f"use it in a TransformerLM or TransformerEncoder"
                )
            other = sorted({slot for sub in ("attn", "ffn") for slot in placement.norm_slots(sub)}
                           - {"in", "out", "inner"})
            if other:
                raise ValueError(f"Block: a parallel placement takes 'in', 'out' and 'inner' norm slots, "
                                 f"placement {placement.name!r} declares {', '.join(map(repr, other))}")
        _check_slots(placement, ("attn", "cross_attn", "ffn") if cross_attention else ("attn", "ffn"))
        self.placement, self.causal, self.dropout = placement, causal, cfg.dropout
        self.rope_dim = cfg.head_dim if cfg.positional == "rope" else None
        self.d_model = cfg.d_model
        qk = dict(qk_norm=cfg.qk_norm, qk_norm_eps=cfg.norm_eps, qk_norm_scope=cfg.qk_norm_scope)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.attention_dropout, **qk)
        self.cross_attn = Attention(cfg.d_model, cfg.n_heads, cfg.attention_dropout, **qk) if cross_attention else None
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation)
        self.norms = nn.ModuleDict()
        for sub in self.sublayer_names:
            for slot in placement.norm_slots(sub):
                dim = cfg.d_ff if (sub, slot) == ("ffn", "inner") else cfg.d_model
                self.norms[f"{sub}_{slot}"] = _build_norm(cfg, dim)

    @property
    def sublayer_names(self) -> tuple[str, ...]:
        return ("attn", "cross_attn", "ffn") if self.cross_attn is not None else ("attn", "ffn")

    def _norm(self, sub: str, slot: str) -> nn.Module | None:
        key = f"{sub}_{slot}"
        return self.norms[key] if key in self.norms else None

    def forward(self, stream: Stream, *, attn_mask: Tensor | None = None, is_causal: bool | None = None,
                rope: tuple[Tensor, Tensor] | None = None, padding_mask: Tensor | None = None,
                context: Tensor | None = None, context_padding_mask: Tensor | None = None,
                context_mask: Tensor | None = None) -> Stream:
        """One layer over ``stream``, a ``Stream`` (``Stream(x)`` for an input x [B, T, d_model];
        a bare tensor is refused). A stack passes the masks and RoPE tables it built once
        for all its blocks; a block called on its own builds them: its self-attention
        mask from its ``causal`` and ``padding_mask`` (unless ``attn_mask`` or ``is_causal``
        is given), and RoPE's tables where the config's positions are RoPE. A placement
        with a dual stream (ResiDual) starts it, where ``stream.dual`` is None, at the
        stream's x (d_0 = x_0), as a stack does.

        ``padding_mask`` [B, T] bool, ``context`` [B, S, d_model] and its
        ``context_padding_mask`` [B, S] bool (True = padded, as every padding mask) are
        checked by shape and dtype (no values read). ``context_mask`` is the cross-attention's
        attn_mask a stack builds once from its ``context_padding_mask`` (True = may attend,
        [B, 1, 1, S]); given, it is taken as it is, and not together with
        ``context_padding_mask``."""
        if not isinstance(stream, Stream):
            raise TypeError(f"Block: expected stream to be a normlab.models.block.Stream (Stream(x) for an input "
                            f"x [B, T, d_model]), got {type(stream).__name__}")
        if (context is None) != (self.cross_attn is None):
            # without it a decoder's cross-attention would attend to its own input, every
            # position (future ones included); an encoder block would ignore one
            raise ValueError("Block: a block with cross-attention (a decoder's) expects context, the encoder's "
                             "output [B, S, d_model]; got none" if context is None else
                             "Block: got context, but this block has no cross-attention (an encoder's or a "
                             "decoder-only model's); expected context=None")
        if context is not None:
            check_context("Block", context, stream.x.shape[0], self.d_model, context_padding_mask)
        elif context_padding_mask is not None or context_mask is not None:
            raise ValueError("Block: got a context mask without context; expected context (the encoder's output "
                             "[B, S, d_model]) with it, or neither")
        if context_padding_mask is not None:
            if context_mask is not None:
                raise ValueError("Block: got both context_padding_mask and context_mask; expected one (a stack "
                                 "passes context_mask, built from its context_padding_mask)")
            context_mask = cross_attention_mask(context_padding_mask)
        check_padding_mask("Block", "padding_mask", padding_mask, stream.x.shape[:2], "[B, T] of the stream's x")
        if stream.dual is None and self.placement.dual_stream:
            stream = Stream(stream.x, stream.pending, stream.x)
        if attn_mask is None and is_causal is None:
            attn_mask, is_causal = self_attention_mask(padding_mask, self.causal)
        is_causal = bool(is_causal)  # (an attn_mask given alone decides by itself)
        if rope is None and self.rope_dim is not None:
            x = stream.x
            rope = rope_tables(x.shape[1], self.rope_dim, x.dtype, x.device)
        p = self.dropout if self.training else 0.0

        def attn(h: Tensor) -> Tensor:
            return self.attn(h, attn_mask=attn_mask, is_causal=is_causal, rope=rope,
                             inner_norm=self._norm("attn", "inner"), padding_mask=padding_mask)

        def ffn(h: Tensor) -> Tensor:
            return self.ffn(h, inner_norm=self._norm("ffn", "inner"), padding_mask=padding_mask)

        if self.placement.parallel:
            return self.parallel_sublayers(stream, attn, ffn, p, padding_mask)
        stream = self.sublayer("attn", stream, attn, p, padding_mask)
        if self.cross_attn is not None:
            stream = self.sublayer("cross_attn", stream, lambda h: self.cross_attn(
                h, context, attn_mask=context_mask, inner_norm=self._norm("cross_attn", "inner"),
                padding_mask=padding_mask), p, padding_mask)
        return self.sublayer("ffn", stream, ffn, p, padding_mask)

    def sublayer(self, sub: str, s: Stream, F_: Callable[[Tensor], Tensor], dropout_p: float,
                 padding_mask: Tensor | None) -> Stream:
        """One sublayer F (``F_``, with its ``inner`` norm inside) in its placement's slots,
        with lambda = ``residual_scale`` and alpha = ``skip_scale``:

            'in' (Pre-LN family):  h, x = Norm_in(x + pending), x + pending    (one fused op)
            otherwise:             h = x
            f = lambda * Norm_out(F(h))                                         ('out' if declared)
            'in':                  pending = f     (added by the next norm's fused op)
            'add', dual (ResiDual): f = dropout(f); d = d + f; x = Norm_add(x + f)
            'add' (Post-LN):       x = Norm_add(alpha * x + dropout(f))        (one fused op)
            no norm (OLMo 2's 'out' only, or none): x = x + dropout(f)"""
        place = self.placement
        norm_in, norm_add = self._norm(sub, "in"), self._norm(sub, "add")
        x = s.x
        if norm_in is not None:
            h, x = _add_norm(norm_in, s.pending, x, dropout_p, padding_mask)
        else:
            h = x
        f = self._branch(sub, F_(h), padding_mask)
        if norm_in is not None:
            return Stream(x, f, s.dual)
        if norm_add is not None and place.dual_stream:
            if dropout_p > 0.0:
                f = F.dropout(f, dropout_p, training=True)
            x, _ = _add_norm(norm_add, f, x, 0.0, padding_mask, out_is_stream=True)
            return Stream(x, None, s.dual + f)
        if norm_add is not None:
            skip = x if place.skip_scale == 1.0 else x * place.skip_scale
            x, _ = _add_norm(norm_add, f, skip, dropout_p, padding_mask, out_is_stream=True)
            return Stream(x, None, s.dual)
        return Stream(NF.dropout_add(f, x, dropout_p=dropout_p, training=dropout_p > 0.0, residual_dtype=x.dtype),
                      None, s.dual)

    def parallel_sublayers(self, s: Stream, attn: Callable[[Tensor], Tensor], ffn: Callable[[Tensor], Tensor],
                           dropout_p: float, padding_mask: Tensor | None) -> Stream:
        """Attention and FFN side by side on the same stream value x (a parallel placement):

            'in':      h_a, x = Norm_attn_in(x + pending), x + pending         (one fused op)
                       h_f = h_a (a shared norm: ``input_norm_of("ffn") == "attn"``), or
                       h_f = Norm_ffn_in(x)                                   (the same x, no second add)
            no 'in':   x = x + dropout(pending); h_a = h_f = x
            a = lambda * Norm_out(Attn(h_a)), f = lambda * Norm_out(FFN(h_f))  ('out' if declared)
            x = x + dropout(f); pending = a   (added, with its own dropout, by the next norm's fused op)

        so the stream after the block is x + dropout(Attn) + dropout(FFN), each branch with
        its own dropout (GPT-NeoX's parallel residual)."""
        place = self.placement
        norm_a, norm_f = self._norm("attn", "in"), self._norm("ffn", "in")
        x = s.x
        if norm_a is not None:
            h_a, x = _add_norm(norm_a, s.pending, x, dropout_p, padding_mask)
        else:
            if s.pending is not None:
                x = NF.dropout_add(s.pending, x, dropout_p=dropout_p, training=dropout_p > 0.0,
                                   residual_dtype=x.dtype)
            h_a = x
        if place.input_norm_of("ffn") == "attn":
            h_f = h_a
        else:
            h_f = x if norm_f is None else norm_f(x, padding_mask=padding_mask)
        a = self._branch("attn", attn(h_a), padding_mask)
        f = self._branch("ffn", ffn(h_f), padding_mask)
        x = NF.dropout_add(f, x, dropout_p=dropout_p, training=dropout_p > 0.0, residual_dtype=x.dtype)
        return Stream(x, a, s.dual)

    def _branch(self, sub: str, f: Tensor, padding_mask: Tensor | None) -> Tensor:
        """lambda * Norm_out(f): a sublayer's output as it joins the stream."""
        norm_out = self._norm(sub, "out")
        if norm_out is not None:
            f = norm_out(f, padding_mask=padding_mask)
        if self.placement.residual_scale != 1.0:
            f = f * self.placement.residual_scale
        return f

    def residual_stream(self, output: Stream) -> Tensor:
        """The residual stream after this block, from its ``forward`` output (the protocol
        ``normlab.diagnostics.ActivationMonitor`` reads). A pending branch is added as it
        is, before the dropout the next norm's fused add draws for it (in training with
        dropout the model's stream differs by that dropout: docs/diagnostics.md)."""
        return output.value

    def extra_repr(self) -> str:
        return f"placement={self.placement!r}, causal={self.causal}"


class BlockStack(nn.Module):
    """What every stack of Blocks holds: ``blocks`` and the placement's ``final_norm`` (None
    if it has none), and ``run_blocks``, the embedded input [B, T, d] -> the stack's output:

        Stream(x_0) -> blocks -> Norm_final(x_L + pending)     (a final norm reading the stream)
                                 x_L + Norm_final(d_L)         (ResiDual: one reading the dual stream)
                                 x_L                           (no final norm)

    It has no ``forward``: ``Stack`` (the encoder and decoder of a seq2seq model) takes
    embeddings, ``TransformerLM`` and ``TransformerEncoder`` take tokens."""

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
        """``padding_mask`` [B, T] and ``context_padding_mask`` [B, S] bool (True = padded),
        ``context`` [B, S, d_model]: checked by shape and dtype, before any mask is built."""
        where = type(self).__name__
        check_padding_mask(where, "padding_mask", padding_mask, x.shape[:2], "[B, T] of x, the input")
        cross = context is not None and len(self.blocks) > 0 and self.blocks[0].cross_attn is not None
        if cross:
            check_context(where, context, x.shape[0], self.blocks[0].d_model, context_padding_mask)
        elif context is None and context_padding_mask is not None:
            raise ValueError(f"{where}: got context_padding_mask without context; expected both (the encoder's "
                             f"output [B, S, d_model] and its [B, S] mask) or neither")
        attn_mask, is_causal = self_attention_mask(padding_mask, self.causal)
        rope = None if self.rope_dim is None else rope_tables(x.shape[1], self.rope_dim, x.dtype, x.device)
        # (an encoder's blocks refuse a context: no mask of it to build)
        context_mask = cross_attention_mask(context_padding_mask) if cross else None
        p = self.dropout if self.training else 0.0
        stream = Stream(x, None, x if self.placement.dual_stream else None)
        for block in self.blocks:
            stream = block(stream, attn_mask=attn_mask, is_causal=is_causal, rope=rope,
                           padding_mask=padding_mask, context=context, context_mask=context_mask)
        if self.final_norm is None:
            if stream.pending is None:
                return stream.x
            return NF.dropout_add(stream.pending, stream.x, dropout_p=p, training=p > 0.0,
                                  residual_dtype=stream.x.dtype)
        if self.placement.final_norm_reads == "dual":
            return stream.x + self.final_norm(stream.dual, padding_mask=padding_mask)
        # (out_is_stream: a pending bf16 branch under autocast is converted to the stream's
        # dtype first, so the output has the stream's dtype under every placement)
        out, _ = _add_norm(self.final_norm, stream.pending, stream.x, p, padding_mask, out_is_stream=True)
        return out


class Stack(BlockStack):
    """A stack of Blocks as a module of its own: embeddings [B, T, d] -> [B, T, d]."""

    def forward(self, x: Tensor, *, padding_mask: Tensor | None = None, context: Tensor | None = None,
                context_padding_mask: Tensor | None = None) -> Tensor:
        return self.run_blocks(x, padding_mask=padding_mask, context=context,
                               context_padding_mask=context_padding_mask)
