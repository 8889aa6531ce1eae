"""What the benchmarks share: the ``normlab bench`` Typer app, the device's name, the
timer, the load average, the CLI's device/dtype checks and the CSV writer."""

from __future__ import annotations

import csv
import os
import platform
import statistics
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


class Timer:
    """Median wall time of a callable: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device, warmup: int, reps: int):
        self.device, self.warmup, self.reps = device, warmup, reps

    _flush: torch.Tensor | None = None

    def once_ms(self, fn: Callable[[], object]) -> float:
        """One timed call. On a GPU the queue is drained, then the L2 cache is flushed by
        reading a 256 MiB buffer (so no input is timed from the cache, and no dirty line
        of the flush is written back during the call, as a flush by writing would), then
        the call is timed with CUDA events. The flush keeps the GPU busy for about 0.1 ms
        while the host queues the call, so host-side cost up to that much, which the GPU
        hides in a training loop, stays out of the number (as in
        ``triton.testing.do_bench``); ``benchmarks/host_overhead.py`` measures it."""
        if self.device.type == "cuda":
            if self._flush is None:
                self._flush = torch.ones(64 << 20, dtype=torch.float32, device=self.device)
            torch.cuda.synchronize(self.device)
            self._flush.sum()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def median_ms(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return statistics.median(self.once_ms(fn) for _ in range(self.reps))

    def median_ms_interleaved(self, fns: dict[str, Callable[[], object]]) -> dict[str, float]:
        """Median time of each callable, measured side by side: after the warm-up of each,
        every round times each callable once (the order rotating from round to round), so a
        change of the machine's load during the run falls on all of them alike."""
        for fn in fns.values():
            for _ in range(self.warmup):
                fn()
        names = list(fns)
        times: dict[str, list[float]] = {k: [] for k in names}
        for i in range(self.reps):
            for k in names[i % len(names):] + names[:i % len(names)]:
                times[k].append(self.once_ms(fns[k]))
        return {k: statistics.median(v) for k, v in times.items()}


def pick_device(device: str | None) -> torch.device:
    """``--device`` (default: cuda when available), refused when CUDA is asked for and absent."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("no CUDA device is available", param_hint="--device")
    return dev


def pick_dtype(dtype: str, allowed: tuple[str, ...] = tuple(DTYPES)) -> torch.dtype:
    if dtype not in allowed:
        raise typer.BadParameter(f"expected one of {', '.join(allowed)}, got {dtype!r}", param_hint="--dtype")
    return DTYPES[dtype]


def write_csv(rows: list[dict], path: Path) -> Path:
    """One CSV row per record (the first record's keys as the header)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path
