"""The torch backend's checked paths (a float64 weight on float32 x, a wider residual
dtype, dropout) give torch's output layouts too: channels_last and channels_last_3d
kept where torch's rms_norm keeps them (the 5-D layout was returned row-major)."""

from __future__ import annotations

import pytest
import torch

import normlab
import normlab.functional as NF
from tests.test_review_round5 import LAYOUTS, _layout


@pytest.mark.parametrize("x_kind,r_kind", LAYOUTS)
@pytest.mark.parametrize("variant", ["plain", "f64_weight", "residual_dtype", "dropout_eval", "no_weight"])
def test_the_torch_backend_gives_torchs_layouts(x_kind, r_kind, variant):
    x = _layout(x_kind, 0)
    r = None if r_kind is None else _layout(r_kind, 1)
    H = x.shape[-1]
    w = None if variant == "no_weight" else torch.randn(H, dtype=torch.float64 if variant == "f64_weight" else None)
    kw = {"residual_dtype": torch.float64} if variant == "residual_dtype" else \
        {"dropout_p": 0.5, "training": False} if variant == "dropout_eval" else {}
    if r is None:
        want = (torch.rms_norm(x, (H,), w),)
        with normlab.set_backend("torch"):
            got = (NF.rms_norm(x, (H,), w),)
    else:
        h = r.to(torch.float64) + x.to(torch.float64) if variant == "residual_dtype" else r + x
        want = (torch.rms_norm(h, (H,), w if w is None else w.to(h.dtype)).to(x.dtype), h)
        with normlab.set_backend("torch"):
            got = NF.add_rms_norm(x, r, w, **kw)
    for g, t in zip(got, want, strict=True):
        assert g.stride() == t.stride(), (g.stride(), t.stride())
        torch.testing.assert_close(g, t.to(g.dtype), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt,shape", [(torch.channels_last, (2, 8, 5, 4)), (torch.channels_last_3d, (2, 8, 3, 5, 4))])
def test_the_rms_module_with_a_float64_weight_keeps_the_layout_and_its_gradient(fmt, shape):
    x = torch.randn(shape, dtype=torch.float64).to(memory_format=fmt).requires_grad_()
    m = normlab.RMSNorm(shape[-1], dtype=torch.float64)
    y = m(x.float())
    want = torch.rms_norm(x.float(), (shape[-1],), m.weight)
    assert y.stride() == want.stride()
    torch.autograd.gradcheck(lambda t: NF.rms_norm(t, (shape[-1],), m.weight), (x,))
