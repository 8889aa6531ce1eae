"""Time per call of normlab's public ops and modules against torch's, on a CPU, at the
small shapes where the host's work is the whole cost.

Each case runs beside its torch counterpart in interleaved rounds (all cases once per
round, in turn, torch and normlab first in alternate rounds), so drifts in the machine's
speed hit both alike; the table gives the
median over rounds and the ratio of the two medians (torch / normlab: above 1, normlab
is faster).

    python benchmarks/host_time_cpu.py [--rounds 21] [--out benchmarks/results/host-time-cpu.md]
    python benchmarks/host_time_cpu.py --cases offset [--out ...]   # offsets and casting modes
"""

from __future__ import annotations

import argparse
import statistics
import timeit

import torch
import torch.nn.functional as TF

import normlab
from normlab import functional as F
from normlab.bench.common import check_script_args, device_name
from normlab.bench.kernels import hf_gemma_rms_norm as _gemma
from normlab.bench.kernels import hf_llama_rms_norm as _llama
from normlab.provenance import code_line


def _offset_cases(x, r, w, b, hidden, dtype, run):
    """The practitioners' variants against the torch code their models run: Gemma's and
    Llama's RMSNorm (Hugging Face's ops), LayerNorm1p (Megatron's F.layer_norm with w + 1)."""
    gemma_n = normlab.RMSNorm(hidden, eps=1e-6, offset=1.0, casting_mode="gemma", dtype=dtype)
    return {
        "rms_norm gemma": (run(lambda: _gemma(x, w)),
                           run(lambda: F.rms_norm(x, hidden, w, 1e-6, offset=1.0, casting_mode="gemma"))),
        "rms_norm llama": (run(lambda: _llama(x, w)),
                           run(lambda: F.rms_norm(x, hidden, w, 1e-6, casting_mode="llama"))),
        "add_rms_norm gemma": (run(lambda: _gemma(x + r, w)),
                               run(lambda: F.add_rms_norm(x, r, w, 1e-6, offset=1.0, casting_mode="gemma"))),
        "layer_norm 1p": (run(lambda: TF.layer_norm(x, (hidden,), w + 1, b)),
                          run(lambda: F.layer_norm(x, hidden, w, b, offset=1.0))),
        "add_layer_norm 1p": (run(lambda: TF.layer_norm(x + r, (hidden,), w + 1, b)),
                              run(lambda: F.add_layer_norm(x, r, w, b, offset=1.0))),
        "Gemma RMSNorm module": (run(lambda: _gemma(x, gemma_n.weight)), run(lambda: gemma_n(x))),
    }


def _cases(rows: int, hidden: int, dtype: torch.dtype, grad: bool, which: str = "plain"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=g).to(dtype).requires_grad_(grad)
    r = torch.randn(rows, hidden, generator=g).to(dtype).requires_grad_(grad)
    w = torch.randn(hidden, generator=g).to(dtype).requires_grad_(grad)
    b = torch.randn(hidden, generator=g).to(dtype).requires_grad_(grad)
    dy = torch.randn(rows, hidden, generator=g).to(dtype)
    ln_t, ln_n = torch.nn.LayerNorm(hidden, dtype=dtype), normlab.LayerNorm(hidden, dtype=dtype)
    rms_t, rms_n = torch.nn.RMSNorm(hidden, dtype=dtype), normlab.RMSNorm(hidden, dtype=dtype)

    def run(f):
        if not grad:
            return f
        def fb():
            out = f()
            (out[0] if isinstance(out, tuple) else out).backward(dy)
        return fb

    if which == "offset":
        return _offset_cases(x, r, w, b, hidden, dtype, run)
    return {
        "layer_norm": (run(lambda: TF.layer_norm(x, (hidden,), w, b)), run(lambda: F.layer_norm(x, hidden, w, b))),
        "rms_norm": (run(lambda: TF.rms_norm(x, (hidden,), w)), run(lambda: F.rms_norm(x, hidden, w))),
        "add_layer_norm": (run(lambda: TF.layer_norm(x + r, (hidden,), w, b)),
                           run(lambda: F.add_layer_norm(x, r, w, b))),
        "add_rms_norm": (run(lambda: TF.rms_norm(x + r, (hidden,), w)), run(lambda: F.add_rms_norm(x, r, w))),
        "LayerNorm module": (run(lambda: ln_t(x)), run(lambda: ln_n(x))),
        "RMSNorm module": (run(lambda: rms_t(x)), run(lambda: rms_n(x))),
    }


def measure(rows, hidden, dtype, grad, rounds, number, which="plain") -> list[tuple[str, float, float]]:
    cases = _cases(rows, hidden, dtype, grad, which)
    times = {name: ([], []) for name in cases}
    for theirs, ours in cases.values():
        for _ in range(max(number // 10, 20)):
            theirs()
            ours()
    for k in range(rounds):
        for name, (theirs, ours) in cases.items():
            # the order alternates round by round: drift (clock, caches) hits both sides alike
            for side, fn in ((0, theirs), (1, ours)) if k % 2 == 0 else ((1, ours), (0, theirs)):
                times[name][side].append(timeit.timeit(fn, number=number) / number * 1e6)
    return [(name, statistics.median(t), statistics.median(o)) for name, (t, o) in times.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the table as Markdown here")
    ap.add_argument("--cases", choices=("plain", "offset"), default="plain",
                    help="plain: the ops against torch's; offset: the offsets and casting modes against "
                         "Hugging Face's and Megatron's torch code")
    args = ap.parse_args()
    check_script_args(ap, args)
    torch.set_num_threads(args.threads)
    lines = [
        "# Time per call on a CPU: normlab's public ops and modules against torch's"
        + (" (offsets and casting modes)" if args.cases == "offset" else ""),
        "",
        f"{device_name(torch.device('cpu'))}, {code_line()}, "
        f"torch {torch.__version__}, backend {normlab.get_backend()}. Medians over {args.rounds} "
        "interleaved rounds (`benchmarks/host_time_cpu.py`); ratio = torch / normlab (above 1: "
        "normlab faster). torch's fused add+norm counterpart is `x + r` then its norm."
        + (" Offset cases: the torch side is the code practitioners' models run (Hugging Face's "
           "GemmaRMSNorm and LlamaRMSNorm op for op, Megatron's LayerNorm1p as F.layer_norm with "
           "w + 1, which adds the offset in the weight's dtype)." if args.cases == "offset" else ""),
        "",
        "bfloat16 LayerNorm rows with fwd+bwd (and the module's forward in grad mode) take normlab's float32 parameter-gradient sums, which torch's CPU kernel does not form (it sums in bfloat16): a chosen cost, docs/kernels.md.",
        "",
        "| op | dtype | shape | pass | torch us | normlab us | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for dtype in (torch.float32, torch.bfloat16):
        for rows, hidden in ((8, 64), (256, 128)):
            for grad in (False, True):
                number = 200 if grad else 1000
                for name, t, o in measure(rows, hidden, dtype, grad, args.rounds, number, args.cases):
                    line = (f"| {name} | {str(dtype).removeprefix('torch.')} | {rows}x{hidden} | "
                            f"{'fwd+bwd' if grad else 'fwd'} | {t:.1f} | {o:.1f} | {t / o:.2f} |")
                    print(line, flush=True)
                    lines.append(line)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
