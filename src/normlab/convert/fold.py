"""fold_norm_affine: move each norm's gamma/beta into the Linear layers reading it."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from normlab.convert.analysis import analyse
from normlab.convert.detect import NormSemantics, semantics
from normlab.convert.linear import LinearView
from normlab.convert.report import ConversionReport
from normlab.convert.rms import RMSNormWithBias
from normlab.convert.swap import (
    all_paths,
    fuse_known_blocks,
    norm_modules,
    patterns,
    replace_module,
    selected,
    shared_params,
)


def _affine_of(module: nn.Module) -> tuple[NormSemantics | str, torch.Tensor | None, torch.Tensor | None]:
    if isinstance(module, RMSNormWithBias):
        sem = NormSemantics("rmsnorm", tuple(module.normalized_shape), module.eps, True, True, "")
    else:
        sem = semantics(module)
    if isinstance(sem, str):
        return sem, None, None
    w = module.weight if sem.affine else None
    b = module.bias if sem.bias else None
    return sem, w, b


def _needs_bias(v: LinearView, beta) -> bool:
    return beta is not None and v.bias() is None and bool(beta.detach().ne(0).any())


def _check_consumers(views: list[LinearView], positions: set[str], beta, shared, shape: tuple[int, ...],
                     add_bias: bool) -> str | None:
    """Why gamma/beta of a norm over ``shape`` cannot fold into ``views`` (found at
    ``positions``, the module paths reading the norm), or None."""
    if len(shape) != 1:
        return (f"it normalizes over several dims {list(shape)}: a Linear layer mixes only the last one, so "
                "its gamma cannot move into the consumer's weight")
    for v in views:
        why = v.check()
        if why:
            return why
        if v.weight().shape[1] != shape[0]:
            return (f"consumer {v.path} takes {v.weight().shape[1]} input features, the norm's gamma has "
                    f"{shape[0]}")
        for p in v.parameters():
            # a parameter's other names are fine where they are consumers of this same norm
            # (a module reachable by two paths, both reading it)
            others = [n for n in shared[id(p)] if n.rpartition(".")[0] not in positions]
            if others:
                return (f"consumer {v.path} shares its parameter with {', '.join(others)} "
                        "(tied weights): folding would change the other use too")
        if _needs_bias(v, beta) and not (add_bias and isinstance(v.module, nn.Linear)):
            return (f"consumer {v.path} has no bias to absorb the norm's beta"
                    + ("" if add_bias else " (add_bias=True gives it one)"))
    return None


def fold_norm_affine(
    model: nn.Module,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    add_bias: bool = False,
) -> nn.Module:
    """For inference: fold each norm's gamma (and beta) into the Linear layers that read
    its output, leaving a non-affine normlab norm, in place; returns the model (the report
    is ``model.normlab_report``).

        W (gamma * n(x) + beta) + b  =  (W diag(gamma)) n(x) + (W beta + b)

    Consumers are found from the known-block table (Q/K/V and FFN-input projections of
    Pre-LN blocks, GPT-2's Conv1D, the LM head after the final norm) or by tracing the
    model with torch.fx. A norm is left (with the reason in the report) when its output
    also feeds anything but Linear layers (a non-linear path, or the residual stream as
    in Post-LN), when a consumer's weight is tied to another module or read directly by the
    forward, when it normalizes over several dims, or when its consumers are unknown. A
    norm used at several places (called twice, or one module at two paths) folds into the
    consumers of all its uses at once, or is left when one use cannot fold. A norm's
    beta needs a bias in each consumer to go to: with ``add_bias=True`` a
    ``torch.nn.Linear`` consumer without one gets a bias (adding a ``<consumer>.bias``
    state_dict entry), else the norm is left. Exact in real
    arithmetic; the weights are updated in float64 and rounded once. The folded norms
    lose their weight/bias state_dict entries.
    """
    include, exclude = patterns(include), patterns(exclude)
    report = ConversionReport("fold_norm_affine", model)
    analysis = analyse(model)
    shared = shared_params(model)
    paths = all_paths(model)
    for path, module in norm_modules(model):
        sem, gamma, beta = _affine_of(module)
        if isinstance(sem, str):
            report.add(path, module, "left", f"not a norm normlab reproduces: {sem}")
            continue
        if not sem.plain:
            report.add(path, module, "left", f"cannot fold: its scale is offset + weight (offset={sem.offset:g}, "
                       f"casting_mode={sem.casting_mode!r}); folding does not take a weight offset yet")
            continue
        if gamma is None and beta is None:
            report.add(path, module, "left", "no affine parameters to fold")
            continue
        if not all(selected(p, include, exclude) for p in paths[id(module)]):
            report.add(path, module, "left", "filtered out by include/exclude")
            continue
        found = analysis.consumers_of(module, paths[id(module)])
        if isinstance(found, str):
            report.add(path, module, "left", f"cannot fold: {found}")
            continue
        views, positions = found
        if not views:
            report.add(path, module, "left", "cannot fold: no consumer found")
            continue
        if sem.weight_shape is not None:
            report.add(path, module, "left", f"cannot fold: one weight per head (weight_shape="
                       f"{list(sem.weight_shape)}, normalized over {list(sem.shape)}); folding takes a weight "
                       "of the normalized shape")
            continue
        why = _check_consumers(views, positions, beta, shared, sem.shape, add_bias)
        if why:
            report.add(path, module, "left", f"cannot fold: {why}")
            continue
        with torch.no_grad():
            g = None if gamma is None else gamma.detach()
            b = None if beta is None else beta.detach()
            for v in views:
                if _needs_bias(v, b):
                    w = v.module.weight
                    v.module.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                                 requires_grad=w.requires_grad)
                    report.add(v.path, v.module, "added", f"a zero bias, to absorb {path}'s beta")
                v.fold_input_affine(g, b)
        plain = NormSemantics(sem.kind, sem.shape, sem.eps, False, False, "").build(module)
        for p in paths[id(module)]:
            replace_module(model, p, plain)
        report.add(path, module, "folded",
                   "gamma" + (" and beta" if beta is not None else "") + " -> "
                   + ", ".join(v.path + ("" if v.rows == "all" else f"[{v.rows}]") for v in views))
    # known blocks now holding normlab norms run normlab's forward (torch's encoder-layer
    # fast path would hand the non-affine norms' missing weights to its own kernel)
    fuse_known_blocks(model, report, quiet=True)
    return report.attach()
