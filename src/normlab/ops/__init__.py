"""Op implementations by backend.

``ops/reference.py`` holds the one pure-torch reference of every op; ``ops/eager.py``
registers the torch-backend implementations; ``ops/triton/`` registers the Triton
kernels when it is imported. ``normlab.functional`` validates arguments and then calls
``get_impl(op, backend)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "dropout_add")

_IMPLS: dict[tuple[str, str], Callable] = {}
_BACKEND_MODULES = {"torch": "normlab.ops.eager", "triton": "normlab.ops.triton"}


def register_impl(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as the ``backend`` implementation of ``op``."""
    if op not in OPS:
        raise ValueError(f"register_impl(op): unknown op {op!r}; expected one of {OPS}")

    def wrap(fn: Callable) -> Callable:
        _IMPLS[(op, backend)] = fn
        return fn

    return wrap


def get_impl(op: str, backend: str) -> Callable:
    """The ``backend`` implementation of ``op``, importing that backend's module on first use."""
    key = (op, backend)
    if key not in _IMPLS:
        importlib.import_module(_BACKEND_MODULES[backend])
    try:
        return _IMPLS[key]
    except KeyError:
        raise NotImplementedError(f"normlab: op {op!r} has no {backend!r} implementation") from None


# the torch backend is always needed: register it now, so the first op call never
# imports a module (torch.compile(fullgraph=True) cannot trace an import). Where CUDA
# and triton are both present, "auto" sends CUDA tensors to the triton backend: register
# it now too, for the same reason.
importlib.import_module(_BACKEND_MODULES["torch"])


def _import_triton_backend_for_cuda() -> None:
    import torch

    from normlab.backend import triton_available
    if triton_available() and torch.cuda.is_available():
        importlib.import_module(_BACKEND_MODULES["triton"])


_import_triton_backend_for_cuda()
