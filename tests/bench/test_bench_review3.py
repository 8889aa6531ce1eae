"""bench and audit, from a review: an interrupted bench keeps every shape it finished
(not only whole hidden sizes), sizes no tensor can have are refused or skipped by name,
and `normlab audit` of a config file beside a checkpoint audits that config."""

import json

import pytest
from typer.testing import CliRunner

from normlab.cli import app


def test_an_interrupt_between_two_row_counts_of_one_hidden_keeps_the_first(tmp_path, monkeypatch):
    import normlab.bench.kernels as bk
    from tests.bench.helpers import ctrl_c_on_call

    monkeypatch.setattr(bk, "keep_freed_memory", lambda: True)
    ctrl_c_on_call(monkeypatch, bk, "_inputs", call=2)  # 8x32 finished, 16x32 interrupted
    result = CliRunner().invoke(app, [
        "bench", "kernels", "--device", "cpu", "--dtype", "fp32", "--quick",
        "--rows", "8,16", "--hidden", "32", "--ops", "rms_norm", "--out", str(tmp_path),
    ])
    assert result.exit_code == 130, result.output
    assert "nothing was measured" not in result.output
    assert "interrupted: kept the" in result.output and "marked partial" in result.output
    md = (tmp_path / "kernels-cpu-fp32.md").read_text()
    assert "| rms_norm | fwd | 8 | 32 | normlab |" in md and "| 16 | 32 |" not in md


@pytest.mark.parametrize("rows,hidden", [("99999999999999999999", "8"), ("8", str(2**62 + 1))])
def test_a_size_no_tensor_can_have_is_refused_by_name(rows, hidden):
    result = CliRunner().invoke(app, ["bench", "kernels", "--device", "cpu", "--quick", "--ops", "rms_norm",
                                      "--rows", rows, "--hidden", hidden])
    assert result.exit_code == 2, result.output
    assert "2^62" in result.output, result.output


def test_a_shape_whose_byte_count_overflows_is_skipped(tmp_path):
    result = CliRunner().invoke(app, ["bench", "kernels", "--device", "cpu", "--quick", "--ops", "rms_norm",
                                      "--rows", "4000000000", "--hidden", "4000000000", "--out", str(tmp_path)])
    assert "Traceback" not in result.output
    assert "4000000000x4000000000" in result.output, result.output


def test_audit_of_another_config_beside_a_checkpoint_audits_that_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    bert.save_pretrained(tmp_path)
    gpt2 = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    (tmp_path / "gpt2_small.json").write_text(json.dumps(gpt2.to_dict()))
    result = CliRunner().invoke(app, ["audit", str(tmp_path / "gpt2_small.json")])
    assert result.exit_code == 0, result.output
    assert "GPT2" in result.output and "BertModel" not in result.output, result.output
    # the checkpoint's own config.json is still the checkpoint, weights included
    result = CliRunner().invoke(app, ["audit", str(tmp_path / "config.json")])
    assert result.exit_code == 0, result.output
    assert "BertModel" in result.output and "random weights" not in result.output, result.output
