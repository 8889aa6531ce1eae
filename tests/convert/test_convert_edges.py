"""Edges of layernorm_to_rmsnorm and ``normlab convert``: half-precision checkpoints, an
exact undo on refusal, a second run, one-line errors, and the Hugging Face docstring."""

import copy
import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import normlab
from normlab.cli import app
from normlab.convert import ConversionError, fold_norm_affine, layernorm_to_rmsnorm
from tests.convert.models import MLPStack, hf_inputs, hf_model, perturb


def _logits(model, **kw):
    with torch.no_grad():
        return model.eval()(**kw).logits


def _types(model):
    return {name: type(m) for name, m in model.named_modules()}


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, state):
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


# --- 1. half precision: the check runs in float32, the model stays in its dtype ---------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_is_verified_in_float32(dtype):
    torch.manual_seed(0)
    model = perturb(hf_model("gpt2"), scale=0.05).eval().to(dtype)
    kw = hf_inputs("gpt2")
    reference = copy.deepcopy(model).float()
    layernorm_to_rmsnorm(reference)  # the same conversion, in float32
    report = layernorm_to_rmsnorm(model, example_inputs=kw).normlab_report
    (detail,) = [e.detail for e in report.entries if e.action == "verified"]
    name = str(dtype).removeprefix("torch.")
    assert f"checked in float32, on a float32 copy of the {name} model" in detail, detail
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert isinstance(model.transformer.h[0].ln_1, normlab.RMSNorm)
    # the model's new weights are the float32 conversion's, rounded to its dtype
    want = reference.state_dict()
    for key, t in model.state_dict().items():
        if t.is_floating_point():
            torch.testing.assert_close(t, want[key].to(dtype), atol=0, rtol=torch.finfo(dtype).eps)


def test_half_precision_refusal_leaves_the_model_unchanged():
    torch.manual_seed(0)
    model = perturb(hf_model("gpt2"), scale=0.05).eval().to(torch.bfloat16)
    state, types = _state(model), _types(model)
    with pytest.raises(ConversionError, match=r"checked in float32, on a float32 copy of the bfloat16 model"):
        layernorm_to_rmsnorm(model, example_inputs=hf_inputs("gpt2"), atol=0.0, rtol=0.0)
    assert _same_state(model, state) and _types(model) == types
    assert model.lm_head.weight is model.transformer.wte.weight


def test_cli_rms_on_a_bf16_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = perturb(hf_model("gpt2"), scale=0.05).eval().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "src")
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "out"), "-t", "rms"],
                                env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "checked in float32, on a float32 copy of the bfloat16 model" in result.output
    assert "(weights in bfloat16)" in result.output
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    assert {p.dtype for p in back.parameters()} == {torch.bfloat16}
    # written in bfloat16: equal to the original up to that dtype's rounding
    kw = hf_inputs("gpt2")
    torch.testing.assert_close(_logits(back, **kw).float(), _logits(model, **kw).float(), atol=5e-2, rtol=5e-2)


# --- 2. a refusal restores the model exactly ---------------------------------------------

def test_refusal_after_fusing_restores_the_model():
    torch.manual_seed(0)
    model = perturb(hf_model("gpt2"), scale=0.05).eval()
    kw = hf_inputs("gpt2")
    y0, state, types = _logits(model, **kw), _state(model), _types(model)
    with pytest.raises(ConversionError, match="the model is left unchanged"):
        layernorm_to_rmsnorm(model, example_inputs=kw, atol=0.0, rtol=0.0)
    assert _types(model) == types  # GPT2Block unfused, torch LayerNorms back
    assert _same_state(model, state)
    assert model.lm_head.weight is model.transformer.wte.weight and model.config.tie_word_embeddings
    assert torch.equal(_logits(model, **kw), y0)


def test_refusal_in_the_middle_of_centering_restores_the_model():
    # the second projection shares its weight with the third: refused after the
    # embeddings and the first projection were centered
    model = perturb(MLPStack())
    model.blocks[2].proj.weight = model.blocks[1].proj.weight
    idx = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        y0 = model(idx)
    state = _state(model)
    with pytest.raises(ConversionError, match="shared with blocks.2.proj.weight"):
        layernorm_to_rmsnorm(model)
    assert _same_state(model, state)
    with torch.no_grad():
        assert torch.equal(model(idx), y0)


# --- 3. a second run is a no-op -------------------------------------------------------------

def test_second_run_is_a_no_op():
    torch.manual_seed(0)
    model = perturb(hf_model("gpt2"), scale=0.05).eval()
    kw = hf_inputs("gpt2")
    y0 = _logits(model, **kw)
    layernorm_to_rmsnorm(model, example_inputs=kw)
    state, types = _state(model), _types(model)
    report = layernorm_to_rmsnorm(model, example_inputs=kw).normlab_report
    assert not report.changed
    assert len(report.left) == 5
    assert all(why.startswith("already converted") for why in report.left.values()), report.left
    assert _same_state(model, state) and _types(model) == types
    # and after folding the affines away, too
    fold_norm_affine(model, add_bias=True)
    report = layernorm_to_rmsnorm(model).normlab_report
    assert not report.changed and all(why.startswith("already converted") for why in report.left.values())
    torch.testing.assert_close(_logits(model, **kw), y0, atol=2e-5, rtol=2e-5)


def test_rmsnorm_on_a_stream_that_is_not_centered_is_still_refused():
    model = hf_model("llama")
    normlab.convert.swap_norms(model)  # normlab RMSNorms, but Llama's stream is not centered
    with pytest.raises(ConversionError, match="is not a LayerNorm: centering the stream would change its output"):
        layernorm_to_rmsnorm(model)


# --- 4, 5. the CLI's errors: one line, no markup read from them -----------------------------

def test_config_mismatch_is_one_line(tmp_path):
    import safetensors.torch

    from normlab.models import TransformerConfig, TransformerLM

    lm = TransformerLM(TransformerConfig(vocab_size=50, d_model=16, n_heads=2, n_layers=3, max_seq_len=8))
    safetensors.torch.save_model(lm, str(tmp_path / "plain.safetensors"))
    (tmp_path / "deeper.json").write_text(json.dumps(dict(lm.cfg.to_dict(), n_layers=6)))
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "plain.safetensors"), str(tmp_path / "out"),
                                      "--config", str(tmp_path / "deeper.json")], env={"COLUMNS": "1000"})
    assert result.exit_code == 2, result.output
    # (Typer's error box wraps at the terminal width it read once per process: unwrap it)
    line = " ".join(part.strip("│ \n") for part in result.output.splitlines())
    deeper = TransformerLM(TransformerConfig.from_dict(dict(lm.cfg.to_dict(), n_layers=6)))
    n = len(deeper.state_dict().keys() - lm.state_dict().keys())
    assert f"{n} missing keys (blocks.3." in line and f"and {n - 3} more)" in line, line
    assert len(result.output.splitlines()) < 8, result.output


def test_conversion_error_is_one_unwrapped_line(tmp_path):
    hf_model("llama").save_pretrained(tmp_path / "src")
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "out"), "-t", "rms"],
                                env={"COLUMNS": "40"})
    assert result.exit_code == 1
    assert any("layernorm_to_rmsnorm: model.layers.0.input_layernorm (LlamaRMSNorm) reads the residual" in line
               and line.endswith("centering the stream would change its output")
               for line in result.output.splitlines()), result.output


def test_cli_output_reads_no_markup_from_user_text(tmp_path, monkeypatch, capsys):
    import normlab.convert
    from normlab.convert import cli

    swap = normlab.convert.swap_norms

    def swap_with_a_bracketed_path(model):
        swap(model).normlab_report.add("encoder.self_attn[kv]", "MultiheadAttention", "left", "[bold]x[/bold]")
        return model

    monkeypatch.setattr(normlab.convert, "swap_norms", swap_with_a_bracketed_path)
    hf_model("gpt2").save_pretrained(tmp_path / "src")
    out = tmp_path / "out[bold]"
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "src"), str(out)], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "encoder.self_attn[kv]" in result.output and "[bold]x[/bold]" in result.output
    assert f"wrote {out}" in result.output
    cli._error("refused: [/tmp] [red]x")  # a stray closing tag would make Rich raise
    assert "refused: [/tmp] [red]x" in capsys.readouterr().err


# --- 6. the Hugging Face docstring says what apply_normlab does to Gemma --------------------

def test_hf_docstring_matches_gemma_behaviour():
    from normlab.integrations import hf

    model = hf.apply_normlab(hf_model("gemma"))
    norms = [m for m in model.modules() if isinstance(m, nn.Module) and "Norm" in type(m).__name__]
    assert norms and all(isinstance(m, normlab.RMSNorm) and m.offset == 1 for m in norms)
    doc = " ".join(hf.__doc__.split())
    assert "norms are left" not in doc
    assert "Gemma's ``x * (1 + weight)`` norms are swapped by ``apply_normlab``" in doc


def test_a_half_precision_model_with_float64_state_and_an_uncopyable_hook_converts():
    import threading

    import torch

    from normlab.convert import layernorm_to_rmsnorm
    from normlab.convert.verify import float32_copy

    lock = threading.Lock()

    class Holder:
        def __init__(self):
            self.lock, self.n = lock, 0

        def hook(self, module, args, output):
            self.n += 1

    model = hf_model("gpt2").to(torch.bfloat16).eval()
    model.register_buffer("calib", torch.ones(3, dtype=torch.float64))
    holder = Holder()
    model.transformer.h[0].register_forward_hook(holder.hook)
    shadow = float32_copy(model)
    assert shadow.calib.dtype == torch.float64 and shadow.transformer.wte.weight.dtype == torch.float32
    assert not shadow.transformer.h[0]._forward_hooks  # the user's hooks stay on the model
    ids = torch.randint(0, 64, (1, 5))
    layernorm_to_rmsnorm(model, example_inputs=(ids,))
    model(ids)
    assert holder.n >= 1
