"""per_example_grad_norms against torch.func.vmap(torch.func.grad(...))."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import normlab
from normlab.diagnostics import per_example_grad_norms
from normlab.errors import NormArgumentError
from tests.diagnostics.helpers import hook_count
from tests.diagnostics.torch_models import VOCAB, torch_lm

NORMS = {
    "torch.LayerNorm": nn.LayerNorm,
    "torch.RMSNorm": nn.RMSNorm,
    "normlab.LayerNorm": normlab.LayerNorm,
    "normlab.RMSNorm": normlab.RMSNorm,
}


def _padded_batch(lengths, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (len(lengths), t + 1), generator=g)
    pad = torch.arange(t + 1)[None, :] >= torch.tensor(lengths)[:, None]  # True = padded
    tokens = tokens.masked_fill(pad, 0)
    return tokens, pad


def _example_loss(model, tokens, pad):
    """Per-example loss [B]: mean next-byte cross-entropy over the example's real targets."""
    logits = model(tokens[:, :-1], padding_mask=pad[:, :-1])
    ce = nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    real = (~pad[:, 1:]).float()
    return (ce * real).sum(1) / real.sum(1)


def _randomize_norms(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))


def _vmap_per_example_sq(model, tokens, pad):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, tok, pd):
        return _example_loss(lambda *a, **kw: functional_call(model, p, a, kw), tok[None], pd[None])[0]

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, tokens, pad)
    return {k: g.flatten(1).square().sum(1) for k, g in grads.items()}


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("norm", list(NORMS), ids=list(NORMS))
def test_matches_vmap_grad_with_padding(norm):
    model = torch_lm("pre", n_layers=2, d_model=16, n_heads=2, seed=0, norm=NORMS[norm])
    _randomize_norms(model)
    tokens, pad = _padded_batch([9, 4, 7, 2], t=9)
    with per_example_grad_norms(model) as rec:
        _example_loss(model, tokens, pad).sum().backward()
    expected = _vmap_per_example_sq(model, tokens, pad)
    norm_names = [n for n, m in model.named_modules() if isinstance(m, NORMS[norm])]
    assert sorted(rec) == sorted(norm_names) and len(norm_names) == 5
    total = torch.zeros(4)
    for name in norm_names:
        params = dict(model.get_submodule(name).named_parameters())
        assert sorted(rec[name]) == sorted(params)  # "bias" only where the norm has one
        for pname in params:
            got = rec[name][pname]
            assert got.dtype == torch.float32 and got.shape == (4,)
            torch.testing.assert_close(got, expected[f"{name}.{pname}"], rtol=1e-5, atol=1e-10)
            total += got
    torch.testing.assert_close(rec.total(), total, rtol=1e-6, atol=0)
    # the batch gradient of this backward over the same parameters
    batch_sq = sum(float(p.grad.square().sum()) for n in norm_names
                   for p in model.get_submodule(n).parameters())
    assert rec.batch_grad_sq() == pytest.approx(batch_sq, rel=1e-5)


def test_padding_contributes_nothing():
    """A padded example's norms equal those of the same example alone, without padding."""
    model = torch_lm("post", n_layers=2, d_model=16, n_heads=2, seed=3)
    _randomize_norms(model)
    tokens, pad = _padded_batch([9, 5], t=9, seed=4)
    with per_example_grad_norms(model) as rec:
        _example_loss(model, tokens, pad).sum().backward()
    padded = rec["blocks.1.norm2"]["weight"][1]
    with per_example_grad_norms(model) as alone:
        _example_loss(model, tokens[1:, :5], pad[1:, :5]).sum().backward()
    torch.testing.assert_close(padded, alone["blocks.1.norm2"]["weight"][0], rtol=1e-4, atol=0)
    assert padded > 0


@pytest.mark.parametrize("cls", [normlab.LayerNorm, normlab.RMSNorm])
def test_normlab_norm_with_residual(cls):
    """norm(x, residual) normalizes residual + x: the recorded norms use that sum."""
    torch.manual_seed(0)
    norm = cls(8)
    _randomize_norms(norm)
    x, r = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    c = torch.randn(3, 5, 8)

    def loss_b(p, xb, rb, cb):
        out, _ = functional_call(norm, p, (xb, rb))
        return (out * cb).sum()

    params = {k: v.detach() for k, v in norm.named_parameters()}
    expected = vmap(grad(loss_b), in_dims=(None, 0, 0, 0))(params, x, r, c)
    with per_example_grad_norms(norm) as rec:
        out, new_res = norm(x, r)
        (out * c).sum().backward()
    for pname, g in expected.items():
        torch.testing.assert_close(rec[""][pname], g.square().sum(1), rtol=1e-5, atol=1e-10)


class _SharedNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.norm(x) * 2)


class _TransposedNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.LayerNorm(8), nn.LayerNorm(8)

    def forward(self, x):  # b sees time along dim 0
        return self.a(x) + self.b(x.transpose(0, 1)).transpose(0, 1)


def test_errors_shared_norm_batch_mismatch_and_no_forward():
    m = _SharedNorm()
    with pytest.raises(RuntimeError, match="called more than once"):
        with per_example_grad_norms(m):
            m(torch.randn(2, 3, 8)).sum().backward()
    m = _TransposedNorm()
    with pytest.raises(RuntimeError, match="batch of"):
        with per_example_grad_norms(m):
            m(torch.randn(2, 3, 8)).sum().backward()
    m = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    loss = m(torch.randn(2, 8)).sum()
    with per_example_grad_norms(m) as rec:
        loss.backward()  # the forward ran outside the context
    with pytest.raises(KeyError, match="run the forward and the backward inside"):
        rec["1"]
    with pytest.raises(KeyError, match="not a LayerNorm/RMSNorm"):
        rec["0"]


def test_forward_without_backward_then_new_step_is_fine():
    """A dropped graph (forward, no backward) does not count as a shared call."""
    m = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    with per_example_grad_norms(m) as rec:
        m(torch.randn(2, 4, 8)).sum()       # graph dropped
        m(torch.randn(3, 4, 8)).square().sum().backward()
    assert rec["1"]["weight"].shape == (3,) and bool((rec["1"]["weight"] > 0).all())


def test_public_ops_carry_no_per_example_buffer_and_the_variants_do():
    import inspect

    import normlab.diagnostics.per_example as per_example
    from normlab import functional

    for name in ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"):
        assert "per_example_grad_sq" not in inspect.signature(getattr(functional, name)).parameters, name
        assert "per_example_grad_sq" in inspect.signature(getattr(per_example, name)).parameters, name


@pytest.mark.parametrize("make", [
    lambda: normlab.RMSNorm(8, offset=1.0, casting_mode="gemma"),
    lambda: normlab.RMSNorm(8, casting_mode="llama"),
    lambda: normlab.LayerNorm(8, offset=1.0),
    lambda: normlab.LayerNorm(4, bias=False, weight_shape=(2, 4)),
], ids=["gemma", "llama", "layernorm1p", "per-head"])
def test_norms_with_options_the_fused_backward_lacks_are_recorded_by_hooks(make):
    """Gemma's, Llama's and Cohere's swapped norms: per-example weight gradients from
    hooks, against torch.func's per-example gradients of the weight."""
    torch.manual_seed(0)
    norm = make()
    with torch.no_grad():
        for p in norm.parameters():
            p.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 8) if norm.weight.dim() == 1 and norm.weight.shape[0] == 8 else torch.randn(3, 5, 2, 4)
    target = torch.randn_like(x)
    with per_example_grad_norms(norm) as rec:
        loss = ((norm(x) - target) ** 2).sum()
        loss.backward()
    params = dict(norm.named_parameters())

    def loss_one(p, xb, tb):
        out = torch.func.functional_call(norm, p, (xb[None],))
        return ((out - tb[None]) ** 2).sum()

    grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, x, target)
    expected = grads["weight"].flatten(1).double().square().sum(1)
    torch.testing.assert_close(rec[""]["weight"].double(), expected, rtol=1e-4, atol=1e-6)
    if "bias" in params:
        torch.testing.assert_close(rec[""]["bias"].double(), grads["bias"].flatten(1).double().square().sum(1),
                                   rtol=1e-4, atol=1e-6)


def test_a_model_without_a_covered_norm_says_so():
    # e.g. an unswapped Hugging Face model, whose norms are its own classes: the error says
    # which norms are covered and how to swap them, not "run the backward inside"
    class OwnNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8))

        def forward(self, x):
            return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * self.weight

    model = nn.Sequential(nn.Linear(8, 8), OwnNorm())
    with per_example_grad_norms(model) as norms:
        model(torch.randn(4, 8)).sum().backward()
    with pytest.raises(RuntimeError, match=r"no norm this covers .*apply_normlab\(model\)"):
        norms.total()


# ------------------------------------------- shared parameters, batch_first=False layers


class _Tied(nn.Module):
    """Two norm modules holding one weight and one bias (n2.weight = n1.weight)."""

    def __init__(self, cls, tie_bias=True):
        super().__init__()
        self.lin, self.n1, self.n2 = nn.Linear(8, 8), cls(8), cls(8)
        self.n2.weight = self.n1.weight
        if tie_bias:
            self.n2.bias = self.n1.bias

    def forward(self, x):
        return self.n2(self.lin(self.n1(x)))


@pytest.mark.parametrize("cls", [nn.LayerNorm, normlab.LayerNorm])
def test_a_parameter_shared_between_norms_is_refused(cls):
    """The per-example gradient of a shared weight is |g_b(n1) + g_b(n2)|^2, which the
    per-module squared norms cannot give (the old code reported |a|^2 + |b|^2, and counted
    the batch gradient twice): entering the context refuses, naming the parameter."""
    m = _Tied(cls)
    with pytest.raises(NormArgumentError, match=r"'n1\.weight' is shared with 'n2\.weight'"):
        with per_example_grad_norms(m):
            m(torch.randn(3, 8)).sum().backward()
    assert hook_count(m) == 0
    m = _Tied(cls, tie_bias=False)
    m.n1.weight.requires_grad_(False)  # a frozen shared weight has nothing to record
    with per_example_grad_norms(m) as rec:
        m(torch.randn(3, 8)).sum().backward()
    assert sorted(rec) == ["n1", "n2"] and all(list(r) == ["bias"] for _, r in rec.items())


def test_a_norm_registered_under_two_names_is_one_norm():
    """One module reachable under two paths (an alias, not a tie) is recorded once, with
    one gradient hook per parameter: the numbers match single-example backward passes."""
    torch.manual_seed(0)

    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.norm, self.out = nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8)
            self.final_norm = self.norm  # the same module again, called once

        def forward(self, x):
            return self.out(self.final_norm(self.lin(x)))

    m = Aliased()
    _randomize_norms(m)
    x = torch.randn(4, 8)
    with per_example_grad_norms(m) as rec:
        m(x).pow(2).sum().backward()
    params = list(m.norm.parameters())
    want = []
    for b in range(4):
        gs = torch.autograd.grad(m(x[b:b + 1]).pow(2).sum(), params)
        want.append(sum(float(g.double().square().sum()) for g in gs))
    assert list(rec) == ["norm"]
    torch.testing.assert_close(rec.total().double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=0)
    assert rec.batch_grad_sq() == pytest.approx(sum(float(p.grad.square().sum()) for p in params), rel=1e-5)


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
def test_batch_first_false_torch_layers_are_refused():
    """torch's layers with batch_first=False feed their norms [T, B, D]: dim 0 is time,
    which the old code recorded as T examples."""
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)  # batch_first=False
    with pytest.raises(NormArgumentError, match=r"the model is a TransformerEncoderLayer with "
                                                r"batch_first=False.*'norm1', 'norm2'.*expected the example"):
        with per_example_grad_norms(layer):
            layer(torch.randn(5, 3, 8)).sum().backward()
    assert hook_count(layer) == 0
    model = nn.Transformer(8, 2, 1, 1, 16, dropout=0.0)
    with pytest.raises(NormArgumentError, match=r"'encoder' is a TransformerEncoder .*'encoder\.norm'"):
        per_example_grad_norms(model).attach()
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    with per_example_grad_norms(layer) as rec:
        layer(torch.randn(3, 5, 8)).sum().backward()
    assert rec.total().shape == (3,)


class _Identity(nn.Module):
    def forward(self, w):
        return w * 1.0  # a new tensor at each access, as every parametrization but the identity's


def test_a_parametrized_norm_weight_is_refused_naming_the_norm():
    # the hooks read the computed weight (weight = f(original)): its per-example gradients,
    # not the trained parameter's, and no batch gradient at all. (Before, the shared-
    # parameter check raised a bare KeyError on it.)
    from torch.nn.utils import parametrize

    m = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    parametrize.register_parametrization(m[1], "weight", _Identity())
    with pytest.raises(NormArgumentError, match="norm '1' has a parametrized weight .*remove_parametrizations"):
        per_example_grad_norms(m).attach()
    parametrize.remove_parametrizations(m[1], "weight")
    with per_example_grad_norms(m) as rec:
        m(torch.randn(4, 3)).square().sum().backward()
    assert set(rec["1"]) == {"weight", "bias"}
