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
