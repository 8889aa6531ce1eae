"""A norm swap_norms verified on a probe in one dtype, cast later to another: the cast
is probed there, and where the original computes otherwise a warning names it."""

import copy
import pickle
import warnings

import pytest
import torch

from normlab.convert import swap_norms
from normlab.convert.detect import CastCheck
from tests.convert.models import hf_inputs, hf_model, perturb

pytest.importorskip("transformers")


def _logits(model, inputs):
    with torch.no_grad():
        return model.eval()(**inputs).logits


@pytest.mark.parametrize("name,cast,original", [
    ("t5", torch.bfloat16, "T5LayerNorm"),
    ("t5", torch.float16, "T5LayerNorm"),
    ("t5", torch.float64, "T5LayerNorm"),
    ("gemma", torch.float64, "GemmaRMSNorm"),
])
def test_a_cast_to_a_dtype_where_the_original_differs_warns(name, cast, original):
    model = perturb(hf_model(name))
    swapped = swap_norms(copy.deepcopy(model))
    with pytest.warns(UserWarning, match=f"normlab.convert: a {original} swapped for normlab.\\w+ in float32 was "
                                         f"cast to {str(cast).removeprefix('torch.')}, where it computes otherwise"):
        swapped.to(cast)
    # what it warns about is there: the outputs are no longer the original's cast alike
    inputs = hf_inputs(name)
    assert not torch.equal(_logits(swapped, inputs), _logits(model.to(cast), inputs))


@pytest.mark.parametrize("name,cast", [("llama", torch.bfloat16), ("llama", torch.float64),
                                       ("qwen3", torch.float64), ("gemma", torch.bfloat16), ("gpt2", torch.float16)])
def test_a_cast_where_the_swap_still_holds_is_silent(name, cast):
    model = perturb(hf_model(name))
    swapped = swap_norms(copy.deepcopy(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        swapped.to(cast)
        swapped.to(torch.float32)  # and back
    if cast is torch.float64:  # (bit for bit there, as a swap of the float64 model)
        inputs = hf_inputs(name)
        assert torch.equal(_logits(swapped.to(cast), inputs), _logits(model.to(cast), inputs))


def test_torchs_own_norms_carry_no_check_and_a_checked_model_pickles():
    gpt2 = swap_norms(hf_model("gpt2"))
    assert not any(hasattr(m, "cast_check") for m in gpt2.modules())
    llama = swap_norms(hf_model("llama"))
    checks = [m.cast_check for m in llama.modules() if hasattr(m, "cast_check")]
    assert checks and all(isinstance(c, CastCheck) for c in checks)
    again = pickle.loads(pickle.dumps(llama))
    assert all(isinstance(m.cast_check, CastCheck) for m in again.modules() if hasattr(m, "cast_check"))
    assert llama.state_dict().keys() == again.state_dict().keys() == hf_model("llama").state_dict().keys()
