"""normlab: normalization for transformers.

Exact, fused LayerNorm/RMSNorm (drop-in for torch.nn), the zoo of published norms
behind one registry, every norm placement, and diagnostics of training stability.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# every public name loads on first use (``import normlab`` imports no torch): the command
# line's entry point (``normlab.__main__``, under this package) then covers torch's own
# import, which a Ctrl-C in the first second interrupts, with its one-line exit
_NAMES = {
    "functional": ("normlab.functional", None),
    "get_backend": ("normlab.backend", "get_backend"),
    "set_backend": ("normlab.backend", "set_backend"),
    "NormArgumentError": ("normlab.errors", "NormArgumentError"),
    **{name: ("normlab.norms", name) for name in (
        "AdaLN", "DyT", "LayerNorm", "MaskedBatchNorm", "NoNorm", "PowerNorm", "RMSNorm", "ScaleNorm",
        "build_norm", "norm_names")},
}
_SUBPACKAGES = ("models", "diagnostics", "convert", "studies", "bench", "integrations")
_MODULES = ("backend", "errors", "norms", "ops", "provenance", "cli")

if TYPE_CHECKING:  # (what the names are, for type checkers and editors)
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


def __getattr__(name: str):
    if name in _NAMES:
        module, attr = _NAMES[name]
        value = importlib.import_module(module)
        value = value if attr is None else getattr(value, attr)
        globals()[name] = value  # (looked up once)
        return value
    if name in _SUBPACKAGES or name in _MODULES:  # (``normlab.backend`` after ``import normlab``, as before)
        return importlib.import_module(f"normlab.{name}")
    raise AttributeError(f"module 'normlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    # (the names and the torch-only modules: pydoc and inspect read every name listed, and
    # the command line's and bench's modules need the study extra)
    return sorted({*globals(), *_NAMES, "backend", "errors", "norms", "ops", "provenance"})


__all__ = [
    "AdaLN", "DyT", "LayerNorm", "MaskedBatchNorm", "NoNorm", "NormArgumentError", "PowerNorm",
    "RMSNorm", "ScaleNorm", "build_norm", "functional", "get_backend", "norm_names",
    "set_backend",
]
