"""Fused AdaLN: y = Norm(x) * (1 + scale) + shift, forward and backward kernels.

x is read as [rows, D] (rows = every dim of x but the last). scale and shift are read as
[M, D] tables of modulation rows, row r of x taking modulation row ``r // group``:
group = 1 for one modulation per token (x's shape), T = rows / B for one per example
([B, 1, ..., D]), rows for one shared by all ([D]); in general any shape that equals x's
leading dims and then has size-1 dims up to D. Other broadcasts ([1, T, D] with x
[B, T, D]) are expanded to one modulation per token first.

Forward, per row, in float32: mean and rstd (RMSNorm: mean = 0), xhat = (x - mean) * rstd,
y = xhat * (1 + scale) + shift rounded once; mean and rstd are saved.

Backward, per row, with g = dy * (1 + scale) and N = D:

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))     (RMSNorm: without mean(g))

dscale = dy * xhat and dshift = dy, stored per row for per-token modulations; otherwise
summed over each program's rows (a program never straddles two modulation rows) into
float32 partials, which are summed per modulation row in a fixed order (deterministic).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from normlab.errors import NormArgumentError
from normlab.ops import eager
from normlab.ops.triton import launch

MAX_HIDDEN = 16384
"""The widest D the fused AdaLN kernels take (one block per row)."""

@triton.jit
def _adaln_fwd_kernel(
    X, SCALE, SHIFT, Y, MEAN, RSTD, rows, hidden, scale_group, shift_group, eps,
    IS_RMS: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
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
    sc = tl.load(SCALE + (row // scale_group) * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    sh = tl.load(SHIFT + (row // shift_group) * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    y = centered * rstd[:, None] * (1.0 + sc) + sh
    tl.store(Y + row * hidden + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _adaln_bwd_kernel(
    DY, X, SCALE, MEAN, RSTD, DX, DSCALE, DSHIFT, SCALE_PART, SHIFT_PART,
    hidden, scale_group, rows_per_example, rows_per_program,
    IS_RMS: tl.constexpr, SCALE_PER_ROW: tl.constexpr, SHIFT_PER_ROW: tl.constexpr,
    BLOCK: tl.constexpr, ROWS: tl.constexpr,
):
    # program (b, c): rows [first, last) of group b (whose rows share every summed
    # modulation row); dscale/dshift partials stay in registers and are written once
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    first = b * rows_per_example + c * rows_per_program
    last = tl.minimum(first + rows_per_program, (b + 1) * rows_per_example)
    part_row = b * tl.num_programs(1) + c
    cols1 = tl.arange(0, BLOCK)
    cols = cols1[None, :]
    col_mask = cols < hidden
    ds = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    dh = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
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
        g = dy * (1.0 + sc)
        c1 = tl.sum(g * xhat, axis=1)[:, None] / hidden
        if IS_RMS:
            dx = (g - xhat * c1) * rstd
        else:
            dx = (g - xhat * c1 - tl.sum(g, axis=1)[:, None] / hidden) * rstd
        tl.store(DX + row * hidden + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if SCALE_PER_ROW:
            tl.store(DSCALE + row * hidden + cols, (dy * xhat).to(DSCALE.dtype.element_ty), mask=mask)
        else:
            ds += dy * xhat
        if SHIFT_PER_ROW:
            tl.store(DSHIFT + row * hidden + cols, dy.to(DSHIFT.dtype.element_ty), mask=mask)
        else:
            dh += dy
    if not SCALE_PER_ROW:
        tl.store(SCALE_PART + part_row * hidden + cols1, tl.sum(ds, axis=0), mask=cols1 < hidden)
    if not SHIFT_PER_ROW:
        tl.store(SHIFT_PART + part_row * hidden + cols1, tl.sum(dh, axis=0), mask=cols1 < hidden)


# ------------------------------------------------------------------------------ host side


def _check(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, hidden: int) -> None:
    for name, t in (("input", x), ("scale", scale), ("shift", shift)):
        if t.dtype not in launch.SUPPORTED_DTYPES:
            raise NormArgumentError(
                f"adaln_modulate: the triton backend supports {name} dtypes float16, bfloat16 and "
                f"float32, got {t.dtype}; use normlab.set_backend('auto') or ('torch') for {t.dtype}"
            )
    if not 1 <= hidden <= MAX_HIDDEN:
        raise NormArgumentError(
            f"adaln_modulate: the triton backend supports a last dim from 1 to {MAX_HIDDEN}, got "
            f"{hidden}; use normlab.set_backend('torch') for wider rows"
        )


def _modulation_rows(t: torch.Tensor, x_shape: torch.Size, rows: int) -> tuple[torch.Tensor, int, bool]:
    """(table, group, expanded): ``t`` as a contiguous [M, D] table whose row r // group
    modulates row r of x; ``expanded``: t's broadcast has no such table, so it was expanded
    to one row per token (its gradient is then summed back to t's shape by the host)."""
    nd, hidden = len(x_shape), x_shape[-1]
    shape = (1,) * (nd - t.dim()) + tuple(t.shape)
    for k in range(nd - 1, -1, -1):  # x's first k dims, then size-1 dims up to D
        if shape[:k] == tuple(x_shape[:k]) and all(s == 1 for s in shape[k:nd - 1]):
            m = math.prod(x_shape[:k])
            return t.reshape(m, hidden).contiguous(), rows // m, False
    return t.expand(x_shape).reshape(rows, hidden).contiguous(), 1, True


def _warps(elements: int) -> int:
    return 16 if elements >= 8192 else 8 if elements >= 2048 else 4 if elements >= 512 else 2 if elements >= 128 else 1


def launch_config(hidden: int, backward: bool) -> tuple[int, int, int]:
    """(block, rows per tile, warps) of the forward or backward kernel for rows of
    ``hidden`` elements: tiles of up to 4096 elements forward, 1024 backward (which
    also holds the dscale/dshift partials)."""
    block = launch.next_power_of_2(hidden)
    tile = 1024 if backward else 4096
    rows = max(1, min(16, tile // block))
    return block, rows, min(8 if backward else 16, _warps(block * rows))


class AdaLNFunction(torch.autograd.Function):
    """The fused op on the kernels above; saves (x, mean, rstd, scale table)."""

    @staticmethod
    def forward(ctx, x, scale, shift, eps, is_rms):
        hidden = x.shape[-1]
        _check(x, scale, shift, hidden)
        out_dtype = torch.promote_types(torch.promote_types(x.dtype, scale.dtype), shift.dtype)
        rows = x.numel() // hidden
        x2 = x.reshape(rows, hidden).contiguous()
        y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        mean = None if is_rms else torch.empty(rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        ctx.is_rms, ctx.x_shape, ctx.rows = is_rms, x.shape, rows
        ctx.params = ((scale.shape, scale.dtype), (shift.shape, shift.dtype))
        if rows == 0:
            ctx.save_for_backward(x2, mean, rstd, None)
            return y
        sc, sc_group, sc_expanded = _modulation_rows(scale, x.shape, rows)
        sh, sh_group, sh_expanded = _modulation_rows(shift, x.shape, rows)
        block, tile_rows, warps = launch_config(hidden, backward=False)
        _adaln_fwd_kernel[(launch.cdiv(rows, tile_rows),)](
            x2, sc, sh, y, mean, rstd, rows, hidden, sc_group, sh_group, eps,
            IS_RMS=is_rms, BLOCK=block, ROWS=tile_rows, num_warps=warps,
        )
        ctx.save_for_backward(x2, mean, rstd, sc)
        ctx.groups = (sc_group, sh_group)
        ctx.expanded = (sc_expanded, sh_expanded)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x2, mean, rstd, sc = ctx.saved_tensors
        rows, hidden, device = ctx.rows, ctx.x_shape[-1], x2.device
        (scale_shape, scale_dtype), (shift_shape, shift_dtype) = ctx.params
        if rows == 0:
            return (torch.zeros(ctx.x_shape, dtype=x2.dtype, device=device),
                    torch.zeros(scale_shape, dtype=scale_dtype, device=device),
                    torch.zeros(shift_shape, dtype=shift_dtype, device=device), None, None)
        dy2 = dy.reshape(rows, hidden).contiguous()
        groups, expanded = ctx.groups, ctx.expanded
        per_row = tuple(g == 1 for g in groups)
        # per-row gradients in the parameter's dtype, or float32 where the host sums them
        per_row_dtypes = tuple(torch.float32 if e else dt for e, dt in zip(expanded, (scale_dtype, shift_dtype)))
        per_row_bufs = tuple(torch.empty(rows, hidden, dtype=dt, device=device) if r else None
                             for r, dt in zip(per_row, per_row_dtypes))
        summed = [g for g, r in zip(groups, per_row) if not r]
        group = min(summed) if summed else rows  # no program straddles two of these groups
        split = launch.split_rows(rows, rows // group, device)
        n_parts = split.examples * split.chunks
        parts = tuple(None if r else torch.empty(n_parts, hidden, dtype=torch.float32, device=device)
                      for r in per_row)
        dx = torch.empty(rows, hidden, dtype=x2.dtype, device=device)
        block, tile_rows, warps = launch_config(hidden, backward=True)
        _adaln_bwd_kernel[(split.examples, split.chunks)](
            dy2, x2, sc, mean, rstd, dx, per_row_bufs[0], per_row_bufs[1], parts[0], parts[1],
            hidden, groups[0], split.rows_per_example, split.rows_per_program,
            IS_RMS=ctx.is_rms, SCALE_PER_ROW=per_row[0], SHIFT_PER_ROW=per_row[1],
            BLOCK=block, ROWS=tile_rows, num_warps=warps,
        )
        grads = []
        for k, (shape, dtype) in enumerate(ctx.params):
            if per_row[k]:
                d = per_row_bufs[k]
                d = d.reshape(ctx.x_shape).sum_to_size(shape) if expanded[k] else d.reshape(shape)
            else:  # partials -> one sum per group of `group` rows -> one per modulation row
                d = parts[k].view(split.examples, split.chunks, hidden).sum(1)
                d = d.view(rows // groups[k], groups[k] // group, hidden).sum(1).reshape(shape)
            grads.append(d.to(dtype))
        return dx.reshape(ctx.x_shape), grads[0], grads[1], None, None


def adaln_modulate(x, scale, shift, eps, *, is_rms=False):
    """Norm(x) * (1 + scale) + shift over the last dim, on the kernels above (eager calls on
    plain tensors; under torch.compile and torch.func transforms, the torch path's ops)."""
    if type(x) is not torch.Tensor or not eager._plain_eager():
        return eager.adaln_modulate(x, scale, shift, eps, is_rms=is_rms)
    return AdaLNFunction.apply(x, scale, shift, float(eps), is_rms)
