"""Rows whose leading dims have no single stride (QK-norm's [B, T, H, hd] tensor viewed
as [B, H, T, hd]): the Triton kernels read them in place, forward and backward, and give
the reference's outputs and gradients with the torch path's output layout."""

from __future__ import annotations

import pytest
import torch

import normlab
from tests.ops.helpers import DEVICE, check_against_reference, make_inputs, needs_kernels

pytestmark = needs_kernels


@pytest.fixture(autouse=True)
def _triton():
    with normlab.set_backend("triton"):
        yield


def _qk(op, hd, dtype, *, b=2, t=5, h=3, seed=0):
    """Inputs of ``op`` with x a [b, h, t, hd] view of a contiguous [b, t, h, hd] tensor."""
    a = make_inputs(op, (b, t, h, hd), (hd,), dtype, seed=seed)
    a["x"] = a["x"].transpose(1, 2)
    return a


class _LaunchSpy:
    """Wraps a kernel: records the data pointers of the tensors each launch receives."""

    def __init__(self, kernel, seen):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.seen.append({t.data_ptr() for t in args if isinstance(t, torch.Tensor)})
            return launch(*args, **kwargs)
        return run


@pytest.fixture
def launched(monkeypatch):
    """The sets of data pointers the norm kernels were launched with, one per launch."""
    from normlab.ops.triton import norm
    seen = []
    for name in ("_fwd_kernel", "_fwd_looped_kernel", "_bwd_kernel", "_bwd_looped_kernel",
                 "_bwd_split_kernel"):
        monkeypatch.setattr(norm, name, _LaunchSpy(getattr(norm, name), seen))
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hd", [64, 128, 256])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_transposed_heads_match_the_reference(op, hd, dtype):
    a = _qk(op, hd, dtype, seed=hd)
    assert not a["x"].is_contiguous()
    check_against_reference(op, a, (hd,), dtype)


def _norm(op, x, a, hd):
    if op == "layer_norm":
        return normlab.functional.layer_norm(x, hd, a["weight"], a["bias"])
    return normlab.functional.rms_norm(x, hd, a["weight"])


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_the_input_is_read_in_place_forward_and_backward(op, launched, monkeypatch):
    a = _qk(op, 128, torch.bfloat16)
    x = a["x"].requires_grad_()
    monkeypatch.setattr(torch.Tensor, "contiguous",
                        lambda *_a, **_k: pytest.fail("the input was copied"))
    y = _norm(op, x, a, 128)
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    assert len(launched) == 2  # forward, backward
    assert all(x.data_ptr() in ptrs for ptrs in launched)
    # the torch path's layout: contiguous out and dx
    with normlab.set_backend("torch"):
        x2 = x.detach().requires_grad_()
        y2 = _norm(op, x2, a, 128)
        (dx2,) = torch.autograd.grad(y2, x2, g)
    assert y.stride() == y2.stride() == g.stride()
    assert dx.stride() == dx2.stride()


@pytest.mark.parametrize("setting", ["looped", "split"])
def test_looped_and_column_split_kernels_read_in_place(setting, launched):
    from normlab.ops.triton import force_looped, launch
    a = _qk("layer_norm", 64, torch.float32, b=1, t=3, h=2, seed=1)
    x = a["x"].requires_grad_()
    with force_looped(32) if setting == "looped" else launch.tuning(bwd_split=2):
        torch.autograd.grad(_norm("layer_norm", x, a, 64).sum(), x)
        assert len(launched) == 2 and all(x.data_ptr() in ptrs for ptrs in launched)
        check_against_reference("layer_norm", a, (64,), torch.float32)


def test_row_layouts():
    from normlab.ops.triton import launch
    base = torch.randn(2, 5, 3, 8, device=DEVICE)
    x = base.transpose(1, 2)
    lay = launch.row_layout((x, torch.empty_like(x, memory_format=torch.contiguous_format)), 8)
    assert lay.tensors[0] is x and lay.strided and (lay.n1, lay.n2) == (3, 5)
    assert lay.strides == ((120, 8, 24), (120, 40, 8))
    # three row dims that do not merge; a uniform row stride (a slice of rows)
    y = x[:, :, ::2]
    lay = launch.row_layout((y,), 8)
    assert lay.tensors[0] is y and lay.strided and lay.strides == ((120, 8, 48),)
    w = torch.randn(4, 6, 16, device=DEVICE)[:, :, :8]
    lay = launch.row_layout((w,), 8)
    assert lay.tensors[0] is w and not lay.strided and lay.rows == 24 and lay.strides == ((16, 0, 0),)
    # copied: four row dims that do not merge, hidden not unit-stride
    z = torch.randn(2, 3, 4, 5, 8, device=DEVICE).permute(3, 2, 1, 0, 4)
    lay = launch.row_layout((z,), 8)
    assert lay.tensors[0].is_contiguous() and not lay.strided
    lay = launch.row_layout((base.transpose(2, 3),), 3)
    assert lay.tensors[0].is_contiguous()


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"])
def test_other_strided_layouts(op):
    # 3 row dims, 4 row dims (copied) and, for the fused ops, the copying path
    a = make_inputs(op, (2, 3, 4, 6, 16), (16,), torch.float32, seed=3)
    a = {k: (v.permute(3, 2, 1, 0, 4) if k in ("x", "residual") and v is not None else v)
         for k, v in a.items()}
    check_against_reference(op, a, (16,), torch.float32)
    b = _qk(op, 64, torch.float32)
    b["x"] = b["x"][:, :, 1::2]
    if "residual" in b:
        b["residual"] = b["residual"].transpose(1, 2)[:, :, 1::2]
    check_against_reference(op, b, (64,), torch.float32)
