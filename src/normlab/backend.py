"""Which implementation runs an op: ``set_backend("auto" | "torch" | "triton")``.

auto:   Triton kernels on CUDA tensors, the torch path on CPU tensors (and for float64,
        which the kernels do not run).
torch:  always the torch path (the reference or a fused torch equivalent).
triton: always the Triton kernels; on CPU tensors this needs ``TRITON_INTERPRET=1``
        (the Triton interpreter), otherwise it raises.

The starting value comes from the environment variable ``NORMLAB_BACKEND``.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton")

_current: str | None = None  # None: not read from the environment yet


def _check_name(name: str, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{source}: expected one of {', '.join(map(repr, BACKENDS))}, got {name!r}")
    return name.lower()


def get_backend() -> str:
    """The backend in force: the last ``set_backend`` value, else ``$NORMLAB_BACKEND``, else auto."""
    global _current
    if _current is None:
        _current = _check_name(os.environ.get("NORMLAB_BACKEND", "auto"), "NORMLAB_BACKEND")
    return _current


class set_backend:
    """Set the backend; also a context manager that restores the previous one on exit.

    >>> normlab.set_backend("torch")            # from now on
    >>> with normlab.set_backend("triton"): ...  # only inside the block
    """

    def __init__(self, name: str) -> None:
        global _current
        name = _check_name(name, "set_backend(name)")
        if name == "triton" and triton_available():
            # register the kernels now: torch.compile cannot trace the import that a
            # first use would otherwise run
            from normlab.ops import triton_ops

            triton_ops()
        self._previous = get_backend()
        _current = name

    def __enter__(self) -> set_backend:
        return self

    def __exit__(self, *exc: object) -> None:
        global _current
        _current = self._previous

    def __repr__(self) -> str:
        return f"set_backend({get_backend()!r})"


_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when the triton package can be imported (looked up once, at import: a
    constant that torch.compile can trace through)."""
    return _TRITON_FOUND


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(x: torch.Tensor) -> str:
    """The backend that will run an op on ``x``: "torch" or "triton"."""
    choice = get_backend()
    if choice == "torch":
        return "torch"
    if choice == "auto":
        kernel_dtype = x.dtype in (torch.float16, torch.bfloat16, torch.float32)
        return "triton" if x.is_cuda and kernel_dtype and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError(
            "normlab backend 'triton' was asked for, but triton is not installed "
            "(pip install 'normlab[triton]')"
        )
    if x.is_cuda or (x.device.type == "cpu" and triton_interpreter_on()):
        return "triton"
    raise RuntimeError(
        f"normlab backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 to run the kernels "
        f"on CPU under the Triton interpreter; got a tensor on {x.device}"
    )
