"""TransformerConfig: clear ValueErrors for bad values, resolved defaults, dict round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest

from normlab import norm_names
from normlab.models import TransformerConfig, placement_names


@pytest.mark.parametrize("kw,match", [
    ({"d_model": 30, "n_heads": 4}, r"d_model to be divisible by n_heads, got d_model=30, n_heads=4"),
    ({"dropout": -0.1}, r"dropout in \[0, 1\), got -0.1"),
    ({"dropout": 1.0}, r"dropout in \[0, 1\), got 1.0"),
    ({"attention_dropout": -1}, r"attention_dropout in \[0, 1\)"),
    ({"n_layers": 0}, r"n_layers to be an int >= 1, got 0"),
    ({"n_heads": 2.0}, r"n_heads to be an int >= 1, got 2.0"),
    ({"vocab_size": True}, r"vocab_size to be an int >= 1, got True"),
    ({"n_decoder_layers": -2}, r"n_decoder_layers to be an int >= 1"),
    ({"d_ff": 0}, r"d_ff to be an int >= 1"),
    ({"max_seq_len": 0}, r"max_seq_len"),
    ({"norm_eps": -1e-5}, r"norm_eps to be None or a finite number >= 0"),
    ({"residual_scale": 0.0}, r"residual_scale to be a finite number > 0"),
    ({"residual_scale": float("nan")}, r"residual_scale"),
    ({"positional": "alibi"}, r"unknown positional 'alibi'; expected one of: learned, sinusoidal, rope"),
    ({"init": "kaiming"}, r"unknown init 'kaiming'; expected one of: xavier, gpt2"),
    ({"activation": "swish"}, r"unknown activation 'swish'"),
    ({"positional": "rope", "d_model": 12, "n_heads": 4}, r"even head dim"),
    ({"tie_embeddings": 1}, r"tie_embeddings to be a bool"),
    ({"qk_norm": "l2"}, r"unknown qk_norm 'l2'; expected None or one of: rmsnorm, layernorm"),
    ({"qk_norm": "dyt"}, r"unknown qk_norm 'dyt'"),
    ({"qk_norm": True}, r"unknown qk_norm True"),
    ({"placement_options": [("shared_norm", True)], "placement": "parallel"},
     r"expected placement_options to be None or a dict of keyword arguments"),
    ({"placement_options": {"shared_norm": False}},
     r"unknown placement_options key\(s\) 'shared_norm' for placement 'pre'; expected any of: none \(it takes no options\)"),
    ({"placement_options": {"shared": False}, "placement": "parallel"},
     r"unknown placement_options key\(s\) 'shared' for placement 'parallel'; expected any of: shared_norm"),
    ({"placement_options": {"shared_norm": "no"}, "placement": "parallel"},
     r"placement_options \{'shared_norm': 'no'\} do not fit placement 'parallel': .*shared_norm to be a bool"),
    ({"placement_options": {"alpha": 1.0}, "placement": "deepnorm"}, r"unknown placement_options key\(s\) 'alpha'"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        TransformerConfig(**kw)


def test_unknown_norm_lists_valid_names():
    with pytest.raises(ValueError, match="unknown norm 'groupnorm'") as err:
        TransformerConfig(norm="groupnorm")
    for name in norm_names():
        assert name in str(err.value)


def test_unknown_placement_lists_valid_names():
    with pytest.raises(ValueError, match="unknown placement 'prenorm'") as err:
        TransformerConfig(placement="prenorm")
    for name in placement_names():
        assert name in str(err.value)


def test_defaults_are_resolved_and_recorded():
    cfg = TransformerConfig(d_model=64, n_layers=3)
    assert cfg.d_ff == 256 and cfg.n_decoder_layers == 3 and cfg.head_dim == 16
    assert cfg.init == "xavier" and cfg.placement == "pre" and cfg.embedding_norm is False


def test_every_norm_and_placement_is_accepted():
    for norm in norm_names():
        for placement in placement_names():
            assert TransformerConfig(norm=norm, placement=placement).placement == placement


def test_dict_round_trip_through_json():
    cfg = TransformerConfig(vocab_size=99, d_model=48, n_heads=3, placement="deepnorm", norm="rmsnorm",
                            norm_eps=None, residual_scale=0.5, init="gpt2", positional="rope")
    again = TransformerConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert set(cfg.to_dict()) == {f.name for f in dataclasses.fields(TransformerConfig)}


@pytest.mark.parametrize("kw", [
    {"placement": "parallel", "placement_options": {"shared_norm": False}, "qk_norm": "rmsnorm"},
    {"placement": "parallel", "placement_options": {}, "qk_norm": "layernorm"},
    {"placement": "olmo2", "qk_norm": None},
])
def test_new_fields_round_trip_through_json(kw):
    cfg = TransformerConfig(d_model=32, n_heads=2, **kw)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["placement_options"] == kw.get("placement_options") and d["qk_norm"] == kw["qk_norm"]
    assert TransformerConfig.from_dict(d) == cfg


def test_new_fields_defaults_and_copies():
    cfg = TransformerConfig()
    assert cfg.qk_norm is None and cfg.placement_options is None
    opts = {"shared_norm": False}
    cfg = TransformerConfig(placement="parallel", placement_options=opts)
    opts["shared_norm"] = True  # the config keeps its own copy
    assert cfg.placement_options == {"shared_norm": False}
    with pytest.raises(ValueError, match="unknown placement_options key"):
        dataclasses.replace(cfg, placement="pre")  # the options are checked against the new placement


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown field.*n_layer\\b.*expected any of"):
        TransformerConfig.from_dict({"n_layer": 2})


def test_config_is_frozen_and_replace_revalidates():
    cfg = TransformerConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 8
    with pytest.raises(ValueError, match="divisible"):
        dataclasses.replace(cfg, n_heads=3)
