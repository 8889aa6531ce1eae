"""The residual stream's dtype: the kernels add in float32, so a float64 stream runs the
torch path under auto (float64 sums) and is refused under a forced triton backend; a
float8 stream is refused on every backend."""

import pytest
import torch

import normlab
import normlab.functional as NF
import normlab.ops
from normlab.errors import NormArgumentError
from tests.ops.helpers import needs_kernels

OPS = [lambda x, r, **k: NF.add_layer_norm(x, r, None, None, **k),
       lambda x, r, **k: NF.add_rms_norm(x, r, None, **k),
       lambda x, r, **k: (NF.dropout_add(x, r, **k),) * 2]


@needs_kernels
@pytest.mark.parametrize("op", OPS[:2])
def test_a_float64_stream_is_refused_by_the_forced_kernels(op):
    x = torch.randn(4, 8)
    with normlab.set_backend("triton"):
        with pytest.raises(NormArgumentError, match="float64 residual stream"):
            op(x, torch.randn(4, 8, dtype=torch.float64))
        with pytest.raises(NormArgumentError, match="float64 residual stream"):
            op(x, torch.randn(4, 8), residual_dtype=torch.float64)


@pytest.mark.parametrize("op", OPS)
def test_a_float64_stream_under_auto_sums_in_float64(op, monkeypatch):
    monkeypatch.setattr(normlab.ops, "resolve", lambda x: "triton")  # as auto picks the kernels on a GPU
    x = torch.full((4, 8), 1e-3)
    r = torch.full((4, 8), 1 + 1e-9, dtype=torch.float64)
    with normlab.set_backend("auto"):
        _, new = op(x, r, residual_dtype=torch.float64)
        _, stored = op(x, r)  # stored in x's dtype: the float64 sum, rounded once
    assert new.dtype == torch.float64 and stored.dtype == torch.float32
    torch.testing.assert_close(new, r + x.double(), rtol=0, atol=0)
    torch.testing.assert_close(stored, (r + x.double()).float(), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["torch", pytest.param("triton", marks=needs_kernels)])
@pytest.mark.parametrize("op", OPS)
def test_a_float8_stream_is_refused(op, name):
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8 dtype in this torch")
    x = torch.randn(4, 8)
    with normlab.set_backend(name):
        with pytest.raises(NormArgumentError, match="residual_dtype to be float16, bfloat16, float32, float64"):
            op(x, torch.randn(4, 8), residual_dtype=torch.float8_e4m3fn)
        with pytest.raises(NormArgumentError, match="expected residual to have a floating-point dtype"):
            op(x, torch.randn(4, 8).to(torch.float8_e4m3fn))


def test_per_example_reference_takes_an_empty_batch():
    from normlab.ops import reference

    w, b = reference.per_example_param_grad_sq(torch.zeros(0, 3, 4), torch.zeros(0, 3, 4), (4,))
    assert w.shape == b.shape == (0,)


@needs_kernels
def test_dropout_add_sums_a_float64_stream_on_either_backend():
    x = torch.full((4, 8), 1e-3)
    r = torch.full((4, 8), 1 + 1e-9, dtype=torch.float64)
    with normlab.set_backend("triton"):
        new = NF.dropout_add(x, r, residual_dtype=torch.float64)
    torch.testing.assert_close(new, r + x.double(), rtol=0, atol=0)


@pytest.mark.parametrize("is_rms", [True, False])
def test_offset_and_casting_mode_with_a_float64_stream_under_auto(is_rms, monkeypatch):
    monkeypatch.setattr(normlab.ops, "resolve", lambda x: "triton")  # as auto picks the kernels on a GPU
    x = torch.randn(4, 8)
    r = torch.randn(4, 8, dtype=torch.float64)
    w = torch.randn(8)
    with normlab.set_backend("auto"):
        if is_rms:
            out, new = NF.add_rms_norm(x, r, w, offset=1.0, casting_mode="gemma", residual_dtype=torch.float64)
            want = NF.rms_norm((r + x.double()).float(), (8,), w, offset=1.0, casting_mode="gemma")
        else:
            out, new = NF.add_layer_norm(x, r, w, None, offset=1.0, residual_dtype=torch.float64)
            want = NF.layer_norm((r + x.double()).float(), (8,), w, offset=1.0)
    torch.testing.assert_close(new, r + x.double(), rtol=0, atol=0)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call", [lambda x: NF.dropout_add(x, None), lambda x: NF.add_rms_norm(x, None, None),
                                  lambda x: NF.add_layer_norm(x, None, None, None), lambda x: NF.layer_norm(x, (8,)),
                                  lambda x: NF.rms_norm(x, (8,))])
def test_float8_input_is_refused_by_name(call):
    from normlab.errors import NormDtypeError

    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8 dtype in this torch")
    with pytest.raises(NormDtypeError, match="expected input to have a floating-point dtype"):
        call(torch.randn(4, 8).to(torch.float8_e4m3fn))
