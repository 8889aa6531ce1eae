"""Host time of the Triton backend's Python path on a CPU, with the kernel launches stubbed
out, against a bare ``torch.autograd.Function`` that calls torch's own op.

The Triton path is what a CUDA call runs on the host: the public function's checks, the
spec, ``FusedNorm`` (the autograd.Function), the output allocations, the launch math.
Here the tensors are on the CPU (``TRITON_INTERPRET=1``, set when the script runs, lets
the triton backend take them) and every kernel launch is replaced by a no-op, so each
time is the host work alone. The baseline is the least an autograd.Function wrapping one
fused torch op can cost: ``torch.native_layer_norm`` forward and
``native_layer_norm_backward`` in ``backward`` (``x + residual`` first for the add ops).
The RMSNorm rows use the same op as the stand-in for a fused RMSNorm op: torch's CPU
``aten._fused_rms_norm`` is a chain of about a dozen ops, and its backward has no CPU
kernel, so a bare Function around them would cost several times one op's host time (on
CUDA each is one kernel). The baseline also computes the norm, so the default shape is
tiny: at 8 x 64 its arithmetic is a few microseconds of the call's 5-30.

Each case runs beside its baseline in interleaved rounds (alternating which goes first);
the table gives medians and the ratio normlab / bare (the target: at most 1.5).

    python benchmarks/host_path_stubbed.py [--rounds 21] [--out benchmarks/results/host-path-stubbed-cpu.md]
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # (before triton is imported: the backend then takes CPU tensors)
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import statistics  # noqa: E402
import timeit  # noqa: E402

import torch  # noqa: E402

import normlab  # noqa: E402
from normlab import functional as F  # noqa: E402
from normlab.bench.common import check_script_args, device_name  # noqa: E402
from normlab.provenance import code_line  # noqa: E402

TARGET = 1.5


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return self._launch

    @staticmethod
    def _launch(*args, **kwargs) -> None:
        return None


@contextlib.contextmanager
def stubbed_launches():
    """Every kernel the norm ops launch, replaced by a no-op (restored on exit)."""
    from normlab.ops.triton import launch, norm

    names = [(norm, n) for n in ("_fwd_kernel", "_fwd_looped_kernel", "_bwd_kernel", "_bwd_split_kernel",
                                 "_bwd_looped_kernel")] + [(launch, "_reduce_partials_kernel")]
    saved = [(mod, n, getattr(mod, n)) for mod, n in names]  # (an AttributeError: a kernel renamed)
    try:
        for mod, n, _ in saved:
            setattr(mod, n, _NoLaunch())
        yield
    finally:
        for mod, n, fn in saved:
            setattr(mod, n, fn)


class BareLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shape, w, b, eps):
        out, mean, rstd = torch.native_layer_norm(x, shape, w, b, eps)
        ctx.save_for_backward(x, w, b, mean, rstd)
        ctx.shape = shape
        return out

    @staticmethod
    def backward(ctx, dy):
        x, w, b, mean, rstd = ctx.saved_tensors
        dx, dw, db = torch.ops.aten.native_layer_norm_backward(dy, x, ctx.shape, mean, rstd, w, b, [True, True, True])
        return dx, None, dw, db, None


class BareRMSNorm(torch.autograd.Function):
    """The RMSNorm rows' baseline: one fused op each way, ``native_layer_norm`` standing in
    (its values are LayerNorm's; only its host time is wanted)."""

    @staticmethod
    def forward(ctx, x, shape, w, eps):
        out, mean, rstd = torch.native_layer_norm(x, shape, w, None, eps)
        ctx.save_for_backward(x, w, mean, rstd)
        ctx.shape = shape
        return out

    @staticmethod
    def backward(ctx, dy):
        x, w, mean, rstd = ctx.saved_tensors
        dx, dw, _ = torch.ops.aten.native_layer_norm_backward(dy, x, ctx.shape, mean, rstd, w, None,
                                                              [True, True, False])
        return dx, None, dw, None


class BareAddLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, r, shape, w, b, eps):
        h = x + r
        out, mean, rstd = torch.native_layer_norm(h, shape, w, b, eps)
        ctx.save_for_backward(h, w, b, mean, rstd)
        ctx.shape = shape
        return out, h

    @staticmethod
    def backward(ctx, dy, dh_out):
        h, w, b, mean, rstd = ctx.saved_tensors
        dh, dw, db = torch.ops.aten.native_layer_norm_backward(dy, h, ctx.shape, mean, rstd, w, b, [True, True, True])
        dh = dh + dh_out
        return dh, dh, None, dw, db, None


class BareAddRMSNorm(torch.autograd.Function):
    """``BareRMSNorm`` after ``x + residual``."""

    @staticmethod
    def forward(ctx, x, r, shape, w, eps):
        h = x + r
        out, mean, rstd = torch.native_layer_norm(h, shape, w, None, eps)
        ctx.save_for_backward(h, w, mean, rstd)
        ctx.shape = shape
        return out, h

    @staticmethod
    def backward(ctx, dy, dh_out):
        h, w, mean, rstd = ctx.saved_tensors
        dh, dw, _ = torch.ops.aten.native_layer_norm_backward(dy, h, ctx.shape, mean, rstd, w, None,
                                                              [True, True, False])
        dh = dh + dh_out
        return dh, dh, None, dw, None


class BareLayerNormModule(torch.nn.LayerNorm):
    """torch's LayerNorm module whose forward is ``BareLayerNorm``: the module rows' baseline."""

    def forward(self, x):
        return BareLayerNorm.apply(x, self.normalized_shape, self.weight, self.bias, self.eps)


class BareRMSNormModule(torch.nn.RMSNorm):
    def forward(self, x):
        return BareRMSNorm.apply(x, self.normalized_shape, self.weight, self.eps)


def _cases(rows: int, hidden: int, dtype: torch.dtype, grad: bool):
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(grad)
    x, r, w, b = t(rows, hidden), t(rows, hidden), t(hidden), t(hidden)
    dy = torch.randn(rows, hidden, generator=g).to(dtype)
    shape = [hidden]
    ln, rms = normlab.LayerNorm(hidden, dtype=dtype), normlab.RMSNorm(hidden, eps=1e-6, dtype=dtype)
    bare_ln, bare_rms = BareLayerNormModule(hidden, dtype=dtype), BareRMSNormModule(hidden, eps=1e-6, dtype=dtype)
    for p in (*ln.parameters(), *rms.parameters(), *bare_ln.parameters(), *bare_rms.parameters()):
        p.requires_grad_(grad)

    def run(f):
        if not grad:
            return f

        def fb():
            out = f()
            torch.autograd.backward(out[0] if isinstance(out, tuple) else out, dy)
        return fb
    return {
        "layer_norm": (run(lambda: F.layer_norm(x, hidden, w, b, 1e-5)),
                       run(lambda: BareLayerNorm.apply(x, shape, w, b, 1e-5))),
        "rms_norm": (run(lambda: F.rms_norm(x, hidden, w, 1e-6)),
                     run(lambda: BareRMSNorm.apply(x, shape, w, 1e-6))),
        "add_layer_norm": (run(lambda: F.add_layer_norm(x, r, w, b, 1e-5)),
                           run(lambda: BareAddLayerNorm.apply(x, r, shape, w, b, 1e-5))),
        "add_rms_norm": (run(lambda: F.add_rms_norm(x, r, w, 1e-6)),
                         run(lambda: BareAddRMSNorm.apply(x, r, shape, w, 1e-6))),
        "LayerNorm module": (run(lambda: ln(x)), run(lambda: bare_ln(x))),
        "RMSNorm module": (run(lambda: rms(x)), run(lambda: bare_rms(x))),
    }


def measure(rounds: int, shapes: list[tuple[int, int]], dtypes: list[torch.dtype], number: int = 200) -> list[dict]:
    """One record per (op, dtype, shape, pass): medians over ``rounds`` interleaved rounds."""
    records = []
    with stubbed_launches(), normlab.set_backend("triton"):
        for dtype in dtypes:
            for grad in (False, True):
                for rows, hidden in shapes:
                    cases = _cases(rows, hidden, dtype, grad)
                    times = {k: ([], []) for k in cases}
                    for fn_n, fn_b in cases.values():  # warm-up (first calls compile nothing, but cache)
                        for _ in range(20):
                            fn_n()
                            fn_b()
                    for i in range(rounds):
                        for k, (fn_n, fn_b) in cases.items():
                            order = ((0, fn_n), (1, fn_b)) if i % 2 == 0 else ((1, fn_b), (0, fn_n))
                            for j, fn in order:
                                times[k][j].append(timeit.timeit(fn, number=number) / number * 1e6)
                    for k, (tn, tb) in times.items():
                        n, bare = statistics.median(tn), statistics.median(tb)
                        records.append({"op": k, "dtype": str(dtype).replace("torch.", ""),
                                        "shape": f"{rows}x{hidden}", "pass": "fwd+bwd" if grad else "fwd",
                                        "normlab_us": n, "bare_us": bare, "ratio": n / bare})
    return records


def table(records: list[dict], rounds: int) -> str:
    worst = max(r["ratio"] for r in records)
    lines = [
        "# Host time of the Triton path, kernel launches stubbed out, against a bare autograd.Function",
        "",
        f"{device_name(torch.device('cpu'))}, {code_line()}, torch {torch.__version__}, "
        f"backend triton on CPU tensors (TRITON_INTERPRET=1, every launch a no-op). Medians over {rounds} "
        "interleaved rounds (`benchmarks/host_path_stubbed.py`). `bare` = a `torch.autograd.Function` calling "
        "torch's `native_layer_norm` forward and `native_layer_norm_backward` (`x + residual` first for the add ops; "
        "the same op stands in for a fused RMSNorm op, which torch's CPU build lacks; for the module rows, torch's "
        "module with that Function as its forward), which also computes the norm; ratio = normlab / bare (target: at most "
        f"{TARGET}). Worst ratio: {worst:.2f}.",
        "",
        "| op | dtype | shape | pass | normlab us | bare us | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(f"| {r['op']} | {r['dtype']} | {r['shape']} | {r['pass']} | {r['normlab_us']:.1f} | "
                     f"{r['bare_us']:.1f} | {r['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--number", type=int, default=200, help="calls per timing")
    ap.add_argument("--shapes", default="8x64")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the table here (default: print it)")
    a = ap.parse_args(argv)
    check_script_args(ap, a)
    torch.set_num_threads(a.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    dtypes = [getattr(torch, d) for d in a.dtypes.split(",")]
    text = table(measure(a.rounds, shapes, dtypes, a.number), a.rounds)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
