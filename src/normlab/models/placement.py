"""Norm placements: where the norms of a sublayer sit and how its output joins the stream.

A placement is a small strategy object. The one ``Block`` asks it which norms each
sublayer has (``norm_slots``) and hands it every sublayer to run (``sublayer``); the
stack asks it how to start (``start``) and end (``finish``) the residual stream. Nothing
else in the model knows placement names. A new placement is one class here, registered
with ``@register_placement(name)``.

Norm slots of a sublayer F (``blocks.i.norms.<sublayer>_<slot>``), and what each does
(``SLOT_ROLES``, the data that ``normlab.convert`` and ``normlab.diagnostics`` read):

    slot   computes                                 reads       its output             used by
    in     Norm(x) feeds F                          the stream  F's input projections  Pre-LN and descendants
    out    Norm(F(.)) before the residual add       F's branch  is added to the stream Sandwich, Peri-LN
    add    Norm(x + F(.)) after the residual add    the stream  is the new stream      Post-LN, DeepNorm, ResiDual
    inner  inside F, before its output projection   F's branch  F's output projection  Sub-LN / Magneto

What writes the stream: each sublayer's output projection (through its ``out`` norm
where there is one), and the embeddings (through the embedding norm where there is
one). A placement that changes how its sublayers run (``start``, ``sublayer``,
``output``, ``finish``, ``stream_value``) states its ``slots`` in the same class, so
its declared structure is never inherited from a parent whose data flow it changed
(``Placement.undeclared_data_flow``).

In the equations below F is the sublayer (self-attention, cross-attention or FFN),
lambda is ``residual_scale`` and every F(.) passes dropout before it is added. Where a
placement allows, the add and the next norm run as one fused op,
``norm(f, residual, dropout_p=p) -> (Norm(residual + dropout(f)), residual + dropout(f))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from normlab import functional as NF

if TYPE_CHECKING:
    from normlab.models.config import TransformerConfig

Stream = tuple  # the placement's residual state: one or two tensors (and a pending output)


class SlotRole(NamedTuple):
    """What a norm slot does: what it reads, and where its output goes."""

    reads: str   # "stream" (the residual stream) or "branch" (a value inside the sublayer)
    output: str  # "sublayer_input", "output_projection", "stream_write" (added to the stream)
                 # or "stream" (it is the new stream: Post-LN)


SLOT_ROLES: dict[str, SlotRole] = {
    "in": SlotRole("stream", "sublayer_input"),
    "out": SlotRole("branch", "stream_write"),
    "add": SlotRole("stream", "stream"),
    "inner": SlotRole("branch", "output_projection"),
}

# the methods through which a placement changes how its sublayers and stream run
_DATA_FLOW = ("start", "sublayer", "output", "finish", "stream_value")

ROLES = ("encoder", "decoder")


# ---------------------------------------------------------------------------- constants


@dataclass(frozen=True)
class DeepNormConstants:
    """DeepNet's x_{l+1} = LN(alpha * x_l + F(x_l)) and init gain beta (Wang et al. 2022, Table 1)."""

    alpha: float
    beta: float


def deepnorm_constants(n_encoder_layers: int, n_decoder_layers: int) -> dict[str, DeepNormConstants]:
    """DeepNorm's alpha and beta for each stack that exists (N encoder, M decoder layers).

        encoder-decoder  encoder: alpha = 0.81 (N^4 M)^(1/16),  beta = 0.87 (N^4 M)^(-1/16)
                         decoder: alpha = (3M)^(1/4),           beta = (12M)^(-1/4)
        encoder-only     alpha = (2N)^(1/4),  beta = (8N)^(-1/4)
        decoder-only     alpha = (2M)^(1/4),  beta = (8M)^(-1/4)

    The paper's constants (torchscale writes the encoder-decoder beta as 1/1.15 = 0.8696)."""
    n, m = _check_depths("deepnorm_constants", n_encoder_layers, n_decoder_layers)
    if n and m:
        return {
            "encoder": DeepNormConstants(0.81 * (n**4 * m) ** (1 / 16), 0.87 * (n**4 * m) ** (-1 / 16)),
            "decoder": DeepNormConstants((3 * m) ** (1 / 4), (12 * m) ** (-1 / 4)),
        }
    role, depth = ("encoder", n) if n else ("decoder", m)
    return {role: DeepNormConstants((2 * depth) ** (1 / 4), (8 * depth) ** (-1 / 4))}


def subln_gains(n_encoder_layers: int, n_decoder_layers: int) -> dict[str, float]:
    """Magneto's init gain gamma for each stack (Wang et al. 2022, "Foundation Transformers").

        encoder-decoder  encoder: sqrt(log(3M) log(2N) / 3),  decoder: sqrt(log(3M))
        single stack     sqrt(log(2L))"""
    n, m = _check_depths("subln_gains", n_encoder_layers, n_decoder_layers)
    if n and m:
        return {"encoder": math.sqrt(math.log(3 * m) * math.log(2 * n) / 3),
                "decoder": math.sqrt(math.log(3 * m))}
    role, depth = ("encoder", n) if n else ("decoder", m)
    return {role: math.sqrt(math.log(2 * depth))}


def _check_depths(op: str, n: int, m: int) -> tuple[int, int]:
    for name, v in (("n_encoder_layers", n), ("n_decoder_layers", m)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{op}: expected {name} to be an int >= 0, got {v!r}")
    if n == 0 and m == 0:
        raise ValueError(f"{op}: expected at least one stack, got n_encoder_layers=0 and n_decoder_layers=0")
    return n, m


# ---------------------------------------------------------------------------- base


def _add_norm(norm: nn.Module, f: Tensor | None, residual: Tensor, dropout_p: float,
              padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """(Norm(residual + dropout(f)), residual + dropout(f)) as one fused op; f=None: no add.

    The new residual keeps the residual's dtype (float32 under autocast)."""
    if f is None:
        return norm(residual, padding_mask=padding_mask), residual
    return norm(f, residual, dropout_p=dropout_p, residual_dtype=residual.dtype, padding_mask=padding_mask)


class Placement:
    """Where a sublayer's norms sit and how its output joins the residual stream.

    ``slots``: the norm slots of every sublayer ("in", "out", "add", "inner");
    ``final_norm``: one norm after the last block; ``embedding_norm``: one norm on the
    embeddings. ``skip_scale`` multiplies the skip path (DeepNorm's alpha) and
    ``branch_gain`` the init of the FFN, value and output projections (DeepNorm's beta,
    Magneto's gamma); ``init_weights`` applies it."""

    name: ClassVar[str] = ""
    slots: ClassVar[tuple[str, ...]] = ()
    final_norm: ClassVar[bool] = False
    # what the final norm reads: "stream" (the residual stream; its output leaves the
    # stack) or "dual" (ResiDual's second stream; its output is added to the first)
    final_norm_reads: ClassVar[str] = "stream"
    embedding_norm: ClassVar[bool] = False  # Norm_emb: its output is the stream's start
    gain_cross_attention: ClassVar[bool] = True  # does branch_gain reach cross-attention?

    def __init__(self, residual_scale: float = 1.0, skip_scale: float = 1.0,
                 branch_gain: float = 1.0) -> None:
        self.residual_scale = float(residual_scale)
        self.skip_scale = float(skip_scale)
        self.branch_gain = float(branch_gain)

    @classmethod
    def for_stack(cls, cfg: TransformerConfig, role: str, n_encoder_layers: int,
                  n_decoder_layers: int) -> Placement:
        """The placement of one stack (``role`` "encoder" or "decoder") of a model with
        that many encoder and decoder layers (0 for a stack the model does not have)."""
        return cls(residual_scale=cfg.residual_scale)

    def norm_slots(self, sublayer: str) -> tuple[str, ...]:
        """The norm slots of ``sublayer`` ("attn", "cross_attn" or "ffn")."""
        return self.slots

    def norm_roles(self, sublayer: str) -> tuple[tuple[str, SlotRole], ...]:
        """(slot, what it does) for each norm of ``sublayer``."""
        return tuple((slot, SLOT_ROLES[slot]) for slot in self.norm_slots(sublayer))

    @classmethod
    def undeclared_data_flow(cls) -> str | None:
        """None when the declared structure (slots, final norm) describes this placement:
        every class in its lineage that changes the data flow also states its slots.
        Otherwise why it cannot be relied on."""
        for c in cls.__mro__:
            if c is Placement:
                return None
            changed = [m for m in _DATA_FLOW if m in vars(c)]
            if changed and "slots" not in vars(c):
                return (f"{c.__name__} changes {', '.join(changed)} without stating its norm slots "
                        "(a `slots = (...)` in the same class)")
        return None

    def branch(self, f: Tensor) -> Tensor:
        """lambda * F(x)."""
        return f if self.residual_scale == 1.0 else f * self.residual_scale

    def start(self, x: Tensor) -> Stream:
        return (x,)

    def sublayer(self, norms: Mapping[str, nn.Module], name: str, fn: Callable[[Tensor], Tensor],
                 stream: Stream, *, dropout_p: float, padding_mask: Tensor | None) -> Stream:
        raise NotImplementedError

    def finish(self, final_norm: nn.Module | None, stream: Stream, *, dropout_p: float,
               padding_mask: Tensor | None) -> Tensor:
        return stream[0]

    def stream_value(self, stream: Stream) -> Tensor:
        """The residual stream x_{l+1} that a block's output ``stream`` stands for."""
        return stream[0]

    def __repr__(self) -> str:
        extra = "".join(
            f", {k}={getattr(self, k):.6g}" for k in ("skip_scale", "branch_gain") if getattr(self, k) != 1.0
        )
        return f"{type(self).__name__}(residual_scale={self.residual_scale:g}{extra})"


_PLACEMENTS: dict[str, type[Placement]] = {}


def register_placement(name: str) -> Callable[[type[Placement]], type[Placement]]:
    """Class decorator: make a Placement subclass selectable as ``placement=name``."""

    def wrap(cls: type[Placement]) -> type[Placement]:
        if name in _PLACEMENTS:
            raise ValueError(f"register_placement: a placement named {name!r} is already registered")
        cls.name = name
        _PLACEMENTS[name] = cls
        return cls

    return wrap


def placement_names() -> list[str]:
    """The registered placement names, in registration order."""
    return list(_PLACEMENTS)


def get_placement(name: str) -> type[Placement]:
    """The Placement class registered as ``name``."""
    try:
        return _PLACEMENTS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown placement {name!r}; expected one of: {', '.join(_PLACEMENTS)}") from None


def build_placement(cfg: TransformerConfig, role: str, n_encoder_layers: int,
                    n_decoder_layers: int) -> Placement:
    """The placement object of one stack of a model built from ``cfg``."""
    if role not in ROLES:
        raise ValueError(f"build_placement: expected role in {ROLES}, got {role!r}")
    return get_placement(cfg.placement).for_stack(cfg, role, n_encoder_layers, n_decoder_layers)


# ---------------------------------------------------------------------------- placements


@register_placement("post")
class PostNorm(Placement):
    """Post-LN: x_{l+1} = Norm(x_l + lambda F(x_l)) (Vaswani et al. 2017, "Attention Is All You Need").

    No final norm: the stream leaving the last block is already normalized. The fused
    op's ``out`` is the new stream."""

    slots = ("add",)

    def skip(self, x: Tensor) -> Tensor:
        return x

    def sublayer(self, norms, name, fn, stream, *, dropout_p, padding_mask):
        (x,) = stream
        out, _ = _add_norm(norms[f"{name}_add"], self.branch(fn(x)), self.skip(x), dropout_p, padding_mask)
        return (out,)


@register_placement("pre")
class PreNorm(Placement):
    """Pre-LN: x_{l+1} = x_l + lambda F(Norm(x_l)); y = Norm_final(x_L) (Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture").

    The stream is (residual, pending): a sublayer's output is added by the next norm's
    fused op, whose ``new_residual`` is the stream and whose ``out`` feeds the next
    sublayer (the final norm closes the last add)."""

    slots = ("in",)
    final_norm = True

    def start(self, x):
        return (x, None)

    def sublayer(self, norms, name, fn, stream, *, dropout_p, padding_mask):
        residual, pending = stream
        h, residual = _add_norm(norms[f"{name}_in"], pending, residual, dropout_p, padding_mask)
        return residual, self.branch(self.output(norms, name, fn(h), padding_mask))

    def output(self, norms, name, f, padding_mask):
        """What the sublayer adds to the stream (before lambda and dropout)."""
        return f

    def finish(self, final_norm, stream, *, dropout_p, padding_mask):
        residual, pending = stream
        out, _ = _add_norm(final_norm, pending, residual, dropout_p, padding_mask)
        return out

    def stream_value(self, stream):
        """residual + pending: the last sublayer's output is added by the next norm's fused
        op (with its dropout, which this value leaves out)."""
        residual, pending = stream
        return residual if pending is None else residual + pending


@register_placement("sandwich")
class SandwichNorm(PreNorm):
    """Sandwich-LN: x_{l+1} = x_l + lambda Norm_out(F(Norm_in(x_l))); y = Norm_final(x_L) (Ding et al. 2021, "CogView")."""

    slots = ("in", "out")

    def output(self, norms, name, f, padding_mask):
        return norms[f"{name}_out"](f, padding_mask=padding_mask)


@register_placement("deepnorm")
class DeepNorm(PostNorm):
    """DeepNorm: x_{l+1} = Norm(alpha x_l + lambda F(x_l)), FFN/value/output projections initialised x beta (Wang et al. 2022, "DeepNet").

    alpha and beta per stack from ``deepnorm_constants``; beta reaches cross-attention too
    (as in torchscale)."""

    @classmethod
    def for_stack(cls, cfg, role, n_encoder_layers, n_decoder_layers):
        c = deepnorm_constants(n_encoder_layers, n_decoder_layers)[role]
        return cls(residual_scale=cfg.residual_scale, skip_scale=c.alpha, branch_gain=c.beta)

    def skip(self, x):
        return x * self.skip_scale


@register_placement("subln")
class SubLN(PreNorm):
    """Sub-LN (Magneto): x_{l+1} = x_l + lambda F(Norm_in(x_l)) with F's output projection reading Norm_inner of its input; y = Norm_final(x_L) (Wang et al. 2022, "Foundation Transformers").

    Self-attention: W_out Norm_inner(Attention(Q, K, V)); FFN: W_2 Norm_inner(act(W_1 h)).
    Cross-attention has no inner norm and no init gain (as in torchscale). FFN, value and
    output projections are initialised x gamma from ``subln_gains``."""

    slots = ("in", "inner")
    gain_cross_attention = False

    @classmethod
    def for_stack(cls, cfg, role, n_encoder_layers, n_decoder_layers):
        gain = subln_gains(n_encoder_layers, n_decoder_layers)[role]
        return cls(residual_scale=cfg.residual_scale, branch_gain=gain)

    def norm_slots(self, sublayer):
        return ("in",) if sublayer == "cross_attn" else self.slots


@register_placement("resi_dual")
class ResiDual(Placement):
    """ResiDual: a Post-LN stream x_{l+1} = Norm(x_l + f_l) and a Pre-LN-style stream d_{l+1} = d_l + f_l, with f_l = lambda F(x_l), d_0 = x_0; y = x_L + Norm_final(d_L) (Xie et al. 2023, "ResiDual").

    Both streams add the same dropped-out f_l (as in the paper's code)."""

    slots = ("add",)
    final_norm = True
    final_norm_reads = "dual"

    def start(self, x):
        return (x, x)

    def sublayer(self, norms, name, fn, stream, *, dropout_p, padding_mask):
        x, dual = stream
        f = self.branch(fn(x))
        if dropout_p > 0.0:
            f = torch.nn.functional.dropout(f, dropout_p, training=True)
        dual = dual + f
        x, _ = _add_norm(norms[f"{name}_add"], f, x, 0.0, padding_mask)
        return x, dual

    def finish(self, final_norm, stream, *, dropout_p, padding_mask):
        x, dual = stream
        return x + final_norm(dual, padding_mask=padding_mask)


@register_placement("peri")
class PeriNorm(SandwichNorm):
    """Peri-LN: x_0 = Norm_emb(embeddings); x_{l+1} = x_l + lambda Norm_out(F(Norm_in(x_l))); y = Norm_final(x_L) (Kim et al. 2025, "Peri-LN").

    The block is Sandwich-LN's; Peri-LN adds the embedding norm of the paper's models."""

    embedding_norm = True


@register_placement("none")
class NoPlacement(Placement):
    """No norms: x_{l+1} = x_l + lambda F(x_l) (norm-free baseline; for DyT in place of every norm use placement "pre" with norm "dyt")."""

    slots = ()

    def sublayer(self, norms, name, fn, stream, *, dropout_p, padding_mask):
        (x,) = stream
        f = self.branch(fn(x))
        return (NF.dropout_add(f, x, dropout_p=dropout_p, training=dropout_p > 0.0, residual_dtype=x.dtype),)
