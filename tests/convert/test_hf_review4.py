"""Hugging Face conversions, from a review: a folded Llama-family model cast to bfloat16
or float16 after folding, the report of a bias that the architecture cannot reload, a
fused block whose norm was replaced or wrapped afterwards, and the reason given for a
Gemma norm the probe could not match."""

import pytest
import torch

from normlab.convert import fold_norm_affine
from tests.convert.models import hf_inputs, hf_model, perturb

transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install 'normlab[hf]')")
from normlab.integrations.hf import apply_normlab  # noqa: E402


@pytest.mark.parametrize("name", ["llama", "qwen2", "t5"])
@pytest.mark.parametrize("cast", ["to_bf16", "half"])
def test_a_model_folded_in_float32_runs_after_a_cast(name, cast):
    torch.manual_seed(0)
    model = perturb(hf_model(name), 0.05).eval()
    ref = perturb(hf_model(name), 0.05).eval()
    ref.load_state_dict(model.state_dict())
    fold_norm_affine(model)
    assert model.normlab_report.paths("folded")
    dt = torch.bfloat16 if cast == "to_bf16" else torch.float16
    for m in (model, ref):
        m.to(dt) if cast == "to_bf16" else m.half()
    with torch.no_grad():
        got = model(**hf_inputs(name)).logits
        want = ref(**hf_inputs(name)).logits
    assert got.dtype is want.dtype is dt
    # the fold is exact in float32; both models round their own float32 weights once
    torch.testing.assert_close(got.float(), want.float(), atol=0.15, rtol=0.05)


def test_the_remembered_dtype_of_a_folded_weight_follows_to_and_back():
    model = hf_model("llama").eval()
    fold_norm_affine(model)
    norm = model.model.layers[0].input_layernorm
    assert norm.weight_dtype is torch.float32
    model.to(torch.bfloat16)
    assert norm.weight_dtype is torch.bfloat16
    model.float()
    assert norm.weight_dtype is torch.float32
    model.to("meta")  # a device move leaves the dtype
    assert norm.weight_dtype is torch.float32


def test_an_added_bias_the_architecture_cannot_reload_is_reported():
    model = perturb(hf_model("gpt_neox"), 0.05).eval()  # a beta to absorb
    fold_norm_affine(model, add_bias=True)
    added = [e for e in model.normlab_report.entries if e.action == "added"]
    assert added
    assert all("GPTNeoXForCausalLM has no slot for" in e.detail and "from_pretrained drops it" in e.detail
               for e in added), [e.detail for e in added]


def test_a_fused_norm_replaced_after_fusion_runs_unfused():
    torch.manual_seed(0)
    model = perturb(hf_model("llama"), 0.05).eval()
    with torch.no_grad():
        want = model(**hf_inputs("llama")).logits
    apply_normlab(model)

    class Wrap(torch.nn.Module):  # an adapter-style wrapper taking one input
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    layer = model.model.layers[0]
    layer.post_attention_layernorm = Wrap(layer.post_attention_layernorm)
    with torch.no_grad():
        got = model(**hf_inputs("llama")).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_gemma_norm_the_probe_cannot_match_gets_a_true_reason():
    from normlab.convert import swap_norms

    model = hf_model("gemma").double().eval()  # Gemma's norm computes in float32 whatever the input
    swap_norms(model)
    left = model.normlab_report.left
    assert left
    for reason in left.values():
        assert "does not take" not in reason
        assert "in float32 whatever its input's dtype" in reason, reason
