"""normlab convert keeps every weight of SRC (a config.json that names no class, or one
transformers has not, loaded the base model and dropped the head, exit 0); T5's norms in
half precision are left with T5's own reason, by apply_normlab and by fold."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from normlab.cli import app
from tests.convert.models import hf_model

transformers = pytest.importorskip("transformers")


def _without_class(tmp_path, architectures):
    torch.manual_seed(0)
    hf_model("llama").save_pretrained(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    if architectures is None:
        del config["architectures"]
    else:
        config["architectures"] = architectures
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("architectures", [None, ["MyLlamaForCausalLM"]])
def test_convert_refuses_to_drop_the_head_of_a_checkpoint_whose_class_it_cannot_tell(tmp_path, architectures):
    _without_class(tmp_path, architectures)
    res = CliRunner().invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "out"), "-t", "swap"])
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.replace("│", " ").split())
    assert "lm_head.weight" in text and '"architectures"' in text, text
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_convert_still_takes_a_base_model_checkpoint_without_a_class(tmp_path):
    torch.manual_seed(0)
    hf_model("llama").model.save_pretrained(tmp_path / "src")  # the base model: no head to drop
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config.pop("architectures", None)
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    res = CliRunner().invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "out"), "-t", "swap"])
    assert res.exit_code == 0, res.output
    with safe_open(str(tmp_path / "src" / "model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())


def test_load_pretrained_keeping_every_weight_names_those_the_class_drops(tmp_path):
    from normlab.integrations.hf import WeightsDoNotFit, load_pretrained

    torch.manual_seed(0)
    hf_model("llama").save_pretrained(tmp_path)
    assert load_pretrained(transformers.LlamaModel, tmp_path) is not None  # as transformers: left out
    with pytest.raises(WeightsDoNotFit, match=r"lm_head\.weight\) .*LlamaModel|no place in LlamaModel"):
        load_pretrained(transformers.LlamaModel, tmp_path, keep_every_weight=True)


def _t5():
    cfg = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                decoder_start_token_id=0)
    return cfg


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_t5_norms_in_half_precision_are_left_with_t5s_reason(dtype):
    from normlab.convert import fold_norm_affine
    from normlab.integrations.hf import apply_normlab, patch

    torch.manual_seed(0)
    m = apply_normlab(transformers.T5ForConditionalGeneration(_t5()).to(dtype))
    reasons = list(m.normlab_report.left.values())
    assert reasons and all(r.startswith("T5LayerNorm casts its output to its weight's half-precision dtype")
                           for r in reasons), reasons[0]
    assert not any("(1 + weight) scale" in r for r in reasons)
    with patch("t5"):
        p = transformers.T5ForConditionalGeneration(_t5()).to(dtype)
    fold_norm_affine(p)
    left = [r for r in p.normlab_report.left.values() if "half-precision weight's dtype" in r]
    assert left and not any("not a norm normlab reproduces" in r for r in p.normlab_report.left.values())


def test_convert_takes_a_checkpoint_whose_named_class_drops_weights(tmp_path):
    # bert-base-uncased's way: BertForMaskedLM named, pre-training heads in the weights; the
    # named class keeps what transformers keeps (only the no-class fallback refuses)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)
    transformers.BertForPreTraining(cfg).save_pretrained(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config["architectures"] = ["BertForMaskedLM"]
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    res = CliRunner().invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "out"), "-t", "swap"])
    assert res.exit_code == 0, res.output
