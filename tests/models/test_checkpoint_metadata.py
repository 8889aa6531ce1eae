"""load_model refuses metadata it cannot rebuild a model from with a ValueError that names
the file and what is wrong: a normlab.config that is JSON but not an object (it raised
TypeError from TransformerConfig.from_dict), not JSON, with unknown fields or values, a
normlab.model that is not a class save_model writes, an encoder head width that is not one."""

from __future__ import annotations

import json

import pytest
import torch

from normlab.models import TransformerConfig, TransformerEncoder, TransformerLM
from normlab.models.checkpoint import load_model, save_model


def _cfg(**kw) -> TransformerConfig:
    return TransformerConfig(**{**dict(vocab_size=50, d_model=16, n_heads=2, n_layers=1, max_seq_len=8), **kw})


def _file(tmp_path, model=None, **meta):
    """A save_model file of ``model``, its metadata updated with ``meta`` (None removes a key)."""
    import safetensors.torch
    from safetensors import safe_open

    torch.manual_seed(0)
    good = tmp_path / "good.safetensors"
    save_model(model if model is not None else TransformerLM(_cfg()), good)
    with safe_open(str(good), framework="pt") as f:
        metadata = dict(f.metadata())
    metadata.update(meta)
    path = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(safetensors.torch.load_file(str(good)), str(path),
                                metadata={k: v for k, v in metadata.items() if v is not None})
    return path


@pytest.mark.parametrize(("config", "kind"), [
    ("[1,2]", "array"), ("null", "null"), ("7", "number"), ("true", "boolean"), ("\"x\"", "string")])
def test_a_config_that_is_not_a_json_object_is_a_value_error(tmp_path, config, kind):
    path = _file(tmp_path, **{"normlab.config": config})
    with pytest.raises(ValueError, match=rf"'.*bad\.safetensors' has a normlab.config that is a JSON {kind}; "
                                         r"expected a JSON object \(dict\)"):
        load_model(path)


@pytest.mark.parametrize(("config", "match"), [
    ({"bogus": 1}, r"TransformerConfig refuses: unknown field\(s\) bogus"),
    ({"d_model": "x"}, r"TransformerConfig refuses: expected d_model to be an int >= 1, got 'x'"),
    ({"n_heads": 3}, r"TransformerConfig refuses: .*n_heads"),
])
def test_a_config_transformer_config_refuses_names_the_file(tmp_path, config, match):
    path = _file(tmp_path, **{"normlab.config": json.dumps({**_cfg().to_dict(), **config})})
    with pytest.raises(ValueError, match=r"load_model: '.*bad\.safetensors' has a normlab.config that " + match):
        load_model(path)


def test_other_garbage_metadata_is_a_value_error_naming_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"bad\.safetensors' has a normlab.config that is not JSON"):
        load_model(_file(tmp_path, **{"normlab.config": "garbage{"}))
    with pytest.raises(ValueError, match=r"bad\.safetensors' has no normlab.config entry"):
        load_model(_file(tmp_path, **{"normlab.config": None}))
    with pytest.raises(ValueError, match=r"bad\.safetensors' has normlab.model 'Nope' in its metadata, not a class "
                                         r"save_model writes; expected one of TransformerLM"):
        load_model(_file(tmp_path, **{"normlab.model": "Nope"}))
    with pytest.raises(ValueError, match=r"bad\.safetensors' has no normlab model metadata"):
        load_model(_file(tmp_path, **{"normlab.model": None}))


@pytest.mark.parametrize("n_outputs", ["x", "0", "-3", "2.5"])
def test_an_encoder_head_width_that_is_not_a_positive_integer_is_a_value_error(tmp_path, n_outputs):
    torch.manual_seed(0)
    path = _file(tmp_path, TransformerEncoder(_cfg(), n_outputs=3), **{"normlab.n_outputs": n_outputs})
    with pytest.raises(ValueError, match=rf"bad\.safetensors' has normlab.n_outputs '{n_outputs}'; expected a "
                                         r"positive integer"):
        load_model(path)


def test_good_metadata_still_loads(tmp_path):
    torch.manual_seed(0)
    enc = TransformerEncoder(_cfg(), n_outputs=3)
    loaded = load_model(_file(tmp_path, enc))
    assert isinstance(loaded, TransformerEncoder) and loaded.head.out_features == 3 and loaded.cfg == enc.cfg
