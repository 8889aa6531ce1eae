"""fold_norm_affine: move each norm's gamma/beta into the Linear layers reading it."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from normlab.convert.analysis import analyse
from normlab.convert.args import check_bool, check_module, check_patterns
from normlab.convert.blocks import block_entry, block_spec
from normlab.convert.detect import NormSemantics, semantics
from normlab.convert.fused import is_fused
from normlab.convert.linear import LinearView, recomputed_by
from normlab.convert.report import ConversionReport
from normlab.convert.rms import RMSNormWithBias
from normlab.convert.swap import (
    all_paths,
    fuse_blocker,
    fuse_known_blocks,
    hook_kinds,
    norm_modules,
    outside_references,
    refuse_meta,
    replace_module,
    selected,
    shared_params,
)
from normlab.norms.base import ResidualNorm


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
        if isinstance(v.module, nn.Module):
            recomputed = recomputed_by(v.module)
            if recomputed:
                return f"consumer {v.path} is parametrized ({recomputed}), so gamma cannot be folded into it"
            kinds = hook_kinds(v.module)
            if kinds:
                return (f"consumer {v.path} has {' and '.join(kinds)}, which see its input: folding changes "
                        "that input from gamma * n(x) + beta to n(x)")
        if v.weight().shape[1] != shape[0]:
            return (f"consumer {v.path} takes {v.weight().shape[1]} input features, the norm's gamma has "
                    f"{shape[0]}")
        for p in v.parameters():
            names = shared.get(id(p))
            if names is None:
                return (f"consumer {v.path}'s weight is not a parameter of the model (it is computed from other "
                        "tensors), so gamma cannot be folded into it")
            # a parameter's other names are fine where they are consumers of this same norm
            # (a module reachable by two paths, both reading it; consumers sharing a weight)
            others = [n for n in names if n.rpartition(".")[0] not in positions]
            if others:
                return (f"consumer {v.path} shares its parameter with {', '.join(others)} "
                        "(tied weights): folding would change the other use too")
        if _needs_bias(v, beta) and not (add_bias and isinstance(v.module, nn.Linear)):
            return (f"consumer {v.path} has no bias to absorb the norm's beta"
                    + ("" if add_bias else " (add_bias=True gives it one)"))
    # consumers of this norm sharing a tensor: each tensor is rewritten once
    by_weight: dict[int, LinearView] = {}
    by_bias: dict[tuple[int, str], LinearView] = {}
    for v in views:
        w = v.weight_param()
        seen = by_weight.setdefault(id(w), v)
        if seen.layout() != v.layout():
            return (f"consumers {seen.path} and {v.path} share their weight but read the norm's output through "
                    "different parts or layouts of it")
        b = v.bias_param()
        if beta is not None and b is not None:
            seen = by_bias.setdefault((id(b), v.rows), v)
            if seen.weight_param() is not w:
                return (f"consumers {seen.path} and {v.path} share their bias but not their weight: each would "
                        "need its own W beta added to the one bias")
    return None


def _fold(views: list[LinearView], gamma, beta, path: str, report: ConversionReport, hf_class: str | None) -> None:
    """W -> W diag(gamma) and b -> b + W beta for every consumer; a weight or bias that
    several consumers share (tied q/k projections) is rewritten once, every bias with its
    own consumer's W before the scaling. ``hf_class``: the Hugging Face model's class,
    whose architecture has no slot for an added bias (its report line says so)."""
    with torch.no_grad():
        g = None if gamma is None else gamma.detach()
        b = None if beta is None else beta.detach()
        for v in views:
            if _needs_bias(v, b):
                w = v.module.weight
                v.module.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                             requires_grad=w.requires_grad)
                report.add(v.path, v.module, "added", f"a zero bias, to absorb {path}'s beta" + (
                    "" if hf_class is None else
                    f"; {hf_class} has no slot for {v.path}.bias: save_pretrained writes it and from_pretrained "
                    "drops it, so the reloaded model is not the folded one (keep the state dict with safetensors, "
                    "or fold without add_bias)"))
        if b is not None:
            done: set[tuple[int, str]] = set()
            for v in views:
                bias = v.bias_param()
                if bias is not None and (id(bias), v.rows) not in done:
                    done.add((id(bias), v.rows))
                    v.fold_beta(b)
        if g is not None:
            scaled: set[int] = set()
            for v in views:
                if id(v.weight_param()) not in scaled:
                    scaled.add(id(v.weight_param()))
                    v.scale_input(g)


def _torch_layer_unfused(model: nn.Module, folding: set[int]) -> dict[int, str]:
    """id(norm) -> why it cannot fold, for the norms to fold (``folding``) inside a torch
    TransformerEncoderLayer that would not be fused: torch's own forward (its fast-path
    check) reads every norm's weight and bias, and a folded norm has none."""
    out: dict[int, str] = {}
    for path, layer in model.named_modules(remove_duplicate=False):
        if not isinstance(layer, nn.TransformerEncoderLayer) or is_fused(layer):
            continue
        mine = [(n, m) for n, m in layer.named_children() if id(m) in folding]
        if not mine:
            continue
        _, entry = block_entry(layer)
        if entry is None or entry.forward is None:
            why = f"{type(layer).__name__} defines its own forward, which normlab does not fuse"
        else:
            spec = block_spec(layer)
            normlab = lambda m: id(m) in folding or isinstance(m, ResidualNorm)  # noqa: E731
            unfolded = [n for n in spec.fused_norms if not normlab(getattr(layer, n, None))]
            why = (f"{', '.join(unfolded)} {'is' if len(unfolded) == 1 else 'are'} left unfolded" if unfolded
                   else fuse_blocker(layer, spec, normlab=normlab))
        if why is None:
            continue
        for name, m in mine:
            out.setdefault(id(m), (
                f"its layer {path} would not be fused ({why}), and torch's own "
                f"TransformerEncoderLayer.forward reads every norm's weight and bias, which a folded "
                f"{name} no longer has"))
    return out


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
    in Post-LN), when a consumer's weight is tied to another module, read directly by the
    forward or recomputed (a parametrization, weight_norm), when the norm or a consumer
    has hooks (they would see other values), when the model holds the norm outside its
    registered paths (``self.pipeline = [self.ln]``), when it normalizes over several
    dims, or when its consumers are unknown. A norm used at several places (called twice,
    or one module at two paths) folds into the consumers of all its uses at once, or is
    left when one use cannot fold; consumers sharing one weight (tied q/k projections)
    have it scaled once. A norm's beta needs a bias in each consumer to go to: with
    ``add_bias=True`` a ``torch.nn.Linear`` consumer without one gets a bias (adding a
    ``<consumer>.bias`` state_dict entry), else the norm is left. A final norm folded into
    a Hugging Face model's head leaves the logits unchanged, but the last hidden state it
    returns with ``output_hidden_states=True`` becomes the non-affine n(x) (the report
    says so). Exact in real arithmetic; the weights are updated in float64 and rounded
    once. The folded norms lose their weight/bias state_dict entries.

    Raises ConversionError, changing nothing, when the model has parameters on the meta
    device (folding needs their values); NormTypeError (a TypeError), changing nothing,
    when ``model`` is not a torch.nn.Module, ``include``/``exclude`` not a str or an
    iterable of str, or ``add_bias`` not a bool.
    """
    check_module("fold_norm_affine", "model", model)
    include = check_patterns("fold_norm_affine", "include", include)
    exclude = check_patterns("fold_norm_affine", "exclude", exclude)
    add_bias = check_bool("fold_norm_affine", "add_bias", add_bias)
    refuse_meta(model, "fold_norm_affine",
                "folding computes the consumers' new weights from their values and the norms' gamma and beta")
    report = ConversionReport("fold_norm_affine", model)
    analysis = analyse(model)
    hf_class = type(model).__name__ if type(model).__module__.startswith("transformers.") else None
    shared = shared_params(model)
    paths = all_paths(model)
    outside = outside_references(model)
    # every norm's outcome, in model order: the reason it is left, or what it folds into
    outcomes: list[tuple[str, nn.Module, str | tuple]] = []
    for path, module in norm_modules(model):
        outcomes.append((path, module, _plan(model, path, module, analysis, shared, paths, outside,
                                             include, exclude, add_bias)))
    # a norm of a torch encoder layer folds only where the layer then runs the fused forward
    # (each removal may leave another layer unfused: repeat until nothing changes)
    while True:
        folding = {id(m) for _, m, plan in outcomes if not isinstance(plan, str)}
        unfused = _torch_layer_unfused(model, folding)
        if not unfused:
            break
        outcomes = [(p, m, f"cannot fold: {unfused[id(m)]}" if id(m) in unfused else plan)
                    for p, m, plan in outcomes]
    for path, module, plan in outcomes:
        if isinstance(plan, str):
            report.add(path, module, "left", plan)
            continue
        sem, gamma, beta, views = plan
        _fold(views, gamma, beta, path, report, hf_class)
        plain = NormSemantics(sem.kind, sem.shape, sem.eps, False, False, "",
                              output_dtype=sem.output_dtype).build(module)
        for p in paths[id(module)]:
            replace_module(model, p, plain)
        note = analysis.final_outputs.get(path)
        report.add(path, module, "folded",
                   "gamma" + (" and beta" if beta is not None else "") + " -> "
                   + ", ".join(v.path + ("" if v.rows == "all" else f"[{v.rows}]") for v in views)
                   + (f"; {note}" if note else ""))
    # known blocks now holding normlab norms run normlab's forward (torch's encoder-layer
    # fast path would hand the non-affine norms' missing weights to its own kernel)
    fuse_known_blocks(model, report, quiet=True)
    return report.attach()


def _plan(model, path, module, analysis, shared, paths, outside, include, exclude, add_bias):
    """Why ``module`` (at ``path``) is left, or (semantics, gamma, beta, consumer views)."""
    weight = getattr(module, "weight", None)
    if (type(module).__name__ == "T5StyleRMSNorm" and type(module).__module__ == "normlab.integrations.hf"
            and isinstance(weight, torch.Tensor) and weight.dtype in (torch.float16, torch.bfloat16)):
        return ("cannot fold: its output takes its half-precision weight's dtype whatever its input's (T5LayerNorm's "
                "rule: a half-precision T5 feeds its norms float32), which a norm without the weight cannot keep")
    sem, gamma, beta = _affine_of(module)
    if isinstance(sem, str):
        return f"not a norm normlab reproduces: {sem}"
    if not sem.plain:
        return (f"cannot fold: its scale is offset + weight (offset={sem.offset:g}, "
                f"casting_mode={sem.casting_mode!r}); folding does not take a weight offset yet")
    if gamma is None and beta is None:
        return "no affine parameters to fold"
    if not all(selected(p, include, exclude) for p in paths[id(module)]):
        return "filtered out by include/exclude"
    kinds = hook_kinds(module)
    if kinds:
        return (f"cannot fold: it has {' and '.join(kinds)}; they see the norm module and its output, which "
                "folding changes (gamma and beta removed: n(x) instead of gamma * n(x) + beta)")
    if id(module) in outside:
        where = ", ".join(outside[id(module)])
        return (f"cannot fold: the model also holds it at {where}, outside its registered module paths; "
                "folding replaces it only at those, so that reference would still apply gamma and beta")
    found = analysis.consumers_of(module, paths[id(module)])
    if isinstance(found, str):
        return f"cannot fold: {found}"
    views, positions = found
    if not views:
        return "cannot fold: no consumer found"
    if sem.weight_shape is not None:
        return (f"cannot fold: one weight per head (weight_shape={list(sem.weight_shape)}, normalized over "
                f"{list(sem.shape)}); folding takes a weight of the normalized shape")
    why = _check_consumers(views, positions, beta, shared, sem.shape, add_bias)
    if why:
        return f"cannot fold: {why}"
    return sem, gamma, beta, views
