"""Third review of this session's fixes: a reentrant-checkpoint forward after an earlier
graph that is still held, audit trying the next class, checkpoints whose missing weights
the model's init rebuilds, size mismatches named, --data read before the folder, convert's
OUT check, update_linearity with running statistics, and bench's final write."""

import json
import shutil

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from typer.testing import CliRunner

import normlab
from normlab.cli import app
from normlab.diagnostics import per_example_grad_norms

transformers = pytest.importorskip("transformers")


def _invoke(args, **env):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "400", **env})


def _reference(model, x):
    out = []
    for b in range(x.shape[0]):
        g = torch.autograd.grad(model(x[b:b + 1]).square().sum(), model[1].weight)[0]
        out.append(float(g.square().sum()))
    return out


@pytest.mark.parametrize("keep", ["retained", "loss kept"])
def test_reentrant_checkpoint_after_a_held_graph(keep):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), normlab.LayerNorm(6), nn.Linear(6, 1))
    x1, x2 = torch.randn(4, 6), 5 * torch.randn(4, 6) + 2
    with per_example_grad_norms(model):
        loss1 = model(x1).square().sum()
        loss1.backward(retain_graph=keep == "retained")
        checkpoint(model, x2.requires_grad_(), use_reentrant=True).square().sum().backward()
        got = model[1].per_example_grad_sq[0].tolist()
    assert got == pytest.approx(_reference(model, x2.detach()), rel=1e-4)


def test_a_kept_eval_pass_then_a_reentrant_step_refuses_the_read():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), normlab.LayerNorm(6), nn.Linear(6, 1))
    norm = model[1]
    norm.collect_per_example_grad_sq = True
    kept = model(torch.randn(4, 6))  # noqa: F841 (an evaluation pass under grad whose output is kept)
    checkpoint(model, torch.randn(4, 6, requires_grad=True), use_reentrant=True).square().sum().backward()
    with pytest.raises(RuntimeError, match="ran 2 times before its backward"):
        _ = norm.per_example_grad_sq


def _bert(path, architectures):
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32)
    transformers.BertModel(cfg).save_pretrained(path)
    d = json.loads((path / "config.json").read_text())
    d["architectures"] = architectures
    (path / "config.json").write_text(json.dumps(d))
    return path


@pytest.mark.parametrize("architectures", [None, ["BertForMyTask"]])
def test_audit_tries_the_next_class(tmp_path, architectures):
    r = _invoke(["audit", _bert(tmp_path / "bert", architectures)])
    assert r.exit_code == 0, r.output


def test_missing_weights_the_init_rebuilds_are_not_random(tmp_path):
    from safetensors.torch import load_file, save_file

    from normlab.integrations.hf import load_pretrained

    cfg = transformers.PegasusConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                     vocab_size=128, max_position_embeddings=64)
    transformers.PegasusForConditionalGeneration(cfg).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in state.items() if "embed_positions" not in k}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})  # sinusoidal positions: the init rebuilds them
    load_pretrained(transformers.PegasusForConditionalGeneration, tmp_path)


def test_a_size_mismatch_is_named(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    d = json.loads((tmp_path / "llama" / "config.json").read_text())
    d["intermediate_size"] = 48
    (tmp_path / "llama" / "config.json").write_text(json.dumps(d))
    r = _invoke(["convert", tmp_path / "llama", tmp_path / "out"])
    assert r.exit_code == 2 and "of another shape" in r.output and "mlp" in r.output


def test_a_refused_data_leaves_no_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    r = _invoke(["study", "warmup", "--out", tmp_path / "s", "--data", tmp_path / "empty", "--workers", "1"])
    assert r.exit_code == 2 and "no text files" in r.stderr
    assert not (tmp_path / "s").exists()


def test_convert_out_with_unrelated_files_is_taken(tmp_path):
    from normlab.models import TransformerConfig, TransformerLM, save_model

    runs = tmp_path / "runs"
    runs.mkdir()
    save_model(TransformerLM(TransformerConfig(vocab_size=32, d_model=16, n_heads=2, n_layers=1)), runs / "lm.safetensors")
    (runs / "training_args.bin").write_bytes(b"x")
    (runs / "README.md").write_text("notes")
    r = _invoke(["convert", runs / "lm.safetensors", runs])
    assert r.exit_code == 0, r.output
    shutil.rmtree(runs)


def test_update_linearity_is_nan_where_running_statistics_moved(tmp_path):
    import math

    from normlab.studies import presets
    from normlab.studies.data import ByteCorpus
    from normlab.studies.spec import RunSpec
    from normlab.studies.train import Env, run_one

    corpus = ByteCorpus.from_path(max_bytes=100_000)
    for norm, finite in (("batchnorm", False), ("layernorm", True)):
        spec = RunSpec(name=norm, model={**presets.MICRO, "placement": "pre", "n_layers": 2, "norm": norm},
                       kind="update", batch_size=4, seq_len=16, probe_batches=2, steps=0, lr=1e-5,
                       tags={"study": "amplification", "group": "pre"})
        r = run_one(spec, tmp_path / norm, Env(device=torch.device("cpu")), corpus)
        assert math.isfinite(r["update_linearity"]) == finite


def test_bench_interrupted_in_the_final_write_says_so(tmp_path, monkeypatch):
    import normlab.bench.kernels as kernels

    real = kernels.write_outputs

    def final_interrupted(*a, **k):
        if "partial" not in k:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(kernels, "write_outputs", final_interrupted)
    r = _invoke(["bench", "kernels", "--device", "cpu", "--quick", "--shapes", "8x64", "--ops", "layer_norm",
                 "--dtype", "fp32", "--out", tmp_path / "b"])
    assert r.exit_code == 130 and "stopped while writing the" in r.stderr
