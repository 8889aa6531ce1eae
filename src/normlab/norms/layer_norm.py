"""normlab.LayerNorm and normlab.RMSNorm: drop-in for torch.nn.LayerNorm / torch.nn.RMSNorm.

They subclass torch's modules, so constructor arguments, defaults, parameter names,
state_dict keys, ``reset_parameters`` and ``extra_repr`` are torch's own; only the
forward changes: it runs normlab's ops (fused Triton kernels on CUDA) and takes an
optional residual for the fused add + dropout + norm.

Per-example gradient norms: set ``module.collect_per_example_grad_sq = True``; each
forward then allocates a float32 [2, x.shape[0]] buffer, passes it to the op as
``per_example_grad_sq`` and keeps it as ``module.per_example_grad_sq``; after the
backward it holds each example's ||dL_b/dweight||^2 and ||dL_b/dbias||^2 (see
``normlab.functional.layer_norm``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab import functional as F
from normlab.norms.base import ResidualNorm
from normlab.norms.registry import register_norm


class _PerExampleGradSq:
    """Mixin: ``collect_per_example_grad_sq`` switches on the per-example buffer."""

    collect_per_example_grad_sq: bool = False
    per_example_grad_sq: Tensor | None = None

    def _per_example_buffer(self, x: Tensor) -> Tensor | None:
        if not self.collect_per_example_grad_sq or self.weight is None or not torch.is_grad_enabled():
            return None
        self.per_example_grad_sq = torch.zeros(2, x.shape[0], dtype=torch.float32, device=x.device)
        return self.per_example_grad_sq


@register_norm("layernorm")
class LayerNorm(_PerExampleGradSq, ResidualNorm, nn.LayerNorm):
    """y = (x - E[x]) / sqrt(Var[x] + eps) * gamma + beta (Ba et al. 2016, "Layer Normalization")."""

    def normalize(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps,
                            per_example_grad_sq=self._per_example_buffer(x))

    def add_normalize(self, x, residual, dropout_p, residual_dtype, padding_mask):
        return F.add_layer_norm(
            x, residual, self.weight, self.bias, self.eps, dropout_p=dropout_p,
            training=self.training, residual_dtype=residual_dtype,
            normalized_shape=self.normalized_shape,
            per_example_grad_sq=self._per_example_buffer(x),
        )


@register_norm("rmsnorm")
class RMSNorm(_PerExampleGradSq, ResidualNorm, nn.RMSNorm):
    """y = x / sqrt(mean(x^2) + eps) * gamma (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization")."""

    def normalize(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps,
                          per_example_grad_sq=self._per_example_buffer(x))

    def add_normalize(self, x, residual, dropout_p, residual_dtype, padding_mask):
        return F.add_rms_norm(
            x, residual, self.weight, self.eps, dropout_p=dropout_p, training=self.training,
            residual_dtype=residual_dtype, normalized_shape=self.normalized_shape,
            per_example_grad_sq=self._per_example_buffer(x),
        )
