"""Fused residual add + dropout + LayerNorm/RMSNorm kernels, forward and backward.

One kernel family serves both norms (``IS_RMS`` drops the mean) and every fusion
(``HAS_RES``: residual add, ``HAS_DROPOUT``: Philox dropout on x, ``STORE_RES``: write
new_residual). Per row, in float32:

    h    = residual + dropout(x)     rounded once to residual_dtype (the stored tensor)
    xhat = (h - mean) * rstd         rstd = 1 / sqrt(Var[h] + eps)   (RMS: mean = 0)
    out  = xhat * scale + bias       scale = offset + weight, formed in float32

``HAS_OFFSET`` adds the runtime ``offset`` to the weight (LayerNorm1p, Gemma's
zero-centred weight; without a weight the scale is the offset). RMSNorm's casting
modes (``ops.reference.rms_norm_cast``): "torch" and "gemma" are the order above;
``LLAMA`` (Hugging Face's LlamaRMSNorm) rounds xhat to h's dtype and the scale to the
weight's dtype, and their product is the one a multiply in those dtypes gives.

Backward, per row, with g = dout * scale and N = hidden:

    dh = rstd * (g - xhat * mean(g * xhat) - mean(g))   (RMS: without mean(g))
         + dnew_residual
    dx = dropout'(dh) (the same mask, regenerated from the seed), dresidual = dh

dweight = sum over rows of dout * xhat (``LLAMA``: the rounded xhat of the forward; the
roundings pass gradients through unchanged, as autograd's ``.to()`` does) and dbias =
sum of dout are accumulated per program and summed by ``launch.reduce_partials``; the
same partials give each example's squared gradient norms (Gray et al. 2024) at the cost of one extra pass over
the small partial buffer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from normlab.ops.triton import launch


@triton.jit
def _load_row(PTR, off, cols, mask):
    return tl.load(PTR + off + cols, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _row_offset(row, s0, s1, s2, n1, n2, STRIDED: tl.constexpr):
    # where row ``row`` starts: one row stride, or (STRIDED) row = (i0, i1, i2) over row
    # dims of sizes (., n1, n2) and strides (s0, s1, s2) (``launch.RowLayout``)
    if STRIDED:
        i2 = row % n2
        r = row // n2
        off = (r // n1) * s0 + (r % n1) * s1 + i2 * s2
    else:
        off = row * s0
    return off


@triton.jit
def _keep(seed, row, hidden, cols, drop_p):
    # Philox stream indexed by the element's flat position: forward and backward
    # regenerate the same mask from (seed, position)
    return tl.rand(seed, row * hidden + cols) >= drop_p


@triton.jit
def _new_residual(X, RES, row, cols, mask, x_off, res_off, hidden, seed, drop_p, drop_scale,
                  HAS_RES: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    h = _load_row(X, x_off, cols, mask)
    if HAS_DROPOUT:
        # times a scaled mask, as torch's dropout: a dropped inf or nan gives nan (a select would give 0)
        h = h * tl.where(_keep(seed, row, hidden, cols, drop_p), drop_scale, 0.0)
    if HAS_RES:
        h += _load_row(RES, res_off, cols, mask)
    return h


@triton.jit
def _round_to(v, PTR):
    # v rounded to the dtype PTR points to, back in float32
    return v.to(PTR.dtype.element_ty).to(tl.float32)


@triton.jit
def _scale(W, cols, mask, offset, HAS_OFFSET: tl.constexpr, LLAMA: tl.constexpr):
    # offset + w in float32 (never w's dtype first); LLAMA: then rounded to w's dtype
    s = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_OFFSET:
        s = s + offset
        if LLAMA:
            s = _round_to(s, W)
    return s


@triton.jit
def _gain(v, W, cols, mask, offset, HAS_W: tl.constexpr, HAS_OFFSET: tl.constexpr, LLAMA: tl.constexpr):
    # v times the scale: offset + w (``_scale``), the offset alone without a weight
    if HAS_W:
        v = v * _scale(W, cols, mask, offset, HAS_OFFSET, LLAMA)
    elif HAS_OFFSET:
        v = v * offset
    return v


@triton.jit
def _affine_store(Y, RES_OUT, W, B, y_off, cols, mask, xhat, hidden, offset,
                  HAS_W: tl.constexpr, HAS_B: tl.constexpr, ROUND_TO_RES: tl.constexpr,
                  HAS_OFFSET: tl.constexpr, LLAMA: tl.constexpr):
    # LLAMA: xhat arrives rounded. Two half-precision factors multiply exactly in float32,
    # so one rounding (ROUND_TO_RES, set where their dtype is h's and not out's, or the
    # store) gives their product in their dtype; with a float32 factor it is float32's
    y = _gain(xhat, W, cols, cols < hidden, offset, HAS_W, HAS_OFFSET, LLAMA)
    if HAS_B:
        y = y + tl.load(B + cols, mask=cols < hidden, other=0.0).to(tl.float32)
    if ROUND_TO_RES:  # the norm's result is rounded to new_residual's dtype, then to x's
        y = y.to(RES_OUT.dtype.element_ty)
    tl.store(Y + y_off + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_kernel(
    X, RES, W, B, Y, RES_OUT, MEAN, RSTD,
    stride_x, stride_res, stride_y, stride_res_out,
    rows, hidden, eps, seed, drop_p, drop_scale,
    IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    STORE_RES: tl.constexpr, ROUND_TO_RES: tl.constexpr, HAS_W: tl.constexpr,
    HAS_B: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
    stride_x1=0, stride_x2=0, n1=1, n2=1, STRIDED: tl.constexpr = False,
    offset=0.0, HAS_OFFSET: tl.constexpr = False, LLAMA: tl.constexpr = False,
    STORE_STATS: tl.constexpr = True,
):
    # a tile of ROWS whole rows per program: narrow rows get enough bytes in flight.
    # STRIDED: x's rows are found through its row dims (_row_offset); the rest use
    # one row stride
    row1 = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row = row1[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (row < rows) & (cols < hidden)
    x_off = _row_offset(row, stride_x, stride_x1, stride_x2, n1, n2, STRIDED)
    h = _new_residual(X, RES, row, cols, mask, x_off, row * stride_res, hidden, seed, drop_p,
                      drop_scale, HAS_RES, HAS_DROPOUT)
    if STORE_RES:
        stored = h.to(RES_OUT.dtype.element_ty)
        tl.store(RES_OUT + row * stride_res_out + cols, stored, mask=mask)
        h = stored.to(tl.float32)  # normalize what the next block will read
    if IS_RMS:
        centered = h
    else:
        mean = tl.sum(h, axis=1) / hidden
        centered = tl.where(mask, h - mean[:, None], 0.0)
        if STORE_STATS:
            tl.store(MEAN + row1, mean, mask=row1 < rows)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / hidden + eps)
    if STORE_STATS:  # (False: no backward will read them, MEAN and RSTD are None)
        tl.store(RSTD + row1, rstd, mask=row1 < rows)
    xhat = centered * rstd[:, None]
    if LLAMA:  # xhat in the dtype of the tensor normalized
        if STORE_RES:
            xhat = _round_to(xhat, RES_OUT)
        else:
            xhat = _round_to(xhat, X)
    _affine_store(Y, RES_OUT, W, B, row * stride_y, cols, mask, xhat, hidden, offset,
                  HAS_W, HAS_B, ROUND_TO_RES, HAS_OFFSET, LLAMA)


@triton.jit
def _fwd_looped_kernel(
    X, RES, W, B, Y, RES_OUT, MEAN, RSTD,
    stride_x, stride_res, stride_y, stride_res_out,
    rows, hidden, eps, seed, drop_p, drop_scale,
    IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    STORE_RES: tl.constexpr, ROUND_TO_RES: tl.constexpr, HAS_W: tl.constexpr,
    HAS_B: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
    stride_x1=0, stride_x2=0, n1=1, n2=1, STRIDED: tl.constexpr = False,
    offset=0.0, HAS_OFFSET: tl.constexpr = False, LLAMA: tl.constexpr = False,
    STORE_STATS: tl.constexpr = True,
):
    # wide rows: pass 1 forms (and stores) h and its sum; pass 2 the centred sum of
    # squares (LayerNorm only); pass 3 normalizes. Passes 2-3 re-read the stored h.
    row = tl.program_id(0).to(tl.int64)
    x_off = _row_offset(row, stride_x, stride_x1, stride_x2, n1, n2, STRIDED)
    if STORE_RES:
        H = RES_OUT
        h_off = row * stride_res_out
    else:
        H = X
        h_off = x_off
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, hidden, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < hidden
        h = _new_residual(X, RES, row, cols, mask, x_off, row * stride_res, hidden, seed, drop_p,
                          drop_scale, HAS_RES, HAS_DROPOUT)
        if STORE_RES:
            stored = h.to(RES_OUT.dtype.element_ty)
            tl.store(RES_OUT + row * stride_res_out + cols, stored, mask=mask)
            h = stored.to(tl.float32)
        if IS_RMS:
            acc += h * h
        else:
            acc += h
    tl.debug_barrier()  # the stored h is re-read by other threads of this program
    if IS_RMS:
        mean = 0.0
        var = tl.sum(acc, axis=0) / hidden
    else:
        mean = tl.sum(acc, axis=0) / hidden
        if STORE_STATS:
            tl.store(MEAN + row, mean)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, hidden, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < hidden
            centered = tl.where(mask, _load_row(H, h_off, cols, mask) - mean, 0.0)
            acc += centered * centered
        var = tl.sum(acc, axis=0) / hidden
    rstd = 1.0 / tl.sqrt(var + eps)
    if STORE_STATS:
        tl.store(RSTD + row, rstd)
    for start in range(0, hidden, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < hidden
        xhat = (_load_row(H, h_off, cols, mask) - mean) * rstd
        if LLAMA:
            xhat = _round_to(xhat, H)
        _affine_store(Y, RES_OUT, W, B, row * stride_y, cols, mask, xhat, hidden, offset,
                      HAS_W, HAS_B, ROUND_TO_RES, HAS_OFFSET, LLAMA)


@triton.jit
def _row_range(rows_per_example, rows_per_program):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    first = b * rows_per_example + c * rows_per_program
    last = tl.minimum(first + rows_per_program, (b + 1) * rows_per_example)
    return first, last, b * tl.num_programs(1) + c


@triton.jit
def _xhat(h, row, MEAN, rstd, mask, row_mask, IS_RMS: tl.constexpr):
    if IS_RMS:
        xhat = h * rstd
    else:
        xhat = tl.where(mask, (h - tl.load(MEAN + row, mask=row_mask, other=0.0)) * rstd, 0.0)
    return xhat


@triton.jit
def _forward_xhat(xhat, H, LLAMA: tl.constexpr):
    # the xhat the forward multiplied the weight by (dweight's factor); dx's formula
    # takes the unrounded one
    if LLAMA:
        xhat = _round_to(xhat, H)
    return xhat


@triton.jit
def _store_grads(DX, DRES, DRES_OUT, row, cols, mask, stride_dx, stride_dres, stride_dres_out,
                 dh, hidden, seed, drop_p, drop_scale,
                 HAS_DRES_OUT: tl.constexpr, HAS_RES: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    if HAS_DRES_OUT:
        dh += _load_row(DRES_OUT, row * stride_dres_out, cols, mask)
    if HAS_RES:
        tl.store(DRES + row * stride_dres + cols, dh.to(DRES.dtype.element_ty), mask=mask)
    if HAS_DROPOUT:
        dh = dh * tl.where(_keep(seed, row, hidden, cols, drop_p), drop_scale, 0.0)
    tl.store(DX + row * stride_dx + cols, dh.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _zero_first(SQ, n_sq, ZERO_SQ: tl.constexpr):
    # program (0, 0) zeroes the n_sq floats of SQ, which the column reduction launched
    # next adds each example's squared gradient norms into
    if ZERO_SQ:
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            offs = tl.arange(0, 128)
            for s0 in range(0, n_sq, 128):
                tl.store(SQ + s0 + offs, tl.zeros([128], dtype=tl.float32), mask=s0 + offs < n_sq)


@triton.jit
def _bwd_kernel(
    DY, DRES_OUT, H, W, MEAN, RSTD, DX, DRES, DW_PART, DB_PART, C1, C2, SQ,
    stride_dy, stride_dres_out, stride_h, stride_dx, stride_dres,
    hidden, rows_per_example, rows_per_program, seed, drop_p, drop_scale, n_sq,
    IS_RMS: tl.constexpr, HAS_DRES_OUT: tl.constexpr, HAS_RES: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr,
    ROWS: tl.constexpr, ZERO_SQ: tl.constexpr,
    stride_dy1=0, stride_dy2=0, stride_h1=0, stride_h2=0, n1=1, n2=1, STRIDED: tl.constexpr = False,
    offset=0.0, HAS_OFFSET: tl.constexpr = False, LLAMA: tl.constexpr = False, db_offset=0,
):
    # the program's rows stream through in tiles of ROWS rows; dweight/dbias partials
    # stay in registers and are written once
    _zero_first(SQ, n_sq, ZERO_SQ)
    first, last, part_row = _row_range(rows_per_example, rows_per_program)
    cols1 = tl.arange(0, BLOCK)
    cols = cols1[None, :]
    col_mask = cols < hidden
    dw = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    db = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for start in range(first, last, ROWS):
        row = start + tl.arange(0, ROWS)[:, None]
        row_mask = row < last
        mask = row_mask & col_mask
        dy = _load_row(DY, _row_offset(row, stride_dy, stride_dy1, stride_dy2, n1, n2, STRIDED), cols,
                       mask)
        rstd = tl.load(RSTD + row, mask=row_mask, other=0.0)
        h_off = _row_offset(row, stride_h, stride_h1, stride_h2, n1, n2, STRIDED)
        xhat = _xhat(_load_row(H, h_off, cols, mask), row, MEAN, rstd, mask, row_mask, IS_RMS)
        # the weight reloaded each step (from L1): registers go to the row instead
        g = _gain(dy, W, cols, col_mask, offset, HAS_W, HAS_OFFSET, LLAMA)
        if HAS_W:
            dw += dy * _forward_xhat(xhat, H, LLAMA)
        if HAS_B:
            db += dy
        c1 = tl.sum(xhat * g, axis=1)[:, None] / hidden
        if IS_RMS:
            dh = (g - xhat * c1) * rstd
        else:
            dh = (g - (xhat * c1 + tl.sum(g, axis=1)[:, None] / hidden)) * rstd
        _store_grads(DX, DRES, DRES_OUT, row, cols, mask, stride_dx, stride_dres, stride_dres_out,
                     dh, hidden, seed, drop_p, drop_scale, HAS_DRES_OUT, HAS_RES, HAS_DROPOUT)
    if HAS_W:
        tl.store(DW_PART + part_row * hidden + cols1, tl.sum(dw, axis=0), mask=cols1 < hidden)
    if HAS_B:
        tl.store(DB_PART + db_offset + part_row * hidden + cols1, tl.sum(db, axis=0), mask=cols1 < hidden)


@triton.jit
def _bwd_split_kernel(
    DY, DRES_OUT, H, W, MEAN, RSTD, DX, DRES, DW_PART, DB_PART, C1, C2, SQ,
    stride_dy, stride_dres_out, stride_h, stride_dx, stride_dres,
    hidden, rows_per_example, rows_per_program, seed, drop_p, drop_scale, n_sq,
    IS_RMS: tl.constexpr, HAS_DRES_OUT: tl.constexpr, HAS_RES: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr,
    ROWS: tl.constexpr, ZERO_SQ: tl.constexpr, SPLIT: tl.constexpr,
    stride_dy1=0, stride_dy2=0, stride_h1=0, stride_h2=0, n1=1, n2=1, STRIDED: tl.constexpr = False,
    offset=0.0, HAS_OFFSET: tl.constexpr = False, LLAMA: tl.constexpr = False, db_offset=0,
):
    # wide rows, columns split SPLIT ways: program (b * SPLIT + s, c) owns column part s
    # of its rows, so its dweight/dbias partials are a part wide, not a row (a whole
    # row's are half an SM's registers for LayerNorm at 16384). Per row it first sums
    # the row's statistics over every part (its own last), then reloads its own part,
    # fresh in the cache, for dx and the partials. The SPLIT programs of a row run side by
    # side (adjacent program ids), so the row comes from HBM once and from L2 after.
    _zero_first(SQ, n_sq, ZERO_SQ)
    PART: tl.constexpr = BLOCK // SPLIT
    pid0 = tl.program_id(0)
    b = (pid0 // SPLIT).to(tl.int64)
    s = pid0 % SPLIT
    c = tl.program_id(1).to(tl.int64)
    first = b * rows_per_example + c * rows_per_program
    last = tl.minimum(first + rows_per_program, (b + 1) * rows_per_example)
    part_row = b * tl.num_programs(1) + c
    own = s * PART + tl.arange(0, PART)
    own_mask = own < hidden
    dw = tl.zeros([PART], dtype=tl.float32)
    db = tl.zeros([PART], dtype=tl.float32)
    for row in range(first, last):
        rstd = tl.load(RSTD + row)
        dy_off = _row_offset(row, stride_dy, stride_dy1, stride_dy2, n1, n2, STRIDED)
        h_off = _row_offset(row, stride_h, stride_h1, stride_h2, n1, n2, STRIDED)
        a1 = 0.0
        a2 = 0.0
        for k in range(1, SPLIT + 1):
            cols = ((s + k) % SPLIT) * PART + tl.arange(0, PART)
            mask = cols < hidden
            g = _gain(_load_row(DY, dy_off, cols, mask), W, cols, mask, offset, HAS_W, HAS_OFFSET, LLAMA)
            xhat = _xhat(_load_row(H, h_off, cols, mask), row, MEAN, rstd, mask, True, IS_RMS)
            a1 += tl.sum(xhat * g, axis=0)
            a2 += tl.sum(g, axis=0)
        c1 = a1 / hidden
        dy = _load_row(DY, dy_off, own, own_mask)
        xhat = _xhat(_load_row(H, h_off, own, own_mask), row, MEAN, rstd, own_mask, True, IS_RMS)
        g = _gain(dy, W, own, own_mask, offset, HAS_W, HAS_OFFSET, LLAMA)
        if HAS_W:
            dw += dy * _forward_xhat(xhat, H, LLAMA)
        if HAS_B:
            db += dy
        if IS_RMS:
            dh = (g - xhat * c1) * rstd
        else:
            dh = (g - (xhat * c1 + a2 / hidden)) * rstd
        _store_grads(DX, DRES, DRES_OUT, row, own, own_mask, stride_dx, stride_dres,
                     stride_dres_out, dh, hidden, seed, drop_p, drop_scale, HAS_DRES_OUT, HAS_RES,
                     HAS_DROPOUT)
    if HAS_W:
        tl.store(DW_PART + part_row * hidden + own, dw, mask=own_mask)
    if HAS_B:
        tl.store(DB_PART + db_offset + part_row * hidden + own, db, mask=own_mask)


@triton.jit
def _bwd_looped_kernel(
    DY, DRES_OUT, H, W, MEAN, RSTD, DX, DRES, DW_PART, DB_PART, C1, C2, SQ,
    stride_dy, stride_dres_out, stride_h, stride_dx, stride_dres,
    hidden, rows_per_example, rows_per_program, seed, drop_p, drop_scale, n_sq,
    IS_RMS: tl.constexpr, HAS_DRES_OUT: tl.constexpr, HAS_RES: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr,
    ROWS: tl.constexpr, ZERO_SQ: tl.constexpr,
    stride_dy1=0, stride_dy2=0, stride_h1=0, stride_h2=0, n1=1, n2=1, STRIDED: tl.constexpr = False,
    offset=0.0, HAS_OFFSET: tl.constexpr = False, LLAMA: tl.constexpr = False, db_offset=0,
):
    # wide rows: pass A reduces each row's mean(g * xhat) and mean(g) into C1/C2; pass B
    # walks column chunks outermost, so the dweight/dbias partials of a chunk stay in
    # registers while the program's rows stream through
    _zero_first(SQ, n_sq, ZERO_SQ)
    first, last, part_row = _row_range(rows_per_example, rows_per_program)
    for row in range(first, last):
        rstd = tl.load(RSTD + row)
        dy_off = _row_offset(row, stride_dy, stride_dy1, stride_dy2, n1, n2, STRIDED)
        h_off = _row_offset(row, stride_h, stride_h1, stride_h2, n1, n2, STRIDED)
        a1 = tl.zeros([BLOCK], dtype=tl.float32)
        a2 = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, hidden, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < hidden
            g = _gain(_load_row(DY, dy_off, cols, mask), W, cols, mask, offset, HAS_W, HAS_OFFSET, LLAMA)
            xhat = _xhat(_load_row(H, h_off, cols, mask), row, MEAN, rstd, mask, True, IS_RMS)
            a1 += xhat * g
            a2 += g
        tl.store(C1 + row, tl.sum(a1, axis=0) / hidden)
        if not IS_RMS:
            tl.store(C2 + row, tl.sum(a2, axis=0) / hidden)
    tl.debug_barrier()  # C1/C2 are read back by every thread of this program
    for start in range(0, hidden, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < hidden
        if HAS_W:
            w = _scale(W, cols, mask, offset, HAS_OFFSET, LLAMA)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        db = tl.zeros([BLOCK], dtype=tl.float32)
        for row in range(first, last):
            dy = _load_row(DY, _row_offset(row, stride_dy, stride_dy1, stride_dy2, n1, n2, STRIDED),
                           cols, mask)
            rstd = tl.load(RSTD + row)
            h_off = _row_offset(row, stride_h, stride_h1, stride_h2, n1, n2, STRIDED)
            xhat = _xhat(_load_row(H, h_off, cols, mask), row, MEAN, rstd, mask, True, IS_RMS)
            g = dy
            if HAS_W:
                dw += dy * _forward_xhat(xhat, H, LLAMA)
                g = dy * w
            elif HAS_OFFSET:
                g = dy * offset
            if HAS_B:
                db += dy
            if IS_RMS:
                dh = (g - xhat * tl.load(C1 + row)) * rstd
            else:
                dh = (g - (xhat * tl.load(C1 + row) + tl.load(C2 + row))) * rstd
            _store_grads(DX, DRES, DRES_OUT, row, cols, mask, stride_dx, stride_dres,
                         stride_dres_out, dh, hidden, seed, drop_p, drop_scale,
                         HAS_DRES_OUT, HAS_RES, HAS_DROPOUT)
        if HAS_W:
            tl.store(DW_PART + part_row * hidden + cols, dw, mask=mask)
        if HAS_B:
            tl.store(DB_PART + db_offset + part_row * hidden + cols, db, mask=mask)


# ------------------------------------------------------------------------------ host side


@dataclass(frozen=True)
class Dropout:
    """Dropout on x with keep probability 1 - p, mask from the Philox stream ``seed``."""
    p: float
    seed: int

    @property
    def scale(self) -> float:
        return 1.0 / (1.0 - self.p) if self.p < 1.0 else 0.0


def _dropout_args(dropout: Dropout | None) -> tuple[int, float, float]:
    return (dropout.seed, dropout.p, dropout.scale) if dropout is not None else (0, 0.0, 1.0)


def _cast_args(offset: float, casting_mode: str, is_rms: bool) -> dict | None:
    """The kernels' offset and casting-mode arguments; None for the defaults (offset 0,
    "torch"), which the kernels take without them. "gemma" computes as "torch" does."""
    llama = casting_mode == "llama" and is_rms
    if offset == 0.0 and not llama:
        return None
    return dict(offset=float(offset), HAS_OFFSET=offset != 0.0, LLAMA=llama)


# The keyword arguments of a launch (constexprs and launch settings) are a pure function
# of the call's flags and its ``BlockConfig``: built once per combination, not per call.
# (The kernel itself is looked up per call, so a replaced kernel is the one launched.)


@functools.lru_cache(maxsize=1024)
def _fwd_keywords(cfg: launch.BlockConfig, is_rms: bool, has_res: bool, has_dropout: bool, store_res: bool,
                  round_to_res: bool, has_w: bool, has_b: bool, store_stats: bool, offset: float,
                  casting_mode: str) -> dict:
    kw = dict(IS_RMS=is_rms, HAS_RES=has_res, HAS_DROPOUT=has_dropout, STORE_RES=store_res,
              ROUND_TO_RES=round_to_res, HAS_W=has_w, HAS_B=has_b, BLOCK=cfg.block, ROWS=cfg.rows,
              num_warps=cfg.num_warps, num_stages=cfg.num_stages, **(_cast_args(offset, casting_mode, is_rms) or {}))
    if not store_stats:
        kw["STORE_STATS"] = False
    return kw


@functools.lru_cache(maxsize=1024)
def _bwd_keywords(cfg: launch.BlockConfig, is_rms: bool, has_dres_out: bool, has_res: bool, has_dropout: bool,
                  has_w: bool, has_b: bool, zero_sq: bool, offset: float, casting_mode: str) -> dict:
    return dict(IS_RMS=is_rms, HAS_DRES_OUT=has_dres_out, HAS_RES=has_res, HAS_DROPOUT=has_dropout,
                HAS_W=has_w, HAS_B=has_b, BLOCK=cfg.block, ROWS=cfg.bwd_rows, ZERO_SQ=zero_sq,
                num_warps=cfg.bwd_warps, num_stages=cfg.num_stages, **backward_kernel(cfg)[1],
                **(_cast_args(offset, casting_mode, is_rms) or {}))


def _stats(shape: tuple[int, ...] | torch.Size, device: torch.device) -> torch.Tensor:
    """A float32 tensor of ``shape`` (sizes passed one by one: torch parses them faster
    than one tuple)."""
    return torch.empty(*shape, dtype=torch.float32, device=device) if shape else \
        torch.empty((), dtype=torch.float32, device=device)


def backward_kernel(cfg: launch.BlockConfig) -> tuple[triton.JITFunction, dict]:
    """The backward kernel a launch config runs, and the constexprs only it takes."""
    if cfg.looped:
        return _bwd_looped_kernel, {}
    if cfg.bwd_split > 1:
        return _bwd_split_kernel, {"SPLIT": cfg.bwd_split}
    return _bwd_kernel, {}


def norm_forward(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
    bias: torch.Tensor | None, eps: float, *, hidden: int, is_rms: bool,
    dropout: Dropout | None, residual_dtype: torch.dtype | None, store_residual: bool,
    offset: float = 0.0, casting_mode: str = "torch", out_dtype: torch.dtype | None = None,
    store_stats: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(out, new_residual, mean, rstd): out and new_residual have x's shape (contiguous),
    out in ``out_dtype`` (default x's), new_residual is None unless ``store_residual``;
    mean/rstd are float32 with x's row dims as shape (``launch.row_shape``; mean None for
    RMSNorm; both None without ``store_stats``, for a call no backward follows). The scale is ``offset`` + weight; ``casting_mode`` as in
    ``ops.reference.rms_norm_cast`` (RMSNorm; "llama" needs a weight of a kernel dtype,
    whose product with the rounded xhat is then rounded to promote(weight's dtype, h's
    dtype) before out's). Without a residual
    (plain LayerNorm / RMSNorm), x is read in place through ``launch.row_layout`` (a
    strided view such as a transposed [B, T, H, hd] tensor is not copied); with one, x and
    residual each need one row stride (``launch.as_rows``: copied otherwise)."""
    strided = None
    if residual is None and not store_residual and not x.is_contiguous():
        layout = launch.row_layout((x,), hidden)
        x2, rows, (x_strides,) = layout.tensors[0], layout.rows, layout.strides
        x_stride = x_strides[0]
        if layout.strided:
            strided = dict(stride_x1=x_strides[1], stride_x2=x_strides[2], n1=layout.n1, n2=layout.n2,
                           STRIDED=True)
    else:
        x2, rows, x_stride = launch.as_rows(x, hidden)
    res2, _, res_stride = launch.as_rows(residual, hidden) if residual is not None else (None, 0, 0)
    # (empty_like: a third of torch.empty's host time given x.shape)
    out = torch.empty_like(x, dtype=out_dtype or x.dtype, memory_format=torch.contiguous_format)
    res_dtype = residual_dtype or x.dtype
    new_res = torch.empty_like(x, dtype=res_dtype, memory_format=torch.contiguous_format) if store_residual else None
    mean = rstd = None
    if store_stats:
        shape = x.shape
        # (the common case of ``launch.row_shape`` inline; hidden 1 keeps every dim there)
        stats_shape = shape[:-1] if shape and shape[-1] == hidden != 1 else launch.row_shape(shape, hidden)
        device = x.device
        mean = None if is_rms else _stats(stats_shape, device)
        rstd = _stats(stats_shape, device)
    if rows == 0:
        return out, new_res, mean, rstd
    cfg = launch.block_config(hidden)
    kernel = _fwd_looped_kernel if cfg.looped else _fwd_kernel
    seed, p, scale = _dropout_args(dropout)
    # the norm's result is rounded to new_residual's dtype before out's, except where
    # llama's product is formed in a wider dtype (a weight of another dtype than h's)
    round_to_res = store_residual and res_dtype != out.dtype and (
        casting_mode != "llama" or not is_rms or weight is None or weight.dtype == res_dtype)
    kw = _fwd_keywords(cfg, is_rms, res2 is not None, dropout is not None, store_residual, round_to_res,
                       weight is not None, bias is not None, store_stats, offset, casting_mode)
    kernel[(launch.cdiv(rows, cfg.rows),)](
        x2, res2, weight, bias, out, new_res, mean, rstd,
        x_stride, res_stride, hidden, hidden,
        rows, hidden, eps, seed, p, scale, **kw, **(strided or {}),
    )
    return out, new_res, mean, rstd


def norm_backward(
    dout: torch.Tensor, dnew_residual: torch.Tensor | None, h: torch.Tensor,
    weight: torch.Tensor | None, bias_dtype: torch.dtype | None, mean: torch.Tensor,
    rstd: torch.Tensor, *, hidden: int, is_rms: bool, dropout: Dropout | None,
    x_dtype: torch.dtype, residual_grad_dtype: torch.dtype | None, examples: int | None,
    out_sq: torch.Tensor | None = None, offset: float = 0.0, casting_mode: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None,
           torch.Tensor | None]:
    """(dx, dresidual, dweight, dbias, per_example_sq): ``h`` is the normalized input
    (the stored new_residual). With ``examples`` set, per_example_sq is float32
    [2, examples]: each example's ||dweight||^2 and ||dbias||^2 (zeros without bias),
    written into ``out_sq`` when given (a float32 [2, examples] tensor). ``offset`` and
    ``casting_mode`` as the forward's. dx (and
    dresidual) are contiguous. Without residual gradients, h and dout are read in place
    through ``launch.row_layout``; otherwise each needs one row stride (copied if not)."""
    strided = None
    if (dnew_residual is None and residual_grad_dtype is None
            and not (h.is_contiguous() and dout.is_contiguous())):
        layout = launch.row_layout((h, dout), hidden)
        (h2, dy2), rows = layout.tensors, layout.rows
        (h_stride, h_s1, h_s2), (dy_stride, dy_s1, dy_s2) = layout.strides
        if layout.strided:
            strided = dict(stride_dy1=dy_s1, stride_dy2=dy_s2, stride_h1=h_s1, stride_h2=h_s2,
                           n1=layout.n1, n2=layout.n2, STRIDED=True)
    else:
        h2, rows, h_stride = launch.as_rows(h, hidden)
        dy2, _, dy_stride = launch.as_rows(dout, hidden)
    dres_out2, _, dres_out_stride = (launch.as_rows(dnew_residual, hidden)
                                     if dnew_residual is not None else (None, 0, 0))
    device = h.device
    dx = torch.empty_like(h, dtype=x_dtype, memory_format=torch.contiguous_format)
    dres = (torch.empty_like(h, dtype=residual_grad_dtype, memory_format=torch.contiguous_format)
            if residual_grad_dtype is not None else None)
    per_example = examples is not None
    cfg = launch.block_config(hidden)
    split = launch.split_rows(rows, examples or 1, device, cfg.programs_per_sm) if rows else None
    if rows == 0:
        dw = torch.zeros(hidden, dtype=weight.dtype, device=device) if weight is not None else None
        db = torch.zeros(hidden, dtype=bias_dtype, device=device) if bias_dtype is not None else None
        sq = None
        if per_example:
            sq = torch.zeros(2, examples, device=device) if out_sq is None else out_sq.zero_()
        return dx, dres, dw, db, sq
    n_parts = split.examples * split.chunks
    n_bufs = (weight is not None) + (bias_dtype is not None)
    parts = torch.empty(n_bufs, n_parts, hidden, dtype=torch.float32, device=device) if n_bufs else None
    # (the kernels take pointers: both buffers are found from where ``parts`` starts, the
    # bias's ``db_offset`` elements on; a select would cost as much host time as an
    # allocation)
    dw_part = parts if weight is not None else None
    db_part = parts if bias_dtype is not None else None
    kernel = backward_kernel(cfg)[0]
    grid = (split.examples * cfg.bwd_split, split.chunks)  # bwd_split is 1 unless split
    c1 = c2 = None
    if cfg.looped:  # per-row statistics of pass A
        c1 = torch.empty(rows, dtype=torch.float32, device=device)
        c2 = torch.empty(rows, dtype=torch.float32, device=device)
    seed, p, scale = _dropout_args(dropout)
    # per example, unless deterministic algorithms are asked for: the backward kernel
    # zeroes the [2, examples] result and the column reduction adds each column block's
    # squared sums into it with atomics (no extra launch; the float32 sums' last bits may
    # vary from run to run). With torch.use_deterministic_algorithms(True): the reduction
    # writes a [2, examples, column blocks] buffer, summed in a fixed order by one more op.
    atomic = per_example and parts is not None and not torch.are_deterministic_algorithms_enabled()
    sq = None
    if atomic:
        sq = out_sq if out_sq is not None else torch.empty(2, examples, device=device)
    kernel[grid](
        dy2, dres_out2, h2, weight, mean, rstd, dx, dres, dw_part, db_part, c1, c2, sq,
        dy_stride, dres_out_stride, h_stride, hidden, hidden,
        hidden, split.rows_per_example, split.rows_per_program, seed, p, scale,
        2 * examples if atomic else 0, db_offset=n_parts * hidden if n_bufs == 2 else 0,
        **_bwd_keywords(cfg, is_rms, dres_out2 is not None, dres is not None, dropout is not None,
                        weight is not None, bias_dtype is not None, atomic, offset, casting_mode),
        **(strided or {}),
    )
    if parts is None:  # neither weight nor bias: nothing to reduce
        if per_example:
            sq = torch.zeros(2, examples, device=device) if out_sq is None else out_sq.zero_()
        return dx, dres, None, None, sq
    weight_dtype = weight.dtype if weight is not None else None
    if atomic or not per_example:
        dw, db = launch.reduce_partials(parts, split, weight_dtype, bias_dtype, sq, atomic=atomic)
        return dx, dres, dw, db, sq
    # deterministic per-example sums (zeros for an absent parameter)
    alloc = torch.empty if n_bufs == 2 else torch.zeros
    sq_parts = alloc(2, examples, launch.reduce_col_blocks(hidden), device=device)
    dw, db = launch.reduce_partials(parts, split, weight_dtype, bias_dtype, sq_parts)
    return dx, dres, dw, db, (sq_parts.sum(2) if out_sq is None else torch.sum(sq_parts, 2, out=out_sq))
