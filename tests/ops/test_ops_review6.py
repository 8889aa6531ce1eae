"""Dropout drops an inf or nan element to nan on every path, as torch's dropout does (the
kernels selected 0, the torch backend and the reference multiplied, the reference's p=1
branch wrote zeros); the offset and casting-mode RMSNorm on a strided input returns
torch's layout on the torch path too (it kept the input's strides)."""

from __future__ import annotations

import pytest
import torch

import normlab
import normlab.functional as NF
from normlab.ops import reference
from tests.ops.helpers import DEVICE, needs_kernels

H = 8


def _dropped(run):
    """The elements ``run(x)`` drops: its branch adds nothing there (x of ones on zeros)."""
    out = run(torch.ones(4, H, device=DEVICE))
    return out == 0


def _paths():
    yield "reference", lambda x, g, p: reference.dropout_add(x, torch.zeros_like(x), dropout_p=p, training=True,
                                                            generator=g)
    yield "torch", lambda x, g, p: NF.add_rms_norm(x, torch.zeros_like(x), torch.ones(H, device=x.device), 1e-6,
                                                   dropout_p=p, training=True, generator=g)[1]
    yield "torch-gemma", lambda x, g, p: NF.add_rms_norm(x, torch.zeros_like(x), torch.zeros(H, device=x.device),
                                                         1e-6, dropout_p=p, training=True, generator=g, offset=1.0,
                                                         casting_mode="gemma")[1]


@pytest.mark.parametrize("p", [0.5, 1.0])
@pytest.mark.parametrize("name", ["reference", "torch", "torch-gemma"])
def test_a_dropped_inf_is_nan_as_torch_gives_it(name, p):
    run = dict(_paths())[name]
    dropped = _dropped(lambda x: run(x, torch.Generator(DEVICE).manual_seed(0), p))
    out = run(torch.full((4, H), float("inf"), device=DEVICE), torch.Generator(DEVICE).manual_seed(0), p)
    assert torch.equal(out.isnan(), dropped) and bool(dropped.any())
    assert bool(out[~dropped].isinf().all())
    # torch's own dropout: the same rule
    assert bool(torch.nn.functional.dropout(torch.full((3,), float("inf")), p=1.0, training=True).isnan().all())


@needs_kernels
@pytest.mark.parametrize("p", [0.5, 1.0])
def test_the_kernels_drop_an_inf_to_nan_too(p):
    def run(x):
        with normlab.set_backend("triton"):
            return NF.add_rms_norm(x, torch.zeros_like(x), torch.ones(H, device=x.device), 1e-6, dropout_p=p,
                                   training=True, generator=torch.Generator(DEVICE).manual_seed(0))[1]

    dropped = _dropped(run)
    out = run(torch.full((4, H), float("inf"), device=DEVICE))
    assert torch.equal(out.isnan(), dropped) and bool(dropped.any())


@pytest.mark.parametrize("mode,offset", [("gemma", 1.0), ("llama", 0.0), ("torch", 0.5)])
def test_the_offset_and_casting_rms_norm_gives_torchs_layout_for_a_strided_input(mode, offset):
    x = torch.randn(2, 5, 4, H).transpose(1, 2)  # a QK-norm view: not contiguous, not channels_last
    w = torch.randn(H)
    with normlab.set_backend("torch"):
        y = NF.rms_norm(x, (H,), w, 1e-6, offset=offset, casting_mode=mode)
        y2, h = NF.add_rms_norm(x, torch.zeros_like(x), w, 1e-6, dropout_p=0.1, training=True, offset=offset,
                                casting_mode=mode)
    want = torch.rms_norm(x, (H,), w)
    assert y.stride() == want.stride() and y.is_contiguous()
    assert y2.stride() == torch.rms_norm(h, (H,), w).stride()
    torch.testing.assert_close(y, reference.rms_norm_cast(x, (H,), w, 1e-6, offset=offset, casting_mode=mode))
    # channels_last keeps channels_last, as torch's rms_norm does
    xc = torch.randn(2, H, 3, H).to(memory_format=torch.channels_last)
    with normlab.set_backend("torch"):
        yc = NF.rms_norm(xc, (H,), w, 1e-6, offset=offset, casting_mode=mode)
    assert yc.stride() == torch.rms_norm(xc, (H,), w).stride()
