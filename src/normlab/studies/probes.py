"""What a study measures besides the loss, through ``normlab.diagnostics``.

* during training, every ``diag_every`` steps: gradient norms by layer and sublayer
  kind, the residual stream's RMS and max |x| after each block, and the gradient noise scale
  estimated from the norm layers' per-example gradients (Gray et al. 2024), smoothed
  by an EMA;
* at initialization (probe runs): the same gradient norms and activation statistics,
  averaged over ``probe_batches`` batches (Xiong et al. 2020, Fig. 3);
* at initialization (update runs): how much one Adam update changes the model's output
  (Liu et al. 2020, Theorem 2 and Fig. 5; Wang et al. 2022, Sec. 4).
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from statistics import mean
from typing import Any

import torch
from torch import nn

from normlab.diagnostics import ActivationMonitor, NoiseScaleEMA, grad_norms, per_example_grad_norms
from normlab.diagnostics.noise_scale import gradient_noise_scale

PROFILE_KINDS = ("ffn_w1", "ffn_w2", "attention", "norm")


def _profiles(model: nn.Module) -> dict[str, list[float]]:
    """Gradient norm per layer for each sublayer kind, from the current ``.grad``."""
    norms = grad_norms(model)
    return {kind: norms.by_layer(kind) for kind in PROFILE_KINDS}


class Diagnostics:
    """Measurements of one training run, taken on the steps it is asked to."""

    def __init__(self, model: nn.Module, ema_beta: float = 0.9) -> None:
        self.model = model
        self.noise = NoiseScaleEMA(beta=ema_beta)
        self._activations: ActivationMonitor | None = None
        self._per_example = None

    @contextmanager
    def capture(self, active: bool):
        """Wrap one step's forward and backward; records only when ``active``."""
        if not active:
            yield
            return
        self._activations = ActivationMonitor(self.model)
        self._per_example = per_example_grad_norms(self.model)
        with ExitStack() as stack:
            stack.enter_context(self._activations)
            stack.enter_context(self._per_example)
            yield

    def collect(self) -> dict[str, Any]:
        """The measurements of the captured step; call after backward, before zero_grad."""
        out: dict[str, Any] = {"grad_norms_by_layer": _profiles(self.model)}
        if self._activations is not None:
            out["activation_rms_by_layer"] = self._activations.residual_rms()
            out["activation_max_by_layer"] = self._activations.residual_rms(stat="max_abs")
        if self._per_example is not None and len(self._per_example):
            per_example, batch_sq = self._per_example.total(), self._per_example.batch_grad_sq()
            if per_example.shape[0] >= 2:
                step = gradient_noise_scale(per_example, batch_sq)
                out["gns_step"] = step.b_simple
                out["gns_g_sq"], out["gns_trace"] = step.g_sq, step.trace_sigma
                out["gns"] = self.noise.update_estimates(step.g_sq, step.trace_sigma)
        self._activations = self._per_example = None
        return {k: v for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}

    def close(self) -> None:
        self._activations = self._per_example = None

    def state_dict(self) -> dict[str, Any]:
        return {"noise": self.noise.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "noise" in state:
            self.noise.load_state_dict(state["noise"])


def gradients_at_init(model: nn.Module, task: Any, env: Any) -> dict[str, Any]:
    """Mean gradient-norm profiles and residual RMS at initialization over the probe batches."""
    model.train()
    grads: list[dict[str, list[float]]] = []
    rms: list[list[float]] = []
    for i in range(task.spec.probe_batches):
        batch = task.batch(i, "train", env)
        with ActivationMonitor(model) as monitor:
            with env.autocast():
                loss, _ = task.loss(model, batch)
            loss.backward()
        grads.append(_profiles(model))
        rms.append(monitor.residual_rms())
        model.zero_grad(set_to_none=True)
    return {
        "grad_norms_by_layer": {k: [mean(v) for v in zip(*(g[k] for g in grads))] for k in PROFILE_KINDS},
        "activation_rms_by_layer": [mean(v) for v in zip(*rms)],
        "probe_loss": loss.item(),
    }


def output_change_after_update(model: nn.Module, task: Any, env: Any) -> dict[str, Any]:
    """||F(x; theta + delta) - F(x; theta)||^2 per coordinate after one Adam update delta at
    initialization (Liu et al. 2020's amplification of a small update through the layers).

    F is the stack's output, the hidden states the head reads (after the final norm where
    the placement has one), on one fixed validation batch, the same for every run; delta
    is one Adam step (the run's lr and betas) on the gradient of the mean loss over
    ``probe_batches`` training batches. Adam's first step moves every parameter by about
    lr whatever its gradient's scale, so the change measures the amplification alone."""
    spec = task.spec
    held = task.batch(0, "val", env)["x"]

    def output() -> torch.Tensor:
        model.eval()
        with torch.no_grad(), env.autocast():
            return model.run_blocks(model.embed(held)).float()

    before = output()
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr, betas=spec.betas)
    losses = []
    for i in range(spec.probe_batches):
        with env.autocast():
            loss, _ = task.loss(model, task.batch(i, "train", env))
        (loss / spec.probe_batches).backward()
        losses.append(loss.item())
    optimizer.step()
    after = output()
    change = float((after - before).pow(2).mean())
    return {"output_change_sq": change, "output_sq": float(before.pow(2).mean()), "probe_loss": mean(losses)}


def total_noise_scale(model: nn.Module, task: Any, batch: dict[str, Any], env: Any) -> dict[str, float]:
    """The whole model's B_simple on ``batch``, from every parameter's per-example
    gradients, one example at a time (Gray et al. 2024 validate the norm layers'
    estimate against it). Leaves the model's ``.grad`` and the RNG as they were."""
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [None if p.grad is None else p.grad.detach().clone() for p in params]
    n = next(iter(batch.values())).shape[0]
    total = [torch.zeros_like(p) for p in params]
    per_example = []
    with torch.random.fork_rng(devices=[]):
        for i in range(n):
            for p in params:
                p.grad = None
            with env.autocast():
                loss, _ = task.loss(model, {k: v[i:i + 1] for k, v in batch.items()})
            loss.backward()
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
            per_example.append(sum(float(g.double().pow(2).sum()) for g in grads))
            for t, g in zip(total, grads):
                t.add_(g)
    for p, g in zip(params, saved):
        p.grad = g
    # the loss is the mean over examples (equal token counts): contribution g_i / n, batch gradient mean g_i
    batch_sq = sum(float((t.double() / n).pow(2).sum()) for t in total)
    step = gradient_noise_scale(torch.tensor(per_example, dtype=torch.float64) / (n * n), batch_sq)
    return {"gns_total_step": step.b_simple, "gns_total_g_sq": step.g_sq, "gns_total_trace": step.trace_sigma}
