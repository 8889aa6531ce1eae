"""normlab.LayerNorm and normlab.RMSNorm: drop-in for torch.nn.LayerNorm / torch.nn.RMSNorm.

They subclass torch's modules, so constructor arguments, defaults, parameter names,
state_dict keys, ``reset_parameters`` and ``extra_repr`` are torch's own; only the
forward changes: it runs normlab's ops (fused Triton kernels on CUDA) and takes an
optional residual for the fused add + dropout + norm.
"""

from __future__ import annotations

from torch import Tensor, nn

from normlab import functional as F
from normlab.norms.base import ResidualNorm
from normlab.norms.registry import register_norm


@register_norm("layernorm")
class LayerNorm(ResidualNorm, nn.LayerNorm):
    """y = (x - E[x]) / sqrt(Var[x] + eps) * gamma + beta (Ba et al. 2016, "Layer Normalization")."""

    def normalize(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def add_normalize(self, x, residual, dropout_p, residual_dtype, padding_mask):
        return F.add_layer_norm(
            x, residual, self.weight, self.bias, self.eps, dropout_p=dropout_p,
            training=self.training, residual_dtype=residual_dtype,
            normalized_shape=self.normalized_shape,
        )


@register_norm("rmsnorm")
class RMSNorm(ResidualNorm, nn.RMSNorm):
    """y = x / sqrt(mean(x^2) + eps) * gamma (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization")."""

    def normalize(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)

    def add_normalize(self, x, residual, dropout_p, residual_dtype, padding_mask):
        return F.add_rms_norm(
            x, residual, self.weight, self.eps, dropout_p=dropout_p, training=self.training,
            residual_dtype=residual_dtype, normalized_shape=self.normalized_shape,
        )
