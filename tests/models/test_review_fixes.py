"""Config numbers as plain builtins, QK-norm width, and batch statistics in a causal LM."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest
import torch

from normlab.models import TransformerConfig, TransformerLM, load_model, save_model
from normlab.models.attention import Attention

np = pytest.importorskip("numpy")


def _cfg(**kw):
    base = dict(vocab_size=19, d_model=16, n_heads=2, n_layers=2, d_ff=32, dropout=0.0, max_seq_len=12)
    base.update(kw)
    return TransformerConfig(**base)


# ---------------------------------------------------------------------------- plain numbers


def _builtin_types(d):
    """The types of every value in ``d``, the values of its dict values included."""
    out = set()
    for v in d.values():
        out |= _builtin_types(v) if isinstance(v, dict) else {type(v)}
    return out


@pytest.mark.parametrize("placement", ["pre", "deepnorm"])
def test_numpy_and_fraction_numbers_are_stored_as_plain_ints_and_floats(tmp_path, placement):
    odd = _cfg(vocab_size=np.int64(19), d_model=np.int32(16), n_heads=np.int64(2), n_layers=np.int64(2),
               n_decoder_layers=np.int16(3), d_ff=np.int64(32), max_seq_len=np.uint8(12),
               dropout=np.float32(0.25), attention_dropout=Fraction(1, 8), norm_eps=np.float64(1e-5),
               residual_scale=Fraction(1, 2), placement=placement)
    plain = _cfg(n_decoder_layers=3, dropout=0.25, attention_dropout=0.125, norm_eps=1e-5,
                 residual_scale=0.5, placement=placement)
    assert odd == plain and odd.to_dict() == plain.to_dict()
    assert _builtin_types(odd.to_dict()) <= {int, float, str, bool, type(None)}
    json.dumps(odd.to_dict())
    model = TransformerLM(odd).eval()  # DeepNorm's constants need plain ints
    save_model(model, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors").eval()
    assert loaded.cfg == plain
    tokens = torch.randint(0, 19, (2, 6))
    torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)


def test_option_values_are_stored_as_plain_numbers():
    cfg = _cfg(norm="powernorm", norm_options={"warmup_iters": np.int64(3), "alpha_fwd": np.float32(0.5)})
    assert cfg.norm_options == {"warmup_iters": 3, "alpha_fwd": 0.5}
    assert _builtin_types(cfg.norm_options) == {int, float}
    cfg = _cfg(norm="dyt", norm_options={"alpha_init": Fraction(3, 4)})
    assert cfg.norm_options == {"alpha_init": 0.75} and type(cfg.norm_options["alpha_init"]) is float
    json.dumps(cfg.to_dict())


def test_a_numpy_d_model_is_a_d_model():
    assert _cfg(d_model=np.int64(16)).d_model == 16


@pytest.mark.parametrize("kw,match", [
    ({"n_layers": np.bool_(True)}, r"n_layers to be an int >= 1"),
    ({"n_heads": np.float64(2.0)}, r"n_heads to be an int >= 1"),
    ({"dropout": True}, r"dropout in \[0, 1\)"),
    ({"residual_scale": np.float32("nan")}, r"residual_scale to be a finite number > 0"),
    ({"residual_scale": 10**400}, r"residual_scale to be a finite number > 0"),
])
def test_refused_numbers_stay_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**kw)


# ---------------------------------------------------------------------------- QK-norm width


@pytest.mark.parametrize("qk_norm", ["rmsnorm", "layernorm"])
def test_qk_norm_over_one_head_feature_is_refused(qk_norm):
    with pytest.raises(ValueError, match=rf"qk_norm='{qk_norm}' .*head_dim \(d_model / n_heads\) >= 2, got 1"):
        _cfg(d_model=4, n_heads=4, qk_norm=qk_norm)
    with pytest.raises(ValueError, match=rf"Attention: qk_norm='{qk_norm}' .*head_dim >= 2, got 1"):
        Attention(4, 4, qk_norm=qk_norm)
    _cfg(d_model=8, n_heads=4, qk_norm=qk_norm)  # head_dim 2
    _cfg(d_model=4, n_heads=4, qk_norm=qk_norm, qk_norm_scope="projection")  # over d_model
    _cfg(d_model=4, n_heads=4)  # no QK-norm: head_dim 1 is fine


# ---------------------------------------------------------------------------- causality


def _future_dependence(norm, train):
    """Largest change of the logits at positions < 5 when the tokens at positions >= 5 change."""
    torch.manual_seed(0)
    model = TransformerLM(_cfg(norm=norm))
    tokens = torch.randint(0, 19, (2, 9))
    model(tokens)  # one training forward: running statistics off their init
    model.train(train)
    other = tokens.clone()
    other[:, 5:] = (other[:, 5:] + 7) % 19
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        a = model(tokens)
        model.load_state_dict(state)  # the same running statistics for both
        b = model(other)
    return (a[:, :5] - b[:, :5]).abs().max().item()


def test_layernorm_lm_is_causal_in_training():
    assert _future_dependence("layernorm", train=True) == 0.0


def test_batchnorm_lm_sees_the_future_in_training_only():
    assert _future_dependence("batchnorm", train=True) > 1e-3
    assert _future_dependence("batchnorm", train=False) == 0.0


def test_numbers_inside_option_sequences_are_plain_too():
    # only the options' top-level values were converted: a numpy number in a list stayed
    import json

    import numpy as np

    from normlab.models.config import _plain_options

    opts = _plain_options({"a": [np.float32(0.5), np.int64(2)], "b": (np.int64(3),), "c": {"d": np.float64(1.5)}})
    assert opts == {"a": [0.5, 2], "b": [3], "c": {"d": 1.5}}  # (a tuple as a list, as JSON reads it back)
    assert type(opts["a"][0]) is float and type(opts["a"][1]) is int and type(opts["c"]["d"]) is float
    json.dumps(opts)
    # a namedtuple (its own constructor) is left as it is
    from collections import namedtuple

    point = namedtuple("point", "x y")(1, 2)
    assert _plain_options({"p": point})["p"] is point
