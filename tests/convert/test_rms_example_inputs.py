"""layernorm_to_rmsnorm names example_inputs when they are not inputs the model takes."""

import copy

import pytest
import torch

from normlab.convert import layernorm_to_rmsnorm
from normlab.convert.report import ConversionError
from normlab.errors import NormTypeError
from tests.convert.models import hf_model, perturb

pytest.importorskip("transformers")


@pytest.mark.parametrize("bad", [5, "abc", {1, 2}])
def test_example_inputs_of_no_accepted_type_are_refused_by_name(bad):
    model = perturb(hf_model("gpt2"))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(NormTypeError, match="layernorm_to_rmsnorm: expected example_inputs to be a tensor, a tuple "
                                            f"or list .* got {type(bad).__name__}"):
        layernorm_to_rmsnorm(model, example_inputs=bad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_model_that_fails_on_its_example_inputs_is_a_conversion_error_left_unchanged():
    model = perturb(hf_model("gpt2"))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConversionError, match="layernorm_to_rmsnorm: the model failed on example_inputs "
                                              r"\(ValueError: .*input_ids.*\); the model is left unchanged"):
        layernorm_to_rmsnorm(model, example_inputs={"foo": 1})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.transformer.h[0].ln_1) is type(hf_model("gpt2").transformer.h[0].ln_1)


def test_out_of_memory_on_the_example_inputs_propagates_as_it_is(monkeypatch):
    import normlab.convert.rms as rms

    def oom(model, inputs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(rms, "run_outputs", oom)
    with pytest.raises(torch.OutOfMemoryError):
        layernorm_to_rmsnorm(perturb(hf_model("gpt2")), example_inputs=torch.zeros(1, 3, dtype=torch.long))
