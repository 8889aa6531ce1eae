"""What the benchmarks share: the ``normlab bench`` Typer app, the device's name, the
timer, the load average, the CLI's option checks (device, dtype, positive integers, the
output directory) and the CSV writer."""

from __future__ import annotations

import csv
import gc
import math
import os
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import typer

app = typer.Typer(help="Benchmarks of normlab: kernels and whole models.", no_args_is_help=True)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model (from /proc/cpuinfo) with core and thread counts."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def load_average() -> str:
    """``os.getloadavg()`` as "1m, 5m, 15m" ("n/a" where the platform has none)."""
    try:
        return ", ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def _cpu_flush_bytes() -> int:
    """Twice the CPU's last-level cache (from sysfs; 64 MiB where it cannot be read)."""
    for index in (3, 2):
        try:
            text = Path(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size").read_text().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        if text and text[-1] in units and text[:-1].isdigit():
            return max(2 * int(text[:-1]) * units[text[-1]], 8 << 20)
    return 64 << 20


class Timer:
    """Median wall time of a callable: CUDA events on a GPU, perf_counter on the CPU.

    On a GPU, with ``hide_host`` (the default), each timed call is preceded on the GPU by
    a wait (``torch.cuda._sleep``) longer than the host needs to issue the call, sized
    from the host time seen in the warm-up: the events then bracket the GPU's work alone,
    as in a training loop where the host runs ahead of the GPU. Without it, host-side
    cost beyond the L2 flush's ~0.1 ms shows up in the time (as it does when a model is
    host-bound). Either way ``last_host_ms`` is the median host time of the last timed
    callable's calls (on the CPU: the timing itself)."""

    def __init__(self, device: torch.device, warmup: int, reps: int, hide_host: bool = True):
        self.device, self.warmup, self.reps = device, warmup, reps
        self.hide_host = hide_host and device.type == "cuda"
        self.last_host_ms = float("nan")
        self.host_ms: dict[str, float] = {}  # per callable of median_ms_interleaved

    _flush: torch.Tensor | None = None
    _cpu_flush: torch.Tensor | None = None
    _cycles_per_ms: float | None = None

    def _sleep_cycles_per_ms(self) -> float:
        """The GPU's ``torch.cuda._sleep`` cycles per millisecond, measured once."""
        if self._cycles_per_ms is None:
            n = 2_000_000
            with torch.cuda.device(self.device):  # (events and the wait on this device's stream, not cuda:0's)
                torch.cuda._sleep(n)  # first call: module load
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize(self.device)
                start.record()
                torch.cuda._sleep(n)
                end.record()
                end.synchronize()
            Timer._cycles_per_ms = n / max(start.elapsed_time(end), 1e-3)
        return self._cycles_per_ms

    def hold_ms(self, host_ms: float) -> float:
        """How long the GPU waits before a timed call whose host time is ``host_ms``:
        twice that plus 50 us (host time varies from call to call)."""
        return 2.0 * host_ms + 0.05

    def _host_ms(self, fn: Callable[[], object]) -> float:
        """Host time of one call issued to an idle GPU, so the queue never pushes back."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def once_ms(self, fn: Callable[[], object], hold_ms: float = 0.0) -> tuple[float, float]:
        """One timed call: (time ms, host time ms). On a GPU the queue is drained, then the
        L2 cache is flushed by reading a 256 MiB buffer (so no input is timed from the
        cache, and no dirty line of the flush is written back during the call, as a flush
        by writing would), then the GPU waits ``hold_ms`` (see the class), then the call
        is timed with CUDA events. On the CPU, a buffer twice the last-level cache is read
        first, so no implementation finds its inputs cached by the one timed before it."""
        if self.device.type == "cuda":
            if self._flush is None:
                self._flush = torch.ones(64 << 20, dtype=torch.float32, device=self.device)
            # the device's own stream: on cuda:1 the events on cuda:0's would bracket an idle stream
            with torch.cuda.device(self.device):
                torch.cuda.synchronize(self.device)
                self._flush.sum()
                if hold_ms > 0:
                    torch.cuda._sleep(int(hold_ms * self._sleep_cycles_per_ms()))
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                t0 = time.perf_counter()
                fn()
                host = (time.perf_counter() - t0) * 1e3
                end.record()
                end.synchronize()
            return start.elapsed_time(end), host
        if self._cpu_flush is None:
            self._cpu_flush = torch.ones(_cpu_flush_bytes() // 4, dtype=torch.float32)
        self._cpu_flush.sum()  # every timed call starts from cold caches, as on the GPU
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        return ms, ms

    def _warm(self, fn: Callable[[], object]) -> float:
        """Warm-up calls; the hold (ms) for the timed calls of ``fn``."""
        host = [self._host_ms(fn) for _ in range(max(self.warmup, 1))]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self.hold_ms(statistics.median(host)) if self.hide_host else 0.0

    def median_ms(self, fn: Callable[[], object]) -> float:
        hold = self._warm(fn)
        runs = [self.once_ms(fn, hold) for _ in range(self.reps)]
        self.last_host_ms = statistics.median(h for _, h in runs)
        return statistics.median(t for t, _ in runs)

    def median_ms_interleaved(self, fns: dict[str, Callable[[], object]]) -> dict[str, float]:
        """Median time of each callable, measured side by side: after the warm-up of each,
        every round times each callable once (the order rotating from round to round), so a
        change of the machine's load during the run falls on all of them alike."""
        holds = {k: self._warm(fn) for k, fn in fns.items()}
        names = list(fns)
        runs: dict[str, list[tuple[float, float]]] = {k: [] for k in names}
        for i in range(self.reps):
            for k in names[i % len(names):] + names[:i % len(names)]:
                runs[k].append(self.once_ms(fns[k], holds[k]))
        self.host_ms = {k: statistics.median(h for _, h in v) for k, v in runs.items()}
        return {k: statistics.median(t for t, _ in v) for k, v in runs.items()}


def out_of_memory(err: BaseException) -> bool:
    """``err`` is a failed allocation: torch.OutOfMemoryError on a GPU, the RuntimeError of
    torch's CPU allocator ("DefaultCPUAllocator: can't allocate memory"), or a size whose
    byte count overflows ("Storage size calculation overflowed")."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and ("can't allocate memory" in str(err)
                                           or "Storage size calculation overflowed" in str(err)))


def release_memory(device: torch.device) -> None:
    """Free what a finished or failed measurement left: Python's garbage, and on a GPU
    the caching allocator's free blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse (large M_MMAP_THRESHOLD and
    M_TRIM_THRESHOLD) instead of returning it to the OS: each CPU timing of a call that
    allocates its outputs then measures the call, not page faults of fresh pages, whose
    count swings with the allocator's state (a backward timed 51 vs 20 ms across runs
    without this). Every implementation is timed under the same setting. False where
    the C library is not glibc."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 31))


def is_device_text(text: str) -> bool:
    """``text`` names a device normlab's commands run on: cpu, cuda or cuda:N."""
    return re.fullmatch(r"cpu|cuda(:\d+)?", text.strip().lower()) is not None


def pick_device(device: str | None) -> torch.device:
    """``--device``: cpu, cuda or cuda:N (default: cuda when available); a CUDA device
    this machine does not have is refused."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not is_device_text(device):
        raise typer.BadParameter(f"expected cpu, cuda or cuda:N, got {device!r}", param_hint="--device")
    dev = torch.device(device.strip().lower())
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise typer.BadParameter(f"{device!r}: no CUDA device is available on this machine; expected cpu",
                                     param_hint="--device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise typer.BadParameter(f"{device!r}: this machine has {torch.cuda.device_count()} CUDA "
                                     f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}",
                                     param_hint="--device")
    return dev


def check_backend(device: torch.device) -> None:
    """The backend in force (``$NORMLAB_BACKEND``) runs normlab's ops on ``device``:
    "triton" needs triton installed and CUDA tensors, or ``TRITON_INTERPRET=1`` on the
    CPU. Refused up front, naming the variable (as the root command refuses a bad name),
    rather than as a traceback from the first op."""
    from normlab.backend import get_backend, resolve, triton_available

    hint = "NORMLAB_BACKEND (environment variable)"
    if device.type == "cuda":
        # resolve's rule for CUDA tensors, without allocating one there (the check runs
        # before anything else: a study's runs are in other processes, and a CUDA
        # context started here would be the command's own, for nothing)
        if get_backend() == "triton" and not triton_available():
            raise typer.BadParameter("normlab backend 'triton' was asked for, but triton is not installed "
                                     "(pip install 'normlab[triton]')", param_hint=hint)
        return
    try:
        resolve(torch.empty(0, device=device))
    except RuntimeError as err:
        raise typer.BadParameter(str(err), param_hint=hint) from None


def check_positive(value: int | None, param_hint: str, most: int = 2**31 - 1) -> int | None:
    """An integer option that must be in [1, ``most``] when given (None: not given): the
    default bound is the largest thread count torch takes (a C int)."""
    if value is not None and not 1 <= value <= most:
        raise typer.BadParameter(f"expected a positive integer{f' at most {most}' if value > most else ''}, "
                                 f"got {value}", param_hint=param_hint)
    return value


def print_table(console, table) -> None:
    """A results table whole. Where the output is not a terminal (a pipe, a CI log, a file:
    80 columns to Rich) it is printed at its own width, so no op or impl name is cut to
    "layer…" and no number wraps; in a terminal at the terminal's width, the names (their
    columns ``overflow="fold"``) folding onto more lines where it is narrow."""
    if console.is_terminal:
        console.print(table)
        return
    natural = console.measure(table, options=console.options.update_width(1 << 14)).maximum
    width = console.width
    console.width = max(width, natural)
    try:
        console.print(table)
    finally:
        console.width = width


def significant(x: float, digits: int = 3) -> str:
    """``x`` with ``digits`` significant digits, positional (0.0000694, not 6.94e-05)."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    return f"{x:.{max(0, digits - 1 - math.floor(math.log10(abs(x))))}f}"


class TableWrites:
    """What a benchmark's tables hold when Ctrl-C stops it: the rows written (marked
    partial), the rows being written when it came (the files unsure), or none.
    ``write(rows, fn)`` runs ``fn`` (the write of ``rows`` rows); ``interrupted()``: the
    exit, with that said on stderr on one line."""

    def __init__(self, stem: Path) -> None:
        self.stem, self.saved, self.writing = stem, 0, 0

    def write(self, rows: int, fn: Callable[[], object]) -> object:
        self.writing = rows
        out = fn()
        self.saved, self.writing = rows, 0
        return out

    def interrupted(self) -> typer.Exit:
        kept = (f"stopped while writing the {self.writing} rows measured to {self.stem}.partial.csv and .md: they "
                "may be incomplete" if self.writing
                else f"kept the {self.saved} rows measured so far in {self.stem}.partial.csv and {self.stem}.md, "
                "marked partial"
                if self.saved else "nothing was measured yet; nothing written")
        from rich.console import Console

        Console(stderr=True).print(f"interrupted: {kept}", markup=False, highlight=False)
        return typer.Exit(code=130)


def out_file_problem(path: str | os.PathLike) -> str | None:
    """Why a table cannot be written to the file ``path`` (a directory, a missing or
    unwritable folder), checked before any measurement; None when it can (nothing is left
    behind: a file that did not exist is not created)."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a directory; expected a file to write the table to"
    if not path.parent.is_dir():
        return f"{path.parent} is not a directory to write {path.name} in"
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        return f"cannot write {path}: {e.strerror or e}"
    if not existed:
        path.unlink(missing_ok=True)
    return None


def check_script_args(ap, args) -> None:
    """A benchmark script's (argparse) counts at least 1 (``--rounds``, ``--number``,
    ``--threads``, those it has) and its ``--out`` file writable, before it measures:
    ``ap.error`` (exit 2) naming the option otherwise."""
    for name in ("rounds", "number", "threads"):
        if getattr(args, name, 1) < 1:
            ap.error(f"--{name}: expected >= 1, got {getattr(args, name)}")
    if getattr(args, "out", None) and (problem := out_file_problem(args.out)):
        ap.error(f"--out: {problem}")


def check_out_dir(path: str | os.PathLike, param_hint: str = "--out") -> Path:
    """A directory that can be written to, or be created and written to: refused (as
    ``param_hint``) up front, before any work, rather than when the results are saved.
    Nothing is left behind: the check makes and removes a temporary directory in
    ``path``, or in its nearest existing parent where ``path`` does not exist yet."""
    if not str(path).strip():
        raise typer.BadParameter("expected a directory to write to, got an empty path", param_hint=param_hint)
    path = Path(path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        what = "is" if probe == path else f"is inside {probe}, which is"
        raise typer.BadParameter(f"{path} {what} not a directory; expected a directory to write to",
                                 param_hint=param_hint)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".normlab-check-", dir=probe))
    except OSError as err:
        raise typer.BadParameter(f"cannot write to {path}: {err.strerror or err}; expected a "
                                 "directory that can be created and written to", param_hint=param_hint) from err
    return path


def pick_dtype(dtype: str, allowed: tuple[str, ...] = tuple(DTYPES)) -> torch.dtype:
    if dtype not in allowed:
        raise typer.BadParameter(f"expected one of {', '.join(allowed)}, got {dtype!r}", param_hint="--dtype")
    return DTYPES[dtype]


def write_table_csv(rows: list[dict], out: Path, stem: str, partial: bool) -> Path:
    """A benchmark's CSV: ``{stem}.csv``, or ``{stem}.partial.csv`` while the run has not
    measured all it was to (a CSV has no place to say so, as the markdown does: a partial
    one read alone would pass for a run of fewer shapes). The other of the two is removed,
    so the folder never holds a CSV of an earlier run beside this run's markdown."""
    path, other = out / f"{stem}.partial.csv", out / f"{stem}.csv"
    if not partial:
        path, other = other, path
    write_csv(rows, path)
    other.unlink(missing_ok=True)
    return path


def write_csv(rows: list[dict], path: Path) -> Path:
    """One CSV row per record (the first record's keys as the header)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path
