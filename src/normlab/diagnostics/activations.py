"""Per-layer activation statistics: the residual stream and every norm's input.

Sites
    ``residual``    the output of each block of every block list (see
                    :func:`normlab.diagnostics.structure.find_block_lists`; a block with a
                    ``residual_stream(output)`` method, as normlab's, says which tensor
                    its output stands for, else its first tensor is taken): the residual
                    stream after that layer
    ``norm_input``  the input of every norm module (for normlab norms called with a
                    residual, the normalized sum residual + x is what is measured)

Statistics over all elements of the tensor: mean, RMS sqrt(mean(x^2)), max |x| (these
three over the finite entries, 0 when there are none) and the fraction of non-finite
entries (0 for an empty tensor). They are
computed on the tensor's device without a host sync; records are materialized when read.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from normlab.backend import in_backward
from normlab.diagnostics.structure import (
    check_every,
    check_model,
    find_block_lists,
    is_norm,
    module_layer,
)
from normlab.errors import NormArgumentError

STATS = ("mean", "rms", "max_abs", "nonfinite")

_replays = [0]  # > 0 while a monitor recomputes part of a forward (``replaying``)


@contextmanager
def replaying():
    """A monitor's own recomputation of part of the model's forward (AttentionLogitMonitor's
    q and k): ActivationMonitor does not record the calls inside, which are no calls of the
    model's."""
    _replays[0] += 1
    try:
        yield
    finally:
        _replays[0] -= 1


@dataclass
class ActivationRecord:
    step: int
    site: str            # "residual" | "norm_input"
    module: str          # module path
    stack: str           # block-list path ("" outside)
    layer: int | None
    mean: float
    rms: float
    max_abs: float
    nonfinite: float     # fraction of NaN/inf entries

    def as_dict(self) -> dict:
        return asdict(self)


def tensor_stats(x: Tensor) -> Tensor:
    """[mean, rms, max|x|, fraction non-finite] of ``x`` as one float32 tensor (no sync).

    mean, rms and max|x| are over the finite entries, 0 where there are none (an empty
    tensor, or one all NaN/inf); the fraction non-finite of an empty tensor is 0. So an
    empty activation (a batch of 0 examples) reads as all zeros, never NaN. Sums are
    float32 (a float64 accumulation costs 50-80x on a CPU): an RMS past about 1.8e19
    reads inf, as a sign of divergence as good as its value."""
    xf = x.detach().float()
    finite = torch.isfinite(xf)
    n_fin = finite.sum()
    xz = torch.where(finite, xf, 0.0)
    denom = n_fin.clamp_min(1)
    mean = xz.sum() / denom
    rms = torch.linalg.vector_norm(xz) / denom.sqrt()
    max_abs = xz.abs().amax() if xz.numel() else xz.new_zeros(())
    nonfinite = (xf.numel() - n_fin) / max(xf.numel(), 1)
    return torch.stack([mean, rms, max_abs, nonfinite.float()])


def _first_tensor(obj) -> Tensor | None:
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        for o in obj:
            if isinstance(o, Tensor) and o.is_floating_point():
                return o
    if hasattr(obj, "last_hidden_state"):
        return obj.last_hidden_state
    return None


class ActivationMonitor:
    """Records residual-stream and norm-input statistics every ``every`` forwards of ``model``.

        with ActivationMonitor(model, every=50) as mon:
            ... train ...
        mon.records                     # [ActivationRecord, ...] over all sampled steps
        mon.residual_rms()              # RMS of the residual stream per layer, latest step

    A *step* is one forward of ``model``; step 0 is the first. ``attach()``/``detach()``
    are the explicit form of the context."""

    def __init__(self, model: nn.Module, every: int = 1) -> None:
        check_model("ActivationMonitor", model)
        self.model, self.every = model, check_every("ActivationMonitor", every)
        self.step = -1
        self._handles: list = []
        self._raw: list[tuple[int, str, str, str, int | None, Tensor]] = []
        self._records: list[ActivationRecord] = []

    def attach(self) -> ActivationMonitor:
        if self._handles:
            return self
        lists = find_block_lists(self.model)
        self._handles.append(self.model.register_forward_pre_hook(self._on_root))
        for bpath, container in lists:
            for i, block in enumerate(container.children()):
                path = f"{bpath}.{i}" if bpath else str(i)
                self._handles.append(block.register_forward_hook(
                    self._block_hook(path, bpath, i)))
        for path, mod in self.model.named_modules():
            if is_norm(mod):
                stack, layer = module_layer(path, self.model, lists)
                self._handles.append(mod.register_forward_hook(
                    self._norm_hook(path, stack, layer), with_kwargs=True))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> ActivationMonitor:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _sampling(self) -> bool:
        # (not a forward that activation checkpointing runs again inside the backward: its
        # values were recorded when the step's forward ran)
        return self.step >= 0 and self.step % self.every == 0 and not _replays[0] and not in_backward()

    def _on_root(self, module, args) -> None:
        if not in_backward():  # (the model's forward recomputed by checkpointing is no new step)
            self.step += 1

    def _block_hook(self, path: str, stack: str, layer: int):
        def hook(module, args, output):
            if self._sampling():
                # a block that knows what its output means says so (normlab's Blocks,
                # whose Pre-LN output is (residual, pending branch)); else its first tensor
                read = getattr(module, "residual_stream", None)
                x = read(output) if callable(read) else _first_tensor(output)
                if x is not None and x.is_floating_point():
                    self._raw.append((self.step, "residual", path, stack, layer, tensor_stats(x)))
        return hook

    def _norm_hook(self, path: str, stack: str, layer: int | None):
        def hook(module, args, kwargs, output):
            if not self._sampling():
                return
            x = args[0] if args else kwargs.get("input", kwargs.get("x"))
            residual = args[1] if len(args) > 1 else kwargs.get("residual")
            if residual is not None and isinstance(output, tuple) and len(output) == 2:
                x = output[1]  # normlab norm(x, residual): the norm's input is residual + x
            if isinstance(x, Tensor) and x.is_floating_point():
                self._raw.append((self.step, "norm_input", path, stack, layer, tensor_stats(x)))
        return hook

    @property
    def records(self) -> list[ActivationRecord]:
        """All records so far (materialized now: one device sync for the pending ones)."""
        if self._raw:
            values = torch.stack([r[-1] for r in self._raw]).tolist()
            self._records.extend(ActivationRecord(s, site, m, st, layer, *v)
                                 for (s, site, m, st, layer, _), v in zip(self._raw, values, strict=True))
            self._raw.clear()
        return self._records

    def step_records(self, step: int | None = None) -> list[ActivationRecord]:
        """Records of one sampled step (default: the latest)."""
        recs = self.records
        if not recs:
            return []
        step = recs[-1].step if step is None else step
        return [r for r in recs if r.step == step]

    def residual_rms(self, step: int | None = None, stack: str | None = None,
                     stat: str = "rms") -> list[float]:
        """``stat`` of the residual stream after each layer of ``stack`` (default: the
        longest block list) at ``step`` (default: the latest)."""
        if stat not in STATS:
            raise ValueError(f"residual_rms: expected stat in {STATS}, got {stat!r}")
        recs = [r for r in self.step_records(step) if r.site == "residual"]
        stacks = list(dict.fromkeys(r.stack for r in recs))
        if stack is not None and recs and stack not in stacks:  # (a misspelling would read as no layers)
            raise NormArgumentError(f"residual_rms: expected stack among {stacks} (the block lists recorded), "
                                    f"got {stack!r}")
        if stack is None:
            lists = find_block_lists(self.model)
            stack = lists[0][0] if lists else ""
        recs = sorted((r for r in recs if r.stack == stack), key=lambda r: r.layer)
        return [getattr(r, stat) for r in recs]

    def table(self, step: int | None = None):
        """A rich.table.Table of one step's records."""
        from rich.table import Table

        recs = self.step_records(step)
        title = f"activation statistics, step {recs[0].step}" if recs else "activation statistics"
        table = Table(title=title)
        for col in ("site", "module", "layer", *STATS):
            table.add_column(col, justify="right" if col in STATS or col == "layer" else "left")
        for r in recs:
            table.add_row(r.site, r.module, "-" if r.layer is None else str(r.layer),
                          f"{r.mean:+.3e}", f"{r.rms:.3e}", f"{r.max_abs:.3e}", f"{r.nonfinite:.2%}")
        return table
