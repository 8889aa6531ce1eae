"""Command-line fixes from a second review: convert and audit refuse a checkpoint whose
weights leave parameters random, convert refuses --config beside a save_model file's
own and an OUT holding a model (unless --overwrite), audit reads save_model files and
names bad module specs in one line, study errors go to stderr on one line and a refused
--data leaves no folder, bench says when Ctrl-C came while writing."""

import shutil

import pytest
import torch
from typer.testing import CliRunner

from normlab.cli import app

transformers = pytest.importorskip("transformers")


def _invoke(args, **env):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "400", **env})


def _tiny_llama(path):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _mismatched(tmp_path):
    """A Llama config.json beside a GPT-2's weights."""
    _tiny_llama(tmp_path / "llama")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2))
    gpt2.save_pretrained(tmp_path / "gpt2")
    (tmp_path / "mis").mkdir()
    shutil.copy(tmp_path / "llama" / "config.json", tmp_path / "mis" / "config.json")
    shutil.copy(tmp_path / "gpt2" / "model.safetensors", tmp_path / "mis" / "model.safetensors")
    return tmp_path / "mis"


def test_weights_that_do_not_fit_their_config_are_refused(tmp_path):
    mis = _mismatched(tmp_path)
    for args in (["convert", mis, tmp_path / "out"], ["audit", mis]):
        r = _invoke(args)
        assert r.exit_code == 2, (args, r.output)
        assert "do not fit LlamaForCausalLM" in r.output and "missing from the files" in r.output
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_convert_refuses_an_out_holding_a_model_unless_overwrite(tmp_path):
    llama = _tiny_llama(tmp_path / "llama")
    other = _tiny_llama(tmp_path / "other")
    r = _invoke(["convert", llama, other])
    assert r.exit_code == 2 and "already holds a model" in r.output and "--overwrite" in r.output
    assert _invoke(["convert", llama, other, "--overwrite"]).exit_code == 0


def test_convert_refuses_config_beside_save_model_metadata(tmp_path):
    from normlab.models import TransformerConfig, TransformerLM, save_model

    cfg = TransformerConfig(vocab_size=32, d_model=16, n_heads=2, n_layers=1, norm_eps=1e-2)
    save_model(TransformerLM(cfg), tmp_path / "m.safetensors")
    (tmp_path / "c.json").write_text('{"vocab_size": 32, "d_model": 16, "n_heads": 2, "n_layers": 1}')
    r = _invoke(["convert", tmp_path / "m.safetensors", tmp_path / "out", "--config", tmp_path / "c.json"])
    assert r.exit_code == 2 and "holds its own config" in r.output


def test_audit_reads_a_save_model_file_and_refuses_a_bare_state_dict(tmp_path):
    import safetensors.torch

    from normlab.models import TransformerConfig, TransformerLM, save_model

    save_model(TransformerLM(TransformerConfig(vocab_size=32, d_model=16, n_heads=2, n_layers=1)),
               tmp_path / "m.safetensors")
    r = _invoke(["audit", tmp_path / "m.safetensors"])
    assert r.exit_code == 0 and "TransformerLM" in r.output
    safetensors.torch.save_file({"a": torch.zeros(2)}, tmp_path / "plain.safetensors")
    r = _invoke(["audit", tmp_path / "plain.safetensors"])
    assert r.exit_code == 2 and "without normlab's metadata" in r.output


@pytest.mark.parametrize("spec, what", [(":tf", "ValueError"), ("broken_mod_for_audit:f", "SyntaxError")])
def test_audit_names_a_bad_module_spec_in_one_line(tmp_path, monkeypatch, spec, what):
    (tmp_path / "broken_mod_for_audit.py").write_text("def f(:\n")
    monkeypatch.chdir(tmp_path)
    r = _invoke(["audit", spec])
    assert r.exit_code == 2 and f"cannot import '{spec}' ({what}" in r.output
    assert "Traceback" not in r.output


def test_study_errors_go_to_stderr_on_one_line_and_leave_nothing(tmp_path):
    r = _invoke(["study", "nosuch", "--out", tmp_path / "s"], COLUMNS="40")
    assert r.exit_code == 2 and r.stdout == ""
    assert len([line for line in r.stderr.splitlines() if line.strip()]) == 1 and "nosuch" in r.stderr
    r = _invoke(["study", "warmup", "--out", tmp_path / "s", "--data", tmp_path / "nope", "--workers", "1"])
    assert r.exit_code == 2 and "does not exist" in r.stderr
    assert not (tmp_path / "s").exists()
    r = _invoke(["study"])
    assert r.exit_code == 2 and "expected a study preset" in r.stderr


def test_bench_interrupted_while_writing_says_so(tmp_path, monkeypatch):
    import normlab.bench.kernels as kernels

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(kernels, "write_outputs", interrupted)
    r = _invoke(["bench", "kernels", "--device", "cpu", "--quick", "--shapes", "8x64", "--ops", "layer_norm",
                 "--dtype", "fp32", "--out", tmp_path / "b"])
    assert r.exit_code == 130 and "stopped while writing" in r.stderr


def test_convert_interrupted_while_writing_says_so(tmp_path, monkeypatch):
    import normlab.convert.cli as convert_cli
    from normlab.models import TransformerConfig, TransformerLM, save_model

    save_model(TransformerLM(TransformerConfig(vocab_size=32, d_model=16, n_heads=2, n_layers=1)),
               tmp_path / "m.safetensors")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_cli, "_save_normlab", interrupted)
    r = _invoke(["convert", tmp_path / "m.safetensors", tmp_path / "out"])
    assert r.exit_code == 130 and "interrupted while writing and checking" in r.stderr
