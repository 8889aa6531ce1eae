"""TransformerConfig: every choice that defines a model, validated on construction.

The config is the experiment's identity: two models built from equal configs (and the
same seed) are the same model, and ``to_dict``/``from_dict`` round-trip it through JSON.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any

from normlab.models.placement import get_placement, placement_names
from normlab.norms import norm_names

POSITIONALS = ("learned", "sinusoidal", "rope", "none")
QK_NORMS = ("rmsnorm", "layernorm")
# where QK-norm normalizes: each head's head_dim features, or the whole projection
QK_NORM_SCOPES = ("head", "projection")
INITS = ("xavier", "gpt2")
ACTIVATIONS = ("gelu", "relu")


@dataclass(frozen=True)
class TransformerConfig:
    """The hyperparameters of a TransformerLM, TransformerEncoder or Seq2SeqTransformer.

    vocab_size        tokens in the vocabulary (shared by source and target in seq2seq)
    d_model           width of the residual stream
    n_heads           attention heads (d_model must be divisible by n_heads)
    n_layers          blocks of the LM, of the encoder, and of the seq2seq encoder
    n_decoder_layers  blocks of the seq2seq decoder (None: n_layers)
    d_ff              hidden width of the feed-forward sublayer (None: 4 * d_model)
    dropout           dropout on each sublayer output before the residual add, and on
                      the embeddings (Vaswani et al. 2017)
    attention_dropout dropout on the attention probabilities
    max_seq_len       longest sequence the positional encoding covers
    positional        "learned" | "sinusoidal" (Vaswani et al.) | "rope" (Su et al. 2021) |
                      "none" (no positions: the model sees a bag of tokens, e.g. majority)
    norm              any ``normlab.norm_names()`` entry
    norm_eps          eps passed to norms that have one (None: each norm's default)
    norm_options      further keyword arguments of the norm, e.g. {"alpha_init": 1.0} for
                      DyT (None: the norm's defaults); checked by building one norm
    qk_norm           None | "rmsnorm" | "layernorm": a norm over each head's query and
                      key (head_dim wide, eps from norm_eps) after their projections,
                      before RoPE, in self- and cross-attention (QK-norm as in Qwen3 and
                      Gemma 3; Dehghani et al. 2023, "Scaling Vision Transformers to 22
                      Billion Parameters"); head_dim must be >= 2: over one feature a
                      normalized query or key keeps only its sign (rmsnorm) or the norm's
                      bias (layernorm: uniform attention)
    qk_norm_scope     "head" (the above) | "projection": one norm over the whole d_model-wide
                      query and key projections, before the head split (OLMo 2)
    placement         any ``placement_names()`` entry: where the norms sit
    placement_options keyword arguments of the placement class (None: its defaults), e.g.
                      {"shared_norm": False} for "parallel" (two input norms, GPT-NeoX);
                      the keys a placement takes are its ``options``
    residual_scale    lambda in x + lambda * F(x), a plain scale of every branch; 1.0 is
                      the plain residual. (Liu et al. 2020, "Rethinking Skip Connection
                      with Layer Normalization", scale the skip instead: LN(mu * x + F(x)).
                      Under Post-LN with a norm blind to its input's scale (layernorm,
                      rmsnorm, scalenorm; batchnorm in training, powernorm in its
                      warm-up: while they divide by the batch's own statistics; powernorm
                      with groups always) that is
                      lambda = 1/mu up to eps; with dyt, none or running statistics, and
                      under the other placements, no lambda gives it.)
    embedding_norm    a norm after the embeddings (as BERT); Peri-LN has one regardless
    tie_embeddings    the output head shares the token embedding matrix
    init              "xavier" (Vaswani et al., Xiong et al.) | "gpt2" (Radford et al. 2019);
                      see ``normlab.models.init.init_weights``
    activation        the FFN's nonlinearity: "gelu" | "relu"

    ``d_ff`` and ``n_decoder_layers`` given as None are resolved on construction, so the
    config always records the numbers the model was built with. Numbers are stored as
    plain ints and floats (a numpy scalar or a Fraction converted exactly as ``int`` and
    ``float`` do), in the fields and in the values of ``norm_options`` and
    ``placement_options``.
    """

    vocab_size: int = 256
    d_model: int = 256
    n_heads: int = 4
    n_layers: int = 4
    n_decoder_layers: int | None = None
    d_ff: int | None = None
    dropout: float = 0.1
    attention_dropout: float = 0.0
    max_seq_len: int = 512
    positional: str = "learned"
    norm: str = "layernorm"
    norm_eps: float | None = 1e-5
    norm_options: dict[str, Any] | None = None
    qk_norm: str | None = None
    qk_norm_scope: str = "head"
    placement: str = "pre"
    placement_options: dict[str, Any] | None = None
    residual_scale: float = 1.0
    embedding_norm: bool = False
    tie_embeddings: bool = True
    init: str = "xavier"
    activation: str = "gelu"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "max_seq_len"):
            object.__setattr__(self, name, _check_int(name, getattr(self, name)))
        if self.n_decoder_layers is None:
            object.__setattr__(self, "n_decoder_layers", self.n_layers)
        object.__setattr__(self, "n_decoder_layers", _check_int("n_decoder_layers", self.n_decoder_layers))
        if self.d_ff is None:
            object.__setattr__(self, "d_ff", 4 * self.d_model)
        object.__setattr__(self, "d_ff", _check_int("d_ff", self.d_ff))
        if self.d_model % self.n_heads:
            raise ValueError(
                f"TransformerConfig: expected d_model to be divisible by n_heads, got "
                f"d_model={self.d_model}, n_heads={self.n_heads}"
            )
        if self.positional == "rope" and (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"TransformerConfig: positional='rope' needs an even head dim (d_model / n_heads), "
                f"got {self.d_model // self.n_heads}"
            )
        for name in ("dropout", "attention_dropout"):
            p = _as_float(getattr(self, name))
            if p is None or not 0.0 <= p < 1.0:
                raise ValueError(f"TransformerConfig: expected {name} in [0, 1), got {getattr(self, name)!r}")
            object.__setattr__(self, name, p)
        if self.norm_eps is not None:
            eps = _as_float(self.norm_eps)
            if eps is None or not math.isfinite(eps) or eps < 0:
                raise ValueError(
                    f"TransformerConfig: expected norm_eps to be None or a finite number >= 0, got {self.norm_eps!r}"
                )
            object.__setattr__(self, "norm_eps", eps)
        scale = _as_float(self.residual_scale)
        if scale is None or not math.isfinite(scale) or scale <= 0:
            raise ValueError(
                f"TransformerConfig: expected residual_scale to be a finite number > 0, got {self.residual_scale!r}"
            )
        object.__setattr__(self, "residual_scale", scale)
        _check_choice("positional", self.positional, POSITIONALS)
        _check_choice("norm", self.norm, norm_names())
        _check_choice("placement", self.placement, placement_names())
        _check_choice("init", self.init, INITS)
        _check_choice("activation", self.activation, ACTIVATIONS)
        if self.norm_options is not None and (
                not isinstance(self.norm_options, dict) or not all(isinstance(k, str) for k in self.norm_options)):
            raise ValueError(
                f"TransformerConfig: expected norm_options to be None or a dict of keyword arguments, "
                f"got {self.norm_options!r}"
            )
        if self.norm_options is not None:
            object.__setattr__(self, "norm_options", _plain_options(self.norm_options))
            if "eps" in self.norm_options:
                raise ValueError("TransformerConfig: norm_options sets eps, which is the field norm_eps; "
                                 "expected norm_eps=... and norm_options without 'eps'")
            factory = sorted({"device", "dtype"} & set(self.norm_options))
            if factory:
                raise ValueError(f"TransformerConfig: norm_options sets {' and '.join(factory)}, where the model's "
                                 f"norms would differ from the rest of it (and the config no longer reads back "
                                 f"from JSON); expected norm_options without them: move the model with "
                                 f"model.to(device, dtype), or build it under torch.device(...)")
            try:
                json.dumps(self.norm_options)
            except (TypeError, ValueError) as e:
                raise ValueError(f"TransformerConfig: expected norm_options to hold values JSON can write (numbers, "
                                 f"strings, bools, lists, dicts), as the config is saved with the model; got "
                                 f"{self.norm_options!r} ({e})") from None
        from normlab.norms import build_norm

        # one norm of the config, built here at d_model: an eps or an option the norm refuses
        # (ScaleNorm's eps must be > 0) is named as the config's field, not later by the
        # norm's own name; a norm that refuses d_model itself is named so
        try:
            build_norm(self.norm, self.d_model, eps=self.norm_eps, **(self.norm_options or {}))
        except (TypeError, ValueError) as e:
            try:
                build_norm(self.norm, self.d_model)
            except (TypeError, ValueError) as plain:
                raise ValueError(f"TransformerConfig: norm {self.norm!r} refuses d_model={self.d_model}: "
                                 f"{plain}") from None
            fields = f"norm_eps={self.norm_eps!r}" + (f", norm_options {self.norm_options!r}"
                                                      if self.norm_options else "")
            raise ValueError(f"TransformerConfig: norm {self.norm!r} refuses {fields}: {e}") from None
        if self.qk_norm is not None and (not isinstance(self.qk_norm, str) or self.qk_norm not in QK_NORMS):
            raise ValueError(
                f"TransformerConfig: unknown qk_norm {self.qk_norm!r}; expected None or one of: {', '.join(QK_NORMS)}"
            )
        _check_choice("qk_norm_scope", self.qk_norm_scope, QK_NORM_SCOPES)
        if self.qk_norm is not None and (self.head_dim if self.qk_norm_scope == "head" else self.d_model) < 2:
            over = "head_dim (d_model / n_heads)" if self.qk_norm_scope == "head" else "d_model"
            raise ValueError(
                f"TransformerConfig: qk_norm={self.qk_norm!r} with qk_norm_scope={self.qk_norm_scope!r} needs "
                f"{over} >= 2, got 1: over one feature it leaves each query and key only its sign or its bias"
            )
        if self.placement_options is not None:
            self._check_placement_options()
        if "inner" in get_placement(self.placement).slots and self.d_ff != self.d_model:
            # the FFN's inner norm (Sub-LN) is d_ff wide: a size rule of the norm (PowerNorm's
            # groups) is named here, as d_ff's, not when the model is built
            try:
                build_norm(self.norm, self.d_ff, eps=self.norm_eps, **(self.norm_options or {}))
            except (TypeError, ValueError) as e:
                raise ValueError(f"TransformerConfig: placement {self.placement!r} puts a {self.norm!r} norm "
                                 f"inside the FFN, over d_ff={self.d_ff} features, which it refuses: {e}") from None
        for name in ("embedding_norm", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TransformerConfig: expected {name} to be a bool, got {getattr(self, name)!r}")

    def _check_placement_options(self) -> None:
        opts = self.placement_options
        if not isinstance(opts, dict) or not all(isinstance(k, str) for k in opts):
            raise ValueError(
                f"TransformerConfig: expected placement_options to be None or a dict of keyword arguments, "
                f"got {opts!r}"
            )
        opts = _plain_options(opts)
        cls = get_placement(self.placement)
        unknown = sorted(set(opts) - set(cls.options))
        if unknown:
            expected = ", ".join(cls.options) if cls.options else "none (it takes no options)"
            raise ValueError(
                f"TransformerConfig: unknown placement_options key(s) {', '.join(map(repr, unknown))} for "
                f"placement {self.placement!r}; expected any of: {expected}"
            )
        try:
            cls(**opts)
        except (TypeError, ValueError) as e:
            raise ValueError(f"TransformerConfig: placement_options {opts!r} do not fit placement "
                             f"{self.placement!r}: {e}") from None
        object.__setattr__(self, "placement_options", opts)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-serialisable dict of every field."""
        return asdict(self)

    def __hash__(self) -> int:
        # (the option dicts are not hashable: their items as frozensets, so that configs
        # equal as dataclasses, 1 and 1.0 or 0.0 and -0.0 alike, hash alike)
        return hash(tuple(_frozen(getattr(self, f.name)) for f in fields(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TransformerConfig:
        """The config ``to_dict`` wrote; unknown keys are an error, missing ones take defaults."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"TransformerConfig.from_dict: unknown field(s) {', '.join(unknown)}; "
                f"expected any of: {', '.join(sorted(known))}"
            )
        return cls(**d)


def _frozen(v: object) -> object:
    """``v`` hashable: dicts as frozensets of their items, lists as tuples."""
    if isinstance(v, dict):
        return frozenset((k, _frozen(x)) for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return tuple(_frozen(x) for x in v)
    return v


def _as_float(v: object) -> float | None:
    """A real number (numpy scalar and Fraction included, bool not) as a plain float, else None."""
    if not isinstance(v, numbers.Real) or isinstance(v, bool):
        return None
    try:
        return float(v)
    except (OverflowError, ValueError, TypeError):
        return None


def _check_int(name: str, v: object) -> int:
    """An int >= 1 (a numpy integer included, bool not), as a plain int."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"TransformerConfig: expected {name} to be an int >= 1, got {v!r}")
    return int(v)


def _plain_options(opts: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``opts`` with its numbers as plain ints and floats (bools as they are) and
    its sequences as lists, so the config stays JSON-serialisable and equal to itself
    read back; what else a value may be is the norm's or
    placement's to check."""
    def plain(v: object) -> object:
        if type(v) in (list, tuple):
            # (each number plain; a tuple as a list, as JSON gives it back, so a config
            # read from its dict equals it; a namedtuple's as it is)
            return [plain(x) for x in v]
        if type(v) is dict:
            return {k: plain(x) for k, x in v.items()}
        if type(v).__module__ == "numpy" and isinstance(getattr(v, "item", lambda: None)(), bool):
            return bool(v)  # numpy's bool (not a numbers.Real)
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            return v
        if isinstance(v, numbers.Integral):
            return int(v)
        f = _as_float(v)
        return v if f is None else f
    return {k: plain(v) for k, v in opts.items()}


def _check_choice(name: str, v: object, choices: list[str] | tuple[str, ...]) -> None:
    if not isinstance(v, str) or v not in choices:
        raise ValueError(
            f"TransformerConfig: unknown {name} {v!r}; expected one of: {', '.join(choices)}"
        )
