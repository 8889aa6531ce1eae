"""normlab.integrations.hf: apply_normlab and patch(architecture)."""

import pytest
import torch

import normlab
from tests.convert.models import hf_inputs, hf_model, perturb

transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install 'normlab[hf]')")
from normlab.integrations.hf import apply_normlab, patch  # noqa: E402


def _logits(model, kw):
    with torch.no_grad():
        return model.eval()(**kw).logits


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2", "bert", "t5"])
def test_patch_builds_normlab_models_with_equal_logits_and_undoes(name):
    torch.manual_seed(0)
    plain = hf_model(name)
    with patch(name) as handle:
        torch.manual_seed(0)
        patched = hf_model(name)
    assert "active=False" in repr(handle)
    kw = hf_inputs(name)
    torch.testing.assert_close(_logits(patched, kw), _logits(plain, kw), atol=2e-5, rtol=2e-5)
    ours = [m for m in patched.modules() if isinstance(m, (normlab.LayerNorm, normlab.RMSNorm))]
    theirs = [m for m in plain.modules() if "Norm" in type(m).__name__]
    assert len(ours) == len(theirs) > 0
    assert not any(isinstance(m, (normlab.LayerNorm, normlab.RMSNorm)) for m in hf_model(name).modules())


def test_apply_normlab_on_hf_and_rejects_other_models():
    torch.manual_seed(0)
    model = perturb(hf_model("qwen2"), scale=0.05)
    kw = hf_inputs("qwen2")
    y0 = _logits(model, kw)
    report = apply_normlab(model).normlab_report
    assert report.transform == "apply_normlab" and len(report.paths("swapped")) == 5
    torch.testing.assert_close(_logits(model, kw), y0)
    with pytest.raises(TypeError, match="expected a transformers PreTrainedModel"):
        apply_normlab(torch.nn.Linear(2, 2))


def test_patch_unknown_architecture():
    with pytest.raises(ValueError, match="expected one of llama, mistral"):
        patch("gemma")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_patch_t5_in_half_precision_returns_t5_layer_norms_dtype(tmp_path, dtype):
    """transformers keeps T5's wo in float32 in a float16 model, so its norms get float32
    input and must return the weight's dtype, as T5LayerNorm does."""
    torch.manual_seed(0)
    perturb(hf_model("t5"), scale=0.05).save_pretrained(tmp_path)
    t5 = transformers.T5ForConditionalGeneration
    kw = hf_inputs("t5")
    plain = t5.from_pretrained(tmp_path, dtype=dtype)
    if dtype == torch.float16:
        assert plain.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    with patch("t5"):
        patched = t5.from_pretrained(tmp_path, dtype=dtype)
    ours, theirs = patched.encoder.block[0].layer[1].layer_norm, plain.encoder.block[0].layer[1].layer_norm
    assert isinstance(ours, normlab.RMSNorm) and ours.weight.dtype == dtype
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        y_ours, y_theirs = ours(x), theirs(x)
    assert y_ours.dtype == y_theirs.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y_ours.float(), y_theirs.float(), atol=eps, rtol=2 * eps)  # within one rounding
    reference = _logits(t5.from_pretrained(tmp_path), kw)  # float32
    got, want = _logits(patched, kw), _logits(plain, kw)
    assert got.dtype == want.dtype
    tol = 1e-2 if dtype == torch.float16 else 8e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    # as close to the float32 model as Hugging Face's own half-precision model is
    assert (got.float() - reference).abs().max() <= 1.5 * (want.float() - reference).abs().max()
