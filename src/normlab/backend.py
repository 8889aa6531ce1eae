"""Which implementation runs an op: ``set_backend("auto" | "torch" | "triton")``.

auto:   on CUDA, Triton kernels for calls of at least AUTO_TRITON_MIN_ELEMENTS elements
        and torch's ops below (where a call's host time outweighs the kernels' gain);
        the torch path on CPU tensors and for float64, which the kernels do not run.
torch:  always the torch path (the reference or a fused torch equivalent).
triton: always the Triton kernels; on CPU tensors this needs ``TRITON_INTERPRET=1``
        (the Triton interpreter), otherwise it raises.

The starting value comes from the environment variable ``NORMLAB_BACKEND``.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.autograd.forward_ad as _forward_ad

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
            importlib.import_module("normlab.ops.triton")  # it hands itself to normlab.ops
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


# ``auto`` on CUDA: normlab's kernels from this many elements per call, torch's ops below.
# From the committed H100 table (benchmarks/results/kernels-cuda-bf16.md, bf16, forward +
# backward, normlab / torch eager): every norm op was slower below 2^26 elements per call
# (0.10-0.77 at 4096 rows, 0.17-1.14 at 16384 rows and hidden <= 4096) and faster from
# 2^27 (1.02-1.99 at 16384 x 8192 and 65536 x 2048 up); the e2e step at 8 x 1024 x 1024
# (2^23 per call) was 0.69-1.02x with the kernels. Re-derive it from a new table.
AUTO_TRITON_MIN_ELEMENTS = 1 << 27
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def auto_choice(is_cuda: bool, dtype: torch.dtype, numel: int) -> str:
    """What ``auto`` runs for a call on a tensor of that device kind, dtype and size."""
    if is_cuda and dtype in _KERNEL_DTYPES and numel >= AUTO_TRITON_MIN_ELEMENTS and triton_available():
        return "triton"
    return "torch"


def forward_ad_active() -> bool:
    """A ``torch.autograd.forward_ad.dual_level`` is open: dual tensors may reach an op,
    and normlab's autograd Functions and custom ops have no forward-mode formula."""
    return _forward_ad._current_level >= 0


def in_backward() -> bool:
    """Inside a backward pass (a hook run by autograd's engine, or activation checkpointing
    recomputing a forward): the monitors do not count such a forward again. (Not known
    inside a compiled graph, which dynamo traces: False there.)"""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def checkpoint_recompute() -> bool:
    """Non-reentrant activation checkpointing (``torch.utils.checkpoint``) is recomputing
    a forward inside the backward: its recomputation's saved-tensor hooks are the ones in
    force. (Reentrant checkpointing runs its first forward without grad and records it in
    the backward, as a plain forward: not this.) False inside a compiled graph."""
    if torch.compiler.is_compiling():
        return False
    hooks = _top_saved_tensors_hooks(False) if _top_saved_tensors_hooks is not None else None
    return hooks is not None and "_recomputation_hook" in getattr(hooks[0], "__qualname__", "")


_top_saved_tensors_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
_functorch_active = torch._C._are_functorch_transforms_active


def resolve(x: torch.Tensor) -> str:
    """The backend that will run an op on ``x``: "torch" or "triton". Under torch.func
    transforms (grad, vmap, jvp, ...) and forward-mode AD (dual tensors) always "torch":
    the kernels' custom ops have no functorch or forward-mode rules, so even a forced
    "triton" runs the torch path there."""
    choice = _current if _current is not None else get_backend()
    if choice == "torch" or _functorch_active() or _forward_ad._current_level >= 0:
        return "torch"
    if choice == "auto":
        return auto_choice(True, x.dtype, x.numel()) if x.is_cuda else "torch"
    if not triton_available():
        raise RuntimeError(
            "normlab backend 'triton' was asked for, but triton is not installed "
            "(pip install 'normlab[triton]')"
        )
    if x.is_cuda or (x.is_cpu and triton_interpreter_on()):
        return "triton"
    raise RuntimeError(
        f"normlab backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 to run the kernels "
        f"on CPU under the Triton interpreter; got a tensor on {x.device}"
    )
