"""The RMSNorm op under torch.func and forward-mode AD beyond torch's size (second-order
forward derivatives were wrong, forward-over-forward failed, a permuted input's tangent
had the wrong layout) and fused dropout under torch.compile with dynamic shapes."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as TF
from torch.func import jacfwd, jacrev

import normlab
import normlab.functional as NF
from normlab.ops import eager

# above eager.NATIVE_RMS_MAX_NUMEL: normlab's own path, not torch's op
ROWS, HIDDEN = 300, 256


def _scaled(fn, x):
    # (x * s) ** 3 summed: RMSNorm is scale-invariant, so every derivative in s is ~0
    return lambda s: (fn(x * s, (x.shape[-1],)) ** 3).sum()


@pytest.mark.parametrize("order", ["rev_over_fwd", "fwd_over_fwd"])
def test_second_order_forward_derivatives_are_torchs(order):
    assert ROWS * HIDDEN > eager.NATIVE_RMS_MAX_NUMEL
    torch.manual_seed(0)
    x, s = torch.randn(ROWS, HIDDEN, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    outer = jacrev if order == "rev_over_fwd" else jacfwd
    ours, theirs = outer(jacfwd(_scaled(NF.rms_norm, x)))(s), outer(jacfwd(_scaled(TF.rms_norm, x)))(s)
    torch.testing.assert_close(ours, theirs, atol=1e-8, rtol=0)


def test_a_mixed_dtype_weight_has_torchs_second_derivatives():
    torch.manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64)
    w = torch.randn(5)  # float32 weight, float64 x: normlab's path at any size
    f = lambda x: (NF.rms_norm(x, (5,), w) ** 3).sum()  # noqa: E731
    g = lambda x: (TF.rms_norm(x, (5,), w.double()) ** 3).sum()  # noqa: E731
    torch.testing.assert_close(jacrev(jacfwd(f))(x), jacrev(jacfwd(g))(x))


def test_the_module_under_dual_tensors_differentiates_again_as_torchs():
    torch.manual_seed(0)
    ours, theirs = normlab.RMSNorm(HIDDEN).double(), torch.nn.RMSNorm(HIDDEN, eps=None).double()
    x = torch.randn(ROWS, HIDDEN, dtype=torch.float64, requires_grad=True)
    t = torch.randn_like(x)
    grads = []
    for m in (ours, theirs):
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(m(fwAD.make_dual(x, t))).tangent
        grads.append(torch.autograd.grad(tangent.square().sum(), x)[0])
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("make", [
    lambda: torch.randn(1, 512, 300).transpose(1, 2),  # [1, 300, 512], rows read across strides
    lambda: torch.randn(512, 300).t(),
])
def test_forward_ad_of_a_permuted_input(make):
    torch.manual_seed(0)
    x = make()
    t = torch.randn_like(x)
    m, ref = normlab.RMSNorm(512), torch.nn.RMSNorm(512)
    outs = []
    for mod in (m, ref):
        with fwAD.dual_level():
            outs.append(fwAD.unpack_dual(mod(fwAD.make_dual(x, t))).tangent)
    torch.testing.assert_close(outs[0], outs[1])


@pytest.mark.parametrize("cls", [normlab.RMSNorm, normlab.LayerNorm])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_dropout_compiles_as_the_shape_changes(cls, dtype):
    torch._dynamo.reset()
    module = cls(16, dtype=dtype).train()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    for T in (4, 8, 12):  # the second call makes the shape symbolic (automatic dynamic)
        torch.manual_seed(T)
        x, r = torch.randn(T, 16, dtype=dtype), torch.randn(T, 16, dtype=dtype)
        out, new_residual = compiled(x, r, dropout_p=0.25)
        kept = (new_residual - r) != 0  # each element kept (scaled) or dropped
        torch.testing.assert_close(new_residual[kept], (r + x / 0.75)[kept])
        assert 0 < int(kept.sum()) < x.numel()


def test_the_functions_own_jvp_differentiates_again():
    # RMSNormFunction (kept for the per-example variant): its jvp recomputes rstd from x
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64)
    t = torch.randn_like(x)
    grads = []
    for fn in (lambda x: eager.RMSNormFunction.apply(x, (6,), w, 1e-6)[0],
               lambda x: TF.rms_norm(x, (6,), w, 1e-6)):
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(fn(fwAD.make_dual(x, t))).tangent
        grads.append(torch.autograd.grad(tangent.square().sum(), x)[0])
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_transforms_give_the_eager_paths_bits(dtype):
    from torch.func import vmap

    torch.manual_seed(0)
    x, w = (torch.randn(1024, 256) * 3).to(dtype), torch.randn(256).to(dtype)
    eager_out = NF.rms_norm(x, (256,), w)
    mapped = vmap(lambda a: NF.rms_norm(a, (256,), w))(x.view(2, 512, 256)).reshape(1024, 256)
    with fwAD.dual_level():
        primal = fwAD.unpack_dual(NF.rms_norm(fwAD.make_dual(x, torch.randn_like(x)), (256,), w)).primal
    assert torch.equal(mapped, eager_out) and torch.equal(primal, eager_out)


@pytest.mark.parametrize("make", [
    lambda: torch.randn(2, 3, 200, 250).to(memory_format=torch.channels_last),
    lambda: torch.randn(250, 200, 6).transpose(0, 2),
])
def test_transforms_give_the_eager_paths_bits_and_layout_for_strided_inputs(make):
    from torch.func import vmap

    torch.manual_seed(0)
    x = make()
    shape = tuple(x.shape[2:]) if x.dim() == 4 else (x.shape[-1],)
    eager_out = NF.rms_norm(x, shape, None, 1e-5)
    assert x.numel() > eager.NATIVE_RMS_MAX_NUMEL  # normlab's own path, not torch's op
    with fwAD.dual_level():
        primal = fwAD.unpack_dual(NF.rms_norm(fwAD.make_dual(x, torch.randn_like(x)), shape, None, 1e-5)).primal
    assert torch.equal(primal, eager_out) and primal.stride() == eager_out.stride()
    # (vmap over a strided batch: its samples' physical layout may sum in another order)
    mapped = vmap(lambda a: NF.rms_norm(a, shape, None, 1e-5))(x)
    torch.testing.assert_close(mapped, eager_out)
