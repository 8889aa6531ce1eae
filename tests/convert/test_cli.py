"""normlab convert over a local Hugging Face model directory; its refusals of bad input."""

import json

import pytest
import torch
from typer.testing import CliRunner

from normlab.cli import app
from tests.convert.models import hf_inputs, hf_model, perturb


def test_convert_gpt2_dir_rms_then_fold_reloads_exactly(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install 'normlab[hf]')")
    torch.manual_seed(0)
    model = perturb(hf_model("gpt2"), scale=0.05).eval()
    model.save_pretrained(tmp_path / "src")
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "out"),
                                      "-t", "rms", "-t", "fold"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "layernorm_to_rmsnorm: 1 untied, 6 centered, 5 converted" in result.output
    assert "fold_norm_affine: 4 folded, 1 left" in result.output
    assert "consumer lm_head has no bias" in result.output
    reports = json.loads((tmp_path / "out" / "normlab_convert.json").read_text())
    assert [r["transform"] for r in reports] == ["layernorm_to_rmsnorm", "fold_norm_affine"]
    # the converted weights are exact in the original architecture too
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    kw = hf_inputs("gpt2")
    with torch.no_grad():
        torch.testing.assert_close(back(**kw).logits, model(**kw).logits, atol=2e-5, rtol=2e-5)


def test_convert_refusal_exits_nonzero(tmp_path):
    hf_model("llama").save_pretrained(tmp_path / "src")
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "out"), "-t", "rms"])
    assert result.exit_code == 1
    assert "is not a LayerNorm" in result.output


def test_convert_rejects_unknown_transform(tmp_path):
    result = CliRunner().invoke(app, ["convert", str(tmp_path), str(tmp_path / "out"), "-t", "nope"])
    assert result.exit_code != 0 and "expected each --transform" in result.output


def _refused(args, *needles):
    result = CliRunner().invoke(app, ["convert", *map(str, args)], env={"COLUMNS": "400"})
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output
    return result


def _tiny_lm():
    from normlab.models import TransformerConfig, TransformerLM
    torch.manual_seed(0)
    return TransformerLM(TransformerConfig(vocab_size=50, d_model=16, n_heads=2, n_layers=1, max_seq_len=8))


def test_convert_refuses_an_unusable_out(tmp_path):
    from normlab.models import save_model
    save_model(_tiny_lm(), tmp_path / "lm.safetensors")
    (tmp_path / "afile").write_text("")
    _refused([tmp_path / "lm.safetensors", tmp_path / "afile"], "Invalid value for OUT", "not a directory")
    _refused([tmp_path / "lm.safetensors", "/proc/normlab-x"], "Invalid value for OUT", "cannot write to /proc/normlab-x")
    # OUT/model.safetensors would be SRC itself
    (tmp_path / "d").mkdir()
    save_model(_tiny_lm(), tmp_path / "d" / "model.safetensors")
    _refused([tmp_path / "d" / "model.safetensors", tmp_path / "d"], "Invalid value for OUT",
             "would write over the source")


def test_convert_refuses_to_write_over_a_source_directory(tmp_path):
    hf_model("gpt2").save_pretrained(tmp_path / "src")
    before = {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()}
    _refused([tmp_path / "src", tmp_path / "src"], "OUT", "is SRC", "would write over the source")
    _refused([tmp_path / "src", tmp_path / "src" / "sub"], "OUT", "is inside SRC")
    assert {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()} == before


def test_convert_refuses_a_directory_without_weights(tmp_path):
    hf_model("gpt2").save_pretrained(tmp_path / "src")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    _refused([tmp_path / "cfg", tmp_path / "out"], "Invalid value for SRC", "cannot load",
             "as a Hugging Face model directory")
    _refused([tmp_path / "missing", tmp_path / "out"], "Invalid value for SRC", "no such file or directory")
    assert not (tmp_path / "out").exists()


def test_convert_refuses_a_previous_normlab_output_dir_with_a_pointer_to_its_file(tmp_path):
    # SRC is a Hugging Face directory or a normlab .safetensors file (docs/convert.md):
    # the directory convert writes for a normlab model is refused, naming the file to pass
    from normlab.models import save_model
    (tmp_path / "o").mkdir()
    lm = _tiny_lm()
    save_model(lm, tmp_path / "o" / "model.safetensors")
    (tmp_path / "o" / "config.json").write_text(json.dumps(lm.cfg.to_dict()))
    _refused([tmp_path / "o", tmp_path / "o2"], "Invalid value for SRC", "holds a normlab model",
             str(tmp_path / "o" / "model.safetensors"))


def test_convert_refuses_bad_normlab_inputs(tmp_path):
    import safetensors.torch
    lm = _tiny_lm()
    safetensors.torch.save_model(lm, str(tmp_path / "plain.safetensors"))
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    wrong = dict(lm.cfg.to_dict(), d_model=32)
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    (tmp_path / "list.json").write_text("[]")
    out = tmp_path / "out"
    _refused([tmp_path / "plain.safetensors", out, "--config", tmp_path / "missing.json"],
             "Invalid value for --config", "cannot read", "No such file or directory")
    _refused([tmp_path / "plain.safetensors", out, "--config", tmp_path / "list.json"],
             "Invalid value for --config", "expected a JSON object")
    _refused([tmp_path / "garbage.safetensors", out], "Invalid value for SRC", "cannot read",
             "as a safetensors file")
    _refused([tmp_path / "plain.safetensors", out, "--config", tmp_path / "wrong.json"],
             "Invalid value for --config", "does not fit the TransformerLM of", "size mismatch")
    assert not out.exists()


def test_convert_refuses_config_with_a_hugging_face_directory(tmp_path):
    hf_model("gpt2").save_pretrained(tmp_path / "src")
    (tmp_path / "cfg.json").write_text(json.dumps(_tiny_lm().cfg.to_dict()))
    _refused([tmp_path / "src", tmp_path / "out", "--config", tmp_path / "cfg.json"], "Invalid value for --config",
             "applies only to a .safetensors SRC", "is a Hugging Face model directory")
    assert not (tmp_path / "out").exists()


def _t5_with_initializer_factor(path):
    """A T5 whose initializer scales norm weights by 0.5: a norm weight missing from the
    file reloads as 0.5, not 1."""
    transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install 'normlab[hf]')")
    cfg = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                decoder_start_token_id=0, dropout_rate=0.0, initializer_factor=0.5)
    torch.manual_seed(0)
    model = perturb(transformers.T5ForConditionalGeneration(cfg), scale=0.3).eval()
    model.save_pretrained(path)
    return transformers, model


def test_convert_t5_fold_writes_the_folded_norm_weights_and_reloads_exactly(tmp_path):
    transformers, model = _t5_with_initializer_factor(tmp_path / "src")
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "out"), "-t", "fold"],
                                env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "fold_norm_affine: 10 folded, 2 left" in result.output
    assert "weights as written, outputs equal the converted model's" in result.output
    back = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(back.encoder.block[0].layer[0].layer_norm.weight, torch.ones(32))
    kw = hf_inputs("t5")
    with torch.no_grad():
        torch.testing.assert_close(back(**kw).logits, model(**kw).logits, atol=2e-5, rtol=2e-5)


def test_convert_exits_1_when_the_written_hugging_face_model_does_not_reload(tmp_path, monkeypatch):
    from normlab.convert import cli

    _t5_with_initializer_factor(tmp_path / "src")
    # the folded norms' weights left out of the file: T5's initializer reloads them as 0.5
    monkeypatch.setattr(cli, "_hf_state", lambda model, original: model.state_dict())
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "out"), "-t", "fold"],
                                env={"COLUMNS": "400"})
    assert result.exit_code == 1, result.output
    assert ("convert: the written model does not reload as converted: encoder.block.0.layer.0.layer_norm.weight "
            "is absent from the written file") in result.output
    assert "are left for inspection: do not use them" in result.output


@pytest.mark.parametrize("family", ["vit", "whisper"])
def test_convert_a_vision_or_speech_model_verifies_it_on_images_or_audio_features(tmp_path, family):
    # the check of the written model ran it on token ids made from config.vocab_size:
    # ViT has none (model(None): AttributeError), Whisper's encoder takes log-mel features
    transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install 'normlab[hf]')")
    torch.manual_seed(0)
    if family == "vit":
        cls, cfg = transformers.ViTModel, transformers.ViTConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=16,
            patch_size=8)
        kw = {"pixel_values": torch.randn(2, 3, 16, 16)}
    else:
        cls, cfg = transformers.WhisperForConditionalGeneration, transformers.WhisperConfig(
            d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=64, num_mel_bins=4, max_source_positions=8,
            max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
        kw = {"input_features": torch.randn(2, 4, 16), "decoder_input_ids": torch.randint(0, 64, (2, 5))}
    model = perturb(cls(cfg), scale=0.05).eval()
    model.save_pretrained(tmp_path / "src")
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "out"), "-t", "fold"],
                                env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "weights as written, outputs equal the converted model's" in result.output
    back = cls.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        a, b = back(**kw), model(**kw)
    a, b = (a.logits, b.logits) if hasattr(a, "logits") else (a.last_hidden_state, b.last_hidden_state)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
