"""The per-example variants choose a backend as the public ops do: a float64 residual
stream runs the torch path under auto (exact float64 sum) and is refused under a forced
triton backend, whose kernels add in float32."""
from __future__ import annotations

import pytest
import torch

import normlab
import normlab.diagnostics.per_example as PE
from normlab import functional as F
from normlab.errors import NormArgumentError
from normlab.ops import reference as R


@pytest.mark.parametrize("op", ["add_rms_norm", "add_layer_norm"])
@pytest.mark.parametrize("stream", ["residual", "residual_dtype"])
def test_float64_residual_stream(op, stream):
    x = torch.full((2, 1, 4), 1e-3, requires_grad=True)
    r = torch.full((2, 1, 4), 1.0 + 1e-12, dtype=torch.float64 if stream == "residual" else torch.float32,
                   requires_grad=True)
    w = torch.ones(4, requires_grad=True)
    args = (x, r, w) if op == "add_rms_norm" else (x, r, w, None)
    kw = {"residual_dtype": torch.float64}
    want = R.dropout_add(x, r, residual_dtype=torch.float64)
    with normlab.set_backend("auto"):
        _, nr = getattr(PE, op)(*args, per_example_grad_sq=torch.zeros(2, 2), **kw)
        _, plain = getattr(F, op)(*args, **kw)
    assert nr.dtype == torch.float64 and torch.equal(nr, want) and torch.equal(plain, want)
    with normlab.set_backend("triton"):
        for call in (lambda: getattr(PE, op)(*args, per_example_grad_sq=torch.zeros(2, 2), **kw),
                     lambda: getattr(PE, op)(*args, per_example_grad_sq=None, **kw),
                     lambda: getattr(F, op)(*args, **kw)):
            with pytest.raises(NormArgumentError, match=f"{op}: the triton backend adds in float32"):
                call()
