"""The op implementations, one module per backend, each with the same functions.

``ops/reference.py`` holds the one pure-torch reference of every op; ``ops/eager.py``
is the torch backend; ``ops/triton/`` the Triton kernels. ``normlab.functional``
checks the arguments, then ``backend_ops(x)`` picks the module with one plain ``if``:

    functional.rms_norm  ->  ops.eager.rms_norm          (CPU, backend torch)
                         ->  ops.triton.rms_norm  ->  custom_ops  ->  norm.py kernels
"""

from __future__ import annotations

import importlib
from types import ModuleType

from normlab.backend import resolve, triton_available
from normlab.ops import eager

OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "dropout_add")

_triton: ModuleType | None = None


def triton_ops() -> ModuleType:
    """normlab.ops.triton, imported on first use (at normlab's import wherever CUDA and
    triton are both present, so torch.compile never traces the import)."""
    global _triton
    if _triton is None:
        _triton = importlib.import_module("normlab.ops.triton")
    return _triton


def backend_ops(x) -> ModuleType:
    """The module that runs an op on ``x``: ``ops.eager`` or ``ops.triton``."""
    return triton_ops() if resolve(x) == "triton" else eager


def _import_triton_for_cuda() -> None:
    import torch

    if triton_available() and torch.cuda.is_available():
        triton_ops()


_import_triton_for_cuda()
