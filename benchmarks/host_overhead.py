"""Host-side (CPU) cost of one norm call on a CUDA device, layer by layer.

The tensors are tiny, so the GPU never holds the host back: each number is the time the
host spends issuing the call (median of perf_counter over many calls). Prints the
layers from the raw Triton launch up to the public API with autograd, torch's own op for
scale, and a cProfile of the API's forward + backward.

    python benchmarks/host_overhead.py [--device cuda] [--backend triton|auto|torch]

The public API's rows run on ``--backend`` (default triton, on every device: the layers
below it are the Triton path's; ``auto`` picks torch's op for calls this small on a GPU,
so its rows would time normlab's wrapper around torch's op). The backend is printed.

(``--device cpu`` with TRITON_INTERPRET=1 runs the same layers through the interpreter:
a smoke test of the script, not a measurement.)
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch

import normlab
from normlab.ops.triton import launch, norm
from normlab.provenance import code_line


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def host_us(fn, n=3000) -> float:
    n = max(1, n)  # (the halved counts of the fwd+bwd rows: at least one call)
    for _ in range(min(200, n)):
        fn()
    _sync()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    _sync()
    return statistics.median(ts) * 1e6


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--calls", type=int, default=3000, help="timed calls per layer")
    ap.add_argument("--backend", default="triton", choices=("triton", "auto", "torch"),
                    help="the backend of the public API's rows (default triton: the path the layers build)")
    a = ap.parse_args(argv)
    dev, calls = a.device, a.calls
    if calls < 1:
        ap.error(f"--calls: expected >= 1, got {calls}")
    normlab.set_backend(a.backend)
    print(f"device {dev}, backend {a.backend} for the api rows, {calls} calls per layer; {code_line()}, "
          f"torch {torch.__version__}")
    hidden = 1024
    x = torch.randn(8, hidden, device=dev, dtype=torch.bfloat16)
    r = torch.randn_like(x)
    w = torch.randn(hidden, device=dev, dtype=torch.bfloat16)
    b = torch.randn(hidden, device=dev, dtype=torch.bfloat16)
    F = normlab.functional
    out, _, mean, rstd = norm.norm_forward(x, None, w, b, 1e-5, hidden=hidden, is_rms=False,
                                           dropout=None, residual_dtype=None, store_residual=False)
    cfg = launch.block_config(hidden)
    y = torch.empty_like(x)

    def raw_launch():
        norm._fwd_kernel[(triton_cdiv(8, cfg.rows),)](
            x, None, w, b, y, None, mean, rstd, hidden, 0, hidden, hidden, 8, hidden, 1e-5, 0,
            0.0, 1.0, IS_RMS=False, HAS_RES=False, HAS_DROPOUT=False, STORE_RES=False,
            ROUND_TO_RES=False, HAS_W=True, HAS_B=True, BLOCK=cfg.block, ROWS=cfg.rows,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    g = torch.randn_like(x)
    rows = {
        "triton launch (fwd kernel)": raw_launch,
        "norm_forward": lambda: norm.norm_forward(
            x, None, w, b, 1e-5, hidden=hidden, is_rms=False, dropout=None,
            residual_dtype=None, store_residual=False),
        "norm_backward": lambda: norm.norm_backward(
            g, None, x, w, b.dtype, mean, rstd, hidden=hidden, is_rms=False, dropout=None,
            x_dtype=x.dtype, residual_grad_dtype=None, examples=None),
        "custom op fwd": lambda: torch.ops.normlab.fused_norm(
            x, None, w, b, None, 1e-5, hidden, False, 0.0, None, False),
    }
    res = {}
    with torch.no_grad():
        for k, fn in rows.items():
            res[k] = host_us(fn, calls)
        res["api layer_norm fwd (no_grad)"] = host_us(lambda: F.layer_norm(x, hidden, w, b), calls)
        res["api add_rms_norm fwd (no_grad)"] = host_us(lambda: F.add_rms_norm(x, r, w), calls)
        res["torch F.layer_norm fwd (no_grad)"] = host_us(
            lambda: torch.nn.functional.layer_norm(x, (hidden,), w, b), calls)
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))

    def api_fwdbwd():
        torch.autograd.grad(F.layer_norm(xg, hidden, wg, bg), (xg, wg, bg), g)

    def torch_fwdbwd():
        torch.autograd.grad(torch.nn.functional.layer_norm(xg, (hidden,), wg, bg), (xg, wg, bg), g)
    y_keep = F.layer_norm(xg, hidden, wg, bg)

    def api_bwd_only():
        torch.autograd.grad(y_keep, (xg, wg, bg), g, retain_graph=True)

    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        def backward(ctx, gt):
            return gt

    def identity_fwdbwd():
        torch.autograd.grad(Identity.apply(xg), (xg,), g)

    res["api layer_norm fwd (grad mode, graph built)"] = host_us(
        lambda: F.layer_norm(xg, hidden, wg, bg), calls // 2)
    res["api layer_norm bwd only (retained graph)"] = host_us(api_bwd_only, calls // 2)
    res["api layer_norm fwd+bwd"] = host_us(api_fwdbwd, calls // 2)
    res["torch layer_norm fwd+bwd"] = host_us(torch_fwdbwd, calls // 2)
    res["python autograd.Function identity fwd+bwd"] = host_us(identity_fwdbwd, calls // 2)
    try:
        from liger_kernel.transformers.functional import liger_layer_norm

        def liger_fwdbwd():
            torch.autograd.grad(liger_layer_norm(xg, wg, bg, 1e-5), (xg, wg, bg), g)
        res["liger layer_norm fwd+bwd"] = host_us(liger_fwdbwd, calls // 2)
    except ImportError:
        pass
    with torch.autograd.set_multithreading_enabled(False):  # backward on this thread
        res["api layer_norm fwd+bwd, one thread"] = host_us(api_fwdbwd, calls // 2)
        res["torch layer_norm fwd+bwd, one thread"] = host_us(torch_fwdbwd, calls // 2)
    for k, v in res.items():
        print(f"{k:48s} {v:8.1f} us")
    for name, fn in (("api fwd+bwd", api_fwdbwd), ("api bwd only", api_bwd_only)):
        prof = cProfile.Profile()
        with torch.autograd.set_multithreading_enabled(False):
            prof.enable()
            for _ in range(max(1, calls // 10)):
                fn()
            prof.disable()
        _sync()
        print(f"\n## cProfile of {max(1, calls // 10)} x {name} (backward on the calling thread)")
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
    # the backward runs on autograd's device thread, where cProfile of the main thread
    # does not look: the profiler's CPU view covers every thread
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with profile(activities=acts) as p:
        for _ in range(min(50, calls)):
            api_fwdbwd()
        _sync()
    print(p.key_averages().table(sort_by="cpu_time_total", row_limit=40, max_name_column_width=70))


def triton_cdiv(a, b):
    return (a + b - 1) // b


if __name__ == "__main__":
    main()
