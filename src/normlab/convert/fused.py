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

from normlab.convert.args import check_module
from normlab.convert.blocks import block_entry
from normlab.errors import NormArgumentError

_PREFIX = "Fused__"
_CLASSES: dict[type, type] = {}


def _encode(base: type) -> str:
    return _PREFIX + f"{base.__module__}:{base.__qualname__}".replace(".", "_o_").replace(":", "_c_")


def _unfused(cls: type) -> type:
    """``cls``'s original block class where ``cls`` is a fused subclass (as the block class
    itself is while ``normlab.integrations.hf.patch`` replaces it in its modeling module)."""
    while "_normlab_base" in cls.__dict__:
        cls = cls.__dict__["_normlab_base"]
    return cls


def fused_class(base: type) -> type:
    """The fused subclass of a registered block class (of its original class where ``base``
    is itself a fused subclass: one fused class per block class, never fused twice)."""
    base = _unfused(base)
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
    """Give ``block`` (an instance of a registered block class) its fused forward, in place;
    a fused block is left as it is."""
    check_module("fuse", "block", block)
    if not is_fused(block):
        _, entry = block_entry(block)
        if entry is None or entry.forward is None:
            raise NormArgumentError(f"fuse: expected block to be a block whose fused forward is registered in "
                                    f"normlab.convert.blocks, got {type(block).__qualname__} (no fused forward is "
                                    "registered for it, or it defines its own forward)")
        block.__class__ = fused_class(type(block))


def unfuse(block: nn.Module) -> None:
    """Give a fused ``block`` its original class back, in place; any other module is left."""
    check_module("unfuse", "block", block)
    if is_fused(block):
        block.__class__ = type(block)._normlab_base


def __getattr__(name: str) -> type:
    # pickling and unpickling: the fused class of its encoded base class; while a patch
    # replaces that base in its module by the fused class, fused_class unwraps it, so
    # this is the very class instances have (pickle checks that) and never a fused fused
    if not name.startswith(_PREFIX):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    mod, _, qual = name[len(_PREFIX):].replace("_o_", ".").partition("_c_")
    base = importlib.import_module(mod)
    for part in qual.split("."):
        base = getattr(base, part)
    return fused_class(base)
