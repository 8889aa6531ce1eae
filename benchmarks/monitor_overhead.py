"""Overhead of the diagnostics monitors on one training step (forward, backward, AdamW step).

    PYTHONPATH=src python benchmarks/monitor_overhead.py [--layers 6 --d-model 128 ...]

Variants run interleaved, round after round, on the same model and batch; the table
shows the median step time and its ratio to the plain step. Time is the process's CPU
time (all its threads), which other processes on a shared machine disturb far less than
wall time; wall time is shown too. Sampling every step is the
worst case; with every=N the cost on skipped steps is a Python call per hook.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time

import torch
from torch import nn

from normlab.diagnostics import ActivationMonitor, GradientMonitor, per_example_grad_norms


class LM(nn.Module):
    def __init__(self, n_layers: int, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, d_model)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout=0.0, batch_first=True,
                                       norm_first=True) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 256)

    def forward(self, tokens):
        t = tokens.shape[1]
        mask = torch.ones(t, t, dtype=torch.bool).triu(1)
        x = self.embed(tokens)
        for b in self.blocks:
            x = b(x, src_mask=mask, is_causal=True)
        return self.head(self.norm(x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = LM(args.layers, args.d_model, args.heads)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, 256, (args.batch, args.seq + 1))

    def step():
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    variants = {
        "plain": contextlib.nullcontext,
        f"ActivationMonitor(every={args.every})": lambda: ActivationMonitor(model, every=args.every),
        f"GradientMonitor(every={args.every})": lambda: GradientMonitor(model, every=args.every),
        "both monitors": lambda: contextlib.ExitStack(),
        "per_example_grad_norms": lambda: per_example_grad_norms(model),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    walls: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for k in range(args.rounds + 1):  # round 0: a warm-up step of every variant, untimed
        # the order rotates round by round: drift (clock, caches, allocator) hits every variant alike
        order = names[k % len(names):] + names[:k % len(names)]
        for name in order:
            make = variants[name]
            with make() as ctx:
                if name == "both monitors":
                    ctx.enter_context(ActivationMonitor(model, every=args.every))
                    ctx.enter_context(GradientMonitor(model, every=args.every))
                if k == 0:
                    step()
                    continue
                c0, t0 = time.process_time(), time.perf_counter()
                for _ in range(3):
                    step()
                times[name].append((time.process_time() - c0) / 3)
                walls[name].append((time.perf_counter() - t0) / 3)
    base = statistics.median(times["plain"])
    wbase = statistics.median(walls["plain"])
    print(f"device: CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"model: Pre-LN, {args.layers} layers, d={args.d_model}; batch {args.batch}x{args.seq}; "
          f"median of {args.rounds} rounds x 3 steps")
    print(f"| {'variant':34s} | {'CPU ms/step':>11s} | {'overhead':>8s} | {'wall ms':>8s} | {'wall ovh':>8s} |")
    print(f"|{'-' * 36}|{'-' * 13}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
    for name, ts in times.items():
        med, wmed = statistics.median(ts), statistics.median(walls[name])
        print(f"| {name:34s} | {med * 1e3:11.2f} | {100 * (med / base - 1):+7.1f}% | "
              f"{wmed * 1e3:8.2f} | {100 * (wmed / wbase - 1):+7.1f}% |")


if __name__ == "__main__":
    main()
