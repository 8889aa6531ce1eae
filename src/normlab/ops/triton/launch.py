"""What every normlab Triton kernel shares: row layout, block sizes, grids, and the
deterministic column reduction of per-program partial sums.

A norm kernel sees its input as a 2-D [rows, hidden] matrix with unit stride along the
hidden dim and any row stride; ``as_rows`` builds that view and copies only when no
such view exists. LayerNorm and RMSNorm without a residual also read rows whose leading
dims have no single stride (a transposed [B, T, H, hd] view: ``row_layout``) in place. Rows that fit one block run the single-block kernels; wider rows run
the looped kernels, which walk the row in chunks. The launch settings are a pure
function of the row width and an immutable ``LaunchOverrides`` value (``force_looped``
shrinks the single-block limit so tests reach the looped kernels on small rows;
``tuning`` is for benchmark sweeps).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from normlab.errors import NormArgumentError

MAX_HIDDEN = 65536
"""The widest normalized size (elements per row) the kernels support."""

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

@dataclass(frozen=True)
class LaunchOverrides:
    """Launch settings that replace ``block_config``'s defaults: an immutable value, set for
    a block of code by ``force_looped`` / ``tuning`` (a context variable, so threads and
    tasks each see their own) or passed to ``block_config`` explicitly.

    single_block  rows up to this many elements run the single-block kernels
    chunk         the looped kernels' chunk (a power of two)
    fwd_warps, bwd_warps, num_stages, programs_per_sm: as ``BlockConfig``'s fields
    fwd_rows, bwd_rows  rows per tile (powers of two; single-block kernels only)
    bwd_split     single-block backward: programs sharing each row (a power of two)
    None: the default."""

    single_block: int = 16384
    chunk: int = 4096
    fwd_warps: int | None = None
    bwd_warps: int | None = None
    num_stages: int | None = None
    programs_per_sm: int | None = None
    fwd_rows: int | None = None
    bwd_rows: int | None = None
    bwd_split: int | None = None


DEFAULT_OVERRIDES = LaunchOverrides()
_overrides: contextvars.ContextVar[LaunchOverrides] = contextvars.ContextVar(
    "normlab_launch_overrides", default=DEFAULT_OVERRIDES)
_TUNABLE = ("fwd_warps", "bwd_warps", "num_stages", "programs_per_sm", "fwd_rows", "bwd_rows", "bwd_split")


def current_overrides() -> LaunchOverrides:
    """The overrides in force: this thread's, or, in a backward that autograd runs on one
    of its device threads (CUDA), those of the thread that called backward. Python
    context variables do not follow autograd onto those threads; the engine carries a
    copy of the calling thread's context in its thread-local state instead
    (``torch.autograd.graph._engine_run_backward``), read here where it is present."""
    o = _overrides.get()
    return _callers_overrides() if o is DEFAULT_OVERRIDES and _is_key_in_tls("context") else o


def _callers_overrides() -> LaunchOverrides:
    caller = _get_obj_in_tls("context")
    return caller.get(_overrides, DEFAULT_OVERRIDES) if isinstance(caller, contextvars.Context) \
        else DEFAULT_OVERRIDES


# (private torch API, looked up once; without it a device thread's backward runs the defaults)
_is_key_in_tls = getattr(torch._C, "_is_key_in_tls", lambda key: False)
_get_obj_in_tls = getattr(torch._C, "_get_obj_in_tls", lambda key: None)


@contextlib.contextmanager
def _overriding(**changes: int | None) -> Iterator[None]:
    token = _overrides.set(dataclasses.replace(current_overrides(), **changes))
    try:
        yield
    finally:
        _overrides.reset(token)


def force_looped(block: int) -> contextlib.AbstractContextManager[None]:
    """Within the block, rows wider than ``block`` elements run the looped kernels in
    chunks of ``block`` (a power of two), so tests reach them on small rows."""
    if block < 1 or block & (block - 1):
        raise ValueError(f"force_looped(block): expected a power of two >= 1, got {block}")
    return _overriding(single_block=block, chunk=block)


def tuning(**settings: int | None) -> contextlib.AbstractContextManager[None]:
    """Within the block, launch with these settings instead of the defaults (for
    benchmark sweeps): ``fwd_warps``, ``bwd_warps``, ``num_stages``, ``fwd_rows`` /
    ``bwd_rows`` (rows per tile, powers of two; single-block kernels only) and
    ``programs_per_sm`` (backward programs per multiprocessor), ``bwd_split`` (single-block
    backward: programs sharing each row, each owning a part of its columns; a power of
    two, 1 = off)."""
    unknown = set(settings) - set(_TUNABLE)
    if unknown:
        raise ValueError(f"tuning(): unknown settings {sorted(unknown)}; expected among {sorted(_TUNABLE)}")
    for key in ("fwd_rows", "bwd_rows", "bwd_split"):
        v = settings.get(key)
        if v is not None and (v < 1 or v & (v - 1)):
            raise ValueError(f"tuning({key}): expected a power of two >= 1, got {v}")
    return _overriding(**settings)


@dataclass(frozen=True)
class BlockConfig:
    block: int       # columns one program holds at a time
    looped: bool     # True: walk the row in chunks of ``block``
    rows: int        # forward: rows per program (a tile of rows x block)
    num_warps: int   # forward
    bwd_rows: int    # backward: rows per step of a program's loop
    bwd_warps: int
    num_stages: int
    programs_per_sm: int  # backward
    bwd_split: int = 1    # backward: programs per row, each owning BLOCK / bwd_split columns


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive ints (plain Python: ``triton.cdiv`` is a constexpr function
    whose host-side call costs microseconds in recent Triton releases)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), in plain Python like ``cdiv``."""
    return 1 << (n - 1).bit_length()


TILE = 4096
"""Elements a single-block program aims to hold per step: narrow rows are stacked into
tiles of several rows, so each step moves enough bytes to hide memory latency."""

# Backward launch settings by block size: (rows per step, warps, programs per SM), from
# the sweep of benchmarks/tune_triton.py on an H100 (bf16, 16384 rows; see
# benchmarks/results/tuning-h100.md). Narrower blocks stack rows up to TILE elements.
_BWD_SETTINGS = {1024: (4, 4, 4), 2048: (1, 8, 4), 4096: (1, 8, 2), 8192: (1, 16, 1),
                 16384: (1, 8, 2)}


def _default_warps(elements: int) -> int:
    return (16 if elements >= 8192 else 8 if elements >= 2048 else 4 if elements >= 512
            else 2 if elements >= 128 else 1)


def block_config(hidden: int, overrides: LaunchOverrides | None = None) -> BlockConfig:
    """Block size, rows per tile, warps, pipelining depth and backward programs per SM
    for rows of ``hidden`` elements: a pure function of (hidden, overrides), cached;
    ``overrides`` defaults to the ones in force (``force_looped``, ``tuning``)."""
    if overrides is None:  # (current_overrides, inline: this runs at every launch)
        overrides = _overrides.get()
        if overrides is DEFAULT_OVERRIDES and _is_key_in_tls("context"):
            overrides = _callers_overrides()
    return _block_config(hidden, overrides)


@functools.lru_cache(maxsize=1024)
def _block_config(hidden: int, o: LaunchOverrides) -> BlockConfig:
    full = next_power_of_2(hidden)
    looped = full > o.single_block
    block = min(full, o.chunk) if looped else full
    if looped:
        fwd_rows, fwd_warps = 1, _default_warps(block)
        bwd_rows, bwd_warps, per_sm = 1, _default_warps(block), 4
    else:
        fwd_rows = max(1, min(16, TILE // block))
        fwd_warps = min(4, _default_warps(block * fwd_rows)) if block <= 2048 else (
            8 if block == 4096 else 16)
        # narrow blocks: backward tiles of up to 1024 elements (4 warps), the most that
        # compile without register spills on sm_90 (tests/ops/sm90.py)
        small_rows = max(1, min(16, 1024 // block))
        bwd_rows, bwd_warps, per_sm = _BWD_SETTINGS.get(
            block, (small_rows, min(4, _default_warps(block * small_rows)), 4))
    fwd_rows = 1 if looped else (o.fwd_rows or fwd_rows)
    bwd_rows = 1 if looped else (o.bwd_rows or bwd_rows)
    bwd_split = 1 if looped else min(block, o.bwd_split or 1)
    return BlockConfig(block, looped, fwd_rows, o.fwd_warps or fwd_warps, bwd_rows, o.bwd_warps or bwd_warps,
                       o.num_stages or 3,  # 3: Triton's own default
                       o.programs_per_sm or per_sm, bwd_split)


def check_supported(op: str, x: torch.Tensor, hidden: int) -> None:
    """Clear errors for what the kernels do not run, before anything is launched."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise NormArgumentError(
            f"{op}: the triton backend supports input dtypes float16, bfloat16 and float32, "
            f"got {x.dtype}; use normlab.set_backend('auto') or ('torch') for {x.dtype}"
        )
    if not 1 <= hidden <= MAX_HIDDEN:
        raise NormArgumentError(
            f"{op}: the triton backend supports normalized sizes (product of normalized_shape) "
            f"from 1 to {MAX_HIDDEN}, got {hidden}; use normlab.set_backend('torch') for "
            f"{'empty' if hidden < 1 else 'wider'} rows"
        )


def as_rows(t: torch.Tensor, hidden: int) -> tuple[torch.Tensor, int, int]:
    """(tensor, rows, row stride) for the kernels, which read ``t`` as [rows, hidden] with
    unit stride along hidden: ``t`` itself when contiguous (no view is built: the kernels
    need only its pointer), else a [rows, hidden] view whenever one exists, else a copy."""
    if t.is_contiguous():
        return t, t.numel() // hidden, hidden
    rows = t.reshape(-1, hidden)
    if rows.stride(1) != 1 and hidden > 1:
        rows = rows.contiguous()
    return rows, rows.shape[0], rows.stride(0) if rows.shape[0] > 1 else hidden


@dataclass(frozen=True)
class RowLayout:
    """How kernels find row ``r`` of each tensor of one shape, read as [rows, hidden] with
    unit stride along hidden. ``strided`` False: at ``r * strides[k][0]`` (one row stride;
    every contiguous tensor). ``strided`` True: the row dims, merged where every tensor
    allows it, are at most three, of sizes (rows / (n1 * n2), n1, n2); row r is
    (i0, i1, i2) in them and starts at i0 * s0 + i1 * s1 + i2 * s2, with (s0, s1, s2) =
    ``strides[k]``. ``tensors`` are the inputs, or a contiguous copy of those no layout
    reaches (hidden dims not one unit-stride block, or more than three row dims)."""
    tensors: tuple[torch.Tensor | None, ...]
    rows: int
    strided: bool
    n1: int
    n2: int
    strides: tuple[tuple[int, int, int], ...]


def _dense_tail(t: torch.Tensor, lead: int) -> bool:
    """The dims of ``t`` from ``lead`` on form one block of unit stride (row-major)."""
    expected = 1
    for d in range(t.dim() - 1, lead - 1, -1):
        if t.shape[d] != 1 and t.stride(d) != expected:
            return False
        expected *= t.shape[d]
    return True


def row_layout(tensors: Sequence[torch.Tensor | None], hidden: int) -> RowLayout:
    """The ``RowLayout`` of ``tensors`` (all of one shape; None where absent) normalized
    over their trailing ``hidden`` elements. Contiguous tensors are passed as they are;
    strided views (a [B, T, H, hd] tensor transposed to [B, H, T, hd], a slice of rows)
    are read in place as long as their row dims merge into at most three; only a tensor
    whose hidden elements are not one unit-stride block, or whose row dims stay more than
    three, is copied."""
    ts = tuple(tensors)
    first = next(t for t in ts if t is not None)
    rows = first.numel() // hidden if hidden else 0
    if rows <= 1 or all(t is None or t.is_contiguous() for t in ts):
        if rows == 1:
            ts = tuple(t if t is None or _dense_tail(t, 0) else t.contiguous() for t in ts)
        return RowLayout(ts, rows, False, 1, 1, tuple((hidden, 0, 0) for _ in ts))
    shape = first.shape
    lead = len(row_shape(shape, hidden))
    ts = tuple(t if t is None or _dense_tail(t, lead) else t.contiguous() for t in ts)
    groups: list[tuple[int, list[int]]] = []  # merged row dims: (size, stride per tensor)
    for d in range(lead):
        n = shape[d]
        if n == 1:
            continue
        st = [t.stride(d) if t is not None else 0 for t in ts]
        if groups and all(gs == s * n for gs, s in zip(groups[-1][1], st, strict=True)):
            groups[-1] = (groups[-1][0] * n, st)
        else:
            groups.append((n, st))
    if len(groups) > 3:
        return row_layout([t if t is None or t.is_contiguous() else t.contiguous() for t in ts], hidden)
    if len(groups) == 1:  # one row stride
        return RowLayout(ts, rows, False, 1, 1, tuple((s, 0, 0) for s in groups[0][1]))
    if len(groups) == 2:
        groups.insert(0, (1, [0] * len(ts)))
    (_, s0), (n1, s1), (n2, s2) = groups
    return RowLayout(ts, rows, True, n1, n2, tuple(zip(s0, s1, s2, strict=True)))


def row_shape(shape: Sequence[int], hidden: int) -> tuple[int, ...]:
    """The leading (row) dims of a tensor of ``shape`` normalized over its trailing
    ``hidden`` elements: ``shape`` without the fewest trailing dims whose product is
    ``hidden``. Per-row statistics (mean, rstd) have this shape, so a sharding of the
    input along a row dim is the same sharding of its statistics."""
    k, size = 0, 1
    while size != hidden and k < len(shape):
        k += 1
        size *= shape[len(shape) - k]
    return tuple(shape[: len(shape) - k])


def normalized_dims(shape: Sequence[int], hidden: int) -> int:
    """How many trailing dims of ``shape`` may belong to the normalized ``hidden``
    elements: the most trailing dims whose product is ``hidden`` (size-1 dims in front
    of the normalized shape are counted in, as they cannot be told apart from it)."""
    k = len(shape) - len(row_shape(shape, hidden))
    while k < len(shape) and shape[len(shape) - k - 1] == 1:
        k += 1
    return k


@functools.lru_cache(maxsize=64)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs_target(device: torch.device, programs_per_sm: int = 4) -> int:
    """How many programs a row-parallel backward aims for: a few per SM on a GPU; few
    on the CPU interpreter, where each program runs in turn."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return programs_per_sm * _sm_count(index)
    return 4


@dataclass(frozen=True)
class RowSplit:
    """Rows split into ``examples`` contiguous groups of ``rows_per_example`` rows, each
    group into ``chunks`` programs of at most ``rows_per_program`` rows; program
    (b, c) writes row b * chunks + c of the partial-sum buffers."""
    examples: int
    rows_per_example: int
    chunks: int
    rows_per_program: int


def split_rows(rows: int, examples: int, device: torch.device, programs_per_sm: int = 4) -> RowSplit:
    return _split_rows(rows, examples, num_programs_target(device, programs_per_sm))


@functools.lru_cache(maxsize=4096)
def _split_rows(rows: int, examples: int, target: int) -> RowSplit:
    per_example = rows // examples
    chunks = max(1, min(per_example, math.ceil(target / examples)))
    per_program = max(1, math.ceil(per_example / chunks))
    chunks = max(1, math.ceil(per_example / per_program))
    return RowSplit(examples, per_example, chunks, per_program)


@triton.jit
def _reduce_partials_kernel(
    PART, OUT_W, OUT_B, SQ, hidden, n_examples, n_chunks, n_col_blocks,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, PER_EXAMPLE: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr, ATOMIC_SQ: tl.constexpr,
):
    # program (pid, k): column block ``pid`` of partial buffer k (weight first when there
    # is one, then bias) summed over its rows, read in [BLOCK_R, BLOCK_C] tiles; with
    # PER_EXAMPLE, also SQ[which, b, pid] = sum over these columns of (example b's sum)^2,
    # which = 0 for the weight, 1 for the bias; with ATOMIC_SQ, that square is added
    # into SQ[which, b] instead (SQ zeroed before). The order of the dweight/dbias sums
    # is fixed: they are deterministic.
    pid = tl.program_id(0)
    k = tl.program_id(1)
    cols1 = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cols = cols1[None, :]
    rr = tl.arange(0, BLOCK_R)[:, None]
    total = tl.zeros([BLOCK_C], dtype=tl.float32)
    base = PART + k.to(tl.int64) * n_examples * n_chunks * hidden
    for b in range(n_examples):  # ``base`` advances one example at a time
        acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for c0 in range(0, n_chunks, BLOCK_R):
            r = c0 + rr
            acc += tl.load(base + r * hidden + cols, mask=(r < n_chunks) & (cols < hidden), other=0.0)
        base += n_chunks * hidden
        s = tl.sum(acc, axis=0)
        total += s
        if PER_EXAMPLE:
            which = k + (0 if HAS_W else 1)  # the SQ row: 0 weight, 1 bias
            if ATOMIC_SQ:
                tl.atomic_add(SQ + which * n_examples + b, tl.sum(s * s, axis=0), sem="relaxed")
            else:
                tl.store(SQ + (which * n_examples + b) * n_col_blocks + pid, tl.sum(s * s, axis=0))
    if HAS_W and HAS_B:
        if k == 0:
            tl.store(OUT_W + cols1, total.to(OUT_W.dtype.element_ty), mask=cols1 < hidden)
        else:
            tl.store(OUT_B + cols1, total.to(OUT_B.dtype.element_ty), mask=cols1 < hidden)
    elif HAS_W:
        tl.store(OUT_W + cols1, total.to(OUT_W.dtype.element_ty), mask=cols1 < hidden)
    else:
        tl.store(OUT_B + cols1, total.to(OUT_B.dtype.element_ty), mask=cols1 < hidden)


@functools.lru_cache(maxsize=1024)
def _reduce_block_c(hidden: int) -> int:
    # narrow column blocks: many programs share the (small, row-long) reduction
    return min(next_power_of_2(hidden), 32 if hidden <= 2048 else 64 if hidden <= 8192 else 128)


def reduce_col_blocks(hidden: int) -> int:
    """How many column blocks ``reduce_partials`` splits ``hidden`` columns into."""
    return cdiv(hidden, _reduce_block_c(hidden))


def reduce_partials(
    partials: torch.Tensor, split: RowSplit, weight_dtype: torch.dtype | None,
    bias_dtype: torch.dtype | None, sq: torch.Tensor | None, atomic: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Sum float32 partials [k, examples * chunks, hidden] over their rows, in a fixed
    order (deterministic, no atomics), in one launch: buffer 0 is dweight's when
    ``weight_dtype`` is given, the last dbias's when ``bias_dtype`` is. Returns (dweight,
    dbias) in those dtypes. With ``sq`` (float32 [2, examples, reduce_col_blocks(hidden)],
    contiguous), also write there, per parameter (0 weight, 1 bias), example and column
    block, the squared norm of that example's sum: ``sq.sum(2)`` is each example's
    squared gradient norm of each parameter. With ``atomic``, ``sq`` is float32
    [2, examples], zeroed beforehand, and each column block adds its squares into it
    (not deterministic in the last bits)."""
    hidden = partials.shape[2]
    device = partials.device
    dw = torch.empty(hidden, dtype=weight_dtype, device=device) if weight_dtype is not None else None
    db = torch.empty(hidden, dtype=bias_dtype, device=device) if bias_dtype is not None else None
    n_col_blocks, keywords = _reduce_launch(hidden, split.chunks, dw is not None, db is not None, sq is not None,
                                            atomic)
    _reduce_partials_kernel[(n_col_blocks, (dw is not None) + (db is not None))](
        partials, dw, db, sq, hidden, split.examples, split.chunks, n_col_blocks, **keywords)
    return dw, db


@functools.lru_cache(maxsize=1024)
def _reduce_launch(hidden: int, chunks: int, has_w: bool, has_b: bool, per_example: bool,
                   atomic: bool) -> tuple[int, dict]:
    """``reduce_partials``' column blocks and launch keywords (built once per combination)."""
    block_c = _reduce_block_c(hidden)
    block_r = min(max(1, 4096 // block_c), next_power_of_2(chunks))
    return cdiv(hidden, block_c), dict(HAS_W=has_w, HAS_B=has_b, PER_EXAMPLE=per_example, BLOCK_C=block_c,
                                       BLOCK_R=block_r, ATOMIC_SQ=atomic, num_warps=4)
