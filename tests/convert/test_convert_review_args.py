"""Review fixes: `normlab convert --overwrite` removes the old model's index and shards; a
patch handle's ``with`` blocks nest; bad arguments to normlab.convert's public functions
are named before any work; a float64 T5LayerNorm left by apply_normlab gets a true
reason; the patched (and swapped) Llama and T5 norms compute float64 as Hugging Face's."""

import copy
import math

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from normlab.cli import app
from normlab.convert import (
    fold_norm_affine,
    fuse,
    layernorm_to_rmsnorm,
    register_block,
    register_model,
    swap_norms,
    unfuse,
)
from normlab.convert.blocks import _add_norm
from tests.convert.models import PreLNLM, perturb

transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install 'normlab[hf]')")
from normlab.integrations.hf import LlamaStyleRMSNorm, T5StyleRMSNorm, apply_normlab, patch  # noqa: E402

ml = pytest.importorskip("transformers.models.llama.modeling_llama")
mt = pytest.importorskip("transformers.models.t5.modeling_t5")

_IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def _llama_cfg():
    return transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1)


def _t5_cfg():
    return transformers.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                                 decoder_start_token_id=0, dropout_rate=0.0)


def _build(cls, cfg):
    """A float32 model in eval mode, its norm weights away from 1."""
    torch.manual_seed(0)
    model = cls(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _inputs(model):
    kw = {"input_ids": _IDS}
    if model.config.is_encoder_decoder:
        kw["decoder_input_ids"] = _IDS.flip(-1)
    return kw


# -------------------------------------------------- 1. convert --overwrite over a sharded model


def test_convert_overwrite_removes_the_old_models_index_and_shards_and_keeps_other_files(tmp_path):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2,
                                                                 n_positions=16))
    out = tmp_path / "out"
    gpt2.save_pretrained(out, max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").is_file()
    (out / "notes.txt").write_text("mine")
    (out / "tokenizer.json").write_text("{}")
    src = tmp_path / "llama"
    llama = _build(transformers.LlamaForCausalLM, _llama_cfg())
    llama.save_pretrained(src)

    r = CliRunner().invoke(app, ["convert", str(src), str(out), "-t", "swap", "--overwrite"],
                           env={"COLUMNS": "400"})
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" not in names, names  # it named the gpt2's keys and shards
    assert not [n for n in names if n.startswith("model-")], names
    assert (out / "notes.txt").read_text() == "mine" and (out / "tokenizer.json").is_file()
    back = transformers.LlamaForCausalLM.from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():
        assert torch.equal(back(**_inputs(back)).logits, llama(**_inputs(llama)).logits)


# -------------------------------------------------- 2. a patch handle's with blocks nest


def test_a_patch_handle_entered_inside_its_own_block_stays_patched_until_the_outer_block_ends():
    original = ml.LlamaRMSNorm
    p = patch("llama")
    p.undo()
    try:
        with p:
            with p:  # (a helper that also enters the handle)
                assert ml.LlamaRMSNorm is LlamaStyleRMSNorm
            assert ml.LlamaRMSNorm is LlamaStyleRMSNorm  # was the original class again here
            model = transformers.LlamaForCausalLM(_llama_cfg())
            assert isinstance(model.model.norm, LlamaStyleRMSNorm)
        assert ml.LlamaRMSNorm is original
        # a handle made and entered at once, entered again inside
        with patch("llama") as q:
            with q:
                pass
            assert ml.LlamaRMSNorm is LlamaStyleRMSNorm
        assert ml.LlamaRMSNorm is original
        # undo() inside a block releases the handle at once; the block's end then does nothing
        with p:
            p.undo()
            assert ml.LlamaRMSNorm is original
        assert ml.LlamaRMSNorm is original
    finally:
        p.undo()
    assert ml.LlamaRMSNorm is original


# -------------------------------------------------- 3. bad arguments are named, before any work


def _refused(error, name, fn, *args, **kw):
    with pytest.raises(error) as info:
        fn(*args, **kw)
    assert name in str(info.value), str(info.value)
    return info.value


@pytest.mark.parametrize("call,name", [
    (lambda m: swap_norms("model"), "expected model to be a torch.nn.Module"),
    (lambda m: swap_norms(m, include=3), "expected include to be a str or an iterable of str"),
    (lambda m: swap_norms(m, exclude=["ln_f", 3]), "expected exclude to be a str or an iterable of str"),
    (lambda m: fold_norm_affine(m, exclude=b"x"), "expected exclude to be a str or an iterable of str"),
    (lambda m: fold_norm_affine(m, include=2.5), "expected include to be"),
    (lambda m: fold_norm_affine(m, add_bias="False"), "expected add_bias to be a bool"),
    (lambda m: fold_norm_affine(m, add_bias=2), "expected add_bias to be a bool"),
    (lambda m: fold_norm_affine(None), "expected model to be a torch.nn.Module"),
    (lambda m: layernorm_to_rmsnorm([m]), "expected model to be a torch.nn.Module"),
    (lambda m: layernorm_to_rmsnorm(m, atol="1e-4"), "expected atol to be a finite number >= 0"),
    (lambda m: layernorm_to_rmsnorm(m, rtol=True), "expected rtol to be a finite number >= 0"),
    (lambda m: fuse("block"), "expected block to be a torch.nn.Module"),
    (lambda m: unfuse(3), "expected block to be a torch.nn.Module"),
    (lambda m: register_block(nn.TransformerEncoderLayer), "expected each qualified name to be a non-empty str"),
    (lambda m: register_block("my.Block", forward="forward"), "expected forward to be None or"),
    (lambda m: register_model(None), "expected each qualified name to be a non-empty str"),
], ids=["swap_norms-model", "swap_norms-include", "swap_norms-exclude", "fold-exclude-bytes", "fold-include",
        "fold-add_bias-str", "fold-add_bias-int", "fold-model", "rms-model", "rms-atol-str", "rms-rtol-bool",
        "fuse-block", "unfuse-block", "register_block-class", "register_block-forward", "register_model-None"])
def test_arguments_of_the_wrong_type_are_a_type_error_naming_them(call, name):
    model = perturb(PreLNLM())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    err = _refused(TypeError, name, call, model)
    assert isinstance(err, ValueError)  # (NormTypeError: also what ValueError handlers catch)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not hasattr(model, "normlab_report")


@pytest.mark.parametrize("kw,name", [
    (dict(atol=-1.0, rtol=-1.0), "expected atol to be a finite number >= 0, got -1.0"),
    (dict(rtol=-1e-3), "expected rtol to be a finite number >= 0, got -0.001"),
    (dict(atol=math.nan), "expected atol to be a finite number >= 0, got nan"),
    (dict(rtol=math.inf), "expected rtol to be a finite number >= 0, got inf"),
])
def test_bad_tolerances_are_refused_before_the_conversion(kw, name):
    model = perturb(transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=16)), scale=0.05).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    _refused(ValueError, name, layernorm_to_rmsnorm, model, example_inputs=_IDS, **kw)
    assert not calls  # nothing ran: no reference outputs, no conversion, no undo
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_string_add_bias_adds_no_bias():
    falcon = transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)).eval()
    keys = set(falcon.state_dict())
    _refused(TypeError, "add_bias", fold_norm_affine, falcon, add_bias="False")
    assert set(falcon.state_dict()) == keys


def test_a_block_without_a_fused_forward_and_other_arguments_are_named():
    _refused(ValueError, "expected block to be a block whose fused forward is registered", fuse, nn.Linear(2, 2))
    _refused(ValueError, "expected at least one qualified name", register_model)
    _refused(TypeError, "patch(architecture)", patch, 3)
    _refused(ValueError, "patch(architecture)", patch, 3)  # (a ValueError, as it was)
    _refused(TypeError, "apply_normlab(model)", apply_normlab, "model")


# -------------------------------------------------- 4. a float64 T5's norms: the true reason


def test_a_float64_t5_norm_is_left_for_its_float32_variance_not_a_half_precision_cast():
    t5 = _build(transformers.T5ForConditionalGeneration, _t5_cfg()).double()
    apply_normlab(t5)
    left = [reason for reason in t5.normlab_report.left.values() if reason.startswith("T5LayerNorm")]
    assert left
    for reason in left:
        assert "half-precision" not in reason, reason
        assert "variance in float32 whatever its input's dtype" in reason, reason
    # the half-precision case keeps its own reason
    t5 = _build(transformers.T5ForConditionalGeneration, _t5_cfg()).bfloat16()
    apply_normlab(t5)
    assert any("half-precision dtype" in r for r in t5.normlab_report.left.values())


# -------------------------------------------------- 5. float64: the patched norms are Hugging Face's


@pytest.mark.parametrize("arch,cls,cfg", [
    ("llama", transformers.LlamaForCausalLM, _llama_cfg),
    ("t5", transformers.T5ForConditionalGeneration, _t5_cfg),
])
def test_a_float64_model_built_under_patch_computes_as_the_unpatched_one(arch, cls, cfg):
    orig = _build(cls, cfg()).double()
    with patch(arch):
        patched = cls(cfg()).eval()
    patched.load_state_dict(orig.state_dict())
    patched.double()
    assert type(patched.get_encoder().final_layer_norm if arch == "t5" else patched.model.norm) in (
        LlamaStyleRMSNorm, T5StyleRMSNorm)
    emb = [orig.get_input_embeddings(), patched.get_input_embeddings()]
    for e in emb:
        e.weight.grad = None
    a, b = orig(**_inputs(orig)).logits, patched(**_inputs(patched)).logits
    assert a.dtype == b.dtype == torch.float64
    assert torch.equal(a, b), (a - b).abs().max()
    a.square().mean().backward()
    b.square().mean().backward()
    assert torch.equal(emb[0].weight.grad, emb[1].weight.grad)
    # apply_normlab agrees: a float64 Llama is swapped and keeps its outputs bit for bit
    # (a float64 T5 is left, test above)
    applied = copy.deepcopy(orig)
    apply_normlab(applied)
    if arch == "llama":
        assert applied.normlab_report.paths("swapped") and not applied.normlab_report.left
    assert torch.equal(applied(**_inputs(applied)).logits, a)  # (in grad mode, as ``a``: SDPA's bits differ)


def test_the_patched_norms_are_hugging_faces_wherever_float64_is_involved():
    g = torch.Generator().manual_seed(0)
    for ours_cls, hf_cls in ((LlamaStyleRMSNorm, ml.LlamaRMSNorm), (T5StyleRMSNorm, mt.T5LayerNorm)):
        for x_dt, w_dt in ((torch.float64, torch.float64), (torch.float64, torch.float32),
                           (torch.float32, torch.float64), (torch.float64, torch.bfloat16)):
            hf = hf_cls(16, eps=1e-6)
            with torch.no_grad():
                hf.weight.copy_(torch.randn(16, generator=g) * 0.3 + 1)
            hf.to(w_dt)
            ours = ours_cls(16, eps=1e-6).to(w_dt)
            ours.load_state_dict(hf.state_dict())
            x, r = (torch.randn(2, 5, 16, generator=g) * 3).to(x_dt), (torch.randn(2, 5, 16, generator=g)).to(x_dt)
            want, got = hf(x), ours(x)
            assert got.dtype == want.dtype and torch.equal(got, want), (ours_cls, x_dt, w_dt)
            out, new_residual = _add_norm(ours, x, r)  # the fused block's call
            assert torch.equal(new_residual, r + x) and torch.equal(out, hf(r + x)), (ours_cls, x_dt, w_dt)
