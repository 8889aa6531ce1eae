"""Fused AdaLN: y = (Norm(x) * weight + bias) * (1 + scale) + shift, forward and backward
kernels, and the PyTorch ops ``normlab::adaln_modulate`` / ``normlab::adaln_modulate_backward``
that run them.

x is read as [rows, D] (rows = every dim of x but the last). scale and shift are read as
[M, D] tables of modulation rows, row r of x taking modulation row ``r // group``:
group = 1 for one modulation per token (x's shape), T = rows / B for one per example
([B, 1, ..., D]), rows for one shared by all ([D]); in general any shape that equals x's
leading dims and then has size-1 dims up to D. Other broadcasts ([1, T, D] with x
[B, T, D]) are expanded to one modulation per token first. weight and bias (optional, [D],
any floating dtype) are the norm's affine.

Forward, per row, in float32: mean and rstd (RMSNorm: mean = 0), xhat = (x - mean) * rstd,
h = xhat * weight + bias, y = h * (1 + scale) + shift rounded once; mean and rstd are saved.

Backward, per row, with dn = dy * (1 + scale) (h's gradient), g = dn * weight and N = D:

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))     (RMSNorm: without mean(g))

dscale = dy * h and dshift = dy, stored per row for per-token modulations; otherwise
summed over each program's rows (a program never straddles two modulation rows) into
float32 partials, which are summed per modulation row in a fixed order (deterministic).
dweight = sum of dn * xhat and dbias = sum of dn go to float32 partials per program, summed
in a fixed order and rounded once to each parameter's dtype. Where a program's rows share
one scale row, two sums carry all four: with A = sum(dy * xhat) and S = sum(dy),
dscale = weight * A + bias * S, dshift = S, dweight = (1 + scale) * A, dbias = (1 + scale) * S.

Which path a call takes (``adaln_modulate`` below): eager calls on plain tensors run
``AdaLNFunction``, an autograd.Function on the kernels (the dispatcher's layers of a custom
op cost more host time per call); torch.compile, torch.export and tensor subclasses run the
custom ops, which a graph holds as two opaque nodes (the forward's autograd formula calls the
backward op); torch.func transforms (vmap, grad, jvp) and DTensors run the torch backend's
ops (``ops.eager.adaln_modulate``), which the transforms can see through.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Optional  # noqa: UP035 - custom_op's schema inference reads typing.Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from normlab.errors import NormArgumentError
from normlab.ops import eager
from normlab.ops.triton import launch
from normlab.ops.triton.custom_ops import SECOND_DERIVATIVE_REFUSED

MAX_HIDDEN = 16384
"""The widest D the fused AdaLN kernels take (one block per row)."""

@triton.jit
def _adaln_fwd_kernel(
    X, SCALE, SHIFT, W, B, Y, MEAN, RSTD, rows, hidden, scale_group, shift_group, eps,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr, ROWS: tl.constexpr,
):
    # a tile of ROWS whole rows per program
    row1 = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row = row1[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (row < rows) & (cols < hidden)
    x = tl.load(X + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    if IS_RMS:
        centered = x
    else:
        mean = tl.sum(x, axis=1) / hidden
        centered = tl.where(mask, x - mean[:, None], 0.0)
        tl.store(MEAN + row1, mean, mask=row1 < rows)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / hidden + eps)
    tl.store(RSTD + row1, rstd, mask=row1 < rows)
    h = centered * rstd[:, None]
    if HAS_WEIGHT:
        h = h * tl.load(W + cols, mask=cols < hidden, other=0.0).to(tl.float32)
    if HAS_BIAS:
        h = h + tl.load(B + cols, mask=cols < hidden, other=0.0).to(tl.float32)
    sc = tl.load(SCALE + (row // scale_group) * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    sh = tl.load(SHIFT + (row // shift_group) * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    y = h * (1.0 + sc) + sh
    tl.store(Y + row * hidden + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _adaln_bwd_kernel(
    DY, X, SCALE, W, B, MEAN, RSTD, DX, DSCALE, DSHIFT, SCALE_PART, SHIFT_PART, W_PART, B_PART,
    hidden, scale_group, rows_per_example, rows_per_program,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    SCALE_PER_ROW: tl.constexpr, SHIFT_PER_ROW: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
):
    # program (b, c): rows [first, last) of group b (whose rows share every summed
    # modulation row); the partial sums stay in registers and are written once
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    first = b * rows_per_example + c * rows_per_program
    last = tl.minimum(first + rows_per_program, (b + 1) * rows_per_example)
    part_row = b * tl.num_programs(1) + c
    cols1 = tl.arange(0, BLOCK)
    cols = cols1[None, :]
    col_mask = cols < hidden
    # where the program's rows share one scale row, the sums of dy * xhat and dy give
    # dscale, dweight and dbias at the end (dweight = (1 + scale) * sum(dy * xhat)); with a
    # scale per row, dweight and dbias sum dn * xhat and dn, dn = dy * (1 + scale)
    sum_dy_xhat = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    sum_dy = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    sum_dn_xhat = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    sum_dn = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for start in range(first, last, ROWS):
        row = start + tl.arange(0, ROWS)[:, None]
        row_mask = row < last
        mask = row_mask & col_mask
        dy = tl.load(DY + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row, mask=row_mask, other=0.0)
        if IS_RMS:
            xhat = x * rstd
        else:
            xhat = tl.where(mask, (x - tl.load(MEAN + row, mask=row_mask, other=0.0)) * rstd, 0.0)
        sc = tl.load(SCALE + (row // scale_group) * hidden + cols, mask=mask, other=0.0).to(tl.float32)
        dn = dy * (1.0 + sc)  # the gradient of h = xhat * weight + bias
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
            g = dn * w
        else:
            g = dn
        c1 = tl.sum(g * xhat, axis=1)[:, None] / hidden
        if IS_RMS:
            dx = (g - xhat * c1) * rstd
        else:
            dx = (g - xhat * c1 - tl.sum(g, axis=1)[:, None] / hidden) * rstd
        tl.store(DX + row * hidden + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if SCALE_PER_ROW:
            if HAS_WEIGHT:
                h = xhat * w
                sum_dn_xhat += dn * xhat
            else:
                h = xhat
            if HAS_BIAS:
                h = h + tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
                sum_dn += dn
            tl.store(DSCALE + row * hidden + cols, (dy * h).to(DSCALE.dtype.element_ty), mask=mask)
        else:
            sum_dy_xhat += dy * xhat
        if SHIFT_PER_ROW:
            tl.store(DSHIFT + row * hidden + cols, dy.to(DSHIFT.dtype.element_ty), mask=mask)
        if HAS_BIAS and not SCALE_PER_ROW or not SHIFT_PER_ROW:
            sum_dy += dy
    col_mask1 = cols1 < hidden
    if SCALE_PER_ROW:
        if HAS_WEIGHT:
            tl.store(W_PART + part_row * hidden + cols1, tl.sum(sum_dn_xhat, axis=0), mask=col_mask1)
        if HAS_BIAS:
            tl.store(B_PART + part_row * hidden + cols1, tl.sum(sum_dn, axis=0), mask=col_mask1)
    else:
        a = tl.sum(sum_dy_xhat, axis=0)
        gain = 1.0 + tl.load(SCALE + (first // scale_group) * hidden + cols1, mask=col_mask1,
                             other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            ds = a * tl.load(W + cols1, mask=col_mask1, other=0.0).to(tl.float32)
            tl.store(W_PART + part_row * hidden + cols1, a * gain, mask=col_mask1)
        else:
            ds = a
        if HAS_BIAS:
            s = tl.sum(sum_dy, axis=0)
            ds += s * tl.load(B + cols1, mask=col_mask1, other=0.0).to(tl.float32)
            tl.store(B_PART + part_row * hidden + cols1, s * gain, mask=col_mask1)
        tl.store(SCALE_PART + part_row * hidden + cols1, ds, mask=col_mask1)
    if not SHIFT_PER_ROW:
        tl.store(SHIFT_PART + part_row * hidden + cols1, tl.sum(sum_dy, axis=0), mask=col_mask1)


# ------------------------------------------------------------------------------ host side


def _check(x: Tensor, scale: Tensor, shift: Tensor) -> None:
    for name, t in (("input", x), ("scale", scale), ("shift", shift)):
        if t.dtype not in launch.SUPPORTED_DTYPES:
            raise NormArgumentError(
                f"adaln_modulate: the triton backend supports {name} dtypes float16, bfloat16 and "
                f"float32, got {t.dtype}; use normlab.set_backend('auto') or ('torch') for {t.dtype}"
            )
    if not 1 <= x.shape[-1] <= MAX_HIDDEN:
        raise NormArgumentError(
            f"adaln_modulate: the triton backend supports a last dim from 1 to {MAX_HIDDEN}, got "
            f"{x.shape[-1]}; use normlab.set_backend('torch') for {'empty' if x.shape[-1] < 1 else 'wider'} rows"
        )


def _out_dtype(x: Tensor, scale: Tensor, shift: Tensor) -> torch.dtype:
    """y's dtype: the promoted dtype of x, scale and shift (the unfused expression's)."""
    return eager._adaln_dtypes(x, scale, shift)[1]


def _layout(shape: Sequence[int], x_shape: Sequence[int]) -> tuple[int, bool]:
    """(group, expanded) of a modulation of ``shape`` for x of ``x_shape`` (with rows):
    row r of x takes row r // group of the modulation's [M, D] table; ``expanded``: the
    broadcast has no such table, so it is expanded to one row per token (group 1), and its
    gradient is summed back to ``shape`` by the host."""
    nd = len(x_shape)
    full = (1,) * (nd - len(shape)) + tuple(shape)
    k = nd - 1  # the most leading dims of x, then size-1 dims up to D
    while full[:k] != x_shape[:k]:
        if full[k - 1] != 1:
            return 1, True
        k -= 1
    return math.prod(x_shape[k:nd - 1]), False


def _table(t: Tensor, x_shape: torch.Size, rows: int, group: int, expanded: bool) -> Tensor:
    """``t`` as the contiguous [M, D] table of ``_layout``."""
    if expanded:
        return t.expand(x_shape).reshape(rows, x_shape[-1]).contiguous()
    return t.reshape(rows // group, x_shape[-1]).contiguous()


def _warps(elements: int) -> int:
    return 16 if elements >= 8192 else 8 if elements >= 2048 else 4 if elements >= 512 else 2 if elements >= 128 else 1


def launch_config(hidden: int, backward: bool) -> tuple[int, int, int]:
    """(block, rows per tile, warps) of the forward or backward kernel for rows of
    ``hidden`` elements: tiles of up to 4096 elements forward, 1024 backward (which
    also holds the dscale/dshift/dweight/dbias partials)."""
    block = launch.next_power_of_2(hidden)
    tile = 1024 if backward else 4096
    rows = max(1, min(16, tile // block))
    return block, rows, min(8 if backward else 16, _warps(block * rows))


class _Rows(NamedTuple):
    """What the kernels read x and scale from: x as a contiguous [rows, D] matrix, scale as
    its [M, D] table, and the (group, expanded) ``_layout`` of scale and shift."""

    x: Tensor
    scale: Tensor
    layouts: tuple[tuple[int, bool], tuple[int, bool]]


def _rows(x: Tensor, scale: Tensor, shift_shape: Sequence[int]) -> _Rows | None:
    """x and scale as the kernels read them; None where x has no rows."""
    rows = x.numel() // x.shape[-1]
    if rows == 0:
        return None
    layouts = (_layout(scale.shape, x.shape), _layout(shift_shape, x.shape))
    return _Rows(x.reshape(rows, x.shape[-1]).contiguous(), _table(scale, x.shape, rows, *layouts[0]), layouts)


def _forward(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor | None, bias: Tensor | None,
             eps: float, is_rms: bool) -> tuple[Tensor, Tensor | None, Tensor, _Rows | None]:
    """(y, mean, rstd, rows): y contiguous in ``_out_dtype``; mean and rstd float32, one
    per row (mean None for RMSNorm); what the kernels read x and scale from."""
    n_rows = x.numel() // x.shape[-1]  # an int: allocating by a torch.Size costs a microsecond more
    y = torch.empty(x.shape, dtype=_out_dtype(x, scale, shift), device=x.device)
    mean = None if is_rms else torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    read = _rows(x, scale, shift.shape)
    if read is None:
        return y, mean, rstd, None
    rows, hidden = read.x.shape
    (sc_group, _), (sh_group, sh_expanded) = read.layouts
    block, tile_rows, warps = launch_config(hidden, backward=False)
    _adaln_fwd_kernel[(launch.cdiv(rows, tile_rows),)](
        read.x, read.scale, _table(shift, x.shape, rows, sh_group, sh_expanded),
        None if weight is None else weight.contiguous(), None if bias is None else bias.contiguous(),
        y, mean, rstd, rows, hidden, sc_group, sh_group, eps,
        IS_RMS=is_rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK=block, ROWS=tile_rows, num_warps=warps,
    )
    return y, mean, rstd, read


def _backward(dy: Tensor, read: _Rows | None, x_dtype: torch.dtype,
              params: tuple[tuple[torch.Size, torch.dtype], tuple[torch.Size, torch.dtype]],
              weight: Tensor | None, bias: Tensor | None, mean: Tensor | None, rstd: Tensor,
              is_rms: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """(dx, dscale, dshift, dweight, dbias), each in its input's shape and dtype (scale's
    and shift's in ``params``; dweight, dbias None without weight, bias)."""
    x_shape, device = dy.shape, dy.device
    if read is None:
        return (torch.zeros(x_shape, dtype=x_dtype, device=device),
                *(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype in params),
                *(torch.zeros(t.shape, dtype=t.dtype, device=device) if t is not None else None
                  for t in (weight, bias)))
    rows, hidden = read.x.shape
    groups, expanded = zip(*read.layouts)
    per_row = tuple(g == 1 for g in groups)
    # per-row gradients in the parameter's dtype, or float32 where the host sums them
    per_row_bufs = tuple(torch.empty(rows, hidden, dtype=torch.float32 if e else dt, device=device) if r else None
                         for r, e, (_, dt) in zip(per_row, expanded, params))
    summed = [g for g, r in zip(groups, per_row) if not r]
    group = min(summed) if summed else rows  # no program straddles two of these groups
    split = launch.split_rows(rows, rows // group, device)
    n_parts = split.examples * split.chunks

    def partials(needed: bool) -> Tensor | None:
        return torch.empty(n_parts, hidden, dtype=torch.float32, device=device) if needed else None

    parts = (partials(not per_row[0]), partials(not per_row[1]))
    w_part, b_part = partials(weight is not None), partials(bias is not None)
    dx = torch.empty(x_shape, dtype=x_dtype, device=device)
    block, tile_rows, warps = launch_config(hidden, backward=True)
    _adaln_bwd_kernel[(split.examples, split.chunks)](
        dy.reshape(rows, hidden).contiguous(), read.x, read.scale,
        None if weight is None else weight.contiguous(), None if bias is None else bias.contiguous(),
        None if is_rms else mean, rstd, dx, per_row_bufs[0], per_row_bufs[1], parts[0], parts[1],
        w_part, b_part, hidden, groups[0], split.rows_per_example, split.rows_per_program,
        IS_RMS=is_rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        SCALE_PER_ROW=per_row[0], SHIFT_PER_ROW=per_row[1], BLOCK=block, ROWS=tile_rows, num_warps=warps,
    )
    grads = []
    for k, (shape, dtype) in enumerate(params):
        if per_row[k]:
            d = per_row_bufs[k]
            d = d.reshape(x_shape).sum_to_size(shape) if expanded[k] else d.reshape(shape)
        else:  # partials -> one sum per group of `group` rows -> one per modulation row
            d = parts[k].view(split.examples, split.chunks, hidden).sum(1)
            d = d.view(rows // groups[k], groups[k] // group, hidden).sum(1).reshape(shape)
        grads.append(d.to(dtype))
    dweight = w_part.sum(0).reshape(weight.shape).to(weight.dtype) if weight is not None else None
    dbias = b_part.sum(0).reshape(bias.shape).to(bias.dtype) if bias is not None else None
    return dx, grads[0], grads[1], dweight, dbias


# ------------------------------------------------------------------------------ the ops


@torch.library.custom_op("normlab::adaln_modulate", mutates_args=())
def adaln_modulate_op(
    x: Tensor, scale: Tensor, shift: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],  # noqa: UP045
    eps: float, is_rms: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd): y = (Norm(x) * weight + bias) * (1 + scale) + shift over the last
    dim, in the promoted dtype of x, scale and shift; mean and rstd float32 with x's row
    dims (mean empty for RMSNorm)."""
    y, mean, rstd, _ = _forward(x, scale, shift, weight, bias, eps, is_rms)
    stats = x.shape[:-1]
    return (y, mean.view(stats) if mean is not None else x.new_empty((0,), dtype=torch.float32),
            rstd.view(stats))


@adaln_modulate_op.register_fake
def _adaln_modulate_fake(x, scale, shift, weight, bias, eps, is_rms):
    stats = x.shape[:-1]
    return (x.new_empty(x.shape, dtype=_out_dtype(x, scale, shift)),
            x.new_empty((0,) if is_rms else stats, dtype=torch.float32),
            x.new_empty(stats, dtype=torch.float32))


@torch.library.custom_op("normlab::adaln_modulate_backward", mutates_args=())
def adaln_modulate_backward_op(
    dy: Tensor, x: Tensor, scale: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],  # noqa: UP045
    mean: Tensor, rstd: Tensor, shift_shape: list[int], shift_dtype: torch.dtype, is_rms: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dscale, dshift, dweight, dbias) of ``adaln_modulate``, each in its input's
    shape and dtype (shift's given by ``shift_shape``, ``shift_dtype``); dweight and dbias
    empty without weight, bias."""
    params = ((scale.shape, scale.dtype), (torch.Size(shift_shape), shift_dtype))
    dx, dscale, dshift, dweight, dbias = _backward(
        dy, _rows(x, scale, shift_shape), x.dtype, params, weight, bias, mean, rstd, is_rms)
    return (dx, dscale, dshift, dweight if dweight is not None else dy.new_empty((0,)),
            dbias if dbias is not None else dy.new_empty((0,)))


@adaln_modulate_backward_op.register_fake
def _adaln_modulate_backward_fake(dy, x, scale, weight, bias, mean, rstd, shift_shape, shift_dtype,
                                  is_rms):
    return (x.new_empty(x.shape), scale.new_empty(scale.shape),
            dy.new_empty(shift_shape, dtype=shift_dtype),
            weight.new_empty(weight.shape) if weight is not None else dy.new_empty((0,)),
            bias.new_empty(bias.shape) if bias is not None else dy.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    x, scale, shift, weight, bias, _eps, is_rms = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, scale, weight, bias, mean, rstd)
    ctx.shift_shape, ctx.shift_dtype, ctx.is_rms = shift.shape, shift.dtype, is_rms
    ctx.mark_non_differentiable(mean, rstd)


def _op_backward(ctx, dy, _dmean, _drstd):
    x, scale, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dscale, dshift, dweight, dbias = torch.ops.normlab.adaln_modulate_backward(
        dy, x, scale, weight, bias, mean, rstd, ctx.shift_shape, ctx.shift_dtype, ctx.is_rms)
    return (dx, dscale, dshift, dweight if weight is not None else None,
            dbias if bias is not None else None, None, None)


torch.library.register_autograd("normlab::adaln_modulate", _op_backward, setup_context=_setup_context)


class AdaLNFunction(torch.autograd.Function):
    """``adaln_modulate_op``'s y for eager mode: the same kernels and backward, with less
    host time per call (it keeps the kernels' [rows, D] view of x and scale table for the
    backward instead of forming them again). Saves (x, scale table, weight, bias, mean, rstd)."""

    @staticmethod
    def forward(ctx, x, scale, shift, weight, bias, eps, is_rms):
        y, mean, rstd, read = _forward(x, scale, shift, weight, bias, eps, is_rms)
        # x and scale themselves too (the saved rows are copies or graph-less views): what a
        # second derivative reaches (``_function_backward_once``); saved, not held on ctx,
        # so activation checkpointing and saved-tensor hooks see them
        if read is None:
            ctx.save_for_backward(None, None, weight, bias, mean, rstd, x, scale)
        else:
            ctx.save_for_backward(read.x, read.scale, weight, bias, mean, rstd, x, scale)
            ctx.layouts = read.layouts
        ctx.x_dtype, ctx.is_rms = x.dtype, is_rms
        ctx.params = ((scale.shape, scale.dtype), (shift.shape, shift.dtype))
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # create_graph: the result must refuse a 2nd derivative
            return _function_backward_once(ctx, dy)
        return _function_backward(ctx, dy)


def _function_backward(ctx, dy, saved=None):
    """(``saved``: ``ctx.saved_tensors`` already unpacked: checkpointing allows one unpack.)"""
    x2, sc, weight, bias, mean, rstd = (ctx.saved_tensors if saved is None else saved)[:6]
    read = _Rows(x2, sc, ctx.layouts) if x2 is not None else None
    grads = _backward(dy, read, ctx.x_dtype, ctx.params, weight, bias, mean, rstd, ctx.is_rms)
    return *grads, None, None


# the refusing node costs host time: only where a graph of the backward is built
def _function_backward_once(ctx, dy):
    """``_function_backward`` under create_graph=True: the gradients refuse a second
    derivative (``eager.refuse_second_derivative``)."""
    saved = ctx.saved_tensors
    with torch.no_grad():
        grads = _function_backward(ctx, dy, saved)
    _x2, _sc, weight, bias, _mean, _rstd, x, scale = saved
    return eager.refuse_second_derivative(grads, (dy, x, scale, weight, bias), SECOND_DERIVATIVE_REFUSED)


if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor

    _TORCH_PATH_TYPES: tuple[type, ...] = (DTensor,)  # no sharding rules for the ops
else:
    _TORCH_PATH_TYPES = ()


def adaln_modulate(x, scale, shift, eps, *, weight=None, bias=None, is_rms=False):
    """(Norm(x) * weight + bias) * (1 + scale) + shift over the last dim: ``AdaLNFunction``
    for eager calls on plain tensors, the custom op under torch.compile and torch.export,
    the torch path's ops under torch.func transforms and for DTensors."""
    if type(x) is Tensor and eager._plain_eager():  # (a subclass of x's decides for all)
        _check(x, scale, shift)
        if eager._differentiable(x, scale, shift, weight, bias):
            return AdaLNFunction.apply(x, scale, shift, weight, bias, float(eps), is_rms)
        return _forward(x, scale, shift, weight, bias, float(eps), is_rms)[0]  # nothing to differentiate
    if torch._C._are_functorch_transforms_active() or any(
            isinstance(t, _TORCH_PATH_TYPES) for t in (x, scale, shift, weight, bias)):
        return eager.adaln_modulate(x, scale, shift, eps, weight=weight, bias=bias, is_rms=is_rms)
    _check(x, scale, shift)
    return torch.ops.normlab.adaln_modulate(x, scale, shift, weight, bias, float(eps), is_rms)[0]
