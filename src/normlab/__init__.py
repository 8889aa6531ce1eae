"""normlab: normalization for transformers.

Exact, fused LayerNorm/RMSNorm (drop-in for torch.nn), the zoo of published norms
behind one registry, every norm placement, and diagnostics of training stability.
"""

from __future__ import annotations

import importlib

from normlab import functional
from normlab.backend import get_backend, set_backend
from normlab.errors import NormArgumentError
from normlab.norms import (
    AdaLN,
    DyT,
    LayerNorm,
    MaskedBatchNorm,
    NoNorm,
    PowerNorm,
    RMSNorm,
    ScaleNorm,
    build_norm,
    norm_names,
)

__version__ = "0.1.0"

_SUBPACKAGES = ("models", "diagnostics", "convert", "studies", "bench", "integrations")


def __getattr__(name: str):
    # subpackages load on first use, so ``import normlab`` stays light
    if name in _SUBPACKAGES:
        return importlib.import_module(f"normlab.{name}")
    raise AttributeError(f"module 'normlab' has no attribute {name!r}")


__all__ = [
    "AdaLN", "DyT", "LayerNorm", "MaskedBatchNorm", "NoNorm", "NormArgumentError", "PowerNorm",
    "RMSNorm", "ScaleNorm", "build_norm", "functional", "get_backend", "norm_names",
    "set_backend",
]
