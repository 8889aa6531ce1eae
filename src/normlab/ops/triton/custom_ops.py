"""The Triton norm kernels as PyTorch ops: ``normlab::fused_norm`` and
``normlab::fused_norm_backward``, and the per-example variant
``normlab::fused_norm_per_example`` and ``normlab::fused_norm_per_example_backward``.

All are opaque ``torch.library.custom_op``s with hand-written fake (meta) functions,
and each forward's autograd formula calls its backward op, so ``torch.compile(...,
fullgraph=True)`` and ``torch.export`` see two graph nodes and never trace into
Triton. One op pair serves LayerNorm and RMSNorm, with or without the residual add and
dropout, a weight offset and RMSNorm's casting modes; the registered impls in
``normlab.ops.triton`` pick the flags.

The per-example pair is the same pair with one more input, the [2, B] buffer: carried
by the forward op to the backward, and read by the backward op for its shape only
(both ops are functional), which turns on the kernels' per-example flag and returns
the squared norms. The autograd formula holds the buffer on ``ctx`` (not among the
saved tensors, whose version check would fire when a retained graph runs backward
again) and copies the squared norms into it. The bodies, fakes and autograd formulas
of the two pairs are the same private helpers. DTensor sharding rules of the ops live
in ``sharding.py``.

In eager mode on plain tensors, ``FusedNorm`` (a plain ``torch.autograd.Function``
over the same kernels and the same backward formula; ``FusedNormPerExample`` with the
buffer) runs instead of the ops: the dispatcher's Python layers of a custom op cost
more host time per call than the kernels of a mid-sized norm take on the GPU.
``use_ops`` says which path a call takes.
"""

from __future__ import annotations

from typing import (
    NamedTuple,
    Optional,  # noqa: UP035 - custom_op's schema inference reads typing.Optional
)

import torch
from torch import Tensor

from normlab.ops.eager import c_apply, refuse_second_derivative, unwrap_if_dead, unwrapped
from normlab.ops.triton.launch import row_shape
from normlab.ops.triton.norm import Dropout, norm_backward, norm_forward


def _dropout(seed: Tensor | None, dropout_p: float) -> Dropout | None:
    return Dropout(dropout_p, int(seed)) if seed is not None else None


# ----------------------------------------------------------------------- forward


def _forward_impl(x, residual, weight, bias, seed, eps, hidden, is_rms, dropout_p, residual_dtype,
                  store_residual, offset, casting_mode, out_dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    out, new_res, mean, rstd = norm_forward(
        x, residual, weight, bias, eps, hidden=hidden, is_rms=is_rms,
        dropout=_dropout(seed, dropout_p), residual_dtype=residual_dtype,
        store_residual=store_residual, offset=offset, casting_mode=casting_mode, out_dtype=out_dtype,
    )
    # an op's outputs are tensors: empty ones where nothing is stored
    if new_res is None:
        new_res = x.new_empty((0,), dtype=residual_dtype or x.dtype)
    if mean is None:
        mean = x.new_empty((0,), dtype=torch.float32)
    return out, new_res, mean, rstd


def _forward_fake(x, hidden, is_rms, residual_dtype, store_residual, out_dtype):
    stats_shape = row_shape(x.shape, hidden)
    out = x.new_empty(x.shape, dtype=out_dtype or x.dtype)
    new_res = x.new_empty(x.shape if store_residual else (0,), dtype=residual_dtype or x.dtype)
    mean = x.new_empty((0,) if is_rms else stats_shape, dtype=torch.float32)
    return out, new_res, mean, x.new_empty(stats_shape, dtype=torch.float32)


@torch.library.custom_op("normlab::fused_norm", mutates_args=())
def fused_norm(
    x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],  # noqa: UP045
    seed: Optional[Tensor], eps: float, hidden: int, is_rms: bool, dropout_p: float,  # noqa: UP045
    residual_dtype: Optional[torch.dtype], store_residual: bool, offset: float = 0.0,  # noqa: UP045
    casting_mode: str = "torch", out_dtype: Optional[torch.dtype] = None,  # noqa: UP045
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, new_residual, mean, rstd) of residual + dropout(x) normalized over the last
    ``hidden`` elements; mean/rstd have x's row dims as shape (mean empty for RMSNorm).
    ``seed`` (int64 scalar) turns dropout on; new_residual is empty unless
    ``store_residual``. The scale is ``offset`` + weight; ``casting_mode`` is RMSNorm's
    (``norm.norm_forward``); out has ``out_dtype`` (default x's)."""
    return _forward_impl(x, residual, weight, bias, seed, eps, hidden, is_rms, dropout_p, residual_dtype,
                    store_residual, offset, casting_mode, out_dtype)


@fused_norm.register_fake
def _fused_norm_fake(x, residual, weight, bias, seed, eps, hidden, is_rms, dropout_p, residual_dtype,
                     store_residual, offset=0.0, casting_mode="torch", out_dtype=None):
    return _forward_fake(x, hidden, is_rms, residual_dtype, store_residual, out_dtype)


@torch.library.custom_op("normlab::fused_norm_per_example", mutates_args=())
def fused_norm_per_example(
    x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],  # noqa: UP045
    seed: Optional[Tensor], per_example_grad_sq: Tensor, eps: float, hidden: int,  # noqa: UP045
    is_rms: bool, dropout_p: float, residual_dtype: Optional[torch.dtype],  # noqa: UP045
    store_residual: bool, offset: float = 0.0, casting_mode: str = "torch",
    out_dtype: Optional[torch.dtype] = None,  # noqa: UP045
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``fused_norm`` whose backward also gives per-example squared gradient norms:
    ``per_example_grad_sq`` (float32 [2, B], B = x.shape[0]) is only carried to it."""
    return _forward_impl(x, residual, weight, bias, seed, eps, hidden, is_rms, dropout_p, residual_dtype,
                    store_residual, offset, casting_mode, out_dtype)


@fused_norm_per_example.register_fake
def _fused_norm_per_example_fake(x, residual, weight, bias, seed, per_example_grad_sq, eps, hidden, is_rms,
                                 dropout_p, residual_dtype, store_residual, offset=0.0, casting_mode="torch",
                                 out_dtype=None):
    return _forward_fake(x, hidden, is_rms, residual_dtype, store_residual, out_dtype)


# ----------------------------------------------------------------------- backward


def _backward_impl(dout, dnew_residual, h, weight, mean, rstd, seed, examples, hidden, is_rms, dropout_p,
                   x_dtype, residual_grad_dtype, bias_dtype, offset, casting_mode):
    """(dx, dresidual, dweight, dbias, per_example_sq or None), each gradient empty where
    its input is absent; per_example_sq with ``examples`` set (``norm.norm_backward``)."""
    dx, dres, dw, db, sq = norm_backward(
        dout, dnew_residual, h, weight, bias_dtype, mean, rstd, hidden=hidden, is_rms=is_rms,
        dropout=_dropout(seed, dropout_p), x_dtype=x_dtype, residual_grad_dtype=residual_grad_dtype,
        examples=examples, offset=offset, casting_mode=casting_mode,
    )
    empty = dout.new_empty((0,))
    return (dx, dres if dres is not None else dout.new_empty((0,), dtype=x_dtype),
            dw.reshape(weight.shape) if dw is not None else empty.clone(),
            db if db is not None else empty.clone(), sq)


def _backward_fake(dout, weight, hidden, x_dtype, residual_grad_dtype, bias_dtype):
    dx = dout.new_empty(dout.shape, dtype=x_dtype)
    dres = dout.new_empty(dout.shape if residual_grad_dtype is not None else (0,),
                          dtype=residual_grad_dtype or x_dtype)
    dw = weight.new_empty(weight.shape) if weight is not None else dout.new_empty((0,))
    db = (dout.new_empty((hidden,), dtype=bias_dtype) if bias_dtype is not None
          else dout.new_empty((0,)))
    return dx, dres, dw, db


@torch.library.custom_op("normlab::fused_norm_backward", mutates_args=())
def fused_norm_backward(
    dout: Tensor, dnew_residual: Optional[Tensor], h: Tensor, weight: Optional[Tensor],  # noqa: UP045
    mean: Tensor, rstd: Tensor, seed: Optional[Tensor], hidden: int, is_rms: bool,  # noqa: UP045
    dropout_p: float, x_dtype: torch.dtype, residual_grad_dtype: Optional[torch.dtype],  # noqa: UP045
    bias_dtype: Optional[torch.dtype], offset: float = 0.0, casting_mode: str = "torch",  # noqa: UP045
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dresidual, dweight, dbias), each empty where its input is absent. ``offset``
    and ``casting_mode`` as the forward's."""
    return _backward_impl(dout, dnew_residual, h, weight, mean, rstd, seed, None, hidden, is_rms, dropout_p,
                          x_dtype, residual_grad_dtype, bias_dtype, offset, casting_mode)[:4]


@fused_norm_backward.register_fake
def _fused_norm_backward_fake(dout, dnew_residual, h, weight, mean, rstd, seed, hidden, is_rms, dropout_p,
                              x_dtype, residual_grad_dtype, bias_dtype, offset=0.0, casting_mode="torch"):
    return _backward_fake(dout, weight, hidden, x_dtype, residual_grad_dtype, bias_dtype)


@torch.library.custom_op("normlab::fused_norm_per_example_backward", mutates_args=())
def fused_norm_per_example_backward(
    dout: Tensor, dnew_residual: Optional[Tensor], h: Tensor, weight: Optional[Tensor],  # noqa: UP045
    mean: Tensor, rstd: Tensor, seed: Optional[Tensor], per_example_grad_sq: Tensor,  # noqa: UP045
    hidden: int, is_rms: bool, dropout_p: float, x_dtype: torch.dtype,
    residual_grad_dtype: Optional[torch.dtype], bias_dtype: Optional[torch.dtype],  # noqa: UP045
    offset: float = 0.0, casting_mode: str = "torch",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``fused_norm_backward``'s results and per_example_sq: ``per_example_grad_sq``
    [2, B] is read for its shape only (the op is functional); per_example_sq is a new
    float32 [2, B] tensor with each example's squared weight/bias gradient norms, which
    the autograd formula copies into the buffer."""
    return _backward_impl(dout, dnew_residual, h, weight, mean, rstd, seed, per_example_grad_sq.shape[1],
                          hidden, is_rms, dropout_p, x_dtype, residual_grad_dtype, bias_dtype, offset,
                          casting_mode)


@fused_norm_per_example_backward.register_fake
def _fused_norm_per_example_backward_fake(dout, dnew_residual, h, weight, mean, rstd, seed, per_example_grad_sq,
                                          hidden, is_rms, dropout_p, x_dtype, residual_grad_dtype, bias_dtype,
                                          offset=0.0, casting_mode="torch"):
    sq = dout.new_empty(per_example_grad_sq.shape, dtype=torch.float32)
    return *_backward_fake(dout, weight, hidden, x_dtype, residual_grad_dtype, bias_dtype), sq


# ----------------------------------------------------------------------- autograd


class FusedSpec(NamedTuple):
    """The fused op's settings: its inputs after bias, in order (``fused_norm(x,
    residual, weight, bias, *spec)``), passed to ``FusedNorm.apply`` as one argument."""

    seed: Tensor | None
    eps: float
    hidden: int
    is_rms: bool
    dropout_p: float
    residual_dtype: torch.dtype | None
    store_residual: bool
    offset: float = 0.0
    casting_mode: str = "torch"
    out_dtype: torch.dtype | None = None  # None: x's


class SavedMeta(NamedTuple):
    """The non-tensor state the backward needs, kept on ``ctx.meta``."""

    hidden: int
    is_rms: bool
    dropout_p: float
    store_residual: bool
    x_dtype: torch.dtype
    residual_dtype: torch.dtype | None  # None: no residual input, so no residual gradient
    bias_dtype: torch.dtype | None      # None: no bias
    bias_shape: torch.Size | None
    offset: float
    casting_mode: str


def _save_state(ctx, x, residual, weight, bias, seed, hidden, is_rms, dropout_p, store_residual,
                new_res, mean, rstd, offset, casting_mode) -> None:
    """What every autograd formula (the ops' and ``FusedNorm``'s) keeps for the backward."""
    ctx.save_for_backward(new_res if store_residual else x, weight, mean, rstd, seed)
    ctx.meta = SavedMeta(hidden, is_rms, dropout_p, store_residual, x.dtype,
                         residual.dtype if residual is not None else None,
                         bias.dtype if bias is not None else None,
                         bias.shape if bias is not None else None, offset, casting_mode)


def _param_grads(ctx, weight, dx, dres, dw, db) -> tuple:
    """The gradients of (x, residual, weight, bias) from the backward's results (``weight``:
    the saved one, unpacked once per backward: activation checkpointing refuses a second
    unpack)."""
    meta = ctx.meta
    # (the kernels' dweight and dbias are flat: a parameter of one dim has their shape)
    return (dx, dres if meta.residual_dtype is not None else None,
            None if weight is None else dw if weight.dim() == 1 else dw.reshape(weight.shape),
            None if meta.bias_dtype is None else db if len(meta.bias_shape) == 1 else db.reshape(meta.bias_shape))


def _setup_context(ctx, inputs, output):
    _out, new_res, mean, rstd = output
    (x, residual, weight, bias, seed, _eps, hidden, is_rms, dropout_p, _residual_dtype, store_residual,
     offset, casting_mode, _out_dtype) = inputs
    _save_state(ctx, x, residual, weight, bias, seed, hidden, is_rms, dropout_p, store_residual,
                new_res, mean, rstd, offset, casting_mode)
    ctx.mark_non_differentiable(mean, rstd)


def _setup_context_per_example(ctx, inputs, output):
    _setup_context(ctx, inputs[:5] + inputs[6:], output)
    # written by the backward, never read: held outside the saved tensors, so their
    # version check does not fire when a retained graph is run backward again
    ctx.per_example_grad_sq = inputs[5]


def _backward_inputs(ctx, dout, dnew_res) -> tuple:
    """The backward op's inputs up to seed (the saved tensors and the output gradients)."""
    h, weight, mean, rstd, seed = ctx.saved_tensors
    return dout, dnew_res if ctx.meta.store_residual else None, h, weight, mean, rstd, seed


def _backward_settings(meta: SavedMeta) -> tuple:
    """The backward op's inputs after seed (and after the per-example buffer)."""
    return (meta.hidden, meta.is_rms, meta.dropout_p, meta.x_dtype, meta.residual_dtype, meta.bias_dtype,
            meta.offset, meta.casting_mode)


def _op_backward(ctx, dout, dnew_res, _dmean, _drstd):
    inputs = _backward_inputs(ctx, dout, dnew_res)
    grads = torch.ops.normlab.fused_norm_backward(*inputs, *_backward_settings(ctx.meta))
    return _param_grads(ctx, inputs[3], *grads) + (None,) * 10


def _op_backward_per_example(ctx, dout, dnew_res, _dmean, _drstd):
    buf = ctx.per_example_grad_sq
    inputs = _backward_inputs(ctx, dout, dnew_res)
    *grads, sq = torch.ops.normlab.fused_norm_per_example_backward(*inputs, buf, *_backward_settings(ctx.meta))
    buf.copy_(sq)
    return _param_grads(ctx, inputs[3], *grads) + (None,) * 11


torch.library.register_autograd("normlab::fused_norm", _op_backward, setup_context=_setup_context)
torch.library.register_autograd("normlab::fused_norm_per_example", _op_backward_per_example,
                                setup_context=_setup_context_per_example)


def use_ops(*tensors: Tensor | None) -> bool:
    """True where a call must go through the registered ops: under torch.compile or
    export, under functorch transforms (which normlab.functional sends to the torch path
    first: backend.resolve), and for tensor subclasses (DTensor, fake
    tensors); plain tensors and Parameters in eager mode take ``FusedNorm``."""
    if _is_compiling() or _functorch_active():
        return True
    for t in tensors:  # (a loop: any() over a generator costs more host time)
        if t is not None and type(t) not in _PLAIN:
            return True
    return False


_is_compiling = torch.compiler.is_compiling
_functorch_active = torch._C._are_functorch_transforms_active


_PLAIN = (Tensor, torch.nn.Parameter)  # a module's weights are Parameters


def spec_forward(x, residual, weight, bias, spec: FusedSpec,
                 store_stats: bool = True) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """``norm_forward`` with a ``FusedSpec``'s settings: (out, new_residual, mean, rstd);
    without ``store_stats`` (no backward follows) mean and rstd are None."""
    return norm_forward(
        x, residual, weight, bias, spec.eps, hidden=spec.hidden, is_rms=spec.is_rms,
        dropout=_dropout(spec.seed, spec.dropout_p), residual_dtype=spec.residual_dtype,
        store_residual=spec.store_residual, offset=spec.offset, casting_mode=spec.casting_mode,
        out_dtype=spec.out_dtype, store_stats=store_stats,
    )


class FusedNorm(torch.autograd.Function):
    """``fused_norm`` for eager mode: ``apply(x, residual, weight, bias, spec)`` with
    ``spec`` a ``FusedSpec``, the op's other inputs; returns out, or (out, new_residual)
    with ``spec.store_residual``. Same saved state and backward formula as the op's autograd.

    Host time per call is what this path exists for: one tensor output where no residual
    is stored, the settings in one argument, and the node refusing a second derivative only
    where a graph of the backward is being built (create_graph=True)."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, spec: FusedSpec):
        out, new_res, mean, rstd = spec_forward(x, residual, weight, bias, spec)
        _save_state(ctx, x, residual, weight, bias, spec.seed, spec.hidden, spec.is_rms, spec.dropout_p,
                    spec.store_residual, new_res, mean, rstd, spec.offset, spec.casting_mode)
        return (out, new_res) if spec.store_residual else out

    @staticmethod
    def backward(ctx, dout, dnew_res=None):
        if torch.is_grad_enabled():  # create_graph: the result must refuse a 2nd derivative
            return _fused_backward_once(ctx, dout, dnew_res)
        return _fused_backward(ctx, dout, dnew_res)


_fused_c_apply = c_apply(FusedNorm)


def apply_fused(x, residual, weight, bias, spec: FusedSpec):
    """``FusedNorm.apply(x, residual, weight, bias, spec)`` for a call outside torch.func
    transforms (``use_ops`` False), through the C apply (``eager.c_apply``: dead
    functorch wrappers unwrapped here)."""
    return _fused_c_apply(unwrap_if_dead(x), unwrapped(residual), unwrapped(weight), unwrapped(bias), spec)


class FusedNormPerExample(FusedNorm):
    """``fused_norm_per_example`` for eager mode: ``apply(x, residual, weight, bias, spec,
    per_example_grad_sq)``, ``FusedNorm`` whose backward also writes the buffer (held on
    ctx, as the op's autograd holds it)."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, spec: FusedSpec, per_example_grad_sq):
        ctx.per_example_grad_sq = per_example_grad_sq
        return FusedNorm.forward(ctx, x, residual, weight, bias, spec)

    @staticmethod
    def backward(ctx, dout, dnew_res=None):
        if torch.is_grad_enabled():  # create_graph
            return *_fused_backward_once(ctx, dout, dnew_res, ctx.per_example_grad_sq), None
        return *_fused_backward(ctx, dout, dnew_res, ctx.per_example_grad_sq), None


def _fused_backward(ctx, dout, dnew_res, buf=None):
    """``FusedNorm``'s gradients; with ``buf`` (the per-example variant) the kernels also
    write each example's squared norms, into ``buf`` itself where its layout allows."""
    h, weight, mean, rstd, seed = ctx.saved_tensors
    meta = ctx.meta
    dx, dres, dw, db, sq = norm_backward(
        dout, dnew_res if meta.store_residual else None, h, weight, meta.bias_dtype, mean, rstd,
        hidden=meta.hidden, is_rms=meta.is_rms, dropout=_dropout(seed, meta.dropout_p), x_dtype=meta.x_dtype,
        residual_grad_dtype=meta.residual_dtype, examples=buf.shape[1] if buf is not None else None,
        out_sq=buf if buf is not None and buf.is_contiguous() and buf.dtype == torch.float32
        else None, offset=meta.offset, casting_mode=meta.casting_mode,
    )
    if buf is not None and sq is not buf:
        buf.copy_(sq)
    return _param_grads(ctx, weight, dx, dres, dw, db) + (None,)


SECOND_DERIVATIVE_REFUSED = (
    "normlab's triton backend: no second derivative (the kernels' backward is not differentiable); "
    "for gradient penalties and other create_graph=True uses run the norm on the torch backend: "
    "normlab.set_backend('torch')")


def _fused_backward_once(ctx, dout, dnew_res, buf=None):
    """``_fused_backward`` under create_graph=True: the gradients, computed without a
    graph, refuse a second derivative (``eager.refuse_second_derivative``)."""
    with torch.no_grad():
        grads = _fused_backward(ctx, dout, dnew_res, buf)
    h, weight, _mean, _rstd, _seed = ctx.saved_tensors
    return refuse_second_derivative(grads, (dout, dnew_res, h, weight), SECOND_DERIVATIVE_REFUSED)
