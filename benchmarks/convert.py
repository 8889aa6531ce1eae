"""Inference step time before/after each normlab.convert transform, on CPU.

    PYTHONPATH=src python benchmarks/convert.py [--out benchmarks/results/convert-cpu.md]

Each row converts a fresh copy of a model and times one eval forward (no_grad) of the
original and the converted model side by side, alternating, and reports medians.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from normlab.convert import fold_norm_affine, layernorm_to_rmsnorm, swap_norms  # noqa: E402


class PreLNLM(nn.Module):
    def __init__(self, vocab=1000, d=256, heads=4, layers=4, max_len=256):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        return self.head(self.ln_f(self.encoder(x)))


class MLPBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln, self.fc, self.proj = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.proj(torch.nn.functional.gelu(self.fc(self.ln(x))))


class MLPStack(nn.Module):
    """Norm-heavy: one LayerNorm per two Linear layers, small hidden size."""

    def __init__(self, vocab=1000, d=128, n=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(MLPBlock(d) for _ in range(n))
        self.norm, self.out = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x)
        return self.out(self.norm(x))


def _hf(name):
    import transformers as t

    if name == "gpt2":
        return t.GPT2LMHeadModel(t.GPT2Config(vocab_size=1000, n_embd=256, n_layer=4, n_head=4,
                                              n_positions=256, bos_token_id=0, eos_token_id=0))
    return t.LlamaForCausalLM(t.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688,
                                            num_hidden_layers=4, num_attention_heads=4))


def _normlab_lm():
    from normlab.models import TransformerConfig, TransformerLM

    return TransformerLM(TransformerConfig(vocab_size=1000, d_model=256, n_heads=4, n_layers=4, d_ff=1024,
                                           max_seq_len=256, dropout=0.0, placement="pre", norm="layernorm",
                                           tie_embeddings=False))


def _step(model, idx):
    with torch.no_grad():
        out = model(idx)
    return out.logits if hasattr(out, "logits") else out


def _time(a, b, idx, repeats):
    """Median times of a and b, and the median of the paired ratios a/b (each pair runs
    back to back, so a busy machine slows both alike)."""
    for _ in range(3):
        _step(a, idx), _step(b, idx)
    ta, tb = [], []
    for i in range(repeats):
        pair = ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta))
        for m, acc in pair:
            t0 = time.perf_counter()
            _step(m, idx)
            acc.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb), statistics.median(x / y for x, y in zip(ta, tb))


TRANSFORMS = {
    "swap_norms": lambda m, idx: swap_norms(m),
    "fold_norm_affine": lambda m, idx: fold_norm_affine(m),
    "layernorm_to_rmsnorm": lambda m, idx: layernorm_to_rmsnorm(m, example_inputs=idx),
    "layernorm_to_rmsnorm + fold": lambda m, idx: (layernorm_to_rmsnorm(m, example_inputs=idx), fold_norm_affine(m)),
}
PLAN = [
    ("torch Pre-LN LM (d256, 4 layers)", lambda: PreLNLM(), list(TRANSFORMS)),
    ("MLP Pre-LN stack (d128, 8 blocks)", lambda: MLPStack(), list(TRANSFORMS)),
    ("normlab Pre-LN TransformerLM (d256, 4 layers)", _normlab_lm, list(TRANSFORMS)),
    ("HF GPT-2 (d256, 4 layers)", lambda: _hf("gpt2"), list(TRANSFORMS)),
    ("HF Llama (d256, 4 layers)", lambda: _hf("llama"), ["swap_norms", "fold_norm_affine"]),
]


def _load() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=41)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    idx = torch.randint(0, 1000, (args.batch, args.seq))
    load_before = _load()
    rows = []
    for label, make, transforms in PLAN:
        try:
            base = make().eval()
        except ImportError:
            continue
        for name in transforms:
            conv = copy.deepcopy(base)
            TRANSFORMS[name](conv, idx)
            err = (_step(conv, idx) - _step(base, idx)).abs().max().item()
            before, after, ratio = _time(base, conv, idx, args.repeats)
            rows.append((label, name, before * 1e3, after * 1e3, ratio, err))
            print(f"{label:36s} {name:28s} {before*1e3:8.2f} ms -> {after*1e3:8.2f} ms  x{ratio:.2f}  max|diff| {err:.1e}", flush=True)
    load_after = _load()
    lines = [
        "# normlab.convert: inference step time before/after, CPU",
        "",
        f"Device: {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}; "
        f"fp32, batch {args.batch} x seq {args.seq}, eval forward under no_grad, "
        f"medians of {args.repeats} alternating repeats; speedup = median of paired before/after "
        f"ratios. Load average (1 min) before / after measuring: {load_before} / {load_after} "
        f"on {os.cpu_count()} cores.",
        "",
        "| model | transform | before (ms) | after (ms) | speedup | max abs diff of outputs |",
        "|---|---|---:|---:|---:|---:|",
    ] + [f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.2f}x | {r[5]:.1e} |" for r in rows]
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
