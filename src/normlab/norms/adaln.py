"""Adaptive LayerNorm conditioned on a vector: DiT's adaLN modulation (shift and scale),
zero-initialised. adaLN-Zero's third output, the gate that scales the residual branch
before its add (zero at init, so each DiT block starts as the identity), belongs to the
block and is not part of this module."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab import functional as F
from normlab.errors import NormArgumentError
from normlab.norms.registry import check_size
from normlab.ops.reference import ADALN_NORMS


class AdaLN(nn.Module):
    """y = LN(x) * (1 + scale(c)) + shift(c), [shift, scale] = Linear(SiLU(c)) zero-initialised (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

    ``x``: [B, ..., dim]; ``cond``: [B, cond_dim]. At initialization the modulation is
    zero, so the module is a LayerNorm without affine parameters. ``norm="rmsnorm"``
    normalizes with RMSNorm instead. The norm and the modulation run as one fused op
    (``normlab.functional.adaln_modulate``), forward and backward."""

    def __init__(self, dim: int, cond_dim: int, eps: float = 1e-6, device=None, dtype=None,
                 norm: str = "layernorm") -> None:
        super().__init__()
        dim = check_size("AdaLN", "dim", dim)
        cond_dim = check_size("AdaLN", "cond_dim", cond_dim)
        if norm not in ADALN_NORMS:
            raise NormArgumentError(f"AdaLN: expected norm to be one of {', '.join(ADALN_NORMS)}, got {norm!r}")
        eps = F._check_eps("AdaLN", eps, allow_none=False)
        self.dim, self.cond_dim, self.eps, self.norm = dim, cond_dim, eps, norm
        self.modulation = nn.Linear(cond_dim, 2 * dim, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        # x first: its batch is what cond is checked against
        if not isinstance(x, Tensor):
            raise TypeError(f"AdaLN: expected input to be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2 or x.shape[-1] != self.dim:
            raise NormArgumentError(f"AdaLN: expected input of shape [B, ..., {self.dim}] (a batch dim, then "
                                    f"any dims, then dim), got input of size{list(x.shape)}")
        if not isinstance(cond, Tensor) or cond.dim() != 2 or cond.shape[-1] != self.cond_dim \
                or cond.shape[0] != x.shape[0]:
            got = list(cond.shape) if isinstance(cond, Tensor) else type(cond).__name__
            raise NormArgumentError(
                f"AdaLN: expected cond of shape [{x.shape[0]}, {self.cond_dim}] "
                f"(batch, cond_dim) for input of size{list(x.shape)}, got {got}"
            )
        w = self.modulation.weight
        # (autocast casts a float32, float16 or bfloat16 input of the modulation, never a float64 one)
        autocast = torch.is_autocast_enabled(cond.device.type) and cond.dtype != torch.float64
        if cond.device != w.device or (cond.dtype != w.dtype and not autocast):
            raise NormArgumentError(f"AdaLN: expected cond as the modulation's parameters: {w.dtype} on "
                                    f"{w.device} (under autocast any floating dtype but float64), got {cond.dtype} "
                                    f"on {cond.device}")
        shift, scale = self.modulation(torch.nn.functional.silu(cond)).chunk(2, dim=-1)
        view = (x.shape[0],) + (1,) * (x.dim() - 2) + (self.dim,)
        return F.adaln_modulate(x, scale.view(view), shift.view(view), self.eps, norm=self.norm)

    def extra_repr(self) -> str:
        norm = "" if self.norm == "layernorm" else f", norm={self.norm!r}"
        return f"{self.dim}, cond_dim={self.cond_dim}, eps={self.eps}{norm}"
