"""Cost of per-example gradient norms in the norm backward, through the public API.

For LayerNorm and RMSNorm on [examples, tokens, hidden] bf16 inputs, times the backward
(dx, dweight, dbias) with and without ``per_example_grad_sq``, side by side
(``Timer.median_ms_interleaved``), and prints the ratio.

    python benchmarks/per_example_overhead.py [--device cuda]
"""

from __future__ import annotations

import argparse

import torch

import normlab
import normlab.diagnostics.per_example as PE
from normlab.bench.common import Timer, device_name


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--examples", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", default="1024,4096,8192")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    timer = Timer(dev, warmup=10, reps=60)
    print(f"# per-example gradient norms: backward time with / without, {device_name(dev)}, "
          f"torch {torch.__version__}, bf16, {a.examples} examples x {a.tokens} tokens")
    print("GPU times (the host's issuing hidden: Timer's hide_host); host us per call beside")
    print("| op | hidden | without (ms) | with (ms) | overhead | host us without / with |")
    print("|---|---|---|---|---|---|")
    for op in ("layer_norm", "rms_norm"):
        for hidden in map(int, a.hidden.split(",")):
            print(_row(op, hidden, a.examples, a.tokens, dev, timer), flush=True)


def _row(op: str, hidden: int, examples: int, tokens: int, dev: torch.device, timer: Timer) -> str:
    """One table row: the backward with and without the per-example norms (the tensors
    are freed when it returns)."""
    F = normlab.functional
    x = torch.randn(examples, tokens, hidden, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(hidden, device=dev, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(hidden, device=dev, dtype=torch.bfloat16, requires_grad=True)
    buf = torch.zeros(2, examples, device=dev)
    leaves = (x, w, b) if op == "layer_norm" else (x, w)

    def call(per_example):
        ops = PE if per_example else F  # the per-example variant, or the plain op
        kw = {"per_example_grad_sq": buf} if per_example else {}
        with normlab.set_backend("triton"):  # the kernels, whatever auto would pick
            if op == "layer_norm":
                return ops.layer_norm(x, hidden, w, b, **kw)
            return ops.rms_norm(x, hidden, w, **kw)
    y0, y1 = call(False), call(True)
    g = torch.randn_like(y0)
    t = timer.median_ms_interleaved({
        "without": lambda: torch.autograd.grad(y0, leaves, g, retain_graph=True),
        "with": lambda: torch.autograd.grad(y1, leaves, g, retain_graph=True),
    })
    host = timer.host_ms
    return (f"| {op} | {hidden} | {t['without']:.4f} | {t['with']:.4f} | "
            f"{t['with'] / t['without'] - 1:+.1%} | {host['without'] * 1e3:.0f} / "
            f"{host['with'] * 1e3:.0f} |")


if __name__ == "__main__":
    main()
