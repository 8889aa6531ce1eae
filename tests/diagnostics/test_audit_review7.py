"""audit on lazy modules, inference mode, forwards that update a frozen parameter, the
identity norm, a norm on a slice of a norm's output, parameter-free float64 norms, and
optimizers with a warm-up built in."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab
from normlab.diagnostics import audit
from normlab.diagnostics.audit import has_warmup
from normlab.errors import NormArgumentError


def _kinds(findings):
    return sorted((f.kind, f.module) for f in findings)


class _LazyFc(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.norm, self.out = nn.LazyLinear(16), nn.LayerNorm(16), nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.norm(self.fc(x)))


@pytest.mark.parametrize("make", [_LazyFc, lambda: nn.Sequential(nn.Linear(8, 16), nn.LazyBatchNorm1d(),
                                                                  nn.ReLU(), nn.Linear(16, 4))])
def test_a_lazy_module_is_refused_and_left_uninitialized(make):
    m = make()
    with pytest.raises(NormArgumentError, match="uninitialized \\(a lazy module"):
        audit(m, torch.randn(4, 8))
    assert any(isinstance(p, nn.parameter.UninitializedParameter) for p in m.parameters())
    m(torch.randn(3, 8))  # still takes its first real input


def test_a_materialized_lazy_module_is_audited():
    m = _LazyFc()
    m(torch.randn(3, 10))
    assert audit(m, torch.randn(2, 10)) == []


class _Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.norm = nn.Linear(8, 8), nn.LayerNorm(8)
        self.count = nn.Parameter(torch.zeros(()), requires_grad=False)

    def forward(self, x):
        self.count.add_(1)
        return self.norm(self.fc(x))


def test_a_forward_updating_a_frozen_parameter_leaves_it_as_it_was():
    m = _Counter()
    audit(m, torch.randn(2, 8))
    assert m.count.item() == 0.0 and not m.count.requires_grad
    m(torch.randn(2, 8))
    assert m.count.item() == 1.0  # (the parameter is the model's own, still updated by its forward)


class _NoFinalNorm(nn.Module):
    """A Pre-LN stack without a final norm: its finding needs the traced data flow."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True,
                                                               norm_first=True) for _ in range(2))

    def forward(self, x):
        for la in self.layers:
            x = la(x)
        return x


def test_inference_mode_traces_as_grad_mode_does():
    m = _NoFinalNorm()
    x = torch.randn(2, 5, 16)
    want = _kinds(audit(m, x))
    assert ("pre-ln-no-final-norm", "layers") in want
    with torch.inference_mode():
        got = _kinds(audit(m, x))
        xi = torch.randn(2, 5, 16)  # an inference tensor given as the input
        assert _kinds(audit(m, xi)) == want
    assert got == want


def test_the_identity_norm_is_no_double_norm_of_itself():
    assert audit(nn.Sequential(nn.Linear(8, 8), normlab.build_norm("none", 8)), torch.randn(2, 8)) == []
    m = nn.Sequential(nn.Linear(8, 8), normlab.build_norm("none", 8), nn.LayerNorm(8))
    assert "double-norm" not in [f.kind for f in audit(m, torch.randn(2, 8))]


class _Head(nn.Module):
    def __init__(self, last_token: bool, feature_slice: bool = False):
        super().__init__()
        self.fc, self.norm, self.head_norm, self.out = nn.Linear(8, 8), nn.LayerNorm(8), nn.LayerNorm(8), nn.Linear(8, 3)
        self.last_token, self.feature_slice = last_token, feature_slice
        if feature_slice:
            self.head_norm = nn.LayerNorm(4)
            self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = self.norm(self.fc(x))
        if self.feature_slice:
            return self.out(self.head_norm(h[..., :4]))
        return self.out(self.head_norm(h[:, -1] if self.last_token else h))


@pytest.mark.parametrize("last_token", [False, True])
def test_a_norm_on_rows_of_a_norms_output_is_a_double_norm(last_token):
    found = [(f.kind, f.module) for f in audit(_Head(last_token), torch.randn(2, 5, 8))]
    assert ("double-norm", "head_norm") in found


def test_a_norm_on_part_of_each_row_is_no_double_norm():
    # h[..., :4] is not normalized over its 4 features: normalizing it again is no rescaling
    assert "double-norm" not in [f.kind for f in audit(_Head(False, feature_slice=True), torch.randn(2, 5, 8))]


def test_a_parameter_free_float64_norm_judges_eps_in_float64():
    m = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8, eps=1e-50, elementwise_affine=False)).double()
    assert audit(m, torch.randn(2, 8, dtype=torch.float64)) == []
    assert audit(m) == []  # (no input given: the model's dtype)
    m32 = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8, eps=1e-50, elementwise_affine=False))
    assert [f.kind for f in audit(m32, torch.randn(2, 8))] == ["eps-underflow"]


def test_a_dead_rmsnorm_is_said_to_output_zeros():
    m = nn.Sequential(nn.Linear(8, 8), nn.RMSNorm(8), nn.Linear(8, 2))
    with torch.no_grad():
        m[1].weight.zero_()
    (f,) = [f for f in audit(m, torch.randn(2, 8)) if f.kind == "dead-norm"]
    assert "outputs zeros" in f.message and "bias" not in f.message.split(":")[1]


def test_adafactor_with_warmup_init_has_a_warmup():
    transformers = pytest.importorskip("transformers")
    params = [nn.Parameter(torch.zeros(3))]
    assert has_warmup(transformers.optimization.Adafactor(params, lr=None, relative_step=True, warmup_init=True))
    assert not has_warmup(transformers.optimization.Adafactor(params, lr=None, relative_step=True,
                                                              warmup_init=False))


class _PreLN(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln, self.fc = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, h):
        return h + self.fc(self.ln(h))


class _EmbNormStream(nn.Module):
    """An embedding norm whose output, flattened to rows, is the residual stream."""

    def __init__(self, view: bool):
        super().__init__()
        self.view = view
        self.emb, self.emb_norm = nn.Embedding(50, 16), nn.LayerNorm(16)
        self.blocks = nn.ModuleList(_PreLN(16) for _ in range(2))
        self.final, self.head = nn.LayerNorm(16), nn.Linear(16, 50)

    def forward(self, idx):
        h = self.emb_norm(self.emb(idx))
        if self.view:
            h = h.flatten(0, 1)
        for b in self.blocks:
            h = b(h)
        return self.head(self.final(h))


@pytest.mark.parametrize("view", [False, True])
def test_a_view_of_a_norms_output_that_is_the_stream_is_no_double_norm(view):
    assert audit(_EmbNormStream(view), torch.randint(0, 50, (2, 8))) == []


class _FrozenTwoNorms(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.n1, self.n2, self.head = nn.Linear(8, 8), nn.LayerNorm(8), nn.LayerNorm(8), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.n2(self.n1(self.fc(x))))


def test_a_model_built_under_inference_mode_is_traced():
    with torch.inference_mode():
        m = _FrozenTwoNorms().eval().requires_grad_(False)
    assert [(f.kind, f.module) for f in audit(m, torch.randn(2, 8))] == [("double-norm", "n2")]


def test_a_failed_forward_copies_no_parameter(monkeypatch):
    m = _FrozenTwoNorms().requires_grad_(False)
    clones = []
    real = torch.Tensor.clone

    def clone(self, *a, **k):
        clones.append(tuple(self.shape))
        return real(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "clone", clone)
    findings = audit(m, torch.randn(2, 5))  # the wrong width: the forward fails
    monkeypatch.undo()
    assert [f.kind for f in findings] == ["no-trace"]
    assert (8, 8) not in clones  # (the Linear weights were not copied)
