"""Review fixes in normlab.diagnostics: the audit's data-flow findings (double norm, Pre-LN
final norm, dead norm, BatchNorm in a sequence model), the gradient monitor beside
normlab's own gradient probes, per-example norms of frozen norms, and argument checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.diagnostics import (
    AttentionLogitMonitor,
    GradientMonitor,
    NoiseScaleEMA,
    audit,
    grad_norms,
    has_warmup,
    per_example_grad_norms,
    two_batch_estimates,
)
from normlab.errors import NormArgumentError
from tests.diagnostics.helpers import hook_count

pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")


def kinds(findings) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in findings:
        out.setdefault(f.kind, set()).add(f.module)
    return out


def _lm(placement, **kw):
    from normlab.models import TransformerConfig, TransformerLM

    torch.manual_seed(0)
    return TransformerLM(TransformerConfig(vocab_size=32, d_model=16, n_heads=2, n_layers=2, max_seq_len=16,
                                           placement=placement, **kw))


# ------------------------------------------------------------------------ double norm


@pytest.mark.parametrize("placement", ["peri", "sandwich", "pre", "parallel"])
def test_embedding_norm_feeding_the_residual_stream_is_no_double_norm_in_either_mode(placement):
    """The embedding norm's output is the residual stream: block 0's input norm reads it,
    and block 0 also adds to it, so the input norm is no redundant second norm. Found in
    eval mode only (train-mode dropout made a new tensor in between)."""
    model = _lm(placement, embedding_norm=True, dropout=0.1)
    assert kinds(audit(model.train())) == {}
    assert kinds(audit(model.eval())) == {}
    assert not model.training and not any(m.training for m in model.modules())  # modes left as they were
    model.train()
    audit(model)
    assert all(m.training for m in model.modules()) and hook_count(model) == 0


def test_pre_ln_stack_after_an_embedding_layernorm_is_no_double_norm():
    """BLOOM-like: an embedding LayerNorm, then Pre-LN blocks (x + f(ln(x))), frozen."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.emb_ln = nn.Embedding(10, 8), nn.LayerNorm(8)
            self.blocks, self.final = nn.ModuleList([_PreBlock(), _PreBlock()]), nn.LayerNorm(8)

        def forward(self, ids):
            x = self.emb_ln(self.emb(ids))
            for b in self.blocks:
                x = b(x)
            return self.final(x)

    model = Net()
    ids = torch.randint(0, 10, (2, 5))
    assert kinds(audit(model, ids)) == {}
    model.requires_grad_(False)  # the data flow is read the same for a frozen model
    assert kinds(audit(model.eval(), ids)) == {}
    assert not any(p.requires_grad for p in model.parameters())


class _Doubled(nn.Module):
    """n2 normalizes n1's output and nothing else reads it; ``dropout`` between the two:
    None, an nn.Dropout module or F.dropout."""

    def __init__(self, dropout=None):
        super().__init__()
        self.fc, self.n1, self.n2, self.head = nn.Linear(8, 8), nn.LayerNorm(8), nn.LayerNorm(8), nn.Linear(8, 2)
        self.drop, self.kind = nn.Dropout(0.5), dropout

    def forward(self, x):
        h = self.n1(self.fc(x))
        if self.kind == "module":
            h = self.drop(h)
        elif self.kind == "functional":
            h = F.dropout(h, 0.5, self.training)
        return self.head(self.n2(h))


@pytest.mark.parametrize("dropout", [None, "module", "functional"])
def test_a_genuinely_doubled_norm_is_found_in_either_mode(dropout):
    x = torch.randn(2, 3, 8)
    model = _Doubled(dropout)
    assert kinds(audit(model.train(), x)) == {"double-norm": {"n2"}}
    assert kinds(audit(model.eval(), x)) == {"double-norm": {"n2"}}
    frozen = _Doubled(dropout).requires_grad_(False)
    assert kinds(audit(frozen.train(), x)) == {"double-norm": {"n2"}}


def test_torch_post_ln_transformer_double_norm_found_in_either_mode():
    model = nn.Transformer(d_model=16, nhead=2, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=32)
    want = {"double-norm": {"encoder.norm", "decoder.norm"}}
    assert kinds(audit(model.train())) == want
    assert kinds(audit(model.eval())) == want


# ----------------------------------------------------------------- Pre-LN final norm


class _PreBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x):
        return x + self.fc(self.ln(x))


class _ViTAvg(nn.Module):
    """timm/BEiT global_pool="avg": the final norm (fc_norm) reads the pooled stack output."""

    def __init__(self, fc_norm=True):
        super().__init__()
        self.inp, self.blocks, self.head = nn.Linear(8, 8), nn.ModuleList([_PreBlock(), _PreBlock()]), nn.Linear(8, 3)
        self.fc_norm = nn.LayerNorm(8) if fc_norm else nn.Identity()

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = b(x)
        return self.head(self.fc_norm(x[:, 1:].mean(1)))


def test_final_norm_after_pooling_counts_as_the_final_norm():
    x = torch.randn(2, 5, 8)
    assert kinds(audit(_ViTAvg(), x)) == {}
    assert kinds(audit(_ViTAvg().requires_grad_(False), x)) == {}
    assert kinds(audit(_ViTAvg(fc_norm=False), x)) == {"pre-ln-no-final-norm": {"blocks"}}


def test_beit_with_mean_pooling_has_its_final_norm():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BeitConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                  image_size=16, patch_size=8, use_mean_pooling=True)
    torch.manual_seed(0)
    assert [f for f in audit(transformers.BeitModel(cfg)) if f.kind == "pre-ln-no-final-norm"] == []


# -------------------------------------------------------------------------- dead norm


class _Basic(nn.Module):
    """torchvision's BasicBlock with zero_init_residual=True (the residual add in place)."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        nn.init.constant_(self.bn2.weight, 0)

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        out += x
        return torch.relu(out)


class _ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.layer1, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(_Basic(8), _Basic(8)), nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.layer1(self.stem(x)).mean((2, 3)))


def test_zero_init_residual_norm_is_a_warning_a_zero_final_norm_an_error():
    found = audit(_ResNet(), torch.randn(2, 3, 8, 8))
    assert kinds(found) == {"dead-norm": {"layer1.0.bn2", "layer1.1.bn2"}}
    assert all(f.severity == "warning" and "zero-init" in f.message for f in found)

    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    with torch.no_grad():
        model[1].weight.zero_()  # a final norm switched off: the model outputs a constant
    (f,) = audit(model, torch.randn(2, 8))
    assert (f.severity, f.kind, f.module) == ("error", "dead-norm", "1")


# ------------------------------------------------------------------ batchnorm padding


def test_batchnorm_padding_decided_by_module_types_not_names():
    class AZ(nn.Module):  # AlphaZero-style policy/value CNN: a head named "value"
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.policy, self.value = nn.Linear(8 * 5 * 5, 25), nn.Linear(8 * 5 * 5, 1)

        def forward(self, x):
            h = self.body(x).flatten(1)
            return self.policy(h), self.value(h)

    assert kinds(audit(AZ(), torch.randn(2, 3, 5, 5))) == {}

    class SeqBN(nn.Module):  # attention over a sequence, BatchNorm over its positions
        def __init__(self):
            super().__init__()
            self.mix, self.bn = nn.MultiheadAttention(8, 2, batch_first=True), nn.BatchNorm1d(8)

        def forward(self, x):
            return self.bn(self.mix(x, x, x)[0].transpose(1, 2))

    assert kinds(audit(SeqBN(), torch.randn(2, 5, 8))) == {"batchnorm-padding": {"bn"}}
    assert kinds(audit(_lm("pre", norm="batchnorm"))).get("batchnorm-padding") is None  # normlab's own


# --------------------------------------------------------------- gradient monitor


def test_gradient_monitor_skips_normlabs_own_gradient_probe():
    model = _lm("pre", dropout=0.0)
    toks = torch.randint(0, 32, (2, 8))
    name = "blocks.0.attn.q_proj.weight"
    with GradientMonitor(model) as mon:
        loss = model.loss(toks, toks)
        probe = {r.name: r.grad_norm for r in grad_norms(model, loss)}
        loss.backward()
        seen = {r.name: r.grad_norm for r in mon.last}
    true = model.blocks[0].attn.q_proj.weight.grad.norm().item()
    assert seen[name] == pytest.approx(true, rel=1e-5) and probe[name] == pytest.approx(true, rel=1e-5)

    # a user's own torch.autograd.grad in the step (a gradient penalty) is part of the step: counted
    model.zero_grad()
    with GradientMonitor(model) as mon:
        loss = model.loss(toks, toks)
        torch.autograd.grad(loss, [model.blocks[0].attn.q_proj.weight], retain_graph=True)
        loss.backward()
        seen = {r.name: r.grad_norm for r in mon.last}
    assert seen[name] == pytest.approx(2 * true, rel=1e-5)


# ----------------------------------------------------------- per-example, frozen norms


def test_frozen_norm_says_it_is_frozen():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    fresh = per_example_grad_norms(model)
    with pytest.raises(RuntimeError, match="nothing recorded"):
        fresh.batch_grad_sq()  # as total(): no backward, no number
    model[1].requires_grad_(False)
    with per_example_grad_norms(model) as rec:
        model(torch.randn(4, 3, 8)).sum().backward()
    with pytest.raises(KeyError, match=r"'1'.*frozen \(requires_grad=False\)"):
        rec["1"]
    for read in (rec.total, rec.batch_grad_sq):
        with pytest.raises(RuntimeError, match=r"'1'.*frozen \(requires_grad=False\)"):
            read()


# ------------------------------------------------------------------ bad arguments


def test_bad_arguments_raise_norm_argument_error_naming_them():
    with pytest.raises(NormArgumentError, match="AttentionLogitMonitor: expected model to be a torch.nn.Module, got str"):
        AttentionLogitMonitor("model")
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NormArgumentError, match="audit: expected scheduler to be .* got str"):
        audit(model, optimizer=opt, scheduler="cosine")
    with pytest.raises(NormArgumentError, match="audit: expected optimizer to be .* got str"):
        audit(model, optimizer="adam")
    with pytest.raises(NormArgumentError, match="has_warmup: expected optimizer to be .* got str"):
        has_warmup("adam")
    for b_small, b_big in [(0, 4), (-1, 4), (1, math.inf), (1, math.nan)]:
        with pytest.raises(NormArgumentError, match="two_batch_estimates: expected b_small and b_big"):
            two_batch_estimates(1.0, 0.5, b_small, b_big)
    with pytest.raises(NormArgumentError, match="b_small < b_big"):
        two_batch_estimates(1.0, 1.0, 8, 8)
    ema = NoiseScaleEMA()
    good = ema.state_dict()
    for bad in ({**good, "beta": 1.5}, {**good, "beta": -0.1}, {**good, "steps": -1}, {**good, "beta": "x"},
                {k: v for k, v in good.items() if k != "g_sq"}):
        with pytest.raises(NormArgumentError, match="NoiseScaleEMA.load_state_dict: expected"):
            ema.load_state_dict(bad)
    assert ema.state_dict() == good  # a refused state leaves the averages as they were
    ema.load_state_dict({**good, "beta": 0.5, "steps": 3})
    assert ema.beta == 0.5 and ema.steps == 3


# ------------------------------------------------------------------ from a review of the fixes above


@pytest.mark.parametrize("kind", ["torch", "normlab"])
def test_an_all_zero_post_ln_norm_stays_an_error(kind):
    # its output is the residual stream, which the next sublayer reads too: the model's
    # output no longer depends on its input. Downgraded to a warning as "a zero-init
    # residual branch" because a residual add also read it
    if kind == "torch":
        model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, norm_first=False,
                                                                 dropout=0.0), 2, enable_nested_tensor=False)
        norm, example = model.layers[0].norm1, torch.randn(2, 5, 16)
    else:
        model = _lm("post")
        norm, example = model.blocks[0].norms.attn_add, torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        norm.weight.zero_()
    dead = [f for f in audit(model.eval(), example) if f.kind == "dead-norm"]
    assert [f.severity for f in dead] == ["error"], dead


class _EvalRefused(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.LayerNorm(8), nn.LayerNorm(8)

    def forward(self, x):
        if not self.training:
            raise RuntimeError("this model runs in training mode only")
        return self.b(self.a(x))


def test_a_forward_that_refuses_eval_mode_is_traced_as_the_model_was_left():
    model = _EvalRefused().train()
    assert kinds(audit(model, torch.randn(2, 8))) == {"double-norm": {"b"}}
    assert model.training and model.a.training


def test_a_cut_short_graph_walk_finds_no_double_norm(monkeypatch):
    # readers past the walk's limit are unknown: "nothing else reads it" cannot be told
    import importlib

    audit_module = importlib.import_module("normlab.diagnostics.audit")

    class Net(nn.Module):  # an embedding norm feeding Pre-LN blocks (no double norm)
        def __init__(self):
            super().__init__()
            self.emb_ln, self.blocks = nn.LayerNorm(8), nn.ModuleList([_PreBlock(), _PreBlock()])

        def forward(self, x):
            x = self.emb_ln(x)
            for b in self.blocks:
                x = b(x)
            return x

    monkeypatch.setattr(audit_module, "_GRAPH_LIMIT", 3)
    assert "double-norm" not in kinds(audit(Net(), torch.randn(2, 5, 8)))
