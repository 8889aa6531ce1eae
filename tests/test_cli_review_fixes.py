"""Command-line fixes from a review: convert reads a plain state dict of a tied
TransformerLM, a $NORMLAB_BACKEND that cannot run here is one usage error, bench skips
a shape that does not fit in memory, audit's refusals are one line."""

import json

import pytest
import torch
from typer.testing import CliRunner

from normlab.cli import app


def _invoke(args, **env):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "400", **env})


# ----------------------------------------------------------------- convert: tied weights


def _tied_lm():
    from normlab.models import TransformerConfig, TransformerLM

    torch.manual_seed(0)
    lm = TransformerLM(TransformerConfig(vocab_size=50, d_model=16, n_heads=2, n_layers=2, max_seq_len=8))
    assert lm.head.weight is lm.embed.tokens.weight  # (the config ties them by default)
    return lm


def test_convert_reads_a_plain_state_dict_of_a_tied_lm_with_config(tmp_path):
    # docs/convert.md: SRC can be a plain state dict of a TransformerLM with --config; a
    # state dict saved with safetensors' save_file holds both names of the tied weight,
    # which safetensors' load_model refused ("1 unexpected key (head.weight)")
    import safetensors.torch

    from normlab.models import load_model

    lm = _tied_lm()
    (tmp_path / "cfg.json").write_text(json.dumps(lm.cfg.to_dict()))
    safetensors.torch.save_file({k: v.clone() for k, v in lm.state_dict().items()}, str(tmp_path / "plain.safetensors"))
    safetensors.torch.save_model(lm, str(tmp_path / "once.safetensors"))  # the tied weight stored once
    for name in ("plain", "once"):
        out = tmp_path / f"out-{name}"
        result = _invoke(["convert", tmp_path / f"{name}.safetensors", out, "--config", tmp_path / "cfg.json"])
        assert result.exit_code == 0, (name, result.output)
        back = load_model(out / "model.safetensors")
        assert back.head.weight is back.embed.tokens.weight
        want = lm.state_dict()
        assert back.state_dict().keys() == want.keys()
        for key, t in back.state_dict().items():
            assert torch.equal(t, want[key]), (name, key)


def test_convert_refuses_a_file_whose_tied_weights_differ(tmp_path):
    # the model holds one tensor for both names: loading would keep one and silently drop the other
    import safetensors.torch

    lm = _tied_lm()
    state = {k: v.clone() for k, v in lm.state_dict().items()}
    state["head.weight"] = state["head.weight"] + 1.0
    safetensors.torch.save_file(state, str(tmp_path / "untied.safetensors"))
    (tmp_path / "tied.json").write_text(json.dumps(lm.cfg.to_dict()))
    out = tmp_path / "out"
    result = _invoke(["convert", tmp_path / "untied.safetensors", out, "--config", tmp_path / "tied.json"])
    assert result.exit_code == 2, result.output
    assert "Invalid value for --config" in result.output and "Traceback" not in result.output
    assert "embed.tokens.weight and head.weight hold different values in the file" in result.output
    assert not out.exists()
    # a config that does not tie them takes the same file, each weight its own
    (tmp_path / "untied.json").write_text(json.dumps(dict(lm.cfg.to_dict(), tie_embeddings=False)))
    result = _invoke(["convert", tmp_path / "untied.safetensors", out, "--config", tmp_path / "untied.json"])
    assert result.exit_code == 0, result.output


def test_convert_still_refuses_a_state_dict_that_does_not_fit(tmp_path):
    import safetensors.torch

    lm = _tied_lm()
    state = {k: v.clone() for k, v in lm.state_dict().items() if k != "head.weight"}
    state["extra.weight"] = torch.zeros(3)
    del state["final_norm.bias"]
    safetensors.torch.save_file(state, str(tmp_path / "odd.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps(lm.cfg.to_dict()))
    result = _invoke(["convert", tmp_path / "odd.safetensors", tmp_path / "out", "--config", tmp_path / "cfg.json"])
    assert result.exit_code == 2, result.output
    assert "does not fit the TransformerLM of" in result.output
    assert "1 missing key (final_norm.bias); 1 unexpected key (extra.weight)" in result.output


# ----------------------------------------------------------------- $NORMLAB_BACKEND=triton without CUDA


def _triton_without_cuda(monkeypatch, cuda: bool = False):
    """NORMLAB_BACKEND=triton, no TRITON_INTERPRET; ``cuda``: as on a machine with a GPU."""
    from normlab import backend

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # (tests/conftest.py sets it on a CPU machine)
    monkeypatch.setenv("NORMLAB_BACKEND", "triton")
    monkeypatch.setattr(backend, "_current", None)  # read from the environment
    if cuda:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def make_small_lm():
    from normlab.models import TransformerConfig, TransformerLM

    return TransformerLM(TransformerConfig(vocab_size=32, d_model=16, n_heads=2, n_layers=1, max_seq_len=8))


@pytest.mark.parametrize("command", ["norms", "kernels", "convert", "audit", "study"])
@pytest.mark.parametrize("cuda", [False, True], ids=["no-cuda", "cuda-machine-cpu-tensors"])
def test_a_triton_backend_that_cannot_run_here_is_one_usage_error(tmp_path, monkeypatch, command, cuda):
    # each command raised RuntimeError from its first op (audit reported a "no-trace"
    # finding and exit 0); the commands run on the CPU here, so "triton" cannot run
    import safetensors.torch

    lm = _tied_lm()
    safetensors.torch.save_model(lm, str(tmp_path / "lm.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps(lm.cfg.to_dict()))
    args = {"norms": ["norms", "--rows", "16", "--hidden", "8"],
            "kernels": ["bench", "kernels", "--device", "cpu", "--quick", "--ops", "rms_norm", "--shapes", "8x64",
                        "--no-compile", "--out", tmp_path / "bench"],
            "convert": ["convert", tmp_path / "lm.safetensors", tmp_path / "out", "--config", tmp_path / "cfg.json"],
            "audit": ["audit", "tests.test_cli_review_fixes:make_small_lm"],
            # (every run failed on its first op, and the study wrote a report of failed runs)
            "study": ["study", "gns", "--seeds", "1", "--steps", "2", "--workers", "1", "--device", "cpu",
                      "--out", tmp_path / "out"]}[command]
    _triton_without_cuda(monkeypatch, cuda)
    result = _invoke(args)
    assert result.exit_code == 2, result.output
    assert "Invalid value for NORMLAB_BACKEND (environment variable): normlab backend 'triton'" in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert not (tmp_path / "bench").exists() and not (tmp_path / "out").exists()


def test_the_triton_backend_check_lets_the_interpreter_through(tmp_path, monkeypatch):
    _triton_without_cuda(monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from normlab.bench.common import check_backend

    check_backend(torch.device("cpu"))  # no error: the kernels run under the interpreter


# ----------------------------------------------------------------- bench: a shape out of memory

# far beyond any machine's address space: the allocation fails at once, whatever the overcommit policy
HUGE_ROWS = 10 ** 12


def test_bench_kernels_skips_a_shape_that_does_not_fit_and_measures_the_rest(tmp_path):
    out = tmp_path / "bench"
    result = _invoke(["bench", "kernels", "--device", "cpu", "--quick", "--dtype", "fp32", "--ops", "rms_norm",
                      "--shapes", f"{HUGE_ROWS}x1024,8x64", "--no-compile", "--out", out])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert f"skipped rms_norm {HUGE_ROWS}x1024: out of memory" in result.output
    assert f"skipped, out of memory: rms_norm {HUGE_ROWS}x1024" in result.output  # the table's caption
    md = (out / "kernels-cpu-fp32.md").read_text()
    assert f"**Skipped, out of memory:** rms_norm {HUGE_ROWS}x1024" in md
    assert "| rms_norm | fwd | 8 | 64 | normlab |" in md and str(HUGE_ROWS) not in md.split("| op |")[1]
    rows = (out / "kernels-cpu-fp32.csv").read_text().splitlines()[1:]
    assert rows and all(",8,64," in r for r in rows)


def test_bench_kernels_with_every_shape_out_of_memory_writes_nothing(tmp_path):
    out = tmp_path / "bench"
    result = _invoke(["bench", "kernels", "--device", "cpu", "--quick", "--dtype", "fp32", "--ops", "rms_norm",
                      "--shapes", f"{HUGE_ROWS}x1024", "--no-compile", "--out", out])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert "nothing measured: every shape ran out of memory" in result.output
    assert not out.exists()


def test_bench_e2e_skips_a_configuration_out_of_cpu_memory(tmp_path):
    # on the CPU an allocation that fails is the allocator's RuntimeError, not OutOfMemoryError
    result = _invoke(["bench", "e2e", "--device", "cpu", "--quick", "--batch", str(HUGE_ROWS), "--n-layers", "1",
                      "--out", tmp_path / "bench"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert f"skipped d256 L1 {HUGE_ROWS}x128 pre layernorm: out of memory" in result.output
    assert "nothing measured" in result.output and "Traceback" not in result.output


# ----------------------------------------------------------------- audit


def make_meta_model():
    with torch.device("meta"):
        return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))


def test_audit_of_a_model_on_the_meta_device_is_one_line(monkeypatch):
    result = _invoke(["audit", "tests.test_cli_review_fixes:make_meta_model"])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert ("Invalid value for MODEL: cannot audit 'tests.test_cli_review_fixes:make_meta_model': expected a model "
            "with values, got '0.weight' on the meta device") in result.output


def test_audit_of_a_path_that_does_not_exist_says_so(tmp_path, monkeypatch):
    pytest.importorskip("transformers", reason="transformers not installed (pip install 'normlab[hf]')")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "empty").mkdir()
    for spec, needle in (("no_such_model_dir", "'no_such_model_dir': no such file or directory"),
                         ("./no/such/dir/", "'./no/such/dir/': no such file or directory"),
                         ("empty", "'empty' is a directory without a config.json")):
        result = _invoke(["audit", spec])
        assert result.exit_code == 2, result.output
        assert f"Invalid value for MODEL: {needle}" in result.output, result.output
        # nothing is downloaded: transformers' "check your internet connection" misleads
        assert "internet" not in result.output and "huggingface.co" not in result.output


# ----------------------------------------------------------------- out-of-range counts


@pytest.mark.parametrize("seeds", ["0", "10001", "99999999999999999999"])
def test_study_seeds_out_of_range_is_one_error(tmp_path, seeds):
    # 10^20 seeds listed runs for minutes, gigabytes deep, before any error
    result = _invoke(["study", "gns", "--seeds", seeds, "--out", tmp_path / "out"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"--seeds: expected an integer in [1, 10000], got {seeds}" in " ".join(result.output.split())


@pytest.mark.parametrize("seed", [str(2**64), str(-(2**63) - 1)])
def test_norms_seed_out_of_torchs_range_is_one_usage_error(seed):
    result = _invoke(["norms", "--rows", "16", "--hidden", "4", "--seed", seed])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "Invalid value for --seed: expected an integer in [-2**63, 2**64 - 1]" in " ".join(result.output.split())
    assert _invoke(["norms", "--rows", "16", "--hidden", "4", "--seed", str(2**64 - 1)]).exit_code == 0
