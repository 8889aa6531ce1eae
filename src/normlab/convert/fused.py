"""Give a known block the forward that fuses its residual adds into the norms.

``fuse(block)`` swaps the block's class for a subclass of it whose only change is the
forward registered in ``normlab.convert.blocks`` (so ``isinstance`` checks, the class
name, parameters and state_dict keys are unchanged); ``unfuse(block)`` restores the
original class. The subclasses are importable from this module by a generated name,
so fused models still pickle and unpickle.
"""

from __future__ import annotations

import importlib

from torch import nn

from normlab.convert.blocks import block_entry

_PREFIX = "Fused__"
_CLASSES: dict[type, type] = {}


def _encode(base: type) -> str:
    return _PREFIX + f"{base.__module__}:{base.__qualname__}".replace(".", "_o_").replace(":", "_c_")


def fused_class(base: type) -> type:
    """The fused subclass of a registered block class."""
    cls = _CLASSES.get(base)
    if cls is None:
        _, entry = block_entry(base)
        if entry is None or entry.forward is None:
            raise ValueError(f"fused_class(base): no fused forward is registered for {base.__qualname__}")
        cls = type(base.__name__, (base,), {
            "forward": entry.forward, "_normlab_base": base,
            "__module__": __name__, "__qualname__": _encode(base),
            "__doc__": f"{base.__name__} with its residual adds fused into the following norms.",
        })
        _CLASSES[base] = cls
    return cls


def is_fused(module: nn.Module) -> bool:
    return "_normlab_base" in type(module).__dict__


def fuse(block: nn.Module) -> None:
    if not is_fused(block):
        block.__class__ = fused_class(type(block))


def unfuse(block: nn.Module) -> None:
    if is_fused(block):
        block.__class__ = type(block)._normlab_base


def __getattr__(name: str) -> type:
    # unpickling: rebuild the fused class from its encoded base class
    if not name.startswith(_PREFIX):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    mod, _, qual = name[len(_PREFIX):].replace("_o_", ".").partition("_c_")
    base = importlib.import_module(mod)
    for part in qual.split("."):
        base = getattr(base, part)
    return fused_class(base)
