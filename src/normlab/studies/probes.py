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
* after training: the fraction of attention inputs that no query can give the highest
  score, "unselectable" keys, over whole sequences (Brody et al. 2023, Sec. 3.2, as their
  code counts them); beside it, the inputs and each head's keys against their causal
  prefix.
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
from normlab.models.attention import apply_rope

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
        self._logits = AttentionLogitMonitor(self.model) if _has_attention(self.model) else None
        self._per_example = per_example_grad_norms(self.model)
        with ExitStack() as stack:
            stack.enter_context(self._activations)
            if self._logits is not None:
                stack.enter_context(self._logits)
            stack.enter_context(self._per_example)
            yield

    def collect(self) -> dict[str, Any]:
        """The measurements of the captured step; call after backward, before zero_grad."""
        out: dict[str, Any] = {"grad_norms_by_layer": _profiles(self.model)}
        if self._activations is not None:
            out["activation_rms_by_layer"] = _stream_profile(self._activations, "rms")
            out["activation_max_by_layer"] = _stream_profile(self._activations, "max_abs")
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


def _has_attention(model: nn.Module) -> bool:
    """Whether ``model`` has a self-attention module AttentionLogitMonitor reads."""
    from normlab.models.attention import Attention

    return any(isinstance(m, Attention) and not name.endswith("cross_attn") for name, m in model.named_modules())


def _stream_profile(monitor: ActivationMonitor, stat: str) -> list[float]:
    """``stat`` of the residual stream after each layer, inf where the stream holds a value
    that is not finite: the monitor's statistics are over the finite entries, so a stream
    that overflowed in part (or whole) would read as a small (or zero) one, and the
    claims take inf as an overflow to name."""
    values = monitor.residual_rms(stat=stat)
    bad = monitor.residual_rms(stat="nonfinite")
    return [math.inf if nf > 0 else v for v, nf in zip(values, bad, strict=True)]


def gradients_at_init(model: nn.Module, task: Any, env: Any) -> dict[str, Any]:
    """Mean gradient-norm profiles and residual RMS at initialization over the probe batches."""
    model.train()
    grads: list[dict[str, list[float]]] = []
    rms: list[list[float]] = []
    losses: list[float] = []
    for i in range(task.spec.probe_batches):
        batch = task.batch(i, "train", env)
        with ActivationMonitor(model) as monitor:
            with env.autocast():
                loss, _ = task.loss(model, batch)
            loss.backward()
        losses.append(loss.item())
        grads.append(_profiles(model))
        rms.append(_stream_profile(monitor, "rms"))
        model.zero_grad(set_to_none=True)
    return {
        "grad_norms_by_layer": {k: [mean(v) for v in zip(*(g[k] for g in grads))] for k in PROFILE_KINDS},
        "activation_rms_by_layer": [mean(v) for v in zip(*rms)],
        # the mean over the probe batches, as the update probe's: a batch whose loss is not
        # finite makes it not finite (the run's ``diverged``), whichever batch it was
        "probe_loss": mean(losses),
    }


def output_change_after_update(model: nn.Module, task: Any, env: Any) -> dict[str, Any]:
    """||F(x; theta + delta) - F(x; theta)||^2 per coordinate after one Adam update delta at
    initialization (Liu et al. 2020's amplification of a small update through the layers).

    F is the stack's output, the hidden states the head reads (after the final norm where
    the placement has one), on one fixed validation batch, the same for every run; delta
    is one Adam step (the run's lr and betas) on the gradient of the mean loss over
    ``probe_batches`` training batches. Adam's first step moves every parameter by about
    lr whatever its gradient's scale, so the change measures the amplification alone.

    It runs in float32 whatever the run's dtype: a step of 1e-5 is below bf16's
    resolution, where the change would measure which roundings flip. The theorems are
    about the linear response to a small update, so the change of a tenth of the step
    (theta + delta / 10, the same direction) is measured too: ``update_linearity`` =
    change / (100 x that change) is 1 where F responds linearly, below 1 where the step
    is large enough that the response saturates (nan for a model whose running statistics
    the step's forwards moved)."""
    spec = task.spec
    held = task.batch(0, "val", env)["x"]

    def output() -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            return model.run_blocks(model.embed(held)).float()

    before = output()
    buffers = [b.detach().clone() for b in model.buffers()]
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    theta = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=spec.lr, betas=spec.betas)
    losses = []
    for i in range(spec.probe_batches):
        loss, _ = task.loss(model, task.batch(i, "train", env))
        (loss / spec.probe_batches).backward()
        losses.append(loss.item())
    optimizer.step()
    after = output()
    change = float((after - before).pow(2).mean())
    with torch.no_grad():  # a tenth of the same step
        for p, t in zip(params, theta, strict=True):
            p.copy_(t + (p - t) / 10)
    tenth = float((output() - before).pow(2).mean())
    # a norm with running statistics (batch norm, PowerNorm) moved them in the step's
    # forwards, by the whole step's batches in both measurements: no linear response to read
    moved = any(not torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))
    return {"output_change_sq": change, "output_change_sq_tenth": tenth,
            "update_linearity": change / (100 * tenth) if tenth > 0 and not moved else math.nan,
            "output_sq": float(before.pow(2).mean()), "probe_loss": mean(losses)}


def total_noise_scale(model: nn.Module, task: Any, batch: dict[str, Any], env: Any) -> dict[str, float]:
    """The whole model's B_simple on ``batch``, from every parameter's per-example
    gradients, one example at a time (Gray et al. 2024 validate the norm layers'
    estimate against it). Leaves the model's ``.grad``, its buffers (a batch-statistics
    norm's running statistics and step count, which each example's forward would move)
    and the RNG as they were."""
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [None if p.grad is None else p.grad.detach().clone() for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
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
    with torch.no_grad():
        for b, value in buffers:
            b.copy_(value)
    # the loss is the mean over examples (equal token counts): contribution g_i / n, batch gradient mean g_i
    batch_sq = sum(float((t.double() / n).pow(2).sum()) for t in total)
    step = gradient_noise_scale(torch.tensor(per_example, dtype=torch.float64) / (n * n), batch_sq)
    return {"gns_total_step": step.b_simple, "gns_total_g_sq": step.g_sq, "gns_total_trace": step.trace_sigma}


# ------------------------------------------------------------------ unselectable keys


def unselectable(points: torch.Tensor, *, candidates: torch.Tensor | None = None, queries: int = 4096,
                 iters: int = 1000, tol: float = 1e-3, seed: int = 0, causal: bool = False) -> torch.Tensor:
    """Which points of each set no linear score can rank first: [N, T, d] -> int8 [N, T],
    1 = unselectable, 0 = selectable, -1 = undetermined.

    A key k_i of a set can receive the strictly highest score q . k_i only if it is a
    vertex of the set's convex hull, i.e. if it lies outside the hull of the other keys
    (Brody et al. 2023, Sec. 3.2); copies of k_i are left out of "the others", and a point
    whose every other is a copy counts as selectable. ``causal``: point i competes only
    with points 0..i (a causal LM's query at position t sees keys 0..t, and the query at
    t = i sees the fewest rivals of k_i), so it is decided against the hull of
    k_0..k_{i-1}. In float64, each set centred and scaled to unit RMS, a point is decided
    by a certificate:

    * selectable: a query ranks it strictly first, checked exactly: first each point's
      own ``candidates`` query ([N, T, d], e.g. the normal of the ellipsoid a norm puts its
      outputs on) and its direction from the set's mean (causal: its prefix's mean), then
      ``queries`` random Gaussian queries (causal: a query picks point i when it scores
      k_i above every k_j, j < i); for the points none of them picks, the residual
      r = k_i - K^T lam of the nearest point K^T lam of the others' hull (FISTA on
      min ||K^T lam - k_i|| over the simplex) is such a query once lam is near optimal;
    * unselectable: a convex combination of the others lies within ``tol`` of k_i, so no
      query ranks k_i first by more than tol |q| of score.

    In the plane (d = 2, e.g. a head's keys in a model of head_dim 2) ``_plane_gaps``
    proposes both certificates from the angular order of each point's rivals, which
    decides every point in general position without FISTA. A point with neither
    certificate after ``iters`` iterations is undetermined (-1)."""
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
    if causal:
        allowed &= torch.ones(t, t, dtype=torch.bool).tril()  # and j <= i
    out[~allowed.any(-1)] = 0
    if causal:  # each point's direction from its prefix's mean
        steps = torch.arange(1, t + 1, dtype=torch.float64)[None, :, None]
        own_queries = [p - p.cumsum(1) / steps]
    else:
        own_queries = [p]
    if candidates is not None:
        own_queries.append(candidates.detach().double().cpu())
    plane = _plane_gaps(p, allowed) if d == 2 else None
    if plane is not None:
        own_queries.append(plane[0])
    for q in own_queries:  # q[n, i] is tried for point i of set n
        scores = q @ p.transpose(1, 2)  # [N, T(i), T(j)]
        own = scores.diagonal(dim1=1, dim2=2)
        rival = scores.masked_fill(~allowed, -math.inf).amax(-1)
        out[own > rival + 1e-12 * q.norm(dim=-1)] = 0
    # random queries: the first-ranked point of each, where it is strictly first
    g = torch.Generator().manual_seed(seed)
    for chunk in torch.randn(queries, d, generator=g, dtype=torch.float64).split(1024):
        scores = p @ chunk.T  # [N, T, Q]
        if causal:  # point i against the best of 0..i-1 (a copy among them blocks it: FISTA decides)
            best_before = scores.cummax(dim=1).values.roll(1, dims=1)
            best_before[:, 0] = -math.inf
            out[(scores > best_before + 1e-12).any(-1)] = 0
            continue
        top = scores.topk(min(2, t), dim=1)
        winners = top.indices[:, 0]  # [N, Q]
        strict = top.values[:, 0] > top.values[:, -1] + 1e-12 if t > 1 else torch.ones_like(winners, dtype=torch.bool)
        hit = torch.zeros(n, t, dtype=torch.bool)
        hit.scatter_(1, winners.masked_fill(~strict, 0), strict)
        out[hit] = 0
    if plane is not None:  # a triangle of the others around each point the gaps leave inside
        undecided = out == -1
        out[undecided & (plane[1] < tol)] = 1
    todo = (out == -1).nonzero()  # [P, 2]: (set, point)
    if len(todo):
        _nearest_in_hull(p, allowed, todo, out, iters, tol, causal)
    return out


def _plane_gaps(p: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both certificates for points in the plane, read off the directions u_j from k_i
    to its allowed others, sorted by angle: [N, T, 2] queries and [N, T] distances.

    * the query: the bisector of the widest angular gap between consecutive u_j; when
      that gap exceeds pi, every u_j is more than pi/2 from it, so it ranks k_i first
      (``unselectable`` checks it exactly);
    * the distance from k_i to a convex combination of three others: u_a (the first
      direction) and the consecutive u_b, u_c around -u_a, with -u_a = beta u_b + gamma u_c
      (beta, gamma >= 0 when no gap exceeds pi), make k_i a convex combination of k_a,
      k_b, k_c. The weights are clipped to the simplex and the distance is recomputed
      from them, so it certifies whatever rounding did (inf where there is no triangle)."""
    n, t, _ = p.shape
    diff = p[:, None, :, :] - p[:, :, None, :]  # [N, T(i), T(j), 2]: k_j - k_i
    angle = torch.atan2(diff[..., 1], diff[..., 0]).masked_fill(~allowed, math.inf)
    angle, order = angle.sort(dim=-1)
    count = allowed.sum(-1)  # [N, T]
    last = (count - 1).clamp_min(0)[..., None]
    first = angle[..., :1]
    nxt = torch.cat([angle[..., 1:], first + 2 * math.pi], dim=-1)
    nxt.scatter_(-1, last, first + 2 * math.pi)  # after the last allowed direction comes the first
    position = torch.arange(t)
    gaps = (nxt - angle).masked_fill(position >= count[..., None], -math.inf)
    widest, at = gaps.max(-1)
    middle = angle.gather(-1, at[..., None]).squeeze(-1) + widest / 2
    queries = torch.stack([middle.cos(), middle.sin()], -1).nan_to_num(0.0, 0.0, 0.0)
    # the triangle: b the last direction up to u_a's opposite, c the one after it
    unit = diff / diff.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    sorted_unit = unit.gather(2, order[..., None].expand(-1, -1, -1, 2))
    b_at = ((angle <= first + math.pi) & (position < count[..., None])).sum(-1, keepdim=True) - 1
    c_at = torch.where(b_at + 1 >= count[..., None], torch.zeros_like(b_at), b_at + 1)
    b_at = b_at.clamp_min(0)
    u_a, u_b, u_c = (sorted_unit.gather(2, i[..., None].expand(-1, -1, 1, 2)).squeeze(2)
                     for i in (torch.zeros_like(b_at), b_at, c_at))
    cross = u_b[..., 0] * u_c[..., 1] - u_b[..., 1] * u_c[..., 0]
    beta = (-u_a[..., 0] * u_c[..., 1] + u_a[..., 1] * u_c[..., 0]) / cross  # Cramer's rule
    gamma = (-u_b[..., 0] * u_a[..., 1] + u_b[..., 1] * u_a[..., 0]) / cross
    degenerate = cross.abs() < 1e-12  # u_b, u_c (anti)parallel: -u_a = u_b when it is on the line
    beta = torch.where(degenerate, -(u_a * u_b).sum(-1), beta)
    gamma = torch.where(degenerate, torch.zeros_like(gamma), gamma)
    idx = order.gather(-1, torch.cat([torch.zeros_like(b_at), b_at, c_at], -1))  # [N, T, 3]
    length = diff.norm(dim=-1).gather(-1, idx).clamp_min(1e-300)
    weights = (torch.stack([torch.ones_like(beta), beta, gamma], -1) / length).nan_to_num(0.0, 0.0, 0.0)
    weights = weights.clamp_min(0.0)
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-300)
    corners = p[torch.arange(n)[:, None, None], idx]  # [N, T, 3, 2]
    dist = (p - (weights[..., None] * corners).sum(-2)).norm(dim=-1)
    valid = (count >= 2) & (weights.sum(-1) > 0.5) & allowed.gather(-1, idx).all(-1)
    return queries, dist.masked_fill(~valid, math.inf)


def _nearest_in_hull(p: torch.Tensor, allowed: torch.Tensor, todo: torch.Tensor, out: torch.Tensor,
                     iters: int, tol: float, restrict: bool = False) -> None:
    """FISTA for min ||K^T lam - k_i|| over the simplex of each (set, point) of ``todo``,
    writing each certificate into ``out`` as it appears (checked every 50 iterations).
    ``restrict``: the Gram matrix (and so the step, 1 / its largest eigenvalue) only over
    each point's allowed others, a longer step where they are few (a causal prefix)."""
    sets, idx = todo[:, 0], todo[:, 1]
    k = p[sets]  # [P, T, d]
    target = p[sets, idx]  # [P, d]
    mask = allowed[sets, idx]  # [P, T]
    gram = k @ k.transpose(1, 2)  # [P, T, T]
    if restrict:
        gram = gram * (mask[:, :, None] & mask[:, None, :])
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
    """The fraction of each self-attention layer's inputs, and of each head's keys, that
    are unselectable (``unselectable``), over the sequences of ``tokens`` (no padding);
    each ``unselectable_*`` list has an ``undetermined_*`` twin, the fraction per layer
    left without a certificate.

    * ``unselectable_by_layer``, Brody et al.'s measurement: the vectors each block's
      self-attention reads (its input norm's output; the residual stream itself without
      one), each decided in d_model dimensions against its whole sequence, as the
      authors' code does with GPT-2's ln_1 outputs. It is about those vectors, not the
      keys: a head's key map W_k^h (d_model -> head_dim, 8 -> 2 in the study's model)
      is not injective, and it can map a vertex of the inputs' hull inside the hull of
      the others' images, so the keys of inputs on a sphere can be unselectable.
    * causal models (LMs), where the query at position t sees keys 0..t only, so key i
      is selectable by some query the model could form iff it is a vertex of the hull
      of keys 0..i: ``unselectable_causal_by_layer``, the same inputs decided against
      their prefix; ``unselectable_heads_causal_by_layer``, each head's keys
      k = W_k^h h + b_k^h (after QK-norm and RoPE where the model has them: what its
      scores are taken with) decided against their prefix, the mean over heads,
      sequences and positions.
    * other models: ``unselectable_heads_by_layer``, each head's keys against the whole
      sequence."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"unselectable_keys: expected a model with normlab Blocks, got {type(model).__name__}")
    seen: list[tuple[torch.Tensor, Any]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if kwargs.get("attn_mask") is not None:
            raise ValueError("unselectable_keys: expected sequences without padding (an attention mask was given)")
        seen.append((args[0].detach(), kwargs.get("rope")))

    handles = [b.attn.register_forward_pre_hook(hook, with_kwargs=True) for b in blocks]
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
    causal = {bool(getattr(b, "causal", False)) for b in blocks}
    if len(causal) > 1:
        raise ValueError("unselectable_keys: expected every block causal or none")
    causal_lm = causal == {True}
    out: dict[str, list[float]] = {}

    def add(name: str, flags: torch.Tensor) -> None:
        out.setdefault(f"unselectable{name}_by_layer", []).append(float((flags == 1).double().mean()))
        out.setdefault(f"undetermined{name}_by_layer", []).append(float((flags == -1).double().mean()))

    for (h, rope), norm, block in zip(seen, norms, blocks):
        h = h.float()
        normals = _ellipsoid_normals(norm, h)
        add("", unselectable(h, candidates=normals))
        if causal_lm:
            add("_causal", unselectable(h, candidates=normals, causal=True))
        keys, candidates = head_keys(block.attn, h, rope)
        add("_heads_causal" if causal_lm else "_heads",
            unselectable(keys.flatten(0, 1), causal=causal_lm,
                         candidates=None if candidates is None else candidates.flatten(0, 1)))
    return out


def head_keys(attn: nn.Module, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each head's keys of the attention inputs ``h`` [B, T, d_model], as ``attn``
    (normlab's ``Attention``) forms them, in float32: [B, H, T, head_dim]; and, where
    a per-head QK-norm puts them on one ellipsoid (no RoPE), each key's normal on it."""
    weight = attn.k_proj.weight
    with torch.autocast(h.device.type, enabled=False):
        keys = attn._heads(attn.k_proj(h.to(weight.dtype)), attn.k_norm).float()
    candidates = None
    if attn.k_norm is not None and getattr(attn, "qk_norm_scope", "head") == "head" and rope is None:
        candidates = _ellipsoid_normals(attn.k_norm, keys)
    if rope is not None:
        keys = apply_rope(keys, *rope)
    return keys, candidates


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
