"""Norm placements: where the norms of a sublayer sit, declared as data.

A placement is a small declaration: the norm slots of each sublayer (``norm_slots``),
whether the sublayers run one after another or side by side (``parallel``) and which
of them share an input norm (``input_norm_of``), whether a final norm closes the stack
and what it reads, whether the embeddings are normalized, its constants (lambda,
DeepNorm's alpha and beta, Magneto's gamma) and the options it takes (``options``,
given as ``TransformerConfig.placement_options``). The one ``Block``
(``normlab.models.block``) runs every placement from this declaration, and
``normlab.convert`` and ``normlab.diagnostics`` read the same declaration; nothing else
knows placement names. A new placement is one class here, registered with
``@register_placement(name)``; a new kind of slot is one entry in ``SLOT_ROLES`` and one
case in ``Block``.

Norm slots of a sublayer F (``blocks.i.norms.<sublayer>_<slot>``), and what each does
(``SLOT_ROLES``):

    slot   computes                                 reads       its output             used by
    in     Norm(x) feeds F                          the stream  F's input projections  Pre-LN and descendants, parallel
    out    Norm(F(.)) before the residual add       F's branch  is added to the stream Sandwich, Peri-LN, OLMo 2
    add    Norm(x + F(.)) after the residual add    the stream  is the new stream      Post-LN, DeepNorm, ResiDual
    inner  inside F, before its output projection   F's branch  F's output projection  Sub-LN / Magneto

What writes the stream: each sublayer's output projection (through its ``out`` norm
where there is one), and the embeddings (through the embedding norm where there is one).

A parallel placement (``parallel = True``) runs attention and FFN side by side on the
same stream value and adds both outputs; where the FFN reads the attention's input norm
(``input_norm_of("ffn") == "attn"``) that one norm feeds both sublayers and the FFN has
no ``in`` slot of its own.

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

    The paper's constants (Table 1). torchscale's encoder code divides the weights by
    (N^4 M)^(1/16) / 1.15, i.e. beta = 1.15 (N^4 M)^(-1/16), not the paper's 0.87: here
    the paper's value (0.497 against 0.657 at N = M = 6)."""
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
    Magneto's gamma); ``init_weights`` applies it. ``parallel``: the sublayers all read
    the same stream value and their outputs are added together (GPT-J's parallel block;
    "in", "out" and "inner" slots only, no cross-attention); ``input_norm_of`` says which
    sublayer's ``in`` norm feeds a sublayer. ``options``: the keyword arguments the
    class takes beyond the constants (``TransformerConfig.placement_options``)."""

    name: ClassVar[str] = ""
    slots: ClassVar[tuple[str, ...]] = ()
    parallel: ClassVar[bool] = False
    options: ClassVar[tuple[str, ...]] = ()
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
                  n_decoder_layers: int, **options) -> Placement:
        """The placement of one stack (``role`` "encoder" or "decoder") of a model with
        that many encoder and decoder layers (0 for a stack the model does not have);
        ``options``: the placement's own keyword arguments (``options``)."""
        return cls(residual_scale=residual_scale, **options)

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

    def input_norm_of(self, sublayer: str) -> str:
        """The sublayer whose ``in`` norm feeds ``sublayer``'s input: itself, or, where a
        parallel block shares one input norm, the sublayer that holds it."""
        return sublayer

    def __repr__(self) -> str:
        extra = "".join(
            f", {k}={getattr(self, k):.6g}" for k in ("skip_scale", "branch_gain") if getattr(self, k) != 1.0
        ) + "".join(f", {k}={getattr(self, k)!r}" for k in self.options)
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
    """The placement object of one stack of a model built from ``cfg`` (with its
    ``placement_options``)."""
    if role not in ROLES:
        raise ValueError(f"build_placement: expected role in {ROLES}, got {role!r}")
    return get_placement(cfg.placement).for_stack(cfg.residual_scale, role, n_encoder_layers, n_decoder_layers,
                                                  **(cfg.placement_options or {}))


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
    def for_stack(cls, residual_scale, role, n_encoder_layers, n_decoder_layers, **options):
        c = deepnorm_constants(n_encoder_layers, n_decoder_layers)[role]
        return cls(residual_scale=residual_scale, skip_scale=c.alpha, branch_gain=c.beta, **options)


@register_placement("subln")
class SubLN(PreNorm):
    """Sub-LN (Magneto): x_{l+1} = x_l + lambda F(Norm_in(x_l)) with F's output projection reading Norm_inner of its input; y = Norm_final(x_L) (Wang et al. 2022, "Foundation Transformers").

    Self-attention: W_out Norm_inner(Attention(Q, K, V)); FFN: W_2 Norm_inner(act(W_1 h)).
    Cross-attention has no inner norm and no init gain (as in torchscale). FFN, value and
    output projections are initialised x gamma from ``subln_gains``."""

    slots = ("in", "inner")
    gain_cross_attention = False

    @classmethod
    def for_stack(cls, residual_scale, role, n_encoder_layers, n_decoder_layers, **options):
        gain = subln_gains(n_encoder_layers, n_decoder_layers)[role]
        return cls(residual_scale=residual_scale, branch_gain=gain, **options)

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


@register_placement("olmo2")
class OLMo2Norm(Placement):
    """OLMo 2: x_{l+1} = x_l + lambda Norm_out(F(x_l)); y = Norm_final(x_L) (Team OLMo 2024, "2 OLMo 2 Furious").

    The norm sits on each sublayer's output only (the paper's reordered norm): nothing
    normalizes a sublayer's input, and the final norm closes the stack. OLMo 2 also
    normalizes queries and keys, over the whole projection:
    ``TransformerConfig(qk_norm=..., qk_norm_scope="projection")``."""

    slots = ("out",)
    final_norm = True


@register_placement("parallel")
class ParallelNorm(Placement):
    """Parallel block: x_{l+1} = x_l + lambda (Attn(Norm_a(x_l)) + FFN(Norm_f(x_l))); y = Norm_final(x_L) (GPT-J, Wang & Komatsuzaki 2021; GPT-NeoX, Black et al. 2022; PaLM, Chowdhery et al. 2022; Falcon, Almazrouei et al. 2023).

    Both sublayers read the same stream value. ``shared_norm=True`` (the default; GPT-J,
    PaLM, Falcon-7B): Norm_a = Norm_f, one module (``attn_in``) feeding attention and
    FFN; ``shared_norm=False`` (GPT-NeoX, Falcon-40B's new decoder architecture): two
    norms, ``attn_in`` and ``ffn_in``, both reading x_l. Each branch has its own dropout
    (as GPT-NeoX's ``post_attention_dropout`` / ``post_mlp_dropout``). No cross-attention
    (a seq2seq decoder refuses this placement)."""

    slots = ("in",)
    final_norm = True
    parallel = True
    options = ("shared_norm",)

    def __init__(self, residual_scale: float = 1.0, skip_scale: float = 1.0, branch_gain: float = 1.0, *,
                 shared_norm: bool = True) -> None:
        if not isinstance(shared_norm, bool):
            raise ValueError(f"ParallelNorm: expected shared_norm to be a bool, got {shared_norm!r}")
        super().__init__(residual_scale, skip_scale, branch_gain)
        self.shared_norm = shared_norm

    def norm_slots(self, sublayer):
        return () if sublayer == "ffn" and self.shared_norm else self.slots

    def input_norm_of(self, sublayer):
        return "attn" if sublayer == "ffn" and self.shared_norm else sublayer


@register_placement("none")
class NoPlacement(Placement):
    """No norms: x_{l+1} = x_l + lambda F(x_l) (norm-free baseline; for DyT in place of every norm use placement "pre" with norm "dyt")."""
