"""A placement whose norm slots the Block does not run is refused when the model is built
(its norms would hold parameters that never touch the output); norm_options refuses
factory arguments and values the saved config cannot hold; an offset needs a weight."""

from __future__ import annotations

import json

import pytest
import torch

import normlab
from normlab.errors import NormArgumentError
from normlab.models import Placement, TransformerConfig, TransformerLM, register_placement
from normlab.models.placement import _PLACEMENTS


@pytest.fixture
def register():
    """Register a placement for one test; the registry is as it was afterwards."""
    names = []

    def add(name, **attrs):
        register_placement(name)(type(f"P_{name}", (Placement,), attrs))
        names.append(name)
        return name

    yield add
    for name in names:
        _PLACEMENTS.pop(name, None)


def _cfg(placement, **kw):
    return TransformerConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1, dropout=0.0, placement=placement,
                             max_seq_len=8, **kw)


@pytest.mark.parametrize("name,attrs,match", [
    ("review6_in_and_add", {"slots": ("in", "add")}, "declares both 'in' and 'add'"),
    ("review6_typo", {"slots": ("inn",)}, "declares 'inn', not a norm slot"),
    ("review6_dual_without_add", {"slots": ("in",), "final_norm": True, "final_norm_reads": "dual"},
     "dual stream"),
])
def test_a_placement_whose_norms_would_never_run_is_refused(register, name, attrs, match):
    with pytest.raises(ValueError, match=match):
        TransformerLM(_cfg(register(name, **attrs)))


def test_every_registered_placement_still_builds_and_each_norm_changes_the_output():
    tok = torch.randint(0, 11, (1, 5))
    for name in ("post", "pre", "sandwich", "deepnorm", "subln", "resi_dual", "peri", "olmo2", "parallel"):
        torch.manual_seed(0)
        lm = TransformerLM(_cfg(name)).eval()
        y0 = lm(tok)
        for key, norm in lm.blocks[0].norms.items():
            with torch.no_grad():
                norm.weight.mul_(3.0)
                changed = (lm(tok) - y0).abs().max().item()
                norm.weight.div_(3.0)
            assert changed > 0, (name, key)


@pytest.mark.parametrize("options,match", [
    ({"dtype": torch.float64}, "norm_options sets dtype"),
    ({"device": "meta"}, "norm_options sets device"),
    ({"dtype": torch.float64, "device": "cpu"}, "sets device and dtype"),
])
def test_norm_options_refuse_factory_arguments(options, match):
    with pytest.raises(ValueError, match=match):
        _cfg("pre", norm_options=options)


def test_norm_options_must_be_writable_as_json():
    class Opaque:
        pass

    with pytest.raises(ValueError, match="JSON can write"):
        _cfg("pre", norm="rmsnorm", norm_options={"offset": 1.0, "extra": Opaque()})
    cfg = _cfg("pre", norm="rmsnorm", norm_options={"offset": 1.0, "casting_mode": "gemma"})
    assert json.loads(json.dumps(cfg.norm_options)) == {"offset": 1.0, "casting_mode": "gemma"}


@pytest.mark.parametrize("cls", [normlab.LayerNorm, normlab.RMSNorm])
def test_an_offset_without_a_weight_is_refused(cls):
    with pytest.raises(NormArgumentError, match=r"offset=0\.5 shifts the weight .* elementwise_affine=False"):
        cls(8, elementwise_affine=False, offset=0.5)
    assert cls(8, elementwise_affine=False, offset=0.0).weight is None
    norm = cls(8, offset=1.0)
    x = torch.randn(2, 8)
    plain = cls(8)
    torch.testing.assert_close(norm(x), plain(x))  # the offset keeps gain 1 at init
