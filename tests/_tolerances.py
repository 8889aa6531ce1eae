"""Per-dtype tolerances shared by the tests (outputs of a norm are O(1))."""

import torch

TOL = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.float16: {"atol": 4e-3, "rtol": 4e-3},
    torch.bfloat16: {"atol": 3e-2, "rtol": 2e-2},
}
# gradients sum over the row (dx) or over rows (dweight): looser in low precision
GRAD_TOL = {
    torch.float64: {"atol": 1e-9, "rtol": 1e-9},
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.float16: {"atol": 3e-2, "rtol": 2e-2},
    torch.bfloat16: {"atol": 2.5e-1, "rtol": 5e-2},
}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def assert_close(actual, expected, dtype, grad=False, msg="", amplification=0.0):
    """Closeness at the dtype's tolerance. Gradients' absolute tolerance scales with their
    largest magnitude, plus ``amplification`` (e.g. sum |dy| * |x| * rstd of a row) times
    the dtype's epsilon: rows of near-equal values (rstd -> 1/sqrt(eps)) amplify rounding,
    and two exact-in-math formulas differ there by that much."""
    tol = dict((GRAD_TOL if grad else TOL)[dtype])
    if grad and expected.numel():
        tol["atol"] *= max(1.0, expected.detach().double().abs().max().item())
        tol["atol"] += 4 * torch.finfo(dtype).eps * amplification
    torch.testing.assert_close(actual.double(), expected.double(), msg=msg or None, **tol)
