"""``normlab bench kernels``: effective bandwidth of the norm ops, normlab vs torch.

For the forward, backward and forward+backward of LayerNorm, RMSNorm and the fused
residual add + norm, over rows x hidden, this measures the median time (CUDA events
after warm-up on a GPU; ``time.perf_counter`` on the CPU), the effective bandwidth
(bytes that must move / median time) and two ratios measured in the same run: against
torch eager (torch-eager time / this time, > 1 is faster) and against the device's copy
bandwidth. Implementations: normlab (backend auto), torch eager, torch.compile of the
eager code, normlab's op compiled alike (``normlab+compile``: compare it with
``torch.compile``), and Liger-Kernel / Apex when importable.

AdaLN (``adaln_layer_norm``, ``adaln_rms_norm``, chosen with ``--ops``): DiT's
modulation norm(x) * (1 + scale) + shift on x of [8, rows / 8, hidden] (rows not a
multiple of 8: [1, rows, hidden]) with one scale and shift per example; torch's
counterpart is the unfused expression around its norm op.

QK-norm (``qk_layer_norm``, ``qk_rms_norm``, chosen with ``--ops``): the norm over
head_dim of a [B, H, T, hd] view of a contiguous [B, T, H, hd] tensor (``.transpose(1,
2)``, as q and k are laid out after the projection), at the [B, H, T, hd] shapes of
``--qk-shapes``; normlab and torch eager (and torch.compile) run on the same view.

On the CPU every implementation allocates its outputs (normlab's API has no ``out=``);
freed memory is kept mapped (``keep_freed_memory``), so the times are of the calls, not
of page faults.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table

import normlab
from normlab.backend import resolve
from normlab.bench.common import (
    TableWrites,
    Timer,
    app,
    check_backend,
    check_out_dir,
    check_positive,
    device_name,
    keep_freed_memory,
    load_average,
    out_of_memory,
    pick_device,
    pick_dtype,
    print_table,
    release_memory,
    significant,
    write_table_csv,
)
from normlab.provenance import code_line, code_record

OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
QK_OPS = ("qk_layer_norm", "qk_rms_norm")
# DiT's adaLN modulation: norm(x) * (1 + scale) + shift, x [B, rows / B, hidden] with one
# scale and shift per example ([B, 1, hidden]), no affine (``normlab.functional.adaln_modulate``)
ADALN_OPS = ("adaln_layer_norm", "adaln_rms_norm")
ADALN_EXAMPLES = 8
# practitioners' variants, each against the torch code their models run (the "torch" row):
# Hugging Face's GemmaRMSNorm (offset 1, the gemma order) and LlamaRMSNorm (the llama
# order, here with a weight in x's dtype), Megatron's LayerNorm1p (F.layer_norm with w + 1)
CAST_OPS = ("gemma_rms_norm", "llama_rms_norm", "layer_norm_1p")
ALL_OPS = OPS + QK_OPS + ADALN_OPS + CAST_OPS
PASSES = ("fwd", "bwd", "fwdbwd")
GPU_ROWS = (4096, 16384, 65536)
GPU_HIDDEN = (768, 1024, 2048, 4096, 5120, 8192, 12288, 16384)
CPU_ROWS = (4096,)
CPU_HIDDEN = (768, 1024, 2048, 4096)
# QK-norm shapes: (B, H, T, head_dim), x a [B, H, T, hd] view of a contiguous [B, T, H, hd]
GPU_QK_SHAPES = ((8, 32, 4096, 128),)
CPU_QK_SHAPES = ((2, 8, 256, 128),)
CPU_QK_QUICK = ((2, 8, 64, 128),)


@dataclass
class Record:
    op: str
    pass_: str
    dtype: str
    rows: int
    hidden: int
    impl: str
    device: str
    median_ms: float
    gbps: float
    ratio_vs_torch: float
    ratio_vs_copy: float
    copy_gbps: float
    torch_version: str
    torch_path: str
    impl_path: str
    host_ms: float  # median host time of one call (on a GPU: issuing it; see Timer)
    shape: str = ""  # x's shape: ROWSxHIDDEN, or BxHxTxHD for the qk ops (a transposed view)
    # the code that measured it (a CSV or JSON row read on its own names it too)
    normlab_version: str = field(default_factory=lambda: code_record()["normlab_version"] or "")
    git_commit: str = field(default_factory=lambda: code_record()["git_commit"] or "")

    def as_json(self) -> dict:
        d = asdict(self)
        d["pass"] = d.pop("pass_")
        return d


# ----------------------------------------------------------------------------- device


def copy_bandwidth(device: torch.device, timer: Timer, nbytes: int) -> float:
    """GB/s of a device-to-device copy of ``nbytes`` (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = timer.median_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------- workloads


def hf_gemma_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Hugging Face's GemmaRMSNorm forward, op for op (the torch code Gemma runs)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + w.float())).type_as(x)


def hf_llama_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm forward, op for op (the torch code Llama runs)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def _torch_eager(op: str, hidden: int) -> Callable:
    F = torch.nn.functional
    if op == "adaln_layer_norm":  # (x, scale, shift, None): see _inputs
        return lambda x, scale, shift, _: F.layer_norm(x, (hidden,), None, None, 1e-6) * (1 + scale) + shift
    if op == "adaln_rms_norm":
        return lambda x, scale, shift, _: F.rms_norm(x, (hidden,), None, 1e-6) * (1 + scale) + shift
    if op == "layer_norm":
        return lambda x, r, w, b: F.layer_norm(x, (hidden,), w, b)
    if op == "rms_norm":
        return lambda x, r, w, b: F.rms_norm(x, (hidden,), w)
    if op == "layer_norm_1p":
        return lambda x, r, w, b: F.layer_norm(x, (hidden,), w + 1, b)
    if op == "gemma_rms_norm":
        return lambda x, r, w, b: hf_gemma_rms_norm(x, w)
    if op == "llama_rms_norm":
        return lambda x, r, w, b: hf_llama_rms_norm(x, w)
    if op == "add_layer_norm":
        def add_ln(x, r, w, b):
            h = r + x
            return F.layer_norm(h, (hidden,), w, b), h
        return add_ln

    def add_rms(x, r, w, b):
        h = r + x
        return F.rms_norm(h, (hidden,), w), h
    return add_rms


def _normlab(op: str, hidden: int) -> Callable:
    F = normlab.functional
    return {
        "layer_norm": lambda x, r, w, b: F.layer_norm(x, hidden, w, b),
        "rms_norm": lambda x, r, w, b: F.rms_norm(x, hidden, w),
        "add_layer_norm": lambda x, r, w, b: F.add_layer_norm(x, r, w, b),
        "add_rms_norm": lambda x, r, w, b: F.add_rms_norm(x, r, w),
        "adaln_layer_norm": lambda x, scale, shift, _: F.adaln_modulate(x, scale, shift, 1e-6),
        "adaln_rms_norm": lambda x, scale, shift, _: F.adaln_modulate(x, scale, shift, 1e-6, norm="rmsnorm"),
        "layer_norm_1p": lambda x, r, w, b: F.layer_norm(x, hidden, w, b, offset=1.0),
        "gemma_rms_norm": lambda x, r, w, b: F.rms_norm(x, hidden, w, 1e-6, offset=1.0, casting_mode="gemma"),
        "llama_rms_norm": lambda x, r, w, b: F.rms_norm(x, hidden, w, 1e-6, casting_mode="llama"),
    }[op]


def _base_op(op: str) -> str:
    """The norm a qk op runs (``qk_rms_norm`` -> ``rms_norm``)."""
    return op.removeprefix("qk_")


def triton_hidden_limit(op: str) -> int:
    """The largest hidden size normlab's Triton kernels take for ``op`` (beyond it the
    backend "auto" runs torch's ops, and "triton" refuses the call)."""
    if op in ADALN_OPS:
        from normlab.ops.triton.adaln import MAX_HIDDEN
    else:
        from normlab.ops.triton.launch import MAX_HIDDEN
    return MAX_HIDDEN


def _forced_triton(fn: Callable) -> Callable:
    """``fn`` under backend "triton": normlab's kernels whatever the call's size."""

    def forced(*args):
        with normlab.set_backend("triton"):
            return fn(*args)

    return forced


def _liger(op: str, hidden: int) -> Callable | None:
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    from liger_kernel.transformers.functional import liger_layer_norm, liger_rms_norm
    if op == "layer_norm":
        return lambda x, r, w, b: liger_layer_norm(x, w, b, 1e-5)
    if op == "rms_norm":
        return lambda x, r, w, b: liger_rms_norm(x, w, 1e-6)
    return None


def _apex(op: str, hidden: int) -> Callable | None:
    if importlib.util.find_spec("apex") is None:
        return None
    from apex.normalization.fused_layer_norm import fused_layer_norm_affine, fused_rms_norm_affine
    if op == "layer_norm":
        return lambda x, r, w, b: fused_layer_norm_affine(x, w, b, (hidden,), 1e-5)
    if op == "rms_norm":
        return lambda x, r, w, b: fused_rms_norm_affine(x, w, (hidden,), 1e-6)
    return None


def bytes_moved(op: str, pass_: str, rows: int, hidden: int, itemsize: int) -> int:
    """Bytes that must move: each [rows, hidden] tensor read or written once."""
    fused = op.startswith("add")
    tensors = {"fwd": 4 if fused else 2,          # x (+ residual) in; out (+ new_residual) out
               "bwd": 5 if fused else 3}          # dout (+ dnew_residual), h in; dx (+ dresidual)
    n = tensors["fwd"] + tensors["bwd"] if pass_ == "fwdbwd" else tensors[pass_]
    return n * rows * hidden * itemsize


def _first(out):
    return out if isinstance(out, tuple) else (out,)


def pass_fn(fn: Callable, inputs: tuple, pass_: str) -> Callable[[], object]:
    """One call of ``pass_`` of ``fn`` on ``inputs``: the forward under no_grad, the
    backward through a retained graph built here, or forward + backward."""
    x, r, w, b = inputs
    leaves = [t for t in (x, r, w, b) if t is not None and t.requires_grad]
    if pass_ == "fwd":
        def fwd():
            with torch.no_grad():
                return fn(*inputs)
        return fwd
    outs = _first(fn(*inputs))
    grads = [torch.randn_like(o) for o in outs]
    if pass_ == "bwd":
        return lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True)

    def fwdbwd():
        torch.autograd.grad(_first(fn(*inputs)), leaves, grads)
    return fwdbwd


def torch_path(fn: Callable, inputs: tuple, device: torch.device) -> str:
    """What torch actually ran for its eager op: the kernels (GPU) or aten ops (CPU) the
    profiler saw in one forward."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad(), profile(activities=acts) as prof:
        fn(*inputs)
    names = []
    for e in prof.events():
        on_device = getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
        if (device.type == "cuda" and on_device) or (device.type == "cpu" and e.name.startswith("aten::")):
            if e.name not in names:
                names.append(e.name)
    return "+".join(n[:60] for n in names[:8])


# ----------------------------------------------------------------------------- runner


def _inputs(op: str, rows: int, hidden: int, device: torch.device, dtype: torch.dtype,
            qk_shape: tuple[int, int, int, int] | None = None) -> tuple:
    """(x, residual, weight, bias), all requiring grad; None where the op has none. With
    ``qk_shape`` (B, H, T, hd), x is a [B, H, T, hd] view of a contiguous [B, T, H, hd].
    The adaln ops: (x [B, rows / B, hidden], scale, shift [B, 1, hidden], None)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def t(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype).requires_grad_()
    if op in ADALN_OPS:
        b = ADALN_EXAMPLES if rows % ADALN_EXAMPLES == 0 else 1
        return t(b, rows // b, hidden), t(b, 1, hidden, std=0.1), t(b, 1, hidden, std=0.1), None
    if qk_shape is not None:
        b, h, s, hd = qk_shape
        x = torch.randn(b, s, h, hd, generator=g).to(device=device, dtype=dtype)
        return (x.transpose(1, 2).requires_grad_(), None, t(hd),
                t(hd) if "layer" in op else None)
    return (t(rows, hidden), t(rows, hidden) if op.startswith("add") else None,
            t(hidden), t(hidden) if "layer" in op else None)


def run(device: torch.device, dtype: torch.dtype, rows_list, hidden_list, ops, passes,
        compile_: bool, timer: Timer, copy_bytes: int,
        progress: Callable[[str], None] | None = None,
        checkpoint: Callable[[list[Record]], None] | None = None,
        shapes: tuple[tuple[int, int], ...] | None = None,
        qk_shapes: tuple[tuple[int, int, int, int], ...] = (),
        skipped: list[str] | None = None) -> list[Record]:
    """Every measurement, in table order: rows_list x hidden_list, or the (rows, hidden)
    pairs of ``shapes``; the qk ops at each (B, H, T, hd) of ``qk_shapes``. ``progress``
    is called after each shape, ``checkpoint`` with the records so far after each (op,
    hidden). A shape that runs out of memory is skipped, none of its rows kept, and the
    others measured; ``skipped`` gets "op shape" for each."""
    if shapes:
        hidden_list = sorted({h for _, h in shapes})
    name = device_name(device)
    copy_gbps = copy_bandwidth(device, timer, copy_bytes)
    records: list[Record] = []
    itemsize = torch.tensor([], dtype=dtype).element_size()
    for op in ops:
        qk = op in QK_OPS
        for hidden in (sorted({s[3] for s in qk_shapes}) if qk else hidden_list):
            eager = _torch_eager(_base_op(op), hidden)
            compiled = None
            if compile_:
                # one compile per (op, hidden), the row count dynamic (marked on the
                # inputs): inductor's norm kernels depend on hidden, not on rows
                torch._dynamo.reset()
                # the backward is timed on a retained graph, which donated buffers forbid
                if hasattr(torch._functorch.config, "donated_buffer"):
                    torch._functorch.config.donated_buffer = False
                compiled = torch.compile(eager)
                # normlab's op compiled alike: what a user who compiles the model gets
                compiled_normlab = torch.compile(_normlab(_base_op(op), hidden))
            if qk:
                cases = [(s[0] * s[1] * s[2], s) for s in qk_shapes if s[3] == hidden]
            else:
                cases = [(r, None) for r in ([r for r, h in shapes if h == hidden] if shapes else rows_list)]
            for rows, qk_shape in cases:
                shape_text = "x".join(map(str, qk_shape or (rows, hidden)))
                measured = len(records)
                try:
                    inputs = _inputs(op, rows, hidden, device, dtype, qk_shape)
                    if compiled is not None:
                        if op.startswith("adaln"):  # x is [8, rows/8, hidden]: its example dim is fixed
                            torch._dynamo.mark_dynamic(inputs[0], 1)
                        else:
                            for t in inputs[:2]:
                                if t is not None:
                                    torch._dynamo.mark_dynamic(t, 0)
                    impls = {"normlab": _normlab(_base_op(op), hidden), "torch": eager}
                    # auto runs torch's ops below its size: time the kernels too, where they run
                    if device.type == "cuda" and hidden <= triton_hidden_limit(op):
                        impls["normlab triton"] = _forced_triton(_normlab(_base_op(op), hidden))
                    if compiled is not None:
                        impls["torch.compile"] = compiled
                        impls["normlab+compile"] = compiled_normlab
                    # Liger-Kernel and Apex run CUDA tensors only (and rows of one stride: not qk)
                    for label, make in ((("liger", _liger), ("apex", _apex)) if device.type == "cuda" and not qk
                                        else ()):
                        fn = make(op, hidden)
                        if fn is not None:
                            impls[label] = fn
                    path = torch_path(eager, inputs, device)
                    normlab_path = f"normlab backend {resolve(inputs[0])}"
                    for pass_ in passes:
                        # side by side: every round times each implementation once, so a
                        # change of the machine's load falls on all of them alike
                        ms_by_impl = timer.median_ms_interleaved(
                            {k: pass_fn(fn, inputs, pass_) for k, fn in impls.items()})
                        times = {k: (ms, timer.host_ms[k]) for k, ms in ms_by_impl.items()}
                        nbytes = bytes_moved(op, pass_, rows, hidden, itemsize)
                        for impl, (ms, host_ms) in times.items():
                            gbps = nbytes / (ms * 1e-3) / 1e9
                            records.append(Record(
                                op, pass_, str(dtype).removeprefix("torch."), rows, hidden, impl, name,
                                round(ms, 6), _sig(gbps), round(times["torch"][0] / ms, 3),
                                _sig(gbps / copy_gbps), round(copy_gbps, 2), torch.__version__,
                                path, normlab_path if impl == "normlab" else impl, round(host_ms, 6),
                                shape_text,
                            ))
                except RuntimeError as err:  # (torch.OutOfMemoryError is one)
                    if not out_of_memory(err):
                        raise
                    # the shape does not fit: skipped whole (as bench e2e skips a configuration)
                    del records[measured:]
                    inputs = impls = None
                    release_memory(device)
                    if skipped is not None:
                        skipped.append(f"{op} {shape_text}")
                if progress is not None:
                    progress(f"{op} {shape_text}")
                if checkpoint is not None and len(records) > measured:
                    checkpoint(records)  # after every shape: a Ctrl-C keeps each one measured
    records.sort(key=_order)
    return records


def _check_triton_sizes(ops: tuple[str, ...], shapes, hidden_list, qk_list) -> None:
    """Under ``NORMLAB_BACKEND=triton`` every op runs normlab's Triton kernels, which take
    hidden sizes up to their limit: a larger one is refused here, naming its option, not
    as a traceback after the shapes before it were measured."""
    if normlab.get_backend() != "triton":
        return
    for op in ops:
        limit = triton_hidden_limit(op)
        if op in QK_OPS:
            sizes, hint = [q[3] for q in qk_list], "--qk-shapes"
        else:
            sizes, hint = ([h for _, h in shapes], "--shapes") if shapes else (hidden_list, "--hidden")
        big = [h for h in sizes if h > limit]
        if big:
            raise typer.BadParameter(
                f"{op}: NORMLAB_BACKEND=triton runs normlab's Triton kernels, which take a hidden size from 1 to "
                f"{limit}, got {big[0]}; expected sizes up to {limit}, or the backend auto (torch's ops there)",
                param_hint=hint)


def _warn_unused(ops: tuple[str, ...], sizes_given: bool, qk_given: bool, no_hide_host: bool) -> None:
    """Say on stderr which given options no selected op (or the device) reads."""
    errors = Console(stderr=True)
    if sizes_given and all(o in QK_OPS for o in ops):
        errors.print("[yellow]--rows/--hidden/--shapes: not used: the qk ops take their sizes from --qk-shapes")
    if qk_given and not any(o in QK_OPS for o in ops):
        errors.print(f"[yellow]--qk-shapes: not used: no qk op ({', '.join(QK_OPS)}) among --ops")
    if no_hide_host:
        errors.print("[yellow]--no-hide-host: not used on the CPU (it holds a GPU's work until the host has "
                     "issued a call)")


def _sig(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits: a small shape's 0.0005 GB/s keeps its value
    (rounding to decimals left 0.0)."""
    return float(f"{x:.{digits}g}")


def _gbps_text(x: float) -> str:
    """GB/s in a table: one decimal from 10 up, three significant digits below (a small
    shape's 0.0000694, not 0.0)."""
    return f"{x:.1f}" if x >= 10 else significant(x)


def _copy_ratio_text(x: float) -> str:
    """The fraction of the copy bandwidth in a table: two decimals, or two significant
    digits below 0.1 (a small shape's 0.00012, not 0.00)."""
    return f"{x:.2f}" if x >= 0.1 else significant(x, 2)


def _order(r: Record) -> tuple:
    return (ALL_OPS.index(r.op), r.rows, r.hidden, r.shape, PASSES.index(r.pass_))


def _op_cell(r: Record) -> str:
    """A table's op cell: a qk op names its [B, H, T, hd] shape, which rows and hidden
    alone do not tell apart (1x2x8x64 and 2x1x8x64 are both 16 rows of 64)."""
    return f"{r.op} {r.shape}" if r.op in QK_OPS else r.op


def timing_note(device_type: str, host_hidden: bool, steady_malloc: bool = False) -> str:
    """What the times of a table include, for its header."""
    if device_type != "cuda":  # perf_counter around each call
        return "(the timing itself on the CPU)." + (
            " glibc's malloc kept freed memory for reuse during the run (mallopt), so the "
            "times are of the calls, not of page faults on fresh allocations."
            if steady_malloc else "")
    if host_hidden:
        return ("(issuing it); the GPU waited until the host had issued each timed call, so "
                "the times are the GPU's alone, as when the host runs ahead in a training loop.")
    return ("(issuing it); host time beyond the ~0.1 ms of the L2 flush before each call is "
            "part of the times (--no-hide-host).")


def write_outputs(records: list[Record], out: Path, stem: str, plot: bool = True,
                  host_hidden: bool = False, device_type: str = "cpu",
                  steady_malloc: bool = False, partial: int | None = None,
                  skipped: list[str] | tuple[str, ...] = ()) -> list[Path]:
    """The CSV, markdown and (``plot``) PNG of ``records``. ``partial``: the number of cases
    the run was to measure, when it has not measured them all yet (the markdown says so,
    and a PNG of an earlier run is removed: it would not match the tables). ``skipped``:
    the shapes ("op shape") that ran out of memory, named under the title."""
    md_path, png_path = out / f"{stem}.md", out / f"{stem}.png"
    csv_path = write_table_csv([r.as_json() for r in records], out, stem, partial is not None)
    r0 = records[0]
    lines = [f"# normlab bench kernels: {r0.device}", ""]
    if partial is not None:
        lines += [f"**Partial: the run stopped after {len(records)} rows** (of the {partial} cases it was to "
                  "measure, each a few rows); these are the rows it measured.", ""]
        png_path.unlink(missing_ok=True)
    if skipped:
        lines += [f"**Skipped, out of memory:** {', '.join(skipped)} (not measured; the other shapes were).", ""]
    lines += [
             f"{code_line()}, torch {r0.torch_version}, dtype {r0.dtype}, copy bandwidth {r0.copy_gbps} GB/s "
             "(measured in the same run). Median times; `vs torch` = torch-eager time / this "
             "time (> 1: faster than torch eager). `host ms` = median host time of one call "
             + timing_note(device_type, host_hidden, steady_malloc),
             f"Load average at the end of the run: {load_average()} (other processes share the device "
             "when it is above the core count).", "",
             "| op | pass | rows | hidden | impl | median ms | GB/s | vs torch | vs copy | host ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {_op_cell(r)} | {r.pass_} | {r.rows} | {r.hidden} | {r.impl} | {r.median_ms:.3f} | "
              f"{_gbps_text(r.gbps)} | {r.ratio_vs_torch:.2f} | {_copy_ratio_text(r.ratio_vs_copy)} | "
              f"{r.host_ms:.3f} |"
              for r in records]
    qk = sorted({(r.op, r.shape) for r in records if r.op in QK_OPS})
    if qk:
        lines += ["", "qk ops: x is a [B, H, T, hd] view of a contiguous [B, T, H, hd] tensor "
                  "(`.transpose(1, 2)`), rows = B * H * T: "
                  + ", ".join(f"{op} {shape}" for op, shape in qk)]
    if device_type == "cuda":
        beyond = sorted({(r.op, r.hidden) for r in records if r.hidden > triton_hidden_limit(r.op)})
        if beyond:
            lines += ["", "`normlab triton` is not measured at "
                      + ", ".join(f"{op} hidden {h}" for op, h in beyond)
                      + ": beyond the Triton kernels' hidden size (auto runs torch's ops there)."]
    paths = {(r.op, r.torch_path) for r in records}
    lines += ["", "torch eager ran (profiler):", ""] + [f"- {op}: `{p}`" for op, p in sorted(paths)]
    md_path.write_text("\n".join(lines) + "\n")
    if not plot:
        return [csv_path, md_path]
    _plot(records, png_path)
    return [csv_path, md_path, png_path]


def _plot(records: list[Record], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ops = sorted({r.op for r in records}, key=ALL_OPS.index)
    passes = sorted({r.pass_ for r in records}, key=PASSES.index)
    fig, axes = plt.subplots(len(passes), len(ops), figsize=(4 * len(ops), 3 * len(passes)),
                             squeeze=False, sharey=True)
    for i, p in enumerate(passes):
        for j, op in enumerate(ops):
            ax = axes[i][j]
            sel = [r for r in records if r.op == op and r.pass_ == p]
            # one line per row count (per shape for the qk ops): every measured shape is drawn
            lines_all = sorted({(r.rows, r.shape if op in QK_OPS else "") for r in sel})
            for impl in sorted({r.impl for r in sel}):
                for rows, shape in lines_all:
                    pts = sorted((r.hidden, r.gbps) for r in sel
                                 if r.impl == impl and r.rows == rows and (not shape or r.shape == shape))
                    if pts:
                        ax.plot([h for h, _ in pts], [g for _, g in pts], marker="o",
                                label=impl if len(lines_all) == 1 else f"{impl}, {shape or f'rows {rows}'}")
            if sel:
                ax.axhline(sel[0].copy_gbps, color="grey", ls="--", lw=0.8, label="copy")
            ax.set_title(f"{op} {p}", fontsize=9)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("hidden")
            if j == 0:
                ax.set_ylabel("GB/s")
    axes[0][0].legend(fontsize=7)
    rows_seen = sorted({r.rows for r in records})
    fig.suptitle(f"{records[0].device}, {records[0].dtype}" + (f", rows={rows_seen[0]}" if len(rows_seen) == 1 else ""),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# a size above this cannot be a tensor dim (torch takes int64 sizes)
MAX_SIZE = 2**62


def _positive_int(text: str) -> int | None:
    """``text`` as a positive integer written in ASCII digits, at most ``MAX_SIZE``; None
    when it is not one (``str.isdigit`` accepts "²", which ``int`` refuses)."""
    text = text.strip()
    return int(text) if re.fullmatch(r"[0-9]+", text) and 0 < int(text) <= MAX_SIZE else None


def _sizes(text: str | None, param_hint: str) -> tuple[int, ...] | None:
    """``--rows`` / ``--hidden``: comma-separated positive integers (None: not given)."""
    if text is None:
        return None
    items = [_positive_int(v) for v in text.split(",")]
    if not all(items):
        raise typer.BadParameter(f"expected comma-separated positive integers (at most 2^62) such as 1024,4096; "
                                 f"got {text!r}",
                                 param_hint=param_hint)
    return tuple(dict.fromkeys(items))  # (a value given twice is measured once)


def parse_shapes(text: str | None) -> tuple[tuple[int, int], ...] | None:
    """"8x64,256x128" -> ((8, 64), (256, 128)); None when not given (an empty value is refused)."""
    if text is None:
        return None
    out = []
    for item in text.split(","):
        parts = [_positive_int(p) for p in item.strip().lower().split("x")]
        if len(parts) != 2 or not all(parts):
            raise typer.BadParameter(f"expected ROWSxHIDDEN pairs such as 8x64,4096x1024; got {item!r}",
                                     param_hint="--shapes")
        out.append((parts[0], parts[1]))
    return tuple(dict.fromkeys(out))


def parse_qk_shapes(text: str | None) -> tuple[tuple[int, int, int, int], ...] | None:
    """"8x32x4096x128,1x2x8x64" -> ((8, 32, 4096, 128), (1, 2, 8, 64)): (B, H, T, hd); None
    when not given (an empty value is refused)."""
    if text is None:
        return None
    out = []
    for item in text.split(","):
        parts = [_positive_int(p) for p in item.strip().lower().split("x")]
        if len(parts) != 4 or not all(parts):
            raise typer.BadParameter(f"expected BxHxTxHD shapes such as 8x32x4096x128; got {item!r}",
                                     param_hint="--qk-shapes")
        out.append(tuple(parts))
    return tuple(dict.fromkeys(out))


@app.command("kernels")
def kernels(
    device: str = typer.Option(None, help="cuda or cpu (default: cuda when available)."),
    dtype: str = typer.Option("bf16", help="Activation dtype: bf16, fp16 or fp32."),
    quick: bool = typer.Option(False, help="A few shapes and repetitions (CPU: seconds)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON record per measurement."),
    out: str = typer.Option("runs/bench", help="Directory for the CSV, MD and PNG (committed tables: "
                                               "--out benchmarks/results)."),
    rows: str = typer.Option(None, help="Comma-separated row counts (overrides the defaults)."),
    hidden: str = typer.Option(None, help="Comma-separated hidden sizes (overrides the defaults)."),
    shapes: str = typer.Option(None, help="Comma-separated ROWSxHIDDEN pairs, e.g. 8x64,256x128,2048x128,"
                                          "4096x1024 (instead of rows x hidden)."),
    ops: str = typer.Option(",".join(OPS), help="Comma-separated ops, among " + ", ".join(ALL_OPS)
                                                 + " (the qk ops: QK-norm of a transposed [B, H, T, hd] "
                                                   "view, at --qk-shapes; the adaln ops: DiT's "
                                                   "norm(x) * (1 + scale) + shift, one scale and shift "
                                                   "per example of [8, rows / 8, hidden]; the "
                                                   "practitioners' variants gemma_rms_norm, llama_rms_norm "
                                                   "and layer_norm_1p: normlab's offset and casting modes "
                                                   "against the torch code of Hugging Face's GemmaRMSNorm "
                                                   "and LlamaRMSNorm and Megatron's LayerNorm1p)."),
    qk_shapes: str = typer.Option(None, help="Comma-separated BxHxTxHD shapes of the qk ops (default: "
                                             "8x32x4096x128 on CUDA, 2x8x256x128 on CPU, "
                                             "2x8x64x128 for --quick on CPU)."),
    compile_: bool = typer.Option(None, "--compile/--no-compile",
                                  help="Include torch.compile (default: on, off for --quick on CPU)."),
    threads: int = typer.Option(None, help="torch CPU threads (default: torch's)."),
    hide_host: bool = typer.Option(
        True, "--hide-host/--no-hide-host",
        help="GPU: hold the GPU until the host has issued each timed call, so the times are "
             "the kernels' (default); --no-hide-host times host-bound calls as they run."),
) -> None:
    """LayerNorm / RMSNorm / add+norm (and QK-norm, AdaLN): fwd, bwd, fwd+bwd GB/s, normlab vs torch."""
    console = Console()
    dev = pick_device(device)
    check_backend(dev)
    torch_dtype = pick_dtype(dtype)
    op_list = tuple(dict.fromkeys(o.strip() for o in ops.split(",")))
    bad = [o for o in op_list if o not in ALL_OPS]
    if bad:
        raise typer.BadParameter(f"unknown op(s) {bad}; expected among {ALL_OPS}", param_hint="--ops")
    check_positive(threads, "--threads")
    shape_pairs = parse_shapes(shapes)
    if shape_pairs and (rows is not None or hidden is not None):
        raise typer.BadParameter("cannot be combined with --rows/--hidden (each ROWSxHIDDEN pair gives "
                                 "both); expected one or the other", param_hint="--shapes")
    rows_given, hidden_given = _sizes(rows, "--rows"), _sizes(hidden, "--hidden")
    check_out_dir(out)
    if threads:
        torch.set_num_threads(threads)
    gpu = dev.type == "cuda"
    steady_malloc = not gpu and keep_freed_memory()
    qk_list = parse_qk_shapes(qk_shapes) or (
        GPU_QK_SHAPES if gpu else CPU_QK_QUICK if quick else CPU_QK_SHAPES)
    rows_list = rows_given or ((16384,) if quick and gpu else (1024,) if quick else GPU_ROWS if gpu else CPU_ROWS)
    hidden_list = hidden_given or ((1024, 4096) if quick else GPU_HIDDEN if gpu else CPU_HIDDEN)
    _check_triton_sizes(op_list, shape_pairs, hidden_list, qk_list)
    _warn_unused(op_list, sizes_given=bool(shape_pairs or rows_given or hidden_given),
                 qk_given=qk_shapes is not None, no_hide_host=not hide_host and not gpu)
    if compile_ is None:
        compile_ = gpu or not quick
    timer = Timer(dev, warmup=3 if quick else 10, reps=5 if quick else (50 if gpu else 15),
                  hide_host=hide_host)
    from rich.progress import Progress
    with Progress(console=Console(stderr=True), transient=True) as bar:
        n_shapes = len(shape_pairs) if shape_pairs else len(rows_list) * len(hidden_list)
        n_qk = sum(o in QK_OPS for o in op_list)
        task = bar.add_task("bench kernels", total=(len(op_list) - n_qk) * n_shapes + n_qk * len(qk_list))

        def advance(what: str) -> None:
            bar.update(task, advance=1, description=what)
        stem = f"kernels-{dev.type}-{dtype}"

        writes = TableWrites(Path(out) / stem)
        skipped: list[str] = []  # shapes that ran out of memory

        def save(so_far: list[Record]) -> None:  # partial tables survive an interruption
            writes.write(len(so_far), lambda: write_outputs(
                sorted(so_far, key=_order), Path(out), stem, plot=False, host_hidden=timer.hide_host,
                device_type=dev.type, steady_malloc=steady_malloc, partial=int(bar.tasks[0].total or 0),
                skipped=skipped))
        try:
            records = run(dev, torch_dtype, rows_list, hidden_list, op_list, PASSES, compile_, timer,
                          copy_bytes=(64 << 20) if quick or not gpu else (1 << 30), progress=advance,
                          checkpoint=save, shapes=shape_pairs, qk_shapes=qk_list, skipped=skipped)
        except KeyboardInterrupt:
            raise writes.interrupted() from None
    errors = Console(stderr=True)
    for what in skipped:  # (on stderr: --json prints only records)
        errors.print(f"[yellow]skipped {what}: out of memory")
    if not records:
        errors.print("[red]nothing measured: every shape ran out of memory; nothing written")
        raise typer.Exit(1)
    try:
        paths = writes.write(len(records), lambda: write_outputs(
            records, Path(out), stem, host_hidden=timer.hide_host, device_type=dev.type,
            steady_malloc=steady_malloc, skipped=skipped))
    except KeyboardInterrupt:
        raise writes.interrupted() from None
    if as_json:
        for r in records:
            print(json.dumps(r.as_json()))
        return
    table = Table(title=f"normlab bench kernels: {records[0].device}, {dtype}, "
                        f"copy {records[0].copy_gbps} GB/s, torch {torch.__version__}",
                  caption=f"skipped, out of memory: {', '.join(skipped)}" if skipped else None)
    for col in ("op", "pass", "rows", "hidden", "impl", "median ms", "GB/s", "vs torch", "vs copy"):
        text = col in ("op", "pass", "impl")  # (names fold in a narrow terminal, never cut to "layer…")
        table.add_column(col, justify="left" if text else "right", overflow="fold", no_wrap=not text)
    for r in records:
        table.add_row(_op_cell(r), r.pass_, str(r.rows), str(r.hidden), r.impl, f"{r.median_ms:.3f}",
                      _gbps_text(r.gbps), f"{r.ratio_vs_torch:.2f}", _copy_ratio_text(r.ratio_vs_copy))
    print_table(console, table)
    console.print("wrote " + ", ".join(str(p) for p in paths))
