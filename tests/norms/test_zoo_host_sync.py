"""The sequence batch norms read no value back to the host on an unmasked training
step (torch's BatchNorm reads none), the registry passes eps through **kw, and a
registered norm's module can be reloaded."""
import importlib

import pytest
import torch
from torch import nn

import normlab
from normlab.norms import MaskedBatchNorm, PowerNorm
from normlab.norms.registry import _REGISTRY, register_norm


def _count_items(monkeypatch) -> list:
    """Every read of a tensor's value on the host: item(), float(), int(), bool(), tolist()."""
    calls = []
    for name in ("item", "__float__", "__int__", "__bool__", "__index__", "tolist"):
        real = getattr(torch.Tensor, name)

        def read(self, *a, _real=real, _name=name):
            calls.append(_name)
            return _real(self, *a)

        monkeypatch.setattr(torch.Tensor, name, read)
    return calls


@pytest.mark.parametrize("cls, kw", [(MaskedBatchNorm, {}), (MaskedBatchNorm, {"momentum": None}),
                                     (PowerNorm, {})])
def test_unmasked_training_step_reads_nothing_back(monkeypatch, cls, kw):
    norm = cls(6, **kw).train()
    x = torch.randn(3, 5, 6)
    calls = _count_items(monkeypatch)
    for _ in range(3):
        norm(x).sum().backward()
    assert calls == []


@pytest.mark.parametrize("cls", [MaskedBatchNorm, PowerNorm])
def test_masked_training_step_still_checks_its_count(cls):
    norm = cls(4).train()
    x = torch.randn(1, 3, 4)
    mask = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(normlab.NormArgumentError, match="real \\(unpadded\\) position"):
        norm(x, padding_mask=mask)


def test_masked_batchnorm_unmasked_count_checked():
    with pytest.raises(normlab.NormArgumentError, match="more than 1 real"):
        MaskedBatchNorm(4).train()(torch.randn(1, 4))


def test_masked_batchnorm_momentum_none_is_the_cumulative_average():
    torch.manual_seed(0)
    norm, ref = MaskedBatchNorm(5, momentum=None).train(), nn.BatchNorm1d(5, momentum=None).train()
    for _ in range(4):
        x = torch.randn(3, 4, 5)
        norm(x)
        ref(x.reshape(-1, 5))
    torch.testing.assert_close(norm.running_mean, ref.running_mean)
    torch.testing.assert_close(norm.running_var, ref.running_var)


def test_masked_batchnorm_exported_with_dynamic_shapes_keeps_the_count_check():
    from torch.export import Dim

    ep = torch.export.export(MaskedBatchNorm(8).train(), (torch.randn(4, 5, 8),),
                             dynamic_shapes={"x": {0: Dim("b", min=1), 1: Dim("s", min=1)}})
    ep.module()(torch.randn(2, 3, 8))
    with pytest.raises(RuntimeError):
        ep.module()(torch.randn(1, 1, 8))


def _powernorm_ref_steps(x_steps, dim, warmup, alpha):
    """Shen et al.'s Algorithm 2 forward statistics in float64: phi divided by at each step."""
    running = torch.ones(dim, dtype=torch.float64)
    out = []
    for t, x in enumerate(x_steps, start=1):
        batch = x.double().reshape(-1, dim).square().mean(0)
        if t <= warmup:
            out.append(batch)
            running = running * (t - 1) / t + batch / t
        else:
            out.append(running.clone())
            running = alpha * running + (1 - alpha) * batch
    return out, running


@pytest.mark.parametrize("warmup", [0, 2])
def test_powernorm_warmup_switch_on_device_matches_algorithm(warmup):
    torch.manual_seed(0)
    dim, alpha = 5, 0.9
    norm = PowerNorm(dim, warmup_iters=warmup, alpha_fwd=alpha, affine=False, dtype=torch.float64).train()
    xs = [torch.randn(4, 3, dim, dtype=torch.float64) * (i + 1) for i in range(5)]
    phis, running = _powernorm_ref_steps(xs, dim, warmup, alpha)
    for x, phi in zip(xs, phis):
        y = norm(x)
        torch.testing.assert_close(y, x / torch.sqrt(phi + norm.eps), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norm.running_phi, running, rtol=1e-12, atol=1e-12)
    assert int(norm.iters) == 5


def test_powernorm_fullgraph_compile_names_the_training_step():
    torch._dynamo.reset()
    compiled = torch.compile(PowerNorm(8).train(), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="PowerNorm's training-mode step"):
        compiled(torch.randn(2, 8))
    torch._dynamo.reset()


def test_build_norm_passes_eps_through_var_keyword():
    name = "test-kw-norm"

    class KwNorm(nn.LayerNorm):
        def __init__(self, dim, **kw):
            super().__init__(dim, **kw)

    try:
        register_norm(name)(KwNorm)
        assert normlab.build_norm(name, 8, eps=0.5).eps == 0.5
        assert normlab.build_norm(name, 8).eps == 1e-5
    finally:
        _REGISTRY.pop(name, None)


def test_register_norm_refuses_another_class_under_a_taken_name():
    class Other(nn.LayerNorm):
        pass

    with pytest.raises(ValueError, match="'scalenorm' is already registered \\(normlab.norms.zoo.ScaleNorm\\)"):
        register_norm("scalenorm")(Other)


def test_reloading_a_module_that_registers_norms_works(tmp_path, monkeypatch):
    (tmp_path / "my_norms_mod.py").write_text(
        "from torch import nn\n"
        "from normlab.norms.registry import register_norm\n"
        "@register_norm('test-reloaded-norm')\n"
        "class Reloaded(nn.LayerNorm):\n"
        "    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        mod = importlib.import_module("my_norms_mod")
        mod = importlib.reload(mod)  # as a notebook's autoreload does
        assert type(normlab.build_norm("test-reloaded-norm", 4)) is mod.Reloaded
    finally:
        _REGISTRY.pop("test-reloaded-norm", None)
        import sys
        sys.modules.pop("my_norms_mod", None)


def test_build_norm_keeps_eps_from_a_var_keyword_that_reaches_none():
    name = "test-factory-kw-norm"

    class FactoryKw(nn.Module):  # (a DyT-like norm: its **kw are factory kwargs)
        def __init__(self, dim, alpha_init=0.5, **factory_kwargs):
            super().__init__()
            self.alpha = nn.Parameter(torch.full((), alpha_init, **factory_kwargs))

        def forward(self, x):
            return torch.tanh(self.alpha * x)

    try:
        register_norm(name)(FactoryKw)
        assert isinstance(normlab.build_norm(name, 8, eps=1e-5), FactoryKw)
        from normlab.models import TransformerConfig, TransformerLM

        TransformerLM(TransformerConfig(vocab_size=10, d_model=8, n_heads=2, n_layers=1, norm=name))
    finally:
        _REGISTRY.pop(name, None)
