"""The argument checks of normlab.convert's public functions: run at the top of each, before
any work, so a bad argument is named (``swap_norms: expected include to be ...``) rather
than failing somewhere inside the transform, or being silently taken (``add_bias="False"``
is truthy). Wrong types raise NormTypeError (a TypeError and a ValueError), wrong values
NormArgumentError (a ValueError), as normlab's ops and modules do."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch
from torch import nn

from normlab.errors import NormArgumentError, NormTypeError


def check_module(where: str, name: str, value: object) -> None:
    """``value`` is a torch.nn.Module."""
    if not isinstance(value, nn.Module):
        raise NormTypeError(f"{where}: expected {name} to be a torch.nn.Module, got {type(value).__name__}")


def check_patterns(where: str, name: str, value: object) -> tuple[str, ...] | None:
    """An include/exclude filter: None, one fnmatch pattern (a str) or an iterable of them;
    returned as a tuple (an iterator is read once, here)."""
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    expected = f"{name} to be a str or an iterable of str (fnmatch patterns over module paths)"
    if isinstance(value, (bytes, bytearray)) or not isinstance(value, Iterable):
        raise NormTypeError(f"{where}: expected {expected}, got {type(value).__name__}")
    out = tuple(value)
    for bad in out:
        if not isinstance(bad, str):
            raise NormTypeError(f"{where}: expected {expected}, got a {type(value).__name__} holding "
                                f"{type(bad).__name__} {bad!r}")
    return out


def check_bool(where: str, name: str, value: object) -> bool:
    """A flag: True or False, numpy's bools, or the integers 0 and 1 (a string such as
    "False" is truthy, so it is refused)."""
    if isinstance(value, bool):
        return value
    numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")
    if numpy_bool or (isinstance(value, numbers.Integral) and value in (0, 1)):
        return bool(value)
    raise NormTypeError(f"{where}: expected {name} to be a bool (True or False), got "
                        f"{type(value).__name__} {value!r}")


def check_tolerance(where: str, name: str, value: object) -> float:
    """A comparison tolerance: a finite real number >= 0 (a one-element real tensor too),
    returned as a float."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex() \
            and value.dtype is not torch.bool and not value.is_meta:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise NormTypeError(f"{where}: expected {name} to be a finite number >= 0, got "
                            f"{type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise NormArgumentError(f"{where}: expected {name} to be a finite number >= 0, got {value!r}")
    return float(value)


def check_names(where: str, name: str, values: tuple, what: str) -> None:
    """Registered names: at least one, each a str (``what`` says which)."""
    if not values:
        raise NormArgumentError(f"{where}: expected at least one {name} ({what}), got none")
    for v in values:
        if not isinstance(v, str) or not v:
            raise NormTypeError(f"{where}: expected each {name} to be a non-empty str ({what}), got "
                                f"{type(v).__name__} {v!r}")
