"""The forward protocol every registered norm follows.

    norm(x)                                   -> normalized x
    norm(x, residual, dropout_p=p)            -> (norm(residual + dropout(x)), residual + dropout(x))
    norm(x, padding_mask=mask)                -> norms with batch statistics ignore padded positions

so a transformer block calls any norm the same way, and LayerNorm/RMSNorm take the
fused add+norm kernel behind that call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normlab import functional as F
from normlab.errors import NormArgumentError


def refuse_traced_default(norm: object, residual: object) -> None:
    """A norm's residual that is a ``torch.fx.symbolic_trace`` graph input with a default of
    None (the norm's own ``residual`` when it is the root module, or a traced model's
    ``forward(x, residual=None)`` passing its own on): the graph would take it as given,
    and return the fused op's pair at run time without one. Refused, naming the argument
    to fix with ``concrete_args``."""
    node = getattr(residual, "node", None)
    if getattr(node, "op", None) == "placeholder" and node.args[:1] == (None,):
        raise NormArgumentError(
            f"{type(norm).__name__}: its residual is the traced graph's input {node.target!r}, None by "
            f"default, which the graph would take as given (a call without it would return the fused "
            f"op's pair); expected a residual that is given: trace with concrete_args={{{node.target!r}: "
            f"None}} for calls without one, or make {node.target!r} a required argument")


class ResidualNorm:
    """Mixin: ``forward(x, residual=None, *, dropout_p=0.0, residual_dtype=None, padding_mask=None)``.

    Subclasses implement ``normalize(x, padding_mask)``; norms with a fused add+norm op
    also override ``add_normalize``. ``padding_mask`` (bool, True at padded positions,
    shape ``x.shape[:-1]``) matters only to norms that mix positions (batch statistics);
    per-position norms ignore it, which is exact for them."""

    def normalize(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def add_normalize(self, x: Tensor, residual: Tensor, dropout_p: float,
                      residual_dtype: torch.dtype | None,
                      padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        try:
            new_residual = F.dropout_add(
                x, residual, dropout_p=dropout_p, training=self.training, residual_dtype=residual_dtype
            )
        except NormArgumentError as e:  # named as this norm's call, not the op inside it
            raise type(e)(str(e).replace("dropout_add:", f"{type(self).__name__}:", 1)) from None
        return self.normalize(new_residual, padding_mask).to(x.dtype), new_residual

    def forward(self, x: Tensor, residual: Tensor | None = None, *, dropout_p: float = 0.0,
                residual_dtype: torch.dtype | None = None,
                padding_mask: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        if residual is None:
            return self.normalize(x, padding_mask)
        if residual.__class__ is not Tensor:
            refuse_traced_default(self, residual)
        return self.add_normalize(x, residual, dropout_p, residual_dtype, padding_mask)
