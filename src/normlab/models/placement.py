"""Norm placements: where the norms of a sublayer sit, declared as data.

A placement is a small declaration: the norm slots of each sublayer (``norm_slots``),
whether a final norm closes the stack and what it reads, whether the embeddings are
normalized, and its constants (lambda, DeepNorm's alpha and beta, Magneto's gamma). The
one ``Block`` (``normlab.models.block``) runs every placement from this declaration, and
``normlab.convert`` and ``normlab.diagnostics`` read the same declaration; nothing else
knows placement names. A new placement is one class here, registered with
``@register_placement(name)``; a new kind of slot is one entry in ``SLOT_ROLES`` and one
case in ``Block``.

Norm slots of a sublayer F (``blocks.i.norms.<sublayer>_<slot>``), and what each does
(``SLOT_ROLES``):

    slot   computes                                 reads       its output             used by
    in     Norm(x) feeds F                          the stream  F's input projections  Pre-LN and descendants
    out    Norm(F(.)) before the residual add       F's branch  is added to the stream Sandwich, Peri-LN
    add    Norm(x + F(.)) after the residual add    the stream  is the new stream      Post-LN, DeepNorm, ResiDual
    inner  inside F, before its output projection   F's branch  F's output projection  Sub-LN / Magneto

What writes the stream: each sublayer's output projection (through its ``out`` norm
where there is one), and the embeddings (through the embedding norm where there is one).

Where a placement allows, the add and the next norm run as one fused op,
``norm(f, residual, dropout_p=p) -> (Norm(residual + dropout(f)), residual + dropout(f))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, NamedTuple

if TYPE_CHECKING:
    from normlab.models.config import TransformerConfig

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


class Placement:
    """Where a sublayer's norms sit and how its output joins the residual stream.

    ``slots``: the norm slots of every sublayer ("in", "out", "add", "inner");
    ``final_norm``: one norm after the last block, reading ``final_norm_reads``;
    ``embedding_norm``: one norm on the embeddings. ``dual_stream`` (from
    ``final_norm_reads``): ResiDual's second, Pre-LN-style stream d beside the Post-LN one. ``residual_scale`` is lambda on every
    sublayer output, ``skip_scale`` multiplies the skip path (DeepNorm's alpha) and
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
    def for_stack(cls, residual_scale: float, role: str, n_encoder_layers: int,
                  n_decoder_layers: int) -> Placement:
        """The placement of one stack (``role`` "encoder" or "decoder") of a model with
        that many encoder and decoder layers (0 for a stack the model does not have)."""
        return cls(residual_scale=residual_scale)

    @property
    def dual_stream(self) -> bool:
        """A second, Pre-LN-style stream runs beside the first: the one the final norm reads."""
        return self.final_norm_reads == "dual"

    def norm_slots(self, sublayer: str) -> tuple[str, ...]:
        """The norm slots of ``sublayer`` ("attn", "cross_attn" or "ffn")."""
        return self.slots

    def norm_roles(self, sublayer: str) -> tuple[tuple[str, SlotRole], ...]:
        """(slot, what it does) for each norm of ``sublayer``."""
        return tuple((slot, SLOT_ROLES[slot]) for slot in self.norm_slots(sublayer))

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
    return get_placement(cfg.placement).for_stack(cfg.residual_scale, role, n_encoder_layers, n_decoder_layers)


# ---------------------------------------------------------------------------- placements
# Each docstring gives the equations the Block runs from the declaration below it.


@register_placement("post")
class PostNorm(Placement):
    """Post-LN: x_{l+1} = Norm(x_l + lambda F(x_l)) (Vaswani et al. 2017, "Attention Is All You Need").

    No final norm: the stream leaving the last block is already normalized."""

    slots = ("add",)


@register_placement("pre")
class PreNorm(Placement):
    """Pre-LN: x_{l+1} = x_l + lambda F(Norm(x_l)); y = Norm_final(x_L) (Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture")."""

    slots = ("in",)
    final_norm = True


@register_placement("sandwich")
class SandwichNorm(PreNorm):
    """Sandwich-LN: x_{l+1} = x_l + lambda Norm_out(F(Norm_in(x_l))); y = Norm_final(x_L) (Ding et al. 2021, "CogView")."""

    slots = ("in", "out")


@register_placement("deepnorm")
class DeepNorm(PostNorm):
    """DeepNorm: x_{l+1} = Norm(alpha x_l + lambda F(x_l)), FFN/value/output projections initialised x beta (Wang et al. 2022, "DeepNet").

    alpha and beta per stack from ``deepnorm_constants``; beta reaches cross-attention too
    (as in torchscale)."""

    @classmethod
    def for_stack(cls, residual_scale, role, n_encoder_layers, n_decoder_layers):
        c = deepnorm_constants(n_encoder_layers, n_decoder_layers)[role]
        return cls(residual_scale=residual_scale, skip_scale=c.alpha, branch_gain=c.beta)


@register_placement("subln")
class SubLN(PreNorm):
    """Sub-LN (Magneto): x_{l+1} = x_l + lambda F(Norm_in(x_l)) with F's output projection reading Norm_inner of its input; y = Norm_final(x_L) (Wang et al. 2022, "Foundation Transformers").

    Self-attention: W_out Norm_inner(Attention(Q, K, V)); FFN: W_2 Norm_inner(act(W_1 h)).
    Cross-attention has no inner norm and no init gain (as in torchscale). FFN, value and
    output projections are initialised x gamma from ``subln_gains``."""

    slots = ("in", "inner")
    gain_cross_attention = False

    @classmethod
    def for_stack(cls, residual_scale, role, n_encoder_layers, n_decoder_layers):
        gain = subln_gains(n_encoder_layers, n_decoder_layers)[role]
        return cls(residual_scale=residual_scale, branch_gain=gain)

    def norm_slots(self, sublayer):
        return ("in",) if sublayer == "cross_attn" else self.slots


@register_placement("resi_dual")
class ResiDual(Placement):
    """ResiDual: a Post-LN stream x_{l+1} = Norm(x_l + f_l) and a Pre-LN-style stream d_{l+1} = d_l + f_l, with f_l = lambda F(x_l), d_0 = x_0; y = x_L + Norm_final(d_L) (Xie et al. 2023, "ResiDual").

    Both streams add the same dropped-out f_l (as in the paper's code)."""

    slots = ("add",)
    final_norm = True
    final_norm_reads = "dual"


@register_placement("peri")
class PeriNorm(SandwichNorm):
    """Peri-LN: x_0 = Norm_emb(embeddings); x_{l+1} = x_l + lambda Norm_out(F(Norm_in(x_l))); y = Norm_final(x_L) (Kim et al. 2025, "Peri-LN").

    The block is Sandwich-LN's; Peri-LN adds the embedding norm of the paper's models."""

    embedding_norm = True


@register_placement("none")
class NoPlacement(Placement):
    """No norms: x_{l+1} = x_l + lambda F(x_l) (norm-free baseline; for DyT in place of every norm use placement "pre" with norm "dyt")."""
