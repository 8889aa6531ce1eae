"""Launch-settings sweep of normlab's Triton norm kernels on a CUDA device.

Times the kernels themselves (``norm_forward`` / ``norm_backward``, no autograd or
custom-op dispatch) for a grid of warps, pipelining depth and backward programs per
SM, next to torch eager, torch.compile and Liger-Kernel (when importable) on the same
inputs, and the same op through normlab's public API (to show the host-side cost).
Each line of the output file is one JSON record; a summary prints last.

    python benchmarks/tune_triton.py --out tune.jsonl [--quick]

Times are medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed between
repetitions); GB/s count each [rows, hidden] tensor read or written once.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import triton

import normlab
from normlab.ops.triton import launch, norm


def bench_ms(fn, device) -> float:
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=20, rep=80, return_mode="median"))
    fn()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def copy_gbps(device, nbytes=1 << 30) -> float:
    src = torch.empty(nbytes // 4, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / ms / 1e6


def inputs(op, rows, hidden, device, dtype):
    g = torch.Generator().manual_seed(0)

    def t(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    x = t(rows, hidden)
    res = t(rows, hidden) if op.startswith("add") else None
    # weights in the activation dtype, as ``normlab bench kernels`` (torch's CUDA
    # layer_norm refuses float32 weights with bfloat16 input)
    w = (torch.randn(hidden, generator=g) * 0.1 + 1.0).to(device=device, dtype=dtype)
    b = (torch.randn(hidden, generator=g) * 0.1).to(device=device, dtype=dtype) if "layer" in op else None
    return x, res, w, b


def peers(op, hidden):
    F = torch.nn.functional
    out = {}
    if op == "layer_norm":
        out["torch"] = lambda x, r, w, b: F.layer_norm(x, (hidden,), w, b)
    elif op == "rms_norm":
        out["torch"] = lambda x, r, w, b: F.rms_norm(x, (hidden,), w)
    elif op == "add_layer_norm":
        def add_ln(x, r, w, b):
            h = r + x
            return F.layer_norm(h, (hidden,), w, b), h
        out["torch"] = add_ln
    else:
        def add_rms(x, r, w, b):
            h = r + x
            return F.rms_norm(h, (hidden,), w), h
        out["torch"] = add_rms
    out["torch.compile"] = torch.compile(out["torch"], dynamic=False)
    try:
        from liger_kernel.transformers.functional import liger_layer_norm, liger_rms_norm
        if op == "layer_norm":
            out["liger"] = lambda x, r, w, b: liger_layer_norm(x, w, b, 1e-5)
        elif op == "rms_norm":
            out["liger"] = lambda x, r, w, b: liger_rms_norm(x, w, 1e-6)
    except ImportError:
        pass
    Fn = normlab.functional
    out["normlab-api"] = {
        "layer_norm": lambda x, r, w, b: Fn.layer_norm(x, hidden, w, b),
        "rms_norm": lambda x, r, w, b: Fn.rms_norm(x, hidden, w),
        "add_layer_norm": lambda x, r, w, b: Fn.add_layer_norm(x, r, w, b),
        "add_rms_norm": lambda x, r, w, b: Fn.add_rms_norm(x, r, w),
    }[op]
    return out


def as_tuple(o):
    return o if isinstance(o, tuple) else (o,)


def time_peer(fn, args, device):
    """(fwd ms, bwd ms) through autograd."""
    with torch.no_grad():
        fwd = bench_ms(lambda: fn(*args), device)
    leaves = [a.requires_grad_() for a in args if a is not None]
    outs = as_tuple(fn(*args))
    grads = [torch.randn_like(o) for o in outs]
    bwd = bench_ms(lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True), device)
    for a in leaves:
        a.requires_grad_(False)
    return fwd, bwd


def kernel_fns(op, x, res, w, b, hidden, examples=None):
    is_rms = "rms" in op
    store = res is not None

    def fwd():
        return norm.norm_forward(x, res, w, b, 1e-5, hidden=hidden, is_rms=is_rms, dropout=None,
                                 residual_dtype=None, store_residual=store)
    out, new_res, mean, rstd = fwd()
    h = new_res if store else x
    dout = torch.randn_like(out)
    dres_out = torch.randn_like(new_res) if store else None

    def bwd(ex=examples):
        return norm.norm_backward(dout, dres_out, h, w, b.dtype if b is not None else None, mean,
                                  rstd, hidden=hidden, is_rms=is_rms, dropout=None, x_dtype=x.dtype,
                                  residual_grad_dtype=x.dtype if store else None, examples=ex)
    return fwd, bwd


def nbytes(op, pass_, rows, hidden, itemsize):
    fused = op.startswith("add")
    n = (4 if fused else 2) if pass_ == "fwd" else (5 if fused else 3)
    return n * rows * hidden * itemsize


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tune.jsonl")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--hidden", default="768,1024,2048,4096,5120,8192,12288,16384")
    ap.add_argument("--rows", default="16384")
    ap.add_argument("--sweep-ops", default="layer_norm,rms_norm")
    ap.add_argument("--sweep-hidden", default="1024,2048,4096,8192,16384")
    ap.add_argument("--ops", default="layer_norm,rms_norm,add_layer_norm,add_rms_norm")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    dtype = torch.bfloat16
    # the normlab-api row times the public ops on their Triton path (auto would pick torch's
    # op below its size threshold on a GPU, and time that instead)
    normlab.set_backend("triton")
    itemsize = 2
    out = Path(a.out)
    f = out.open("w")
    cg = copy_gbps(device, (64 << 20) if a.quick else (1 << 30))
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}, copy {cg:.0f} GB/s", flush=True)
    f.write(json.dumps({"kind": "copy", "gbps": cg, "torch": torch.__version__}) + "\n")
    fwd_warps = (2, 4) if a.quick else (2, 4, 8, 16)
    bwd_warps = (4,) if a.quick else (4, 8, 16)
    ppsm = (1, 4) if a.quick else (1, 2, 4, 8)
    tile_rows = (1, 4) if a.quick else (1, 2, 4, 8, 16)
    summary = []
    for op, hidden, rows in itertools.product(a.ops.split(","), map(int, a.hidden.split(",")),
                                              map(int, a.rows.split(","))):
        sweep = op in a.sweep_ops.split(",") and str(hidden) in a.sweep_hidden.split(",")
        x, res, w, b = inputs(op, rows, hidden, device, dtype)
        rec = dict(kind="shape", op=op, hidden=hidden, rows=rows)
        fb = nbytes(op, "fwd", rows, hidden, itemsize) / 1e6
        bb = nbytes(op, "bwd", rows, hidden, itemsize) / 1e6

        def log(rec=rec, fb=fb, bb=bb, **kw):
            r = {**rec, **kw}
            if "ms" in r:
                r["gbps"] = (fb if r["pass"] == "fwd" else bb) / r["ms"]
            f.write(json.dumps(r) + "\n")
            f.flush()
            return r
        best = {}
        block = triton.next_power_of_2(hidden)
        rows_opts = [r for r in tile_rows if r * block <= 16384]

        def warps_ok(v, r, sp=1, block=block):  # 4 to 64 elements per thread
            return 4 <= r * block // sp // (32 * v) <= 64
        # the column-split backward (programs sharing each row) for wide rows
        splits = (1, 2, 4) if block >= 8192 else (1,)
        for pass_, grid in (("fwd", [dict(fwd_warps=v, fwd_rows=r)
                                     for v, r in itertools.product(fwd_warps, rows_opts) if warps_ok(v, r)]
                             if sweep else [{}]),
                            ("bwd", [dict(bwd_warps=v, bwd_rows=r, programs_per_sm=p, bwd_split=sp)
                                     for v, r, p, sp in itertools.product(bwd_warps, rows_opts, ppsm, splits)
                                     if warps_ok(v, r, sp) and (sp == 1 or r == 1)]
                             if sweep else [{}])):
            for settings in grid:
                try:
                    with launch.tuning(**settings):
                        kf, kb = kernel_fns(op, x, res, w, b, hidden)
                        ms = bench_ms(kf if pass_ == "fwd" else kb, device)
                except Exception as e:  # noqa: BLE001  (a setting that does not compile)
                    log(impl="normlab-kernel", settings=settings, error=repr(e)[:200], **{"pass": pass_})
                    continue
                r = log(impl="normlab-kernel", settings=settings, ms=ms, **{"pass": pass_})
                if pass_ not in best or ms < best[pass_]["ms"]:
                    best[pass_] = r
        default_f, default_b = kernel_fns(op, x, res, w, b, hidden)
        dflt = {"fwd": bench_ms(default_f, device), "bwd": bench_ms(default_b, device)}
        for p in ("fwd", "bwd"):
            log(impl="normlab-default", ms=dflt[p], **{"pass": p})
        # per-example gradient norms: the same backward with the rows split by example
        pe = {}
        for ex in (8, 64):
            if rows % ex == 0:
                _, kb = kernel_fns(op, x, res, w, b, hidden, examples=ex)
                pe[ex] = bench_ms(kb, device)
                log(impl=f"normlab-per-example-{ex}", ms=pe[ex], **{"pass": "bwd"})
        peer_ms = {}
        torch._dynamo.reset()  # a fresh compile per shape (no recompile limit, no fallback)
        for name, fn in peers(op, hidden).items():
            try:
                pf, pb = time_peer(fn, (x, res, w, b), device)
            except Exception as e:  # noqa: BLE001
                log(impl=name, error=repr(e)[:200], **{"pass": "fwd"})
                continue
            peer_ms[name] = (pf, pb)
            log(impl=name, ms=pf, **{"pass": "fwd"})
            log(impl=name, ms=pb, **{"pass": "bwd"})
        line = (f"{op:15s} {rows:6d}x{hidden:<6d} fwd: default {fb / dflt['fwd']:6.0f} "
                f"best {best.get('fwd', {}).get('gbps', 0):6.0f} {best.get('fwd', {}).get('settings', '')} | "
                f"bwd: default {bb / dflt['bwd']:6.0f} best {best.get('bwd', {}).get('gbps', 0):6.0f} "
                f"{best.get('bwd', {}).get('settings', '')} | pe8 {dflt['bwd'] / pe.get(8, float('nan')):.3f}x"
                + "".join(f" | {k} {fb / v[0]:.0f}/{bb / v[1]:.0f}" for k, v in peer_ms.items()))
        print(line, flush=True)
        summary.append(line)
        del x, res, w, b
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("\n".join(["", "SUMMARY (GB/s fwd/bwd)", *summary]))


if __name__ == "__main__":
    sys.exit(main())
