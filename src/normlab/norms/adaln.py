"""Adaptive LayerNorm conditioned on a vector (DiT's adaLN-Zero modulation)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab import functional as F
from normlab.errors import NormArgumentError


class AdaLN(nn.Module):
    """y = LN(x) * (1 + scale(c)) + shift(c), [shift, scale] = Linear(SiLU(c)) zero-initialised (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

    ``x``: [B, ..., dim]; ``cond``: [B, cond_dim]. At initialization the modulation is
    zero, so the module is a LayerNorm without affine parameters."""

    def __init__(self, dim: int, cond_dim: int, eps: float = 1e-6, device=None, dtype=None) -> None:
        super().__init__()
        self.dim, self.cond_dim, self.eps = dim, cond_dim, eps
        self.modulation = nn.Linear(cond_dim, 2 * dim, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        if not isinstance(cond, Tensor) or cond.dim() != 2 or cond.shape[-1] != self.cond_dim \
                or x.dim() < 2 or cond.shape[0] != x.shape[0]:
            got = list(cond.shape) if isinstance(cond, Tensor) else type(cond).__name__
            raise NormArgumentError(
                f"AdaLN: expected cond of shape [{x.shape[0] if x.dim() else 'B'}, {self.cond_dim}] "
                f"(batch, cond_dim) for input of size{list(x.shape)}, got {got}"
            )
        shift, scale = self.modulation(torch.nn.functional.silu(cond)).chunk(2, dim=-1)
        view = (x.shape[0],) + (1,) * (x.dim() - 2) + (self.dim,)
        y = F.layer_norm(x, (self.dim,), None, None, self.eps)
        return y * (1 + scale.view(view)) + shift.view(view)

    def extra_repr(self) -> str:
        return f"{self.dim}, cond_dim={self.cond_dim}, eps={self.eps}"
