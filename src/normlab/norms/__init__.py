"""Norm modules and the registry. Importing this package registers every norm."""

from normlab.norms.adaln import AdaLN
from normlab.norms.base import ResidualNorm
from normlab.norms.layer_norm import LayerNorm, RMSNorm
from normlab.norms.registry import build_norm, get_norm_entry, is_norm, norm_names, register_norm
from normlab.norms.zoo import (
    DyT,
    MaskedBatchNorm,
    NoNorm,
    PowerNorm,
    ScaleNorm,
    sync_batch_statistics,
)

__all__ = [
    "AdaLN", "DyT", "LayerNorm", "MaskedBatchNorm", "NoNorm", "PowerNorm", "RMSNorm",
    "ResidualNorm", "ScaleNorm", "build_norm", "get_norm_entry", "is_norm", "norm_names", "register_norm",
    "sync_batch_statistics",
]
