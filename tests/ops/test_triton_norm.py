"""The Triton kernels (interpreted on CPU, real on CUDA) against ops/reference.py."""

from __future__ import annotations

import pytest
import torch

import normlab
from normlab.errors import NormArgumentError
from tests.ops.helpers import (
    DEVICE,
    OPS,
    call,
    check_against_reference,
    make_inputs,
    needs_kernels,
)

pytestmark = needs_kernels


@pytest.fixture(autouse=True)
def _triton():
    with normlab.set_backend("triton"):
        yield


def _looped(block):
    from normlab.ops.triton import force_looped
    return force_looped(block)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("hidden", [1, 3, 17, 128, 1000, 4097])
def test_hidden_sizes_fp32(op, hidden):
    a = make_inputs(op, (7, hidden), (hidden,), torch.float32)
    check_against_reference(op, a, (hidden,), torch.float32)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("rows", [0, 1, 64])
def test_row_counts(op, rows):
    a = make_inputs(op, (rows, 17), (17,), torch.float32)
    check_against_reference(op, a, (17,), torch.float32)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("hidden,block", [(17, 8), (1000, 256), (4097, 1024)])
def test_looped_kernels(op, hidden, block):
    a = make_inputs(op, (5, hidden), (hidden,), torch.float32, seed=hidden)
    with _looped(block):
        check_against_reference(op, a, (hidden,), torch.float32)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("hidden,split", [(17, 4), (40, 2), (1000, 2)])
def test_column_split_backward(op, hidden, split):
    # the backward's programs share each row, each owning 1/split of its columns (17 in
    # 4 parts of 8: the last part is all padding)
    from normlab.ops.triton import launch
    a = make_inputs(op, (9, hidden), (hidden,), torch.float32, seed=hidden)
    with launch.tuning(bwd_split=split):
        assert launch.block_config(hidden).bwd_split == split
        check_against_reference(op, a, (hidden,), torch.float32)


def test_column_split_with_dropout_and_residual_matches_unsplit():
    from normlab.ops.triton import launch
    a = make_inputs("add_layer_norm", (6, 40), (40,), torch.float32)
    grads = []
    for split in (1, 2):
        leaves = [a[k].clone().requires_grad_() for k in ("x", "residual", "weight", "bias")]
        gen = torch.Generator(device=DEVICE).manual_seed(3)
        with launch.tuning(bwd_split=split):
            out, new_res = normlab.functional.add_layer_norm(
                *leaves, dropout_p=0.3, training=True, generator=gen)
            grads.append(torch.autograd.grad(out.square().sum() + new_res.sum(), leaves))
    for p, q in zip(*grads, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_tuning_rejects_a_split_that_is_not_a_power_of_two():
    from normlab.ops.triton import launch
    with pytest.raises(ValueError, match="bwd_split.*power of two"), launch.tuning(bwd_split=3):
        pass


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weight_fp32", [False, True])
def test_half_precision(op, dtype, weight_fp32):
    a = make_inputs(op, (2, 4, 96), (96,), dtype,
                    weight_dtype=torch.float32 if weight_fp32 else dtype)
    check_against_reference(op, a, (96,), dtype)


@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
@pytest.mark.parametrize("x_dtype,residual_dtype", [
    (torch.bfloat16, torch.float32),   # fp32 residual stream, bf16 activations
    (torch.float16, torch.float32),
    (torch.float32, torch.bfloat16),   # new_residual rounded to bf16, out rounded twice
])
def test_residual_dtype(op, x_dtype, residual_dtype):
    a = make_inputs(op, (6, 40), (40,), x_dtype, weight_dtype=torch.float32,
                    residual_in_dtype=residual_dtype)
    # tolerance of the coarser dtype: out is rounded through new_residual's dtype
    coarse = residual_dtype if x_dtype == torch.float32 else x_dtype
    check_against_reference(op, a, (40,), coarse, residual_dtype=residual_dtype)


@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
def test_fused_without_residual(op):
    a = make_inputs(op, (3, 33), (33,), torch.float32, residual=False)
    check_against_reference(op, a, (33,), torch.float32)
    a = make_inputs(op, (3, 33), (33,), torch.bfloat16, residual=False)
    check_against_reference(op, a, (33,), torch.bfloat16, residual_dtype=torch.float32)


@pytest.mark.parametrize("op", OPS)
def test_without_affine(op):
    a = make_inputs(op, (4, 24), (24,), torch.float32, weight=False, bias=False)
    check_against_reference(op, a, (24,), torch.float32)
    if "layer" in op:  # weight without bias
        a = make_inputs(op, (4, 24), (24,), torch.float32, bias=False)
        check_against_reference(op, a, (24,), torch.float32)


@pytest.mark.parametrize("op", OPS)
def test_leading_dims_and_multi_dim_normalized_shape(op):
    a = make_inputs(op, (2, 3, 4, 5), (4, 5), torch.float32)
    check_against_reference(op, a, (4, 5), torch.float32)


@pytest.mark.parametrize("op", OPS)
def test_non_contiguous_inputs(op):
    a = make_inputs(op, (6, 8, 48), (48,), torch.float32)
    # strided rows (a view the kernels read in place) and a transposed layout (copied)
    a["x"] = a["x"][::2, :, :]
    if "residual" in a:
        a["residual"] = a["residual"].transpose(0, 1).contiguous().transpose(0, 1)[1::2]
    assert not a["x"].is_contiguous()
    check_against_reference(op, a, (48,), torch.float32)
    b = make_inputs(op, (16, 5, 12), (12,), torch.float32)
    b = {k: (v.transpose(0, 1) if k in ("x", "residual") and v is not None else v)
         for k, v in b.items()}
    check_against_reference(op, b, (12,), torch.float32)


def test_non_contiguous_grad_output():
    x = torch.randn(4, 32, device=DEVICE, requires_grad=True)
    w = torch.randn(32, device=DEVICE, requires_grad=True)
    g = torch.randn(32, 4, device=DEVICE).t()  # strided along the hidden dim
    y = normlab.functional.rms_norm(x, 32, w)
    dx, dw = torch.autograd.grad(y, (x, w), g)
    x2, w2 = x.detach().requires_grad_(), w.detach().requires_grad_()
    from normlab.ops import reference
    ex, ew = torch.autograd.grad(reference.rms_norm(x2, (32,), w2), (x2, w2), g)
    torch.testing.assert_close(dx, ex, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, ew, rtol=1e-5, atol=1e-5)


def test_new_residual_gradient_flows_without_out():
    # Pre-LN uses new_residual downstream: its gradient must reach x and residual
    a = make_inputs("add_rms_norm", (3, 16), (16,), torch.float32)
    x = a["x"].requires_grad_()
    r = a["residual"].requires_grad_()
    _out, new_res = normlab.functional.add_rms_norm(x, r, a["weight"])
    g = torch.randn_like(new_res)
    dx, dr = torch.autograd.grad(new_res, (x, r), g)
    torch.testing.assert_close(dx, g)
    torch.testing.assert_close(dr, g)


def test_backward_is_deterministic():
    a = make_inputs("add_layer_norm", (64, 40), (40,), torch.float32)
    runs = []
    for _ in range(2):
        w = a["weight"].clone().requires_grad_()
        b = a["bias"].clone().requires_grad_()
        out, _ = normlab.functional.add_layer_norm(a["x"], a["residual"], w, b)
        runs.append(torch.autograd.grad(out.sum() + out.square().sum(), (w, b)))
    assert all(torch.equal(p, q) for p, q in zip(*runs, strict=True))


# ------------------------------------------------------------------------- errors


def test_hidden_too_large():
    from normlab.ops.triton import MAX_HIDDEN
    x = torch.zeros(1, MAX_HIDDEN + 1, device=DEVICE)
    with pytest.raises(NormArgumentError, match=f"from 1 to {MAX_HIDDEN}, got {MAX_HIDDEN + 1}"):
        normlab.functional.rms_norm(x, MAX_HIDDEN + 1)


def test_float64_forced_on_triton_errors_and_auto_falls_back():
    x = torch.randn(3, 8, dtype=torch.float64, device=DEVICE)
    with pytest.raises(NormArgumentError, match="float16, bfloat16 and float32.*got torch.float64"):
        normlab.functional.layer_norm(x, 8)
    with normlab.set_backend("auto"):
        y = normlab.functional.layer_norm(x, 8)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (8,)))


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter rule applies to CPU tensors")
def test_triton_on_cpu_without_interpreter_errors(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        normlab.functional.layer_norm(torch.randn(2, 4), 4)


def test_call_matches_module_forward():
    # modules dispatch through the same ops
    m = normlab.RMSNorm(24).to(DEVICE)
    with torch.no_grad():
        m.weight.copy_(torch.linspace(0.5, 1.5, 24))
    x = torch.randn(5, 24, device=DEVICE)
    a = {"x": x, "weight": m.weight.detach(), "bias": None}
    torch.testing.assert_close(m(x), call("rms_norm", a, (24,))[0])


def test_launch_overrides_are_values_per_context():
    """force_looped/tuning set an immutable value for their block only (threads see their own)."""
    import threading

    from normlab.ops.triton import launch

    base = launch.block_config(1024)
    assert launch.current_overrides() == launch.DEFAULT_OVERRIDES
    with launch.force_looped(256):
        assert launch.block_config(1024).looped and launch.block_config(1024).block == 256
        seen = []
        t = threading.Thread(target=lambda: seen.append(launch.block_config(1024)))
        t.start()
        t.join()
        assert seen == [base]  # another thread: the defaults
        with launch.tuning(fwd_warps=2):
            assert launch.block_config(1024).num_warps == 2 and launch.block_config(1024).looped
    assert launch.block_config(1024) == base
    explicit = launch.block_config(1024, launch.LaunchOverrides(single_block=512, chunk=512))
    assert explicit.looped and explicit.block == 512 and launch.block_config(1024) == base
    with pytest.raises(ValueError, match="unknown settings"):
        launch.tuning(chunk=3)


def test_a_backward_on_autograd_device_thread_sees_the_callers_launch_settings():
    """On CUDA autograd runs a backward on its own device thread, where the caller's
    context variables are not set; the engine carries a copy of the caller's context in
    its thread-local state. Simulated on a plain thread with that state set as the engine
    sets it (``_engine_run_backward``); on a GPU the next test runs the real engine."""
    import contextvars
    import threading

    from normlab.ops.triton import launch

    base = launch.block_config(1024)
    with launch.tuning(bwd_split=2):
        caller = contextvars.copy_context()
    seen = []

    def device_thread():
        seen.append(launch.block_config(1024))  # nothing stashed: the defaults
        torch._C._stash_obj_in_tls("context", caller)
        try:
            seen.append(launch.block_config(1024))
            with launch.force_looped(256):  # the thread's own setting, on top of the caller's
                seen.append(launch.current_overrides())
        finally:
            torch._C._remove_obj_from_tls("context")
        seen.append(launch.block_config(1024))

    t = threading.Thread(target=device_thread)
    t.start()
    t.join()
    assert seen[0] == base and seen[3] == base
    assert seen[1].bwd_split == 2 and not seen[1].looped
    assert seen[2] == launch.LaunchOverrides(single_block=256, chunk=256, bwd_split=2)


@pytest.mark.skipif(DEVICE != "cuda", reason="autograd runs a CUDA backward on a device thread")
def test_launch_settings_reach_a_cuda_backward(monkeypatch):
    import threading

    from normlab.ops.triton import launch

    seen = []
    real = launch.block_config

    def spy(hidden, overrides=None):
        cfg = real(hidden, overrides)
        seen.append((threading.current_thread() is threading.main_thread(), cfg.bwd_split))
        return cfg

    monkeypatch.setattr(launch, "block_config", spy)
    a = make_inputs("layer_norm", (9, 40), (40,), torch.float32, seed=1)
    x = a["x"].clone().requires_grad_()
    with normlab.set_backend("triton"), launch.tuning(bwd_split=2):
        normlab.functional.layer_norm(x, (40,), a["weight"], a["bias"]).square().sum().backward()
    assert seen and all(split == 2 for _, split in seen), seen
    assert any(not main for main, _ in seen), "the backward ran on the calling thread"
