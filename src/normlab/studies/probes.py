"""What a study measures besides the loss, through ``normlab.diagnostics``.

* during training, every ``diag_every`` steps: gradient norms by layer and sublayer
  kind, the residual stream's RMS and max |x| after each block, the largest attention
  logit of each layer (Wortsman et al. 2023), and the gradient noise scale
  estimated from the norm layers' per-example gradients (Gray et al. 2024), smoothed
  by an EMA;
* at initialization (probe runs): the same gradient norms and activation statistics,
  averaged over ``probe_batches`` batches (Xiong et al. 2020, Fig. 3);
* at initialization (update runs): how much one Adam update changes the model's output
  (Liu et al. 2020, Theorem 2 and Fig. 5; Wang et al. 2022, Sec. 4);
* after training: the fraction of attention keys that no query can give the highest
  score, "unselectable" keys (Brody et al. 2023, Sec. 3.2).
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from statistics import mean
from typing import Any

import torch
from torch import nn

from normlab.diagnostics import (
    ActivationMonitor,
    AttentionLogitMonitor,
    NoiseScaleEMA,
    grad_norms,
    per_example_grad_norms,
)
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
        self._logits: AttentionLogitMonitor | None = None
        self._per_example = None

    @contextmanager
    def capture(self, active: bool):
        """Wrap one step's forward and backward; records only when ``active``."""
        if not active:
            yield
            return
        self._activations = ActivationMonitor(self.model)
        self._logits = AttentionLogitMonitor(self.model)
        self._per_example = per_example_grad_norms(self.model)
        with ExitStack() as stack:
            stack.enter_context(self._activations)
            stack.enter_context(self._logits)
            stack.enter_context(self._per_example)
            yield

    def collect(self) -> dict[str, Any]:
        """The measurements of the captured step; call after backward, before zero_grad."""
        out: dict[str, Any] = {"grad_norms_by_layer": _profiles(self.model)}
        if self._activations is not None:
            out["activation_rms_by_layer"] = self._activations.residual_rms()
            out["activation_max_by_layer"] = self._activations.residual_rms(stat="max_abs")
        if self._logits is not None and self._logits.modules:
            out["attention_logit_max_by_layer"] = self._logits.by_layer()
        if self._per_example is not None and len(self._per_example):
            per_example, batch_sq = self._per_example.total(), self._per_example.batch_grad_sq()
            if per_example.shape[0] >= 2:
                step = gradient_noise_scale(per_example, batch_sq)
                out["gns_step"] = step.b_simple
                out["gns_g_sq"], out["gns_trace"] = step.g_sq, step.trace_sigma
                out["gns"] = self.noise.update_estimates(step.g_sq, step.trace_sigma)
        self._activations = self._logits = self._per_example = None
        return {k: v for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}

    def close(self) -> None:
        self._activations = self._logits = self._per_example = None

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


# ------------------------------------------------------------------ unselectable keys


def unselectable(points: torch.Tensor, *, candidates: torch.Tensor | None = None, queries: int = 4096,
                 iters: int = 1000, tol: float = 1e-3, seed: int = 0) -> torch.Tensor:
    """Which points of each set no linear score can rank first: [N, T, d] -> int8 [N, T],
    1 = unselectable, 0 = selectable, -1 = undetermined.

    A key k_i of a set can receive the strictly highest score q . k_i only if it is a
    vertex of the set's convex hull, i.e. if it lies outside the hull of the other keys
    (Brody et al. 2023, Sec. 3.2); copies of k_i are left out of "the others", and a point
    whose every other is a copy counts as selectable. In float64, each set centred and
    scaled to unit RMS, a point is decided by a certificate:

    * selectable: a query ranks it strictly first, checked exactly: first each point's
      own ``candidates`` query ([N, T, d], e.g. the normal of the ellipsoid a norm puts its
      outputs on) and its direction from the set's mean, then ``queries`` random Gaussian
      queries; for the points none of them picks, the residual
      r = k_i - K^T lam of the nearest point K^T lam of the others' hull (FISTA on
      min ||K^T lam - k_i|| over the simplex) is such a query once lam is near optimal;
    * unselectable: a convex combination of the others lies within ``tol`` of k_i, so no
      query ranks k_i first by more than tol |q| of score.

    A point with neither certificate after ``iters`` iterations is undetermined (-1)."""
    if points.dim() != 3:
        raise ValueError(f"unselectable: expected points of shape [N, T, d], got {tuple(points.shape)}")
    n, t, d = points.shape
    out = torch.full((n, t), -1, dtype=torch.int8)
    if n == 0 or t == 0:
        return out.zero_()
    p = points.detach().double().cpu()
    p = p - p.mean(dim=1, keepdim=True)
    p = p / p.pow(2).sum(-1).mean(1).sqrt().clamp_min(1e-300)[:, None, None]
    allowed = ~(p[:, :, None, :] == p[:, None, :, :]).all(-1)  # [N, T(i), T(j)]: j is not a copy of i
    out[~allowed.any(-1)] = 0
    own_queries = [p] if candidates is None else [p, candidates.detach().double().cpu()]
    for q in own_queries:  # q[n, i] is tried for point i of set n
        scores = q @ p.transpose(1, 2)  # [N, T(i), T(j)]
        own = scores.diagonal(dim1=1, dim2=2)
        rival = scores.masked_fill(~allowed, -math.inf).amax(-1)
        out[own > rival + 1e-12 * q.norm(dim=-1)] = 0
    # random queries: the first-ranked point of each, where it is strictly first
    g = torch.Generator().manual_seed(seed)
    for chunk in torch.randn(queries, d, generator=g, dtype=torch.float64).split(1024):
        scores = p @ chunk.T  # [N, T, Q]
        top = scores.topk(min(2, t), dim=1)
        winners = top.indices[:, 0]  # [N, Q]
        strict = top.values[:, 0] > top.values[:, -1] + 1e-12 if t > 1 else torch.ones_like(winners, dtype=torch.bool)
        hit = torch.zeros(n, t, dtype=torch.bool)
        hit.scatter_(1, winners.masked_fill(~strict, 0), strict)
        out[hit] = 0
    todo = (out == -1).nonzero()  # [P, 2]: (set, point)
    if len(todo):
        _nearest_in_hull(p, allowed, todo, out, iters, tol)
    return out


def _nearest_in_hull(p: torch.Tensor, allowed: torch.Tensor, todo: torch.Tensor, out: torch.Tensor,
                     iters: int, tol: float) -> None:
    """FISTA for min ||K^T lam - k_i|| over the simplex of each (set, point) of ``todo``,
    writing each certificate into ``out`` as it appears (checked every 50 iterations)."""
    sets, idx = todo[:, 0], todo[:, 1]
    k = p[sets]  # [P, T, d]
    target = p[sets, idx]  # [P, d]
    mask = allowed[sets, idx]  # [P, T]
    gram = k @ k.transpose(1, 2)  # [P, T, T]
    linear = torch.einsum("pjd,pd->pj", k, target)
    step = (1.0 / torch.linalg.eigvalsh(gram)[:, -1].clamp_min(1e-12))[:, None]
    lam = mask.double() / mask.sum(-1, keepdim=True).clamp_min(1)
    y, theta = lam.clone(), torch.ones(len(todo), 1, dtype=torch.float64)
    live = torch.ones(len(todo), dtype=torch.bool)
    for it in range(1, iters + 1):
        grad = torch.bmm(gram, y[:, :, None]).squeeze(-1) - linear  # of 1/2 ||K^T y - k_i||^2
        new = _project_simplex(y - step * grad, mask)
        # adaptive restart (O'Donoghue & Candes 2015): momentum is dropped where it points uphill
        restart = ((grad * (new - lam)).sum(-1, keepdim=True) > 0)
        theta = torch.where(restart, torch.ones_like(theta), theta)
        theta_next = (1 + torch.sqrt(1 + 4 * theta * theta)) / 2
        y = new + ((theta - 1) / theta_next) * (new - lam)
        lam, theta = new, theta_next
        if it % 50 and it != iters:
            continue
        residual = target - torch.einsum("pj,pjd->pd", lam, k)
        dist = residual.norm(dim=-1)
        scores = torch.einsum("pjd,pd->pj", k, residual)  # r . k_j
        own = (residual * target).sum(-1)
        rival = scores.masked_fill(~mask, -math.inf).amax(-1)
        separated = live & (own > rival + 1e-12 * dist)
        close = live & ~separated & (dist < tol)
        out[sets[separated], idx[separated]] = 0
        out[sets[close], idx[close]] = 1
        live &= ~(separated | close)
        if not live.any():
            return


def _project_simplex(v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of ``v`` onto the simplex over its ``allowed`` entries."""
    v = v.masked_fill(~allowed, -1e30)
    u = v.sort(dim=-1, descending=True).values
    css = u.cumsum(-1) - 1.0
    k = torch.arange(1, v.shape[-1] + 1, dtype=v.dtype)
    rho = ((u - css / k) > 0).long().cumsum(-1).argmax(-1, keepdim=True)  # the last index where it holds
    tau = css.gather(-1, rho) / (rho + 1).to(v.dtype)
    return (v - tau).clamp_min(0.0).masked_fill(~allowed, 0.0)


@torch.no_grad()
def unselectable_keys(model: nn.Module, tokens: torch.Tensor, env: Any) -> dict[str, Any]:
    """The fraction of each self-attention layer's input vectors that are unselectable
    within their sequence (``unselectable``), over the sequences of ``tokens``.

    The vectors are what each block's self-attention reads: its input norm's output (the
    residual stream itself without one), as Brody et al. measure them after the norm.
    The keys are one linear map of them, which keeps a vertex of the set a vertex when it
    is injective. Returns ``unselectable_by_layer`` (the fraction per block) and
    ``undetermined_by_layer`` (the fraction left without a certificate)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"unselectable_keys: expected a model with normlab Blocks, got {type(model).__name__}")
    inputs: list[torch.Tensor] = []
    handles = [b.attn.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach())) for b in blocks]
    norms = [b.norms["attn_in"] if "attn_in" in b.norms else None for b in blocks]
    was_training = model.training
    model.eval()
    try:
        with env.autocast():
            model(tokens)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    fractions, undetermined = [], []
    for h, norm in zip(inputs, norms):
        flags = unselectable(h.float(), candidates=_ellipsoid_normals(norm, h.float()))
        fractions.append(float((flags == 1).double().mean()))
        undetermined.append(float((flags == -1).double().mean()))
    return {"unselectable_by_layer": fractions, "undetermined_by_layer": undetermined}


def _ellipsoid_normals(norm: nn.Module | None, h: torch.Tensor) -> torch.Tensor | None:
    """For h = w * u + b with every u of one norm (LayerNorm's and RMSNorm's outputs), the
    query (h - b) / w^2 scores h_j as u . u_j up to a constant, which ranks h first among
    distinct outputs: the ellipsoid's normal at h. None for other modules."""
    weight = getattr(norm, "weight", None)
    if norm is None or type(norm).__name__ not in ("LayerNorm", "RMSNorm") or not isinstance(weight, torch.Tensor):
        return None
    bias = getattr(norm, "bias", None)
    w = weight.detach().float()
    if (w == 0).any():
        return None
    centred = h if bias is None else h - bias.detach().float()
    return centred / w.square()
