"""ActivationMonitor: values, Pre-LN residual growth vs Post-LN, sampling, clean detach."""

from __future__ import annotations

import math
import re

import pytest
import torch
from rich.console import Console
from torch import nn

import normlab
from normlab.diagnostics import ActivationMonitor, per_example_grad_norms, tensor_stats
from normlab.errors import NormArgumentError
from tests.diagnostics.helpers import hook_count
from tests.diagnostics.torch_models import text_batches, torch_lm


def _manual_stream(model, tokens):
    causal = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool).triu(1)
    x, outs = model.embed(tokens), []
    for block in model.blocks:
        x = block(x, src_mask=causal, is_causal=True)
        outs.append(x)
    return outs


def test_residual_stats_match_manual_forward():
    model = torch_lm("pre", n_layers=3, d_model=16, n_heads=2, seed=0)
    tokens = text_batches(1, 2, 10)[0][:, :-1]
    with torch.no_grad(), ActivationMonitor(model) as mon:
        model(tokens)
    with torch.no_grad():
        outs = _manual_stream(model, tokens)
    recs = [r for r in mon.records if r.site == "residual"]
    assert [(r.module, r.layer, r.stack) for r in recs] == [(f"blocks.{i}", i, "blocks") for i in range(3)]
    for r, x in zip(recs, outs, strict=True):
        assert r.mean == pytest.approx(float(x.mean()), abs=1e-6)
        assert r.rms == pytest.approx(float(x.square().mean().sqrt()), rel=1e-5)
        assert r.max_abs == pytest.approx(float(x.abs().max()), rel=1e-6)
        assert r.nonfinite == 0.0
    norm_recs = {r.module: r for r in mon.records if r.site == "norm_input"}
    assert set(norm_recs) == {"blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1", "blocks.1.norm2",
                              "blocks.2.norm1", "blocks.2.norm2", "final_norm"}
    assert norm_recs["final_norm"].rms == pytest.approx(float(outs[-1].square().mean().sqrt()), rel=1e-5)
    assert norm_recs["blocks.1.norm1"].rms == pytest.approx(recs[0].rms, rel=1e-6)  # Pre-LN: reads the stream
    assert norm_recs["final_norm"].layer is None and norm_recs["blocks.2.norm2"].layer == 2


def test_pre_ln_stream_grows_post_ln_does_not():
    tokens = text_batches(1, 4, 32)[0][:, :-1]
    rms = {}
    for placement in ("pre", "post"):
        model = torch_lm(placement, n_layers=8, d_model=64, n_heads=4, seed=0)
        with torch.no_grad(), ActivationMonitor(model) as mon:
            model(tokens)
        rms[placement] = mon.residual_rms()
    assert len(rms["pre"]) == len(rms["post"]) == 8
    assert rms["pre"][-1] > 1.5 * rms["pre"][0]
    assert all(b > a for a, b in zip(rms["pre"], rms["pre"][1:], strict=False))
    assert rms["post"] == pytest.approx([1.0] * 8, abs=1e-3)  # every block ends in a LayerNorm


def test_nonfinite_fraction_and_finite_stats():
    x = torch.tensor([[1.0, -3.0, float("nan"), float("inf")]])
    mean, rms, max_abs, nonfinite = tensor_stats(x).tolist()
    assert (mean, max_abs, nonfinite) == (-1.0, 3.0, 0.5)
    assert rms == pytest.approx(math.sqrt(5.0))
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(torch.tensor([1.0, float("nan"), 2.0, 3.0]))
    with ActivationMonitor(model) as mon:
        model(torch.randn(5, 4))
    (rec,) = [r for r in mon.records if r.site == "norm_input"]
    assert rec.nonfinite == 0.25 and rec.mean == pytest.approx(2.0) and rec.max_abs == 3.0


def test_every_n_steps_and_clean_detach():
    model = torch_lm("post", n_layers=2, d_model=16, n_heads=2)
    tokens = text_batches(1, 2, 8)[0][:, :-1]
    mon = ActivationMonitor(model, every=3).attach()
    assert hook_count(model) > 0
    for _ in range(7):
        model(tokens).sum().backward()
    mon.detach()
    assert hook_count(model) == 0
    assert sorted({r.step for r in mon.records}) == [0, 3, 6]
    assert len(mon.step_records(3)) == 2 + 4  # two blocks, four norms
    model(tokens)
    assert sorted({r.step for r in mon.records}) == [0, 3, 6]
    console = Console(record=True, width=200)
    console.print(mon.table())
    assert "blocks.1.norm2" in console.export_text()


def test_normlab_residual_norm_input_is_the_sum():
    norm = normlab.LayerNorm(8)
    x, r = torch.randn(2, 3, 8), torch.randn(2, 3, 8) * 5
    with ActivationMonitor(norm) as mon:
        norm(x, r)
    (rec,) = mon.records
    assert rec.rms == pytest.approx(float((x + r).square().mean().sqrt()), rel=1e-5)


def test_all_monitors_leave_no_hooks():
    model = torch_lm("pre", n_layers=2, d_model=16, n_heads=2)
    window = text_batches(1, 2, 8)[0]
    from normlab.diagnostics import GradientMonitor, audit
    from tests.diagnostics.torch_models import lm_loss
    with ActivationMonitor(model), GradientMonitor(model), per_example_grad_norms(model):
        assert hook_count(model) > 0
        lm_loss(model, window).backward()
    audit(model)
    assert hook_count(model) == 0


@pytest.mark.parametrize("placement", ["pre", "sandwich", "peri", "post"])
def test_residual_of_normlab_blocks_is_the_stream_the_next_block_reads(placement):
    # Pre-LN-family blocks return (residual, pending branch); the stream after block l is
    # what block l+1's first norm receives (its fused add's new_residual), measured
    # independently at that norm's input; after the last block, the final norm's input.
    from normlab.models import TransformerConfig, TransformerLM

    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=50, d_model=16, n_heads=2, n_layers=3,
                                            placement=placement, dropout=0.0, max_seq_len=16))
    with ActivationMonitor(model) as mon:
        model(torch.randint(0, 50, (2, 12)))
    residual = mon.residual_rms()
    norm_in = {r.module: r.rms for r in mon.records if r.site == "norm_input"}
    first_norm = "attn_add" if placement == "post" else "attn_in"
    nxt = [norm_in[f"blocks.{i}.norms.{first_norm}"] for i in (1, 2)]
    if placement != "post":
        nxt.append(norm_in["final_norm"])
        assert residual == pytest.approx(nxt, rel=1e-5)
    else:  # Post-LN: the block output is the normalized stream, the next add's residual input
        assert residual[:2] != pytest.approx(nxt, rel=1e-3)  # (next norm input = stream + F)
        assert residual == pytest.approx([1.0, 1.0, 1.0], rel=0.05)


def test_empty_and_partly_finite_tensors():
    """An empty tensor has no non-finite entry (the old code said 100%) and all-zero
    statistics, so nothing downstream turns NaN; the statistics of the finite entries
    leave the others out."""
    assert tensor_stats(torch.empty(0, 8)).tolist() == [0.0, 0.0, 0.0, 0.0]
    net = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    with ActivationMonitor(net) as mon:
        net(torch.randn(0, 8))
    assert [(r.site, r.mean, r.rms, r.max_abs, r.nonfinite) for r in mon.records] == [
        ("norm_input", 0.0, 0.0, 0.0, 0.0)]
    x = torch.tensor([1e15, -3e15, 2e14, float("nan")])
    finite = x[:3].double()
    want = [finite.mean(), finite.square().mean().sqrt(), finite.abs().max(), 0.25]
    torch.testing.assert_close(tensor_stats(x), torch.tensor(want, dtype=torch.float32), rtol=1e-6, atol=0)


def test_bad_arguments_are_named():
    for every in (2.5, "10", 0):
        with pytest.raises(NormArgumentError, match=r"ActivationMonitor: expected every to be an int >= 1, got "
                                                    + re.escape(repr(every))):
            ActivationMonitor(nn.Linear(2, 2), every=every)
    with pytest.raises(NormArgumentError, match="ActivationMonitor: expected model to be a torch.nn.Module"):
        ActivationMonitor("x")
