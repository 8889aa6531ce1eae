"""Per-parameter gradient norms, grouped per layer and per sublayer kind.

The measurement behind Xiong et al. 2020 ("On Layer Normalization in the Transformer
Architecture", Figure 3): at initialization the gradient norm of the FFN output weight
W2 grows with the layer index in Post-LN and stays flat in Pre-LN.

    records = grad_norms(model, loss)       # one GradNormRecord per parameter
    records.by_layer("ffn_w2")              # [||grad W2||_F of layer 0, 1, ...]
    records.table()                         # a rich Table, one row per (stack, layer)
    records.plot("grads.png")               # gradient norm vs layer, one line per kind

Layers and kinds are inferred by :mod:`normlab.diagnostics.structure`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from normlab.backend import in_backward
from normlab.diagnostics.structure import (
    SUBLAYER_KINDS,
    check_every,
    check_model,
    iter_param_info,
)
from normlab.errors import NormArgumentError

_probes = [0]  # > 0 while normlab computes gradients for a measurement of its own (``probing``)


@contextmanager
def probing():
    """normlab's own gradient computation for a measurement (``grad_norms(model, loss)``'s
    torch.autograd.grad): GradientMonitor does not record the gradients computed inside,
    which are no part of the training step's. A counter, not a thread-local: the
    parameters' hooks run on autograd's device threads."""
    _probes[0] += 1
    try:
        yield
    finally:
        _probes[0] -= 1


@dataclass
class GradNormRecord:
    """One parameter's gradient norm ||grad||_2 (Frobenius for matrices) and its place."""

    name: str            # dotted parameter name, as in model.named_parameters()
    stack: str           # path of its block list ("" outside every block)
    layer: int | None    # index in that block list (None outside)
    kind: str            # one of SUBLAYER_KINDS
    grad_norm: float
    param_norm: float    # the parameter's norm where its gradient was computed
    numel: int

    def as_dict(self) -> dict:
        return asdict(self)


class GradNorms(list):
    """A list of :class:`GradNormRecord` with grouping, a Rich table and a plot."""

    def grouped(self, *, weights_only: bool = False) -> list[dict]:
        """One record per (stack, layer, kind): {"stack", "layer", "kind", "grad_norm", "numel"},
        grad_norm = sqrt(sum of the members' squared norms). ``weights_only`` keeps only
        parameters whose name does not end in "bias"."""
        acc: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0])
        for r in self:
            if weights_only and r.name.rsplit(".", 1)[-1].endswith("bias"):
                continue
            a = acc[(r.stack, r.layer, r.kind)]
            a[0] += r.grad_norm ** 2
            a[1] += r.numel
        out = [{"stack": s, "layer": layer, "kind": k, "grad_norm": math.sqrt(v[0]), "numel": v[1]}
               for (s, layer, k), v in acc.items()]
        out.sort(key=lambda d: (d["stack"], -1 if d["layer"] is None else d["layer"],
                                SUBLAYER_KINDS.index(d["kind"]) if d["kind"] in SUBLAYER_KINDS else 99))
        return out

    def stacks(self) -> list[str]:
        """Block-list paths present, in order of first appearance."""
        return list(dict.fromkeys(r.stack for r in self if r.layer is not None))

    def by_layer(self, kind: str, *, stack: str | None = None, weights_only: bool = True) -> list[float]:
        """Gradient norm of ``kind`` in each layer of ``stack`` (default: the first stack);
        0.0 for a layer without that kind. A ``kind`` that is none of SUBLAYER_KINDS nor
        any record's, or a ``stack`` that is none of ``stacks()`` (when there are records),
        raises NormArgumentError: a misspelling would read as zero gradients."""
        known = dict.fromkeys([*SUBLAYER_KINDS, *(r.kind for r in self)])
        if kind not in known:
            raise NormArgumentError(f"by_layer: expected kind among {list(known)}, got {kind!r}")
        stacks = self.stacks()
        if not stacks:
            return []
        if stack is not None and stack not in stacks:
            raise NormArgumentError(f"by_layer: expected stack among {stacks} (the block lists with "
                                    f"gradients), got {stack!r}")
        stack = stacks[0] if stack is None else stack
        groups = [g for g in self.grouped(weights_only=weights_only)
                  if g["stack"] == stack and g["layer"] is not None]
        n = max((g["layer"] for g in groups), default=-1) + 1
        out = [0.0] * n
        for g in groups:
            if g["kind"] == kind:
                out[g["layer"]] = g["grad_norm"]
        return out

    def table(self, title: str = "gradient norms per layer and sublayer kind"):
        """A rich.table.Table: one row per (stack, layer), one column per kind."""
        from rich.table import Table

        groups = self.grouped()
        kinds = [k for k in SUBLAYER_KINDS if any(g["kind"] == k for g in groups)]
        table = Table(title=title)
        table.add_column("stack")
        table.add_column("layer", justify="right")
        for k in kinds:
            table.add_column(k, justify="right")
        rows: dict[tuple, dict[str, float]] = {}
        for g in groups:
            rows.setdefault((g["stack"], g["layer"]), {})[g["kind"]] = g["grad_norm"]
        for (stack, layer), vals in rows.items():
            table.add_row(stack or "-", "-" if layer is None else str(layer),
                          *(f"{vals[k]:.3e}" if k in vals else "" for k in kinds))
        return table

    def plot(self, path: str | Path, *, title: str = "gradient norm vs layer",
             weights_only: bool = True) -> Path:
        """Write a PNG: gradient norm (log scale) vs layer index, one line per (stack, kind)."""
        return plot_grad_norms([("", self)], path, title=title, weights_only=weights_only)


def plot_grad_norms(runs: list[tuple[str, GradNorms]], path: str | Path, *,
                    title: str = "gradient norm vs layer", weights_only: bool = True) -> Path:
    """Write a PNG comparing runs (label, records): gradient norm vs layer per kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, recs in runs:
        for stack in recs.stacks():
            for kind in SUBLAYER_KINDS:
                ys = recs.by_layer(kind, stack=stack, weights_only=weights_only)
                if not any(ys):
                    continue
                name = " ".join(s for s in (label, stack, kind) if s)
                ax.plot(range(len(ys)), ys, marker="o", label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("gradient norm" + (" (weights)" if weights_only else ""))
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _records(model: nn.Module, grads: dict[int, Tensor | None],
             param_norms: dict[int, Tensor] | None = None) -> GradNorms:
    """``param_norms``: each parameter's norm when its gradient was computed (default: now)."""
    infos = [(info, p) for info, p in iter_param_info(model) if grads.get(id(p)) is not None]
    if not infos:
        return GradNorms()
    # one device sync for all norms
    gn = torch.stack([grads[id(p)].detach().float().norm() for _, p in infos]).tolist()
    pnorm = param_norms or {}
    pn = torch.stack([pnorm[id(p)] if id(p) in pnorm else p.detach().float().norm() for _, p in infos]).tolist()
    return GradNorms(GradNormRecord(i.name, i.stack, i.layer, i.kind, g, w, p.numel())
                     for (i, p), g, w in zip(infos, gn, pn, strict=True))


def grad_norms(model: nn.Module, loss: Tensor | None = None) -> GradNorms:
    """Gradient norm of every parameter of ``model``, with its layer and sublayer kind.

    With ``loss``, the gradients of ``loss`` w.r.t. the parameters are computed with
    ``torch.autograd.grad`` (``.grad`` is left untouched, the graph is retained).
    Without, the parameters' current ``.grad`` is read. Parameters without a gradient
    are left out (a frozen model, or a loss that does not require grad, gives an empty
    list). ``loss``: a one-element tensor; anything else raises NormArgumentError."""
    check_model("grad_norms", model)
    if loss is None:
        return _records(model, {id(p): p.grad for p in model.parameters()})
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        got = f"a tensor of shape {list(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
        raise NormArgumentError(f"grad_norms: expected loss to be a scalar torch.Tensor (one element) or None, "
                                f"got {got}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or not loss.requires_grad:  # a frozen model, a loss outside autograd: no gradient
        return GradNorms()
    with probing():  # a measurement, not the step's gradient: GradientMonitor skips it
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return _records(model, {id(p): g for p, g in zip(params, grads, strict=True)})


class GradientMonitor:
    """Records per-parameter gradient norms during training with tensor hooks.

    Every parameter gets a hook that keeps the gradient flowing into it: a step's entry
    is the norm of the step's gradient, summed over its backward calls, before
    accumulation into ``.grad`` (a gradient left in ``.grad`` from an earlier step is not
    in it). A *step* is one forward of ``model``; on steps where
    ``step % every == 0`` the hooks record, on the others they return at once.
    Gradients that normlab computes for its own measurements (``grad_norms(model, loss)``)
    are skipped; a ``torch.autograd.grad`` call of the training step's own (a gradient
    penalty) reaches the parameters' hooks and is counted, as a second backward would be.

        with GradientMonitor(model, every=10) as mon:
            for batch in data:
                loss_fn(model(batch)).backward(); opt.step(); opt.zero_grad()
        mon.history      # [(step, GradNorms), ...]
        mon.last         # the latest GradNorms

    ``attach()``/``detach()`` do the same as entering/leaving the context.
    """

    def __init__(self, model: nn.Module, every: int = 1) -> None:
        check_model("GradientMonitor", model)
        self.model, self.every = model, check_every("GradientMonitor", every)
        self.step = -1
        self.history: list[tuple[int, GradNorms]] = []
        self._handles: list = []
        self._pending: dict[int, Tensor] = {}  # the current step's gradients, summed
        self._param_norms: dict[int, Tensor] = {}  # each parameter's norm at its first gradient of the step
        self._params: list[nn.Parameter] = []
        self._changed = False  # a gradient came since the current step's entry was written

    # --------------------------------------------------------------- attach / detach
    def attach(self) -> GradientMonitor:
        if self._handles:
            return self
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self._handles.append(self.model.register_forward_pre_hook(self._on_forward))
        for p in self._params:
            self._handles.append(p.register_hook(self._make_hook(p)))
        return self

    def detach(self) -> None:
        """Write the last step's entry and remove the hooks; the gradients held for it are
        released (a model-sized copy otherwise kept as long as the monitor)."""
        try:
            self.flush()
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()
            self._pending, self._param_norms = {}, {}

    def __enter__(self) -> GradientMonitor:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    # ---------------------------------------------------------------------- hooks
    def _sampling(self) -> bool:
        return self.step >= 0 and self.step % self.every == 0

    def _on_forward(self, module, args) -> None:
        if in_backward():  # the model's forward recomputed by checkpointing: no new step
            return
        self.flush()  # the finished step's final entry
        self._pending = {}
        self._param_norms = {}
        self.step += 1

    def _make_hook(self, p: nn.Parameter):
        key = id(p)

        def hook(grad: Tensor) -> None:
            if self._sampling() and not _probes[0]:
                prev = self._pending.get(key)
                if prev is None:
                    # the weights the gradient was computed at (before the optimizer's step,
                    # whenever the entry is written)
                    self._param_norms[key] = p.detach().float().norm()
                # several backward calls in one step (losses backwarded one by one): their
                # gradients add up, so the step's norm is that of the sum, not of each.
                # The gradient itself is held, not a detach()ed view of it: autograd then
                # sees it referenced and copies it into a .grad that is None, where it would
                # install this very tensor, whose memory clipping, GradScaler.unscale_ or
                # zero_grad(set_to_none=False) change in place later in the step (the
                # monitor read the clipped or zeroed gradient). A gradient with a graph of
                # its own (create_graph=True) is copied instead, without the graph.
                own = grad.detach().clone() if grad.requires_grad else grad
                self._pending[key] = own if prev is None else prev + own.detach()
                self._changed = True
        return hook

    def flush(self) -> None:
        """Write the current step's entry of ``history`` from the gradients gathered so far.

        Read in the middle of a step (between two of its backward calls) the entry is
        provisional: a later backward of the same step replaces it, and the next forward
        writes the final one, summed over all the step's backward calls."""
        if not self._changed:
            return
        self._changed = False
        grads = {k: v.float().square().sum().sqrt() for k, v in self._pending.items()}
        entry = (self.step, _records(self.model, grads, self._param_norms))
        if self.history and self.history[-1][0] == self.step:
            self.history[-1] = entry
        else:
            self.history.append(entry)

    @property
    def last(self) -> GradNorms:
        """The latest step's GradNorms (provisional while that step's backward calls go on)."""
        self.flush()
        return self.history[-1][1] if self.history else GradNorms()
