"""The simple gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018,
"An Empirical Model of Large-Batch Training", Appendix A.1).

G is the true gradient and Sigma the per-example gradient covariance. The gradient of a
batch of B independent examples, G_B, has E|G_B|^2 = |G|^2 + tr(Sigma) / B. Measuring
|G_B|^2 at two batch sizes B_small < B_big gives the unbiased estimates

    |G|^2      ~ (B_big |G_Bbig|^2 - B_small |G_Bsmall|^2) / (B_big - B_small)
    tr(Sigma)  ~ (|G_Bsmall|^2 - |G_Bbig|^2) / (1/B_small - 1/B_big)

With per-example gradient norms, B_small = 1 (|G_1|^2 = mean over the batch of the
examples' squared gradient norms) and B_big = B (the batch gradient). Their ratio is
biased (a ratio of unbiased estimates); during training average the numerator and the
denominator separately over steps, as :class:`NoiseScaleEMA` does, and divide last.

Gray et al. 2024 showed that the norm layers' per-example gradients alone predict the
whole model's noise scale: feed :func:`per_example_grad_norms`'s ``rec.total()`` and
``rec.batch_grad_sq()``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from torch import Tensor

from normlab.errors import NormArgumentError


@dataclass(frozen=True)
class NoiseScale:
    b_simple: float      # tr(Sigma) / |G|^2  (nan when |G|^2 <= 0)
    g_sq: float          # estimate of |G|^2
    trace_sigma: float   # estimate of tr(Sigma)
    batch_size: int


def two_batch_estimates(sq_small: float, sq_big: float, b_small: float,
                        b_big: float) -> tuple[float, float]:
    """Unbiased (|G|^2, tr(Sigma)) from |G_B|^2 measured at batch sizes b_small < b_big.

    Batch sizes that are not positive finite numbers, or not two different ones, raise
    NormArgumentError (the estimates divide by 1/b and by their difference)."""
    if not all(isinstance(b, numbers.Real) and not isinstance(b, bool) and math.isfinite(b) and b > 0
               for b in (b_small, b_big)):
        raise NormArgumentError(f"two_batch_estimates: expected b_small and b_big to be positive finite numbers "
                                f"(batch sizes), got {b_small!r} and {b_big!r}")
    if not b_small < b_big:
        raise NormArgumentError(f"two_batch_estimates: expected b_small < b_big (two different batch sizes), "
                                f"got {b_small} and {b_big}")
    g_sq = (b_big * sq_big - b_small * sq_small) / (b_big - b_small)
    trace_sigma = (sq_small - sq_big) / (1.0 / b_small - 1.0 / b_big)
    return g_sq, trace_sigma


def _as_float(x: Tensor | float) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def gradient_noise_scale(per_example_sq: Tensor, batch_grad_sq: Tensor | float, *,
                         reduction: str = "mean") -> NoiseScale:
    """B_simple from one backward: per-example squared gradient norms and the batch gradient.

    ``per_example_sq`` [B]: the squared norm of each example's contribution to the
    gradient of the loss that was backpropagated; ``batch_grad_sq``: the squared norm of
    that gradient (the sum of the contributions), over the same parameters.
    ``reduction`` says how the loss combined the examples: "mean" (loss = mean of the
    example losses: contribution = g_b / B, batch gradient = G_B) or "sum"
    (contribution = g_b, batch gradient = B G_B)."""
    if not isinstance(per_example_sq, Tensor):
        raise NormArgumentError(f"gradient_noise_scale: expected per_example_sq to be a torch.Tensor of "
                                f"shape [B] with B >= 2, got {type(per_example_sq).__name__}")
    if per_example_sq.dim() != 1 or per_example_sq.shape[0] < 2:
        raise NormArgumentError(
            f"gradient_noise_scale: expected per_example_sq of shape [B] with B >= 2, "
            f"got {list(per_example_sq.shape)}"
        )
    if not (isinstance(batch_grad_sq, numbers.Real) and not isinstance(batch_grad_sq, bool)
            or isinstance(batch_grad_sq, Tensor) and batch_grad_sq.numel() == 1):
        got = (f"a tensor of shape {list(batch_grad_sq.shape)}" if isinstance(batch_grad_sq, Tensor)
               else type(batch_grad_sq).__name__)
        raise NormArgumentError(f"gradient_noise_scale: expected batch_grad_sq to be a number or a one-element "
                                f"torch.Tensor, got {got}")
    if reduction not in ("mean", "sum"):
        raise NormArgumentError(f"gradient_noise_scale: expected reduction 'mean' or 'sum', got {reduction!r}")
    b = per_example_sq.shape[0]
    pe = per_example_sq.double()
    g_batch_sq = _as_float(batch_grad_sq)
    if reduction == "mean":
        small = float((pe * b * b).mean())
        big = g_batch_sq
    else:
        small = float(pe.mean())
        big = g_batch_sq / (b * b)
    g_sq, trace_sigma = two_batch_estimates(small, big, 1, b)
    b_simple = trace_sigma / g_sq if g_sq > 0 else math.nan
    return NoiseScale(b_simple, g_sq, trace_sigma, b)


def _check_beta(where: str, beta: object, name: str = "beta") -> float:
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0.0 <= beta < 1.0:
        raise NormArgumentError(f"{where}: expected {name} to be a number with 0 <= beta < 1, got {beta!r}")
    return float(beta)


class NoiseScaleEMA:
    """Exponential moving averages of |G|^2 and tr(Sigma), for tracking B_simple in training.

        ema = NoiseScaleEMA(beta=0.95)
        with per_example_grad_norms(model) as rec:
            loss = ...; loss.backward()
        ema.update(rec.total(), rec.batch_grad_sq())
        ema.b_simple

    Both averages are bias-corrected (divided by 1 - beta^t, as in Adam); B_simple is
    the ratio of the averages, not the average of ratios."""

    def __init__(self, beta: float = 0.95) -> None:
        self.beta = _check_beta("NoiseScaleEMA", beta)
        self.steps = 0
        self._g_sq = 0.0
        self._trace = 0.0

    def update_estimates(self, g_sq: float, trace_sigma: float) -> float:
        """Fold in one step's unbiased estimates; returns the current B_simple."""
        self.steps += 1
        self._g_sq = self.beta * self._g_sq + (1 - self.beta) * g_sq
        self._trace = self.beta * self._trace + (1 - self.beta) * trace_sigma
        return self.b_simple

    def update(self, per_example_sq: Tensor, batch_grad_sq: Tensor | float, *,
               reduction: str = "mean") -> float:
        est = gradient_noise_scale(per_example_sq, batch_grad_sq, reduction=reduction)
        return self.update_estimates(est.g_sq, est.trace_sigma)

    def state_dict(self) -> dict[str, float]:
        """What a checkpoint needs to continue the averages exactly."""
        return {"beta": self.beta, "steps": self.steps, "g_sq": self._g_sq, "trace_sigma": self._trace}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Continue from ``state_dict()``'s dict; a state that is not one (a key missing,
        beta outside [0, 1), steps not an int >= 0) raises NormArgumentError and changes
        nothing."""
        where = "NoiseScaleEMA.load_state_dict"
        keys = ("beta", "steps", "g_sq", "trace_sigma")
        if not isinstance(state, dict) or any(k not in state for k in keys):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise NormArgumentError(f"{where}: expected state to be a dict with keys {list(keys)} "
                                    f"(from state_dict()), got {got}")
        steps = state["steps"]
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
            raise NormArgumentError(f"{where}: expected state['steps'] to be an int >= 0, got {steps!r}")
        beta = _check_beta(where, state["beta"], "state['beta']")
        try:
            g_sq, trace = float(state["g_sq"]), float(state["trace_sigma"])
        except (TypeError, ValueError):
            raise NormArgumentError(f"{where}: expected state['g_sq'] and state['trace_sigma'] to be numbers, "
                                    f"got {state['g_sq']!r} and {state['trace_sigma']!r}") from None
        self.beta, self.steps, self._g_sq, self._trace = beta, int(steps), g_sq, trace

    @property
    def g_sq(self) -> float:
        return self._g_sq / (1 - self.beta ** self.steps) if self.steps else math.nan

    @property
    def trace_sigma(self) -> float:
        return self._trace / (1 - self.beta ** self.steps) if self.steps else math.nan

    @property
    def b_simple(self) -> float:
        g = self.g_sq
        return self.trace_sigma / g if self.steps and g > 0 else math.nan


__all__ = ["NoiseScale", "NoiseScaleEMA", "gradient_noise_scale", "two_batch_estimates"]
