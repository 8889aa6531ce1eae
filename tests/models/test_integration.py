"""The models with the PyTorch stack: safetensors checkpoints, autocast bf16, torch.compile, DDP."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from normlab.models import (
    Seq2SeqTransformer,
    TransformerConfig,
    TransformerEncoder,
    TransformerLM,
    load_model,
    save_model,
)

PLACEMENTS = ["post", "pre", "sandwich", "deepnorm", "subln", "resi_dual", "peri", "none"]


def _cfg(**kw):
    base = dict(vocab_size=29, d_model=16, n_heads=2, n_layers=2, d_ff=32, dropout=0.0, max_seq_len=16)
    base.update(kw)
    return TransformerConfig(**base)


# ---------------------------------------------------------------------------- safetensors


@pytest.mark.parametrize("build", [
    lambda: TransformerLM(_cfg(placement="peri", norm="batchnorm", positional="rope")),
    lambda: TransformerEncoder(_cfg(placement="deepnorm", norm="powernorm", tie_embeddings=False), n_outputs=3),
    lambda: Seq2SeqTransformer(_cfg(placement="resi_dual", norm="rmsnorm", n_decoder_layers=3)),
], ids=["lm", "encoder", "seq2seq"])
def test_safetensors_round_trip(tmp_path, build):
    torch.manual_seed(0)
    model = build()
    tokens = torch.randint(0, 29, (2, 6))
    args = (tokens, tokens[:, :4]) if isinstance(model, Seq2SeqTransformer) else (tokens,)
    model.train()
    model(*args).float().square().mean().backward()  # moves batch-statistics buffers off their init
    model.eval()
    path = tmp_path / "model.safetensors"
    save_model(model, path)
    loaded = load_model(path).eval()
    assert type(loaded) is type(model) and loaded.cfg == model.cfg
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k
    torch.testing.assert_close(loaded(*args), model(*args), rtol=0, atol=0)
    if getattr(model.cfg, "tie_embeddings", False) and not isinstance(model, TransformerEncoder):
        assert loaded.head.weight is loaded.embed.tokens.weight


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_safetensors_round_trip_keeps_the_dtype(tmp_path, dtype):
    # load_model rebuilt every model in float32 and copied the weights into it: a float64
    # model came back rounded (logits off by ~1e-7), a bfloat16 one twice as large
    torch.manual_seed(1)
    model = TransformerLM(_cfg(norm="powernorm")).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.train()
    model(torch.randint(0, 29, (2, 6))).float().square().mean().backward()  # PowerNorm's running stats move
    model.eval()
    save_model(model, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors").eval()
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert {k: v.dtype for k, v in theirs.items()} == {k: v.dtype for k, v in mine.items()}
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k
    tokens = torch.randint(0, 29, (2, 6))
    torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)
    assert loaded.head.weight is loaded.embed.tokens.weight


def test_load_model_rejects_a_plain_file(tmp_path):
    import safetensors.torch

    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="no normlab model metadata"):
        load_model(path)


# ---------------------------------------------------------------------------- autocast


# the newer placements with their options and QK-norm, beside every placement without them
AUTOCAST_CASES = [(p, None, None) for p in PLACEMENTS] + [
    ("olmo2", None, "rmsnorm"), ("parallel", None, "rmsnorm"), ("parallel", {"shared_norm": False}, "rmsnorm")]


@pytest.mark.parametrize("placement,options,qk_norm", AUTOCAST_CASES)
def test_autocast_bf16_cpu(placement, options, qk_norm):
    torch.manual_seed(1)
    model = TransformerLM(_cfg(placement=placement, norm="rmsnorm", placement_options=options, qk_norm=qk_norm))
    tokens = torch.randint(0, 29, (2, 8))
    ref = model(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)
        loss = F.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    assert logits.dtype == torch.bfloat16
    err = (logits.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.05, err
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


# ---------------------------------------------------------------------------- torch.compile


def test_torch_compile_matches_eager():
    """Dynamo traces the whole model in one graph (fullgraph) and AOTAutograd its backward.
    The aot_eager backend keeps this test fast on CPU; Inductor takes the same graph."""
    torch.manual_seed(2)
    model = TransformerLM(_cfg(placement="pre", norm="layernorm", positional="rope"))
    tokens = torch.randint(0, 29, (2, 8))
    pad = torch.zeros(2, 8, dtype=torch.bool)
    pad[1, 6:] = True
    loss = F.cross_entropy(model(tokens, pad).flatten(0, 1), tokens.flatten())
    loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss_c = F.cross_entropy(compiled(tokens, pad).flatten(0, 1), tokens.flatten())
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[n], msg=n)


# ---------------------------------------------------------------------------- DDP

DDP_CFG = dict(placement="pre", norm="layernorm")


def _batch(rank):
    return torch.randint(0, 29, (2, 8), generator=torch.Generator().manual_seed(100 + rank))


def _ddp_worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(TransformerLM(_cfg(**DDP_CFG)))
        tokens = _batch(rank)
        F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
        grads = {n: p.grad for n, p in model.module.named_parameters()}
        torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears the group down while the other still talks (gloo aborts)
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_average_gradients(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    g0, g1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    torch.manual_seed(0)
    model = TransformerLM(_cfg(**DDP_CFG))
    loss = sum(F.cross_entropy(model(_batch(r)).flatten(0, 1), _batch(r).flatten()) for r in range(2)) / 2
    loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(g0[n], g1[n], msg=n)
        torch.testing.assert_close(g0[n], p.grad, rtol=1e-5, atol=1e-6, msg=n)
