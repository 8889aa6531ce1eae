"""grad_norms, GradientMonitor, the layer/kind rules, and Xiong et al. 2020's measurement."""

from __future__ import annotations

import re

import pytest
import torch
from rich.console import Console
from torch import nn

from normlab.diagnostics import (
    GradientMonitor,
    find_block_lists,
    grad_norms,
    iter_param_info,
    register_kind_rule,
    structure,
)
from normlab.errors import NormArgumentError
from tests.diagnostics.helpers import hook_count
from tests.diagnostics.torch_models import LM_FACTORIES, lm_loss, text_batches, torch_lm


@pytest.fixture(params=list(LM_FACTORIES))
def lm_factory(request):
    return LM_FACTORIES[request.param]


def _ffn_w2_profile(factory, placement, seeds=range(6), n_batches=2):
    """Mean over seeds and batches of ||grad W2||_F per layer at initialization."""
    rows = []
    for seed in seeds:
        model = factory(placement, n_layers=12, d_model=128, n_heads=4, seed=seed)
        for window in text_batches(n_batches, batch=8, seq_len=64, seed=100 + seed):
            rows.append(grad_norms(model, lm_loss(model, window)).by_layer("ffn_w2"))
    return torch.tensor(rows).mean(0)


@pytest.mark.slow
def test_xiong_post_ln_grows_pre_ln_does_not(lm_factory):
    post = _ffn_w2_profile(lm_factory, "post")
    pre = _ffn_w2_profile(lm_factory, "pre")
    assert post.shape == pre.shape == (12,)
    # Per seed the Post-LN growth is noisy (last/first 1.1 to 1.9 over 3 seeds); over
    # 6 seeds x 2 batches it was 1.34 to 1.64 on four disjoint seed sets.
    layer = torch.arange(12.0)

    def log_slope(y):
        return float(((layer - layer.mean()) * (y.log() - y.log().mean())).sum()
                     / (layer - layer.mean()).square().sum())

    # the last layer's FFN output-weight gradient is larger in Post-LN
    assert post[-1] > 1.5 * pre[-1]
    # Post-LN: grows from the first to the last layer (ends, outer thirds, fitted trend)
    assert post[-1] > 1.15 * post[0]
    assert post[8:].mean() > 1.1 * post[:4].mean()
    assert log_slope(post) > 0.01
    # Pre-LN: does not grow
    assert pre[-1] < pre[0]
    assert pre[8:].mean() < pre[:4].mean()
    assert log_slope(pre) < 0


def test_grad_norms_values_grouping_and_grad_untouched():
    model = torch_lm("post", n_layers=3, d_model=16, n_heads=2, seed=0)
    window = text_batches(1, 2, 12)[0]
    loss = lm_loss(model, window)
    recs = grad_norms(model, loss)
    assert all(p.grad is None for p in model.parameters())  # .grad untouched
    loss.backward()
    by_name = {r.name: r for r in recs}
    assert set(by_name) == {n for n, _ in model.named_parameters()}
    for n, p in model.named_parameters():
        assert by_name[n].grad_norm == pytest.approx(float(p.grad.norm()), rel=1e-6)
        assert by_name[n].param_norm == pytest.approx(float(p.detach().norm()), rel=1e-6)
        assert by_name[n].numel == p.numel()
    # without loss: reads .grad
    again = {r.name: r.grad_norm for r in grad_norms(model)}
    assert again == pytest.approx({n: r.grad_norm for n, r in by_name.items()}, rel=1e-6)
    # grouping: sqrt of sum of squares over (layer, kind)
    w2 = recs.by_layer("ffn_w2", weights_only=False)
    for i in range(3):
        expect = (model.blocks[i].linear2.weight.grad.square().sum()
                  + model.blocks[i].linear2.bias.grad.square().sum()).sqrt()
        assert w2[i] == pytest.approx(float(expect), rel=1e-6)
    assert recs.by_layer("ffn_w2")[1] == pytest.approx(float(model.blocks[1].linear2.weight.grad.norm()),
                                                       rel=1e-6)
    attn = [g for g in recs.grouped() if g["kind"] == "attention" and g["layer"] == 2][0]
    expect = sum(p.grad.square().sum() for p in model.blocks[2].self_attn.parameters()).sqrt()
    assert attn["grad_norm"] == pytest.approx(float(expect), rel=1e-6)
    assert attn["numel"] == sum(p.numel() for p in model.blocks[2].self_attn.parameters())


def test_table_and_plot(tmp_path):
    model = torch_lm("pre", n_layers=2, d_model=16, n_heads=2)
    recs = grad_norms(model, lm_loss(model, text_batches(1, 2, 8)[0]))
    console = Console(record=True, width=200)
    console.print(recs.table())
    text = console.export_text()
    assert "ffn_w2" in text and "attention" in text and "embedding" in text
    row0 = recs.by_layer("ffn_w2", weights_only=False)[0]
    assert f"{row0:.3e}" in text
    path = recs.plot(tmp_path / "g.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _HFStyleBlock(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(d)
        self.self_attn = nn.Module()
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.self_attn, n, nn.Linear(d, d))
        self.mlp = nn.Module()
        self.mlp.gate_proj, self.mlp.up_proj, self.mlp.down_proj = (nn.Linear(d, 2 * d),
                                                                     nn.Linear(d, 2 * d),
                                                                     nn.Linear(2 * d, d))
        self.ffn = nn.Module()  # unnamed linears in an FFN container: last one is W2
        self.ffn.a, self.ffn.b = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.gpt2 = nn.Module()
        self.gpt2.attn = nn.Module()
        self.gpt2.attn.c_attn, self.gpt2.attn.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.gpt2.mlp = nn.Module()
        self.gpt2.mlp.c_fc, self.gpt2.mlp.c_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.scale = nn.Parameter(torch.ones(d))


class _HFStyleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 8)
        self.layers = nn.ModuleList(_HFStyleBlock() for _ in range(3))
        self.norm = nn.RMSNorm(8)
        self.lm_head = nn.Linear(8, 10)


def test_layer_and_kind_rules():
    info = {i.name: i for i, _ in iter_param_info(_HFStyleModel())}
    kinds = {n: i.kind for n, i in info.items()}
    expect = {
        "embed_tokens.weight": "embedding", "norm.weight": "norm", "lm_head.weight": "head",
        "layers.1.input_layernorm.weight": "norm",
        "layers.1.self_attn.q_proj.weight": "attention", "layers.1.self_attn.o_proj.bias": "attention",
        "layers.1.mlp.gate_proj.weight": "ffn_w1", "layers.1.mlp.up_proj.weight": "ffn_w1",
        "layers.1.mlp.down_proj.weight": "ffn_w2", "layers.1.ffn.a.weight": "ffn_w1",
        "layers.1.ffn.b.weight": "ffn_w2", "layers.1.gpt2.attn.c_attn.weight": "attention",
        "layers.1.gpt2.attn.c_proj.weight": "attention", "layers.1.gpt2.mlp.c_fc.weight": "ffn_w1",
        "layers.1.gpt2.mlp.c_proj.weight": "ffn_w2", "layers.1.scale": "other",
    }
    for name, kind in expect.items():
        assert kinds[name] == kind, name
    assert info["layers.2.mlp.down_proj.weight"].layer == 2
    assert info["layers.2.mlp.down_proj.weight"].stack == "layers"
    assert info["lm_head.weight"].layer is None

    rule = register_kind_rule(lambda c: "ffn_w1" if c.name.endswith(".scale") else None)
    try:
        assert {i.name: i.kind for i, _ in iter_param_info(_HFStyleModel())}["layers.0.scale"] == "ffn_w1"
    finally:
        structure.KIND_RULES.remove(rule)


def test_block_lists_of_torch_transformer():
    model = nn.Transformer(d_model=16, nhead=2, num_encoder_layers=3, num_decoder_layers=2,
                           dim_feedforward=32)
    lists = [(p, len(m)) for p, m in find_block_lists(model)]
    assert lists == [("encoder.layers", 3), ("decoder.layers", 2)]
    info = {i.name: i for i, _ in iter_param_info(model)}
    assert info["decoder.layers.1.multihead_attn.in_proj_weight"].kind == "attention"
    assert (info["decoder.layers.1.linear2.weight"].stack, info["decoder.layers.1.linear2.weight"].layer,
            info["decoder.layers.1.linear2.weight"].kind) == ("decoder.layers", 1, "ffn_w2")


def test_hf_gpt2_kinds():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg)
    info = {i.name: i for i, _ in iter_param_info(model)}
    assert info["transformer.h.1.mlp.c_proj.weight"].kind == "ffn_w2"
    assert info["transformer.h.1.mlp.c_fc.weight"].kind == "ffn_w1"
    assert info["transformer.h.1.attn.c_proj.weight"].kind == "attention"
    assert info["transformer.h.0.ln_1.weight"].kind == "norm"
    assert info["transformer.wte.weight"].kind == "embedding"
    assert info["transformer.ln_f.weight"].layer is None
    assert info["transformer.h.1.mlp.c_proj.weight"].layer == 1


def test_gradient_monitor_records_sampled_steps_and_detaches():
    model = torch_lm("pre", n_layers=2, d_model=16, n_heads=2, seed=0)
    batches = text_batches(5, 2, 8)
    before = hook_count(model)
    with GradientMonitor(model, every=2) as mon:
        for window in batches:
            model.zero_grad()
            lm_loss(model, window).backward()
            if mon.step == 4:
                last_grads = {n: float(p.grad.norm()) for n, p in model.named_parameters()}
    assert hook_count(model) == before == 0
    assert [s for s, _ in mon.history] == [0, 2, 4]
    got = {r.name: r.grad_norm for r in mon.last}
    assert got == pytest.approx(last_grads, rel=1e-5)
    assert mon.last.by_layer("ffn_w2")[1] == pytest.approx(last_grads["blocks.1.linear2.weight"], rel=1e-5)
    # detached: later steps record nothing
    lm_loss(model, batches[0]).backward()
    assert [s for s, _ in mon.history] == [0, 2, 4]


def test_gradient_monitor_detaches_on_error():
    model = torch_lm("post", n_layers=2, d_model=16, n_heads=2)
    with pytest.raises(ZeroDivisionError):
        with GradientMonitor(model):
            lm_loss(model, text_batches(1, 2, 8)[0]).backward()
            1 / 0  # noqa: B018
    assert hook_count(model) == 0


def test_gradient_monitor_read_in_the_middle_of_a_step():
    """Reading ``last`` between a step's backward calls gives a provisional entry; the
    step's final entry still sums all its backward calls, and the next step's holds only
    its own gradient (the old code lost the second backward from step 0 and moved it
    into step 1)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    x = torch.randn(5, 4)

    def grads():
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    with GradientMonitor(m) as mon:
        y = m(x)
        y[:, 0].pow(2).sum().backward(retain_graph=True)
        first = grads()
        provisional = {r.name: r.grad_norm for r in mon.last}
        y[:, 1:].sum().backward()
        step0 = grads()
        m.zero_grad()
        m(x).pow(3).sum().backward()
        step1 = grads()
    assert provisional == pytest.approx({n: float(g.norm()) for n, g in first.items()}, rel=1e-5)
    assert [s for s, _ in mon.history] == [0, 1]
    for (step, recs), want in zip(mon.history, (step0, step1), strict=True):
        got = {r.name: r.grad_norm for r in recs}
        assert got == pytest.approx({n: float(g.norm()) for n, g in want.items()}, rel=1e-5), step


def test_grad_norms_of_a_frozen_model_is_empty_and_bad_arguments_are_named():
    frozen = nn.Sequential(nn.Linear(4, 4)).requires_grad_(False)
    assert grad_norms(frozen, frozen(torch.randn(2, 4)).sum()) == []
    m = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(NormArgumentError, match="grad_norms: expected loss to be a scalar torch.Tensor.*got float"):
        grad_norms(m, 3.0)
    with pytest.raises(NormArgumentError, match=r"expected loss .*got a tensor of shape \[2, 4\]"):
        grad_norms(m, m(torch.randn(2, 4)))
    with pytest.raises(NormArgumentError, match="grad_norms: expected model to be a torch.nn.Module, got str"):
        grad_norms("x")
    for every in ("10", 2.5, 0, True):
        with pytest.raises(NormArgumentError, match=r"GradientMonitor: expected every to be an int >= 1, got "
                                                    + re.escape(repr(every))):
            GradientMonitor(m, every=every)
    with pytest.raises(NormArgumentError, match="GradientMonitor: expected model"):
        GradientMonitor("x")
