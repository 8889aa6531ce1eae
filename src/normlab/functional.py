"""normlab's public ops: argument checks, then dispatch to the backend in force.

Every function here has one reference in ``normlab.ops.reference``; after the checks,
``backend_ops(x)`` picks ``normlab.ops.eager`` or ``normlab.ops.triton`` by the backend
in force (``normlab.set_backend``, see ``normlab.backend``) and calls its function of
the same name.

Weight and bias may have any floating-point dtype, whatever x's (float32 weights with
bfloat16 activations, ...): as in torch, the output keeps x's dtype and each gradient
has its tensor's dtype; the weight and bias gradients are summed in float32 (on the
torch backend float64 for float64 x or parameters) and rounded once to the parameter's
dtype (docs/kernels.md, "Mixed dtypes").
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function

from normlab.backend import get_backend, resolve
from normlab.errors import NormArgumentError, NormDtypeError, NormTypeError
from normlab.ops import backend_ops, reference
from normlab.ops import eager as _eager
from normlab.ops.eager import NATIVE_RMS_MAX_NUMEL

__all__ = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "dropout_add"]

_HALF = (torch.float16, torch.bfloat16)
_F32 = torch.float32
_INF = math.inf
# the dtypes whose fused add is a plain ``residual + x`` on the torch backend (float64 goes
# through the reference, which gives the same sum)
_SHORT_ADD_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32))
# a residual stream's dtypes (float8 and the like: no sum is formed in them)
_STREAM_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
_PARAM_TYPES = (Tensor, torch.nn.Parameter)  # (a weight of another subclass takes the checked path)


# ---------------------------------------------------------------------------- checks


def _traced(*args: object) -> bool:
    """An argument that is no tensor but takes part in ``__torch_function__`` (torch.fx's
    Proxy, when a model is traced symbolically): the call is handed to it, to be recorded,
    as torch's own functional ops hand theirs."""
    return any(a is not None and not isinstance(a, Tensor) for a in args) and has_torch_function(
        tuple(a for a in args if a is not None))


def _check_tensor(op: str, name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: expected {name} to be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _STREAM_DTYPES:  # (float8 and the like: no op computes in them)
        raise NormDtypeError(
            f"{op}: expected {name} to have a floating-point dtype "
            f"(float16, bfloat16, float32 or float64), got {t.dtype}"
        )
    return t


def _check_normalized_shape(op: str, x: Tensor, normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    if type(normalized_shape) is int:  # the common call, checked without the general path
        if x.dim() >= 1 and x.shape[-1] == normalized_shape:
            return (normalized_shape,)
        shape = (normalized_shape,)
    elif isinstance(normalized_shape, numbers.Integral):
        shape = (int(normalized_shape),)
    else:
        try:
            shape = tuple(operator.index(d) for d in normalized_shape)
        except TypeError:
            raise TypeError(
                f"{op}: expected normalized_shape to be an int or a sequence of ints, "
                f"got {normalized_shape!r}"
            ) from None
    if not shape:
        raise NormArgumentError(f"{op}: expected normalized_shape to have at least one dimension, got ()")
    if len(shape) > x.dim() or tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise NormArgumentError(
            f"{op}: Given normalized_shape={list(shape)}, expected input with shape "
            f"[*, {', '.join(map(str, shape))}], but got input of size{list(x.shape)}"
        )
    return shape


def _check_param(op: str, name: str, p: Tensor | None, shape: tuple[int, ...], x: Tensor,
                 what: str = "normalized_shape") -> None:
    """weight/bias: the normalized shape (``what`` names the expected shape), x's device
    and a floating-point dtype (any: the output keeps x's dtype, and each parameter's
    gradient is summed in float32, float64 for float64, then rounded to its dtype)."""
    if p is None:
        return
    _check_tensor(op, name, p)
    if p.shape != shape:
        raise NormArgumentError(
            f"{op}: Expected {name} to be of same shape as {what}, but got {name} "
            f"of shape {list(p.shape)} and {what} = {list(shape)}"
        )
    if p.device != x.device:
        raise NormArgumentError(f"{op}: expected {name} on {x.device} (the input's device), got {p.device}")


def _check_eps(op: str, eps: float | Tensor | None, allow_none: bool) -> float | None:
    """eps as a float: any finite number, as torch takes (torch's own OpInfo samples use
    eps=-0.5), or a 0-dim tensor holding one; inf and nan are refused."""
    if type(eps) is float and -_INF < eps < _INF:  # (comparisons: traceable on a symbolic eps)
        return eps
    if eps is None and allow_none:
        return None
    if isinstance(eps, torch.SymFloat):
        return eps  # a traced eps (torch.compile with dynamic floats): checked where it is a number
    if isinstance(eps, Tensor) and eps.dim() == 0 and not eps.is_complex():
        eps = eps.item()
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps):
        expected = "None or a finite number" if allow_none else "a finite number"
        # (no number at all: also a TypeError, as torch raises; inf or nan: a ValueError)
        error = NormArgumentError if isinstance(eps, numbers.Real) and not isinstance(eps, bool) else NormTypeError
        raise error(f"{op}: expected eps to be {expected}, got {eps!r}")
    return float(eps)


def _restored_by_checkpointing(generator: torch.Generator) -> bool:
    """A device's default generator, whose state activation checkpointing saves and
    restores (torch's global RNG): a recomputed forward draws the same mask."""
    if generator is torch.default_generator:
        return True
    return generator.device.type == "cuda" and generator is torch.cuda.default_generators[generator.device.index or 0]


def _check_residual_args(op: str, x: Tensor, residual: Tensor | None, dropout_p: float,
                         generator: torch.Generator | None,
                         residual_dtype: torch.dtype | None, training: bool = False) -> None:
    if residual is not None:
        _check_tensor(op, "residual", residual)
        if residual.shape != x.shape:
            raise NormArgumentError(
                f"{op}: expected residual of the input's shape {list(x.shape)}, got {list(residual.shape)}"
            )
        if residual.device != x.device:
            raise NormArgumentError(f"{op}: expected residual on {x.device} (the input's device), got {residual.device}")
    if (type(dropout_p) is not float and (isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real))) \
            or not 0.0 <= dropout_p <= 1.0:
        raise NormArgumentError(f"{op}: expected dropout_p in [0, 1], got {dropout_p!r}")
    if type(training) is not bool:  # as torch's dropout asks (None, 1, a tensor refused)
        raise TypeError(f"{op}: expected training to be a bool, got {training!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"{op}: expected generator to be a torch.Generator or None, got {type(generator).__name__}")
        if (training and dropout_p > 0.0 and torch._C._current_graph_task_id() != -1
                and not _restored_by_checkpointing(generator)):
            # activation checkpointing recomputing the forward inside the backward: it
            # restores torch's global RNG, not this generator, which has moved on since
            raise RuntimeError(
                f"{op}: dropout with an explicit generator cannot run again inside a backward pass: "
                f"activation checkpointing (torch.utils.checkpoint) recomputes the forward there and "
                f"restores only torch's global RNG, so the mask would differ from the forward's and the "
                f"gradients would be wrong; under checkpointing pass generator=None (the global RNG), "
                f"or keep this call out of the checkpointed region")
    if residual_dtype is not None and (
        not isinstance(residual_dtype, torch.dtype) or residual_dtype not in _STREAM_DTYPES
    ):
        raise NormArgumentError(f"{op}: expected residual_dtype to be float16, bfloat16, float32, float64 or None, "
                                f"got {residual_dtype!r}")


def _fused_shape(op: str, x: Tensor, normalized_shape: int | Sequence[int] | None,
                 weight: Tensor | None, bias: Tensor | None) -> tuple[int, ...]:
    """The fused add+norm ops normalize over ``normalized_shape`` if given, else over the
    parameters' shape, else over the last dim."""
    if normalized_shape is not None:
        return _check_normalized_shape(op, x, normalized_shape)
    if x.dim() == 0:
        raise NormArgumentError(f"{op}: expected input with at least one dimension, got a 0-dim tensor")
    param = weight if weight is not None else bias
    if param is not None and isinstance(param, Tensor):
        pshape = param.shape
        if len(pshape) == 1 and type(pshape[0]) is int and x.shape[-1] == pshape[0]:
            return _check_normalized_shape(op, x, pshape[0])  # (the int path of the check; not a SymInt)
        n = len(pshape)
        if n == 0 or x.dim() < n or tuple(x.shape[-n:]) != tuple(pshape):
            # (no normalized_shape given: the parameter's shape is what disagrees with x)
            name = "weight" if weight is not None else "bias"
            raise NormArgumentError(
                f"{op}: expected {name} of shape {list(x.shape[-max(n, 1):])} (the input's trailing dims, as "
                f"normalized_shape is not given), got {name} of shape {list(pshape)} for input of size "
                f"{list(x.shape)}")
        return _check_normalized_shape(op, x, tuple(pshape))
    return tuple(x.shape[-1:])


def _check_norm_args(op: str, x: Tensor, normalized_shape: int | Sequence[int], weight: Tensor | None,
                     bias: Tensor | None, eps: float | None, *, is_rms: bool) -> tuple[tuple[int, ...], float | None]:
    """The checks of layer_norm / rms_norm (``is_rms``: eps may be None): (normalized shape, eps)."""
    _check_tensor(op, "input", x)
    return _check_params_eps(op, x, _check_normalized_shape(op, x, normalized_shape), weight, bias, eps, is_rms)


def _check_params_eps(op: str, x: Tensor, shape: tuple[int, ...], weight: Tensor | None, bias: Tensor | None,
                      eps: float | None, is_rms: bool) -> tuple[tuple[int, ...], float | None]:
    """The parameters' checks and eps, the end of every norm op's checks: (shape, eps)."""
    if weight is not None:
        _check_param(op, "weight", weight, shape, x)
    if bias is not None:
        _check_param(op, "bias", bias, shape, x)
    if type(eps) is float and -_INF < eps < _INF:  # (the common eps, without a call)
        return shape, eps
    return shape, _check_eps(op, eps, allow_none=is_rms)


def _check_add_args(op: str, x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None,
                    eps: float | None, dropout_p: float, generator: torch.Generator | None,
                    residual_dtype: torch.dtype | None, normalized_shape: int | Sequence[int] | None, *,
                    is_rms: bool, training: bool = False) -> tuple[tuple[int, ...], float | None]:
    """The checks of add_layer_norm / add_rms_norm: (normalized shape, eps)."""
    _check_tensor(op, "input", x)
    _check_residual_args(op, x, residual, dropout_p, generator, residual_dtype, training)
    return _check_params_eps(op, x, _fused_shape(op, x, normalized_shape, weight, bias), weight, bias, eps, is_rms)


# ---------------------------------------------------------------------------- ops


def _layer_norm(
    x: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Layer normalization over the trailing ``normalized_shape`` dims (Ba et al. 2016).

    y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias, biased variance, statistics in
    float32 (float64 for float64 input); same semantics as ``torch.nn.functional.layer_norm``."""
    shape, eps = _check_norm_args("layer_norm", x, normalized_shape, weight, bias, eps, is_rms=False)
    return backend_ops(x).layer_norm(x, shape, weight, bias, eps)


def _rms_norm(
    x: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    """RMS normalization over the trailing ``normalized_shape`` dims (Zhang & Sennrich 2019).

    y = x / sqrt(mean(x^2) + eps) * weight; eps=None uses float32's machine epsilon
    (float64's for float64 input), as ``torch.nn.functional.rms_norm``. Output keeps x's dtype."""
    shape, eps = _check_norm_args("rms_norm", x, normalized_shape, weight, None, eps, is_rms=True)
    return backend_ops(x).rms_norm(x, shape, weight, eps)


def _check_cast(op: str, offset: float, casting_mode: str) -> None:
    if type(offset) is float and -_INF < offset < _INF:  # (comparisons: traceable on a symbolic offset)
        pass
    elif isinstance(offset, torch.SymFloat):
        # a traced offset (torch.compile on recompiling): not checked there (neither a
        # guard nor torch._check on it refuses inf in torch 2.13); eager calls refuse it
        pass
    elif isinstance(offset, bool) or not isinstance(offset, numbers.Real) or not math.isfinite(offset):
        raise NormArgumentError(f"{op}: expected offset to be a finite number, got {offset!r}")
    if casting_mode not in reference.CASTING_MODES:
        raise NormArgumentError(f"{op}: expected casting_mode to be one of {', '.join(reference.CASTING_MODES)}, "
                                f"got {casting_mode!r}")


def _check_weight_shape(op: str, x: Tensor, shape: tuple[int, ...], weight_shape: Sequence[int]) -> tuple[int, ...]:
    """weight_shape: normalized_shape with dims in front of it, which x ends with."""
    wshape = tuple(int(d) for d in weight_shape)
    if wshape[len(wshape) - len(shape):] != shape:
        raise NormArgumentError(f"{op}: expected weight_shape to end with normalized_shape {list(shape)}, "
                                f"got {list(wshape)}")
    if len(wshape) > x.dim() or tuple(x.shape[x.dim() - len(wshape):]) != wshape:
        raise NormArgumentError(f"{op}: weight_shape={list(wshape)}: expected input with shape "
                                f"[*, {', '.join(map(str, wshape))}], but got input of size{list(x.shape)}")
    return wshape


def _layer_norm_torch_ops(x, normalized_shape, weight, bias, eps, offset,
                          weight_shape: Sequence[int] | None = None) -> Tensor:
    """layer_norm with a weight offset (the scale offset + weight, formed in float32), or
    with weight and bias of ``weight_shape``: normalized_shape with dims in front of it,
    one weight per head (broadcast over those trailing dims of x, which x must end with;
    Cohere's q/k norm normalizes each head over head_dim with weight_shape (heads,
    head_dim)). The Triton kernels take the offset where the backend in force resolves
    to them for x (``backend_ops``); otherwise, and for ``weight_shape`` on every
    device, torch ops in float32 (float64), rounded once to x's dtype
    (``ops.reference.layer_norm``)."""
    op = "layer_norm"
    _check_tensor(op, "input", x)
    shape = _check_normalized_shape(op, x, normalized_shape)
    pshape = shape if weight_shape is None else _check_weight_shape(op, x, shape, weight_shape)
    what = "normalized_shape" if pshape == shape else "weight_shape"
    _check_param(op, "weight", weight, pshape, x, what)
    _check_param(op, "bias", bias, pshape, x, what)
    eps = _check_eps(op, eps, allow_none=False)
    _check_cast(op, offset, "torch")
    if pshape == shape and _kernels_take(x, weight, "torch"):
        return backend_ops(x).layer_norm(x, shape, weight, bias, eps, offset=float(offset))
    return _layer_norm_offset(x, shape, pshape, weight, bias, eps, offset)


def _layer_norm_offset(x: Tensor, shape: tuple[int, ...], pshape: tuple[int, ...], weight: Tensor | None,
                       bias: Tensor | None, eps: float, offset: float) -> Tensor:
    """``_layer_norm_torch_ops``' torch ops, on checked arguments (``pshape``: the
    parameters' shape)."""
    if pshape == shape:  # (torch's fused op: 5-8x the chain below on a CPU)
        return _eager.layer_norm_scaled(x, shape, weight, bias, eps, float(offset))
    ct = reference.compute_dtype(x.dtype)
    scale = weight
    if offset != 0.0:
        scale = (torch.full(pshape, float(offset), dtype=ct, device=x.device) if weight is None  # offset alone
                 else weight.to(ct) + float(offset))
    return reference.layer_norm(x, shape, scale, None if bias is None else bias.to(ct), eps)


def _kernels_take(x: Tensor, weight: object, casting_mode: str) -> bool:
    """An offset / casting-mode call on x runs the fused kernels: the backend in force
    resolves to them for x, and the call is not llama's order with a float64 weight (its
    product is float64, which the kernels do not form)."""
    return resolve(x) == "triton" and (casting_mode != "llama" or getattr(weight, "dtype", None) is not torch.float64)


def _add_then_norm(op, x, residual, weight, bias, eps, dropout_p, training, generator, residual_dtype,
                   normalized_shape, offset, casting_mode="torch") -> tuple[Tensor, Tensor]:
    """add_layer_norm / add_rms_norm (``op``) with a weight offset or a casting mode: the fused
    kernels where they take the call (``_kernels_take``); otherwise in two steps,
    new_residual = dropout_add(x, residual), then the norm of new_residual in x's dtype
    (``_layer_norm_offset`` / ``reference.rms_norm_cast``, the torch ops of layer_norm's and
    rms_norm's offset paths)."""
    is_rms = op == "add_rms_norm"
    # every argument checked before any work, named for this op: the two-step path below
    # draws its dropout mask first (a refused call must not move the generator), and
    # _add_ops names the backend's residual dtypes, the wrong cause for an integer residual
    shape, eps = _check_add_args(op, x, residual, weight, bias, eps, dropout_p, generator, residual_dtype,
                                 normalized_shape, is_rms=is_rms, training=training)
    _check_cast(op, offset, casting_mode)
    ops = _add_ops(op, x, residual, residual_dtype) if _kernels_take(x, weight, casting_mode) else _eager
    if ops is not _eager:
        kw = dict(dropout_p=float(dropout_p), training=bool(training), generator=generator,
                  residual_dtype=residual_dtype, normalized_shape=shape, offset=float(offset))
        if is_rms:
            return ops.add_rms_norm(x, residual, weight, eps, casting_mode=casting_mode, **kw)
        return ops.add_layer_norm(x, residual, weight, bias, eps, **kw)
    # (checked: the op itself, which both backends run; then torch ops, in float32 or
    # float64: the kernels did not take the call)
    new_residual = _eager.dropout_add(x, residual, dropout_p=float(dropout_p), training=bool(training),
                                      generator=generator, residual_dtype=residual_dtype)
    out = (_torch_layout(reference.rms_norm_cast(new_residual, shape, weight, eps, offset=float(offset),
                                                 casting_mode=casting_mode), new_residual)
           if is_rms else _layer_norm_offset(new_residual, shape, shape, weight, bias, eps, offset))
    return out.to(x.dtype), new_residual


def _torch_layout(y: Tensor, x: Tensor) -> Tensor:
    """``y`` (the reference's op chain on ``x``, which keeps x's strides) in the layout
    torch's rms_norm and the kernels give: row-major, or x's channels_last(_3d)."""
    if y.is_contiguous() or y.is_nested:
        return y
    return y.contiguous(memory_format=_eager.torch_format(x) or torch.contiguous_format)


def _rms_norm_cast(x, normalized_shape, weight, eps, offset, casting_mode) -> Tensor:
    """rms_norm with an offset or a casting mode: the Triton kernels where the backend in
    force resolves to them for x (``backend_ops``), except llama's order with a float64
    weight (its product is float64, which the kernels do not form); otherwise torch ops
    (``ops.reference.rms_norm_cast``), differentiable by autograd."""
    op = "rms_norm"
    _check_tensor(op, "input", x)
    shape = _check_normalized_shape(op, x, normalized_shape)
    _check_param(op, "weight", weight, shape, x)
    eps = _check_eps(op, eps, allow_none=True)
    _check_cast(op, offset, casting_mode)
    if _kernels_take(x, weight, casting_mode):
        return backend_ops(x).rms_norm(x, shape, weight, eps, offset=float(offset), casting_mode=casting_mode)
    return _torch_layout(reference.rms_norm_cast(x, shape, weight, eps, offset=float(offset),
                                                 casting_mode=casting_mode), x)


def dropout_add(
    x: Tensor,
    residual: Tensor | None,
    *,
    dropout_p: float = 0.0,
    training: bool = False,
    generator: torch.Generator | None = None,
    residual_dtype: torch.dtype | None = None,
) -> Tensor:
    """new_residual = residual + dropout(x), summed in float32 (float64) and stored in
    ``residual_dtype`` (default x.dtype). ``residual=None`` is a zero residual."""
    op = "dropout_add"
    _check_tensor(op, "input", x)
    _check_residual_args(op, x, residual, dropout_p, generator, residual_dtype, training)
    return getattr(backend_ops(x), op)(  # (both backends' dropout_add forms float64 sums)
        x, residual, dropout_p=float(dropout_p), training=bool(training), generator=generator,
        residual_dtype=residual_dtype,
    )


def _add_layer_norm(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float = 1e-5,
    *,
    dropout_p: float = 0.0,
    training: bool = False,
    generator: torch.Generator | None = None,
    residual_dtype: torch.dtype | None = None,
    normalized_shape: int | Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused residual add + dropout + LayerNorm: returns (out, new_residual).

    new_residual = residual + dropout(x)   (stored in residual_dtype, default x.dtype)
    out          = layer_norm(new_residual) over normalized_shape (default: weight's
                   shape, the last dim without weight and bias), in x's dtype.
    Post-LN uses ``out`` as the next residual, Pre-LN uses ``new_residual``."""
    shape, eps = _check_add_args("add_layer_norm", x, residual, weight, bias, eps, dropout_p, generator,
                                 residual_dtype, normalized_shape, is_rms=False, training=training)
    return _add_ops("add_layer_norm", x, residual, residual_dtype).add_layer_norm(
        x, residual, weight, bias, eps, dropout_p=float(dropout_p), training=bool(training),
        generator=generator, residual_dtype=residual_dtype, normalized_shape=shape,
    )


def _add_ops(op: str, x: Tensor, residual: Tensor | None, residual_dtype: torch.dtype | None):
    """``backend_ops(x)`` for a residual add: the kernels add in float32 and store float16,
    bfloat16 or float32, so a float64 residual stream runs the torch path under auto and
    is refused, by name, under a forced triton backend."""
    ops = backend_ops(x)
    if ops is _eager:
        return ops
    stream = None if residual is None else residual.dtype
    wide = (stream if stream is not None and stream not in _SHORT_ADD_DTYPES
            else residual_dtype if residual_dtype is not None and residual_dtype not in _SHORT_ADD_DTYPES else None)
    if wide is None:
        return ops
    if get_backend() == "auto":
        return _eager
    raise NormArgumentError(f"{op}: the triton backend adds in float32 and stores float16, bfloat16 or float32; "
                            f"got a {wide} residual stream; use normlab.set_backend('auto') or ('torch') for it")


def _add_rms_norm(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    eps: float | None = None,
    *,
    dropout_p: float = 0.0,
    training: bool = False,
    generator: torch.Generator | None = None,
    residual_dtype: torch.dtype | None = None,
    normalized_shape: int | Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused residual add + dropout + RMSNorm: returns (out, new_residual), as add_layer_norm."""
    shape, eps = _check_add_args("add_rms_norm", x, residual, weight, None, eps, dropout_p, generator,
                                 residual_dtype, normalized_shape, is_rms=True, training=training)
    return _add_ops("add_rms_norm", x, residual, residual_dtype).add_rms_norm(
        x, residual, weight, eps, dropout_p=float(dropout_p), training=bool(training),
        generator=generator, residual_dtype=residual_dtype, normalized_shape=shape,
    )


# ---------------------------------------------------------------------------- the public ops
# The signatures carry no per-example buffer: per-example gradient norms are an opt-in
# variant (``normlab.diagnostics.per_example``), entered by ``per_example_grad_norms``.
#
# The common CPU call takes a short path: where the checked path would end in torch's own
# op (``ops.eager``: torch's fused layer_norm; rms_norm up to NATIVE_RMS_MAX_NUMEL elements
# with a weight in x's dtype), the public op calls that op first. torch's op checks the
# same shapes, devices and dtypes (the parity tests cover every case where it accepts
# what normlab refuses, which the guards here exclude: non-finite eps, broadcasting
# residuals, dropout_p outside [0, 1]); a call it refuses goes on to the checked path,
# which raises normlab's error naming the argument. This keeps the host time of a small
# call at torch's (docs/kernels.md, "Host time"). layer_norm of half-precision x with a
# parameter gradient to take is not such a call (``_param_grad``).


# Under torch.compile the short paths' try/except does not catch what torch's CPU kernel
# refuses only when it runs (layer_norm of float32 x with parameters of another dtype,
# which its shape check passes at trace time): compiled calls take the checked path.
_compiling = torch.compiler.is_compiling
# What torch's ops raise for arguments they refuse: the short paths then take the checked
# path, which names the bad argument. Nothing broader: activation checkpointing stops a
# recomputation with an exception of its own (``_StopRecomputationError``), which must
# reach it.
_REFUSED = (RuntimeError, TypeError, ValueError, IndexError, AttributeError, ArithmeticError)
# Under torch.func transforms torch's layer_norm of parameters of another dtype than x
# decomposes and promotes (batched parameters): such calls take the checked path.
_functorch_active = torch._C._are_functorch_transforms_active


def _param_grad(weight: object, bias: object) -> bool:
    """A weight or bias gradient will be taken. torch's CPU layer_norm backward sums those
    in x's dtype (a bfloat16 sum of ones stops at 256), so with half-precision x the call
    takes the checked path, whose sums are float32 (``ops.eager.layer_norm_native_ok``)."""
    return torch.is_grad_enabled() and (
        getattr(weight, "requires_grad", False) or getattr(bias, "requires_grad", False))


def _plain_add_call(x: Tensor, residual: object, dropout_p: object, training: object, generator: object,
                    residual_dtype: object) -> bool:
    """The fused add of an offset norm's short path is ``residual + x``: a contiguous
    residual of x's dtype and shape, no dropout to draw (dropout_p in [0, 1] outside
    training), no generator, no residual_dtype (x is checked by ``_offset_short_ok``)."""
    return (generator is None and residual_dtype is None and type(residual) is Tensor
            and residual.dtype is x.dtype and residual.shape == x.shape and residual.is_contiguous()
            and type(dropout_p) is float and training.__class__ is bool
            and (dropout_p == 0.0 or (not training and 0.0 <= dropout_p <= 1.0)))


def layer_norm(x: Tensor, normalized_shape: int | Sequence[int], weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5, *, offset: float = 0.0) -> Tensor:
    """Layer normalization over the trailing ``normalized_shape`` dims (Ba et al. 2016).

    y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias, biased variance, statistics in
    float32 (float64 for float64 input); same semantics as ``torch.nn.functional.layer_norm``.
    ``offset``: the scale is (offset + weight), formed in float32 (LayerNorm1p,
    zero-centred gamma: offset=1), and y is rounded once to x's dtype."""
    if offset != 0.0:
        # the common call (a weight, contiguous CPU x), as the plain op's short path: torch's
        # op on the scale; anything else, or an error, takes the checked path
        if weight is not None and _offset_short_ok(x, weight, bias, eps, offset) and eps is not None \
                and (not _functorch_active() or _eager.one_dtype(x, weight, bias)):
            try:
                return _eager.layer_norm_scaled(
                    x, (normalized_shape,) if type(normalized_shape) is int else normalized_shape, weight, bias,
                    eps, offset)
            except _REFUSED:  # the checked path below names the bad argument
                pass
        if x.__class__ is not Tensor and _traced(x):
            return handle_torch_function(layer_norm, (x,), x, normalized_shape, weight, bias, eps, offset=offset)
        return _layer_norm_torch_ops(x, normalized_shape, weight, bias, eps, offset)
    if type(x) is Tensor and x.is_cpu and type(eps) is float and -_INF < eps < _INF and get_backend() != "triton" \
            and (x.dtype not in _HALF or (not _param_grad(weight, bias) and not _eager.bias_alone_refused(x, weight, bias))) \
            and not _compiling() and (not _functorch_active() or _eager.one_dtype(x, weight, bias)):
        try:
            return torch.layer_norm(
                x, (normalized_shape,) if type(normalized_shape) is int else normalized_shape, weight, bias, eps)
        except _REFUSED:  # the checked path below names the bad argument
            pass
    if x.__class__ is not Tensor and _traced(x):
        return handle_torch_function(layer_norm, (x,), x, normalized_shape, weight, bias, eps)
    return _layer_norm(x, normalized_shape, weight, bias, eps)


def _offset_short_ok(x: object, weight: object, bias: object, eps: object, offset: object,
                     casting_mode: object = "torch") -> bool:
    """An offset / casting-mode norm call on x takes the short path (``_eager.rms_norm_cast``,
    ``_eager.layer_norm_scaled``): a contiguous CPU x (torch's ops return a contiguous tensor,
    rms_norm's checked path keeps x's strides) of a dtype normlab computes, parameters of
    such dtypes (torch's ops take an integer one, cast), a finite eps (rms_norm: or None)
    and offset and a known casting mode. torch's ops check x's trailing dims against
    normalized_shape, the parameters' shapes (rms_norm's llama order broadcasts: its
    caller checks the weight's) and devices."""
    return (type(x) is Tensor and x.is_cpu and x.dtype in _STREAM_DTYPES and x.is_contiguous()
            and (weight is None or (type(weight) in _PARAM_TYPES and weight.dtype in _STREAM_DTYPES))
            and (bias is None or (type(bias) in _PARAM_TYPES and bias.dtype in _STREAM_DTYPES))
            and (eps is None or (type(eps) is float and -_INF < eps < _INF))
            and type(offset) is float and -_INF < offset < _INF and casting_mode in reference.CASTING_MODES
            and get_backend() != "triton" and not _compiling())


def rms_norm(x: Tensor, normalized_shape: int | Sequence[int], weight: Tensor | None = None,
             eps: float | None = None, *, offset: float = 0.0, casting_mode: str = "torch") -> Tensor:
    """RMS normalization over the trailing ``normalized_shape`` dims (Zhang & Sennrich 2019).

    y = x / sqrt(mean(x^2) + eps) * weight; eps=None uses float32's machine epsilon
    (float64's for float64 input), as ``torch.nn.functional.rms_norm``. Output keeps x's dtype
    (casting_mode "llama": the promoted dtype of x and the weight, as ``LlamaRMSNorm``).

    ``offset``: the scale is (offset + weight), formed in float32 (Gemma's zero-centred
    gamma is offset=1). ``casting_mode``: "torch" (``nn.RMSNorm``'s numerics), "llama"
    (normalize in float32, cast to x's dtype, then multiply by the weight) or "gemma"
    (multiply by (offset + weight) in float32, then cast); bit for bit Hugging Face's
    ``LlamaRMSNorm`` / ``GemmaRMSNorm`` for float32, bfloat16 and float16 input (float64
    input is normalized in float64, where Hugging Face's modules compute in float32: about
    1e-7 apart; see ``ops.reference.rms_norm_cast``)."""
    if offset != 0.0 or casting_mode != "torch":
        if _offset_short_ok(x, weight, None, eps, offset, casting_mode):
            try:
                shape = (normalized_shape,) if type(normalized_shape) is int else tuple(normalized_shape)
                if weight is None or weight.shape == shape:
                    return _eager.rms_norm_cast(x, shape, weight, eps, offset, casting_mode)
            except _REFUSED:  # the checked path below names the bad argument
                pass
        if x.__class__ is not Tensor and _traced(x):
            return handle_torch_function(rms_norm, (x,), x, normalized_shape, weight, eps, offset=offset,
                                         casting_mode=casting_mode)
        return _rms_norm_cast(x, normalized_shape, weight, eps, offset, casting_mode)
    if type(x) is Tensor and x.is_cpu and (eps is None or (type(eps) is float and -_INF < eps < _INF)) \
            and get_backend() != "triton" and not _compiling():
        try:
            # torch takes complex input, which normlab refuses (docs/kernels.md)
            if x.numel() <= NATIVE_RMS_MAX_NUMEL and (weight is None or weight.dtype is x.dtype) \
                    and x.is_floating_point():
                return torch.rms_norm(
                    x, (normalized_shape,) if type(normalized_shape) is int else normalized_shape, weight, eps)
        except _REFUSED:  # the checked path below names the bad argument
            pass
    if x.__class__ is not Tensor and _traced(x):
        return handle_torch_function(rms_norm, (x,), x, normalized_shape, weight, eps)
    return _rms_norm(x, normalized_shape, weight, eps)


def _plain_shape(weight: Tensor | None, normalized_shape: int | Sequence[int] | None) -> Sequence[int] | None:
    """The normalized shape of a fused add+norm call: normalized_shape, else the weight's."""
    if normalized_shape is None:
        return None if weight is None else weight.shape
    return (normalized_shape,) if type(normalized_shape) is int else normalized_shape


def add_layer_norm(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None,
                   eps: float = 1e-5, *, dropout_p: float = 0.0, training: bool = False,
                   generator: torch.Generator | None = None, residual_dtype: torch.dtype | None = None,
                   normalized_shape: int | Sequence[int] | None = None,
                   offset: float = 0.0) -> tuple[Tensor, Tensor]:
    """Fused residual add + dropout + LayerNorm: returns (out, new_residual).

    new_residual = residual + dropout(x)   (stored in residual_dtype, default x.dtype)
    out          = layer_norm(new_residual) over normalized_shape (default: weight's
                   shape, the last dim without weight and bias), in x's dtype.
    Post-LN uses ``out`` as the next residual, Pre-LN uses ``new_residual``.
    (``offset`` as in ``layer_norm``.)"""
    if offset != 0.0:
        # the common call, as add_rms_norm's with an offset: residual + x, then layer_norm's
        if (weight is not None and eps is not None and _offset_short_ok(x, weight, bias, eps, offset)
                and _plain_add_call(x, residual, dropout_p, training, generator, residual_dtype)
                and (not _functorch_active() or _eager.one_dtype(x, weight, bias))):
            try:
                h = residual + x
                return _eager.layer_norm_scaled(h, weight.shape if normalized_shape is None
                                                else _plain_shape(weight, normalized_shape), weight, bias, eps,
                                                offset), h
            except _REFUSED:  # the checked path below names the bad argument
                pass
        if (x.__class__ is not Tensor or residual.__class__ is not Tensor) and _traced(x, residual):
            return handle_torch_function(
                add_layer_norm, (x, residual), x, residual, weight, bias, eps, dropout_p=dropout_p, training=training,
                generator=generator, residual_dtype=residual_dtype, normalized_shape=normalized_shape, offset=offset)
        return _add_then_norm("add_layer_norm", x, residual, weight, bias, eps, dropout_p, training, generator,
                              residual_dtype, normalized_shape, offset)
    # the common call (CPU, no dropout, one dtype; no half-precision x with a parameter
    # gradient, whose sums the checked path forms in float32): residual + x, then torch's
    # op, with the fewest checks; anything else, or an error, takes the checked path
    # (the checks ordered and merged for host time: this path is most of an 8 x 64 call)
    if (generator is None and residual_dtype is None and type(x) is Tensor and type(residual) is Tensor
            and (dt := x.dtype) is residual.dtype and type(dropout_p) is float and training.__class__ is bool
            and (dropout_p == 0.0 or (not training and 0.0 <= dropout_p <= 1.0)) and type(eps) is float
            and -_INF < eps < _INF and x.is_cpu
            and (dt is _F32 or (dt in _HALF and not _param_grad(weight, bias)
                                and not _eager.bias_alone_refused(x, weight, bias)))
            and residual.shape == x.shape and get_backend() != "triton" and not _compiling()):
        try:
            h = residual + x
            out = torch.layer_norm(h, weight.shape if normalized_shape is None and weight is not None
                                   else _plain_shape(weight, normalized_shape), weight, bias, eps)
            # (under torch.func transforms torch's op promotes to parameters of another
            # dtype, batched ones: the checked path keeps x's dtype, as in eager)
            if out.dtype is dt:
                return out, h
        except _REFUSED:  # the checked path below names the bad argument
            pass
    if (x.__class__ is not Tensor or residual.__class__ is not Tensor) and _traced(x, residual):
        return handle_torch_function(
            add_layer_norm, (x, residual), x, residual, weight, bias, eps, dropout_p=dropout_p, training=training,
            generator=generator, residual_dtype=residual_dtype, normalized_shape=normalized_shape)
    return _add_layer_norm(x, residual, weight, bias, eps, dropout_p=dropout_p, training=training,
                           generator=generator, residual_dtype=residual_dtype, normalized_shape=normalized_shape)


def add_rms_norm(x: Tensor, residual: Tensor | None, weight: Tensor | None, eps: float | None = None, *,
                 dropout_p: float = 0.0, training: bool = False, generator: torch.Generator | None = None,
                 residual_dtype: torch.dtype | None = None,
                 normalized_shape: int | Sequence[int] | None = None, offset: float = 0.0,
                 casting_mode: str = "torch") -> tuple[Tensor, Tensor]:
    """Fused residual add + dropout + RMSNorm: returns (out, new_residual), as add_layer_norm
    (``offset`` and ``casting_mode`` as in ``rms_norm``)."""
    if offset != 0.0 or casting_mode != "torch":
        # the common call (no dropout, one dtype, contiguous), as rms_norm's: residual + x,
        # then the offset / casting-mode norm's torch ops
        if (_offset_short_ok(x, weight, None, eps, offset, casting_mode)
                and _plain_add_call(x, residual, dropout_p, training, generator, residual_dtype)):
            try:
                shape = _plain_shape(weight, normalized_shape)
                shape = (x.shape[-1],) if shape is None else tuple(shape)
                if weight is None or weight.shape == shape:
                    h = residual + x
                    return _eager.rms_norm_cast(h, shape, weight, eps, offset, casting_mode).type_as(x), h
            except _REFUSED:  # the checked path below names the bad argument
                pass
        if (x.__class__ is not Tensor or residual.__class__ is not Tensor) and _traced(x, residual):
            return handle_torch_function(
                add_rms_norm, (x, residual), x, residual, weight, eps, dropout_p=dropout_p, training=training,
                generator=generator, residual_dtype=residual_dtype, normalized_shape=normalized_shape, offset=offset,
                casting_mode=casting_mode)
        return _add_then_norm("add_rms_norm", x, residual, weight, None, eps, dropout_p, training, generator,
                              residual_dtype, normalized_shape, offset, casting_mode)
    # the common call, as add_layer_norm's: residual + x, then torch's op where it is the
    # faster one (native_rms_ok)
    if (generator is None and residual_dtype is None and type(x) is Tensor and type(residual) is Tensor
            and (dt := x.dtype) is residual.dtype and type(dropout_p) is float and training.__class__ is bool
            and (dropout_p == 0.0 or (not training and 0.0 <= dropout_p <= 1.0))
            and (eps is None or (type(eps) is float and -_INF < eps < _INF)) and x.is_cpu
            and (dt is _F32 or dt in _HALF) and (weight is None or getattr(weight, "dtype", None) is dt)
            and not _compiling() and x.numel() <= NATIVE_RMS_MAX_NUMEL and residual.shape == x.shape
            and get_backend() != "triton"):
        try:
            h = residual + x
            return torch.rms_norm(h, weight.shape if normalized_shape is None and weight is not None
                                  else _plain_shape(weight, normalized_shape), weight, eps), h
        except _REFUSED:  # the checked path below names the bad argument
            pass
    if (x.__class__ is not Tensor or residual.__class__ is not Tensor) and _traced(x, residual):
        return handle_torch_function(
            add_rms_norm, (x, residual), x, residual, weight, eps, dropout_p=dropout_p, training=training,
            generator=generator, residual_dtype=residual_dtype, normalized_shape=normalized_shape)
    return _add_rms_norm(x, residual, weight, eps, dropout_p=dropout_p, training=training, generator=generator,
                         residual_dtype=residual_dtype, normalized_shape=normalized_shape)


# ---------------------------------------------------------------------------- adaptive norm


def _check_modulation(op: str, name: str, t: object, x: Tensor) -> Tensor:
    """scale/shift: a floating-point tensor on x's device whose shape broadcasts to x's,
    with x's last dim (D) and, at x's rank, a leading dim of B or 1."""
    _check_tensor(op, name, t)
    if t.device != x.device:
        raise NormArgumentError(f"{op}: expected {name} on {x.device} (the input's device), got {t.device}")
    d, b = x.shape[-1], x.shape[0]
    shape = list(t.shape)
    broadcasts = t.dim() <= x.dim() and all(s in (1, n) for s, n in zip(reversed(shape), reversed(x.shape)))
    if t.dim() == 0 or shape[-1] != d or not broadcasts:
        raise NormArgumentError(
            f"{op}: expected {name} to broadcast to the input's shape {list(x.shape)} with last dim {d} "
            f"([{b}, 1, ..., {d}] per example or {list(x.shape)} per token), got {name} of shape {shape}"
        )
    return t


def adaln_modulate(x: Tensor, scale: Tensor, shift: Tensor, eps: float = 1e-6, *,
                   norm: str = "layernorm", normalized_shape: int | Sequence[int] | None = None,
                   weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """Adaptive normalization, fused: y = (Norm(x) * weight + bias) * (1 + scale) + shift
    (DiT's adaLN modulation, Peebles & Xie 2023), forward and backward in one op.

    Norm: ``norm="layernorm"`` or ``"rmsnorm"``, over the last dim D (the only
    ``normalized_shape`` taken: None, D or (D,)), with the norm's optional affine
    ``weight`` and ``bias`` of shape [D] (elementwise_affine=True; any floating dtype;
    ``rmsnorm`` takes a weight only, as torch.nn.RMSNorm). ``scale`` and ``shift``
    broadcast to x's shape with last dim D: [B, 1, ..., D] (one modulation per example),
    x's shape (one per token), or [D] / [1, ..., D] (shared). Statistics and the
    modulation in float32 (float64 when x, scale or shift is float64), y rounded once to
    the promoted dtype of x, scale and shift; the scale, shift, weight and bias gradients
    are summed over the broadcast dims in float32 (float64) and rounded once to each one's
    dtype. On the triton backend the op is the custom op ``normlab::adaln_modulate`` under
    torch.compile and torch.export; under torch.func transforms (vmap, grad, jvp) it runs
    as torch ops (docs/kernels.md, "Fused AdaLN")."""
    # the common small call (no affine, no normalized_shape, modulation that keeps x's shape):
    # torch ops first, as the other ops' short paths; anything else, or an error, takes
    # the checked path below, which names the bad argument
    if (weight is None and bias is None and normalized_shape is None and type(eps) is float and -_INF < eps < _INF
            and type(x) is Tensor and type(scale) is Tensor and type(shift) is Tensor
            and x.numel() <= _eager.ADALN_NATIVE_MAX_NUMEL and get_backend() != "triton"):
        try:  # (a 0-dim x, scale or shift raises here)
            d = x.shape[-1]
            # (the dtypes the ops take: float8 and the like go to the checked path, refused there)
            if (scale.shape[-1] == d and shift.shape[-1] == d and x.dtype in _STREAM_DTYPES
                    and scale.dtype in _STREAM_DTYPES and shift.dtype in _STREAM_DTYPES
                    and (norm == "layernorm" or norm == "rmsnorm")):
                y = _eager.adaln_native(x, scale, shift, eps, is_rms=norm == "rmsnorm")
                if y.shape == x.shape:  # scale or shift did not broadcast x up
                    return y
        except _REFUSED:  # the checked path below names the bad argument
            pass
    op = "adaln_modulate"
    _check_tensor(op, "input", x)
    if x.dim() == 0:
        raise NormArgumentError(f"{op}: expected input with at least one dimension, got a 0-dim tensor")
    if normalized_shape is not None:
        shape = _check_normalized_shape(op, x, normalized_shape)
        if len(shape) != 1:
            raise NormArgumentError(
                f"{op}: normalizes over the last dim only: expected normalized_shape None, {x.shape[-1]} "
                f"or ({x.shape[-1]},), got {list(shape)}"
            )
    if norm not in reference.ADALN_NORMS:
        raise NormArgumentError(f"{op}: expected norm to be one of {', '.join(reference.ADALN_NORMS)}, got {norm!r}")
    _check_modulation(op, "scale", scale, x)
    _check_modulation(op, "shift", shift, x)
    _check_param(op, "weight", weight, x.shape[-1:], x, what="the input's last dim")
    _check_param(op, "bias", bias, x.shape[-1:], x, what="the input's last dim")
    if bias is not None and norm == "rmsnorm":
        raise NormArgumentError(
            f"{op}: norm='rmsnorm' takes no bias (RMSNorm's affine is a weight only, as "
            f"torch.nn.RMSNorm's), got bias of shape {list(bias.shape)}; pass bias=None or norm='layernorm'"
        )
    eps = _check_eps(op, eps, allow_none=False)
    return backend_ops(x).adaln_modulate(x, scale, shift, eps, weight=weight, bias=bias, is_rms=norm == "rmsnorm")


__all__ += ["adaln_modulate"]
