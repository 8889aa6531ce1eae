"""The norm registry: ``build_norm(name, dim, **kw)`` and ``norm_names()``.

A norm is added by decorating its class with ``@register_norm("name")`` in its own
file; callers (models, studies, the CLI) only ever use the registry.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from normlab.errors import NormArgumentError


@dataclass(frozen=True)
class NormEntry:
    name: str
    cls: type[nn.Module]
    has_eps: bool

    @property
    def summary(self) -> str:
        """The one docstring line with the norm's equation and paper."""
        return (inspect.getdoc(self.cls) or "").splitlines()[0]


_REGISTRY: dict[str, NormEntry] = {}


def register_norm(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make ``cls`` buildable as ``build_norm(name, dim, **kw)``.

    ``cls(dim, **kw)`` must accept the norm's size first; its forward follows the
    protocol of ``normlab.norms.base.ResidualNorm``."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        old = _REGISTRY.get(name)
        # (the same class defined again, by importlib.reload or a notebook's autoreload,
        # takes its name back; another class may not)
        if old is not None and (old.cls.__module__, old.cls.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"register_norm: a norm named {name!r} is already registered "
                             f"({old.cls.__module__}.{old.cls.__qualname__})")
        _REGISTRY[name] = NormEntry(name, cls, _takes_eps(cls))
        return cls

    return wrap


def _takes_eps(cls: type) -> bool:
    """Whether ``cls(dim, eps=...)`` takes eps: its ``__init__`` names it, or passes its
    ``**kw`` on to a base class's that does (a subclass of torch's LayerNorm). A ``**kw``
    that reaches no eps (factory kwargs, nn.Module's) does not take it."""
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        if any(p.name == "eps" for p in params):
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return False
    return False


_TORCH_NORM_TYPES: tuple[type, ...] = (
    nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm,
)


def is_norm(module: nn.Module) -> bool:
    """True for a normalization layer: torch's, normlab's (every registered norm), and any
    other leaf module whose class name ends in ``Norm`` (LlamaRMSNorm, T5LayerNorm, ...),
    except torch's weight parametrizations (``_WeightNorm``, ``_SpectralNorm``: their
    forward takes a layer's weight, not activations)."""
    from normlab.norms.base import ResidualNorm

    if isinstance(module, (*_TORCH_NORM_TYPES, ResidualNorm)):
        return True
    cls = type(module)
    return (cls.__name__.endswith("Norm") and not cls.__module__.startswith("torch.nn.utils.")
            and next(module.children(), None) is None)


def norm_names() -> list[str]:
    """The registered norm names, in registration order."""
    return list(_REGISTRY)


def get_norm_entry(name: str) -> NormEntry:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise NormArgumentError(
            f"unknown norm {name!r}; expected one of: {', '.join(norm_names())}"
        ) from None


def check_size(name: str, arg: str, value: object) -> int:
    """A norm's size (``dim``, ``cond_dim``): an int >= 1 (a numpy integer taken, as torch's
    modules take it), returned as a plain int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise NormArgumentError(f"{name}: expected {arg} to be an int >= 1, got {value!r}")
    return int(value)


def build_norm(name: str, dim: int, **kw) -> nn.Module:
    """Build the norm registered as ``name`` over a last dim of size ``dim``.

    ``eps`` is passed to norms that have one and ignored by those that have none
    (``dyt``, ``none``), so a model can pass its ``norm_eps`` whatever the norm."""
    entry = get_norm_entry(name)
    dim = check_size("build_norm", "dim", dim)
    if not entry.has_eps or kw.get("eps", 0.0) is None:
        kw.pop("eps", None)  # None: the norm's own default
    return entry.cls(dim, **kw)
