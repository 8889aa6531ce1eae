"""Adopt normlab in an existing model without rewriting it.

    swap_norms(model)            norm layers -> normlab's (fused add+norm in known blocks)
    fold_norm_affine(model)      fold each norm's gamma/beta into the Linear layers reading it
    layernorm_to_rmsnorm(model)  exact Pre-LN -> Pre-RMSNorm (Jiang et al. 2023)

Each changes the model in place and returns a ``ConversionReport``.
"""

from normlab.convert.report import ConversionReport, Entry
from normlab.convert.swap import swap_norms

__all__ = ["ConversionReport", "Entry", "swap_norms"]
