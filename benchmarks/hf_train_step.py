"""A Hugging Face model's training step with its own norms against the same model after
``normlab.integrations.hf.apply_normlab``: what a practitioner's model costs with normlab.

Tiny Llama (RMSNorm) and GPT-2 (LayerNorm) models built from configs (no download), a
forward with labels, backward and an AdamW step, the two models timed side by side
(each round runs each once), medians over the rounds; ratio = torch norms / normlab
(> 1: normlab faster). Prints a markdown table with the device and commit.

    python benchmarks/hf_train_step.py [--dtype float32|bfloat16] [--threads 1] [--rounds 15]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from normlab.bench.common import device_name
from normlab.provenance import code_line

SIZES = ((64, 2, 4, 32), (256, 4, 8, 128))  # (d_model, layers, batch, tokens)


def _model(kind: str, d: int, layers: int, dtype: torch.dtype):
    import transformers as T

    torch.manual_seed(0)
    heads = max(1, d // 32)
    if kind == "llama":
        m = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=256, hidden_size=d, intermediate_size=4 * d,
                                             num_hidden_layers=layers, num_attention_heads=heads,
                                             num_key_value_heads=heads, max_position_embeddings=256))
    else:
        m = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=256, n_embd=d, n_layer=layers, n_head=heads, n_positions=256,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                           eos_token_id=0))
    return m.to(dtype)


def _step(model, ids):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main(argv=None) -> None:
    from normlab.integrations.hf import apply_normlab

    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    print(f"# Hugging Face training step, torch's norms against normlab's (apply_normlab): "
          f"{device_name(torch.device('cpu'))}, {a.dtype}\n")
    print(f"{code_line()}, torch {torch.__version__}. "
          f"Forward with labels + backward + AdamW step, medians over {a.rounds} interleaved rounds "
          f"(`benchmarks/hf_train_step.py`); ratio = torch norms / normlab (> 1: normlab faster).\n")
    print("| model | d_model | layers | batch x tokens | torch norms ms | normlab ms | ratio |")
    print("|---|---|---|---|---|---|---|")
    for kind in ("llama", "gpt2"):
        for d, layers, batch, tokens in SIZES:
            plain = _model(kind, d, layers, dtype)
            swapped = apply_normlab(copy.deepcopy(plain))
            ids = torch.randint(0, 256, (batch, tokens))
            steps = {"torch": _step(plain, ids), "normlab": _step(swapped, ids)}
            for _ in range(3):
                for f in steps.values():
                    f()
            times = {k: [] for k in steps}
            for _ in range(a.rounds):
                for k, f in steps.items():
                    t0 = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t0)
            t, n = (statistics.median(times[k]) * 1e3 for k in ("torch", "normlab"))
            print(f"| {kind} | {d} | {layers} | {batch} x {tokens} | {t:.2f} | {n:.2f} | {t / n:.3f} |", flush=True)


if __name__ == "__main__":
    main()
