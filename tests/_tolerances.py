"""The tests' one tolerance table: for each kind of comparison, (rtol, atol) per dtype and
how atol is read. Pass the entry to :func:`assert_close`.

    OUTPUT          forward outputs on the CPU paths, atol absolute
    BACKEND_OUTPUT  forward outputs of an op under a backend vs ops/reference.py,
                    atol relative to the expected tensor's largest magnitude (>= 1e-2)
    GRAD            gradients vs a reference's autograd, atol relative to the expected
                    tensor's largest magnitude (>= 1), plus an amplification term
    PARAM_GRAD_SUM  weight/bias gradients summed over many rows vs the float64
                    reference (the float32 sum), atol as GRAD's

OUTPUT and BACKEND_OUTPUT hold the same numbers and differ in how atol is read; neither
is tighter at every element (an absolute atol is tighter for tensors larger than 1 in
magnitude, a relative one for smaller), so one rule for both would loosen one set of
tests. BACKEND_OUTPUT scales because its low-precision reference rounds intermediates
(x_hat, x_hat * w) that a kernel keeps in float32: where x_hat * w and the bias cancel,
the two differ by about eps * |x_hat * w| (in bfloat16 the atol needed beyond rtol is
4.6e-3 under the interpreter, on outputs up to 10 in magnitude), and the same tests run
compiled on CUDA. On the OUTPUT paths normlab's CPU path calls torch's own op: the atol
they need beyond rtol is under 6e-5 in half precision and 4e-7 in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    """(rtol, atol) per dtype; ``atol_floor`` None: atol is absolute; else atol is
    multiplied by max(largest |expected|, atol_floor)."""

    per_dtype: dict
    atol_floor: float | None


# Forward outputs on the CPU paths, compared with torch's own op or with each other:
# normlab.functional and ops/reference.py vs torch.nn.functional (also with float32
# weights or residual and a half-precision input), a module's fused add+norm vs the
# add then the norm. Expected outputs are O(1) (a norm's output times a weight ~ N(1, .5)).
OUTPUT = Tolerance(
    per_dtype={
        torch.float64: (1e-10, 1e-10),
        torch.float32: (1e-5, 1e-5),
        torch.float16: (2e-3, 2e-3),
        torch.bfloat16: (1.6e-2, 1.6e-2),
    },
    atol_floor=None,
)

# Forward outputs (normed output and new residual) of an op under a backend (eager, the
# Triton kernels interpreted on CPU or compiled on CUDA) vs ops/reference.py under the
# torch backend, in the same dtype; also a bfloat16 kernel's output vs the float32
# reference on CUDA (tests/ops/test_triton_gpu.py). Same numbers as OUTPUT, atol relative
# (see the module docstring); the floor keeps outputs that are ~0 (hidden size 1: the bias)
# at a tolerance of their own size.
BACKEND_OUTPUT = Tolerance(per_dtype=OUTPUT.per_dtype, atol_floor=1e-2)

# Gradients (dx, dresidual, dweight, dbias) vs the reference's autograd with the same
# cotangent: normlab.functional and ops/reference.py vs torch's op, an op under a backend
# vs ops/reference.py, a bfloat16 kernel vs the float32 reference on CUDA. Looser than the
# outputs: a gradient sums over a row (dx) or over rows (dweight, dbias) and goes through
# more roundings in low precision. The floor of 1 keeps gradients that cancel to ~0
# (hidden size 1) compared at the scale of their terms.
GRAD = Tolerance(
    per_dtype={
        torch.float64: (1e-9, 1e-9),
        torch.float32: (1e-4, 1e-4),
        torch.float16: (1e-2, 1e-2),
        torch.bfloat16: (5e-2, 5e-2),
    },
    atol_floor=1.0,
)

# A parameter's gradient (dweight, dbias) summed over many rows, vs the float64
# reference, per the coarser of the parameter's dtype and the compute dtype (float32
# for fp16/bf16/fp32 activations: their x_hat is a float32 value): rtol is one rounding
# to that dtype (half an ulp, with margin), atol (relative to the largest |expected|) a
# float32 sum's error. A sum formed in the activations' dtype misses by far more: about
# 1e-1 (bfloat16) and 6e-3 (float16) of the largest |dweight| at 8192 rows (torch's CPU
# layer_norm backward), and a bfloat16 sum of ones stops at 256
# (tests/ops/test_mixed_dtypes.py).
PARAM_GRAD_SUM = Tolerance(
    per_dtype={
        torch.float64: (1e-12, 1e-12),
        torch.float32: (1e-6, 1e-5),
        torch.float16: (5e-4, 1e-5),
        torch.bfloat16: (4e-3, 1e-5),
    },
    atol_floor=1.0,
)

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def assert_close(actual, expected, dtype, tol: Tolerance, *, what="", amplification=0.0):
    """``actual`` vs ``expected`` (compared in float64, so their dtypes may differ) at
    ``tol``'s tolerance for ``dtype``. ``amplification`` (e.g. sum |dy| * |x| * rstd of
    a row) adds that many times 4 * the dtype's epsilon to atol: rows of near-equal values
    (rstd -> 1/sqrt(eps)) amplify rounding, and two exact-in-math formulas differ there by
    that much."""
    rtol, atol = tol.per_dtype[dtype]
    if tol.atol_floor is not None and expected.numel():
        atol *= max(tol.atol_floor, expected.detach().double().abs().max().item())
    atol += 4 * torch.finfo(dtype).eps * amplification
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol,
                               msg=(lambda m: f"{what}: {m}") if what else None)
