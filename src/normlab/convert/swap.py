"""swap_norms: replace a model's norm layers by normlab's, in place."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from torch import nn
from torch.nn.utils import parametrize

from normlab.convert.args import check_module, check_patterns
from normlab.convert.blocks import block_entry, block_spec
from normlab.convert.detect import NormSemantics, cast_check_for, semantics
from normlab.convert.fused import fuse, is_fused
from normlab.convert.report import ConversionError, ConversionReport
from normlab.convert.verify import HOOK_DICTS
from normlab.norms import LayerNorm, RMSNorm, is_norm
from normlab.norms.base import ResidualNorm


def selected(path: str, include, exclude) -> bool:
    if include is not None and not any(fnmatch.fnmatchcase(path, pat) for pat in include):
        return False
    return not (exclude is not None and any(fnmatch.fnmatchcase(path, pat) for pat in exclude))


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path``, carrying over the old module's hooks."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    old = getattr(parent, name)
    for attr in (*HOOK_DICTS, "_is_full_backward_hook", "_state_dict_hooks", "_state_dict_pre_hooks",
                 "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks"):
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))
    setattr(parent, name, new)


def parametrization_modules(model: nn.Module) -> set[int]:
    """id() of every module inside a ``torch.nn.utils.parametrize`` ParametrizationList of
    ``model``: the modules computing a parametrized tensor (weight norm's ``_WeightNorm``,
    ``orthogonal``'s, ...), which are not layers of the model even where their class name
    ends in ``Norm``."""
    out: set[int] = set()
    for m in model.modules():
        if isinstance(m, parametrize.ParametrizationList):
            out.update(id(s) for s in m.modules())
    return out


def norm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every norm-like module (not a parametrization's module); a module
    reachable by several paths once."""
    seen = parametrization_modules(model)
    out = []
    for path, m in model.named_modules():
        if is_norm(m) and id(m) not in seen:
            seen.add(id(m))
            out.append((path, m))
    return out


# the hooks that see a module's inputs or outputs (and the module itself)
_CALL_HOOKS = (("_forward_pre_hooks", "forward pre-hooks"), ("_forward_hooks", "forward hooks"),
               ("_backward_pre_hooks", "backward pre-hooks"), ("_backward_hooks", "backward hooks"))


def hook_kinds(module: nn.Module) -> list[str]:
    """The kinds of hooks registered on ``module`` that run when it is called ("forward
    hooks", ...): a transform that changes the module's inputs, outputs or call signature
    changes what they see."""
    return [name for attr, name in _CALL_HOOKS if getattr(module, attr, None)]


def refuse_meta(model: nn.Module, transform: str, why: str) -> None:
    """Raise ConversionError when ``model`` has parameters on the meta device: ``transform``
    needs their values (``why``)."""
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        shown = ", ".join(meta[:3]) + (f", ... ({len(meta)} in all)" if len(meta) > 3 else "")
        raise ConversionError(
            f"{transform}(model): expected parameters with values, got parameters on the meta device ({shown}): "
            f"{why}; load the weights first (e.g. model.load_state_dict(state_dict, assign=True)), then "
            f"run {transform}")


def outside_references(model: nn.Module) -> dict[int, list[str]]:
    """id(submodule) -> where a module of ``model`` is also held outside the module tree: in
    a plain attribute of one of its modules (a list, tuple, dict or set, as
    ``self.pipeline = [self.ln]``, or the module itself set past ``nn.Module.__setattr__``).
    A transform that replaces the module at its registered paths leaves such a reference
    calling the old one. References outside the model (closures, globals) are not seen."""
    ids = {id(m) for m in model.modules()}
    out: dict[int, list[str]] = {}

    def scan(value, where: str, depth: int) -> None:
        if isinstance(value, nn.Module):
            if id(value) in ids:
                out.setdefault(id(value), []).append(where)
            return
        if depth >= 3:
            return
        if isinstance(value, dict):
            for k, v in value.items():
                scan(v, f"{where}[{k!r}]", depth + 1)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                scan(v, f"{where}[{i}]", depth + 1)
        elif isinstance(value, (set, frozenset)):
            for v in value:
                scan(v, f"{where}{{...}}", depth + 1)

    skip = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_state_dict_hooks",
            "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
            "_is_full_backward_hook", *HOOK_DICTS}
    for path, m in model.named_modules():
        for attr, value in vars(m).items():
            if attr not in skip:
                scan(value, f"{path}.{attr}" if path else attr, 0)
    return out


def all_paths(model: nn.Module) -> dict[int, list[str]]:
    paths: dict[int, list[str]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(path)
    return paths


def swap_norms(
    model: nn.Module,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> nn.Module:
    """Replace every LayerNorm/RMSNorm-like module of ``model`` by normlab.LayerNorm /
    normlab.RMSNorm, in place; returns the model, with the report of what was swapped and
    what was left (and why) as ``model.normlab_report``.

    Swapped: torch.nn.LayerNorm, torch.nn.RMSNorm, and any other norm class whose
    forward normlab reproduces, checked on a probe (Hugging Face's LlamaRMSNorm and its
    Mistral/Qwen2/... copies, T5LayerNorm, Gemma's ``x * (1 + weight)`` as
    ``RMSNorm(offset=1, casting_mode="gemma")``, ...). Left, with the reason: norms normlab
    does not reproduce (a mean-free variance, another cast order, a forward taking a second
    argument, dropout inside the norm: the probe runs in training mode too), norms with
    state a normlab norm would drop (extra parameters or persistent buffers, a
    parametrization), batch/group norms, and paths filtered out by ``include``/``exclude``
    (fnmatch patterns over module paths). The
    parameters are the same Parameter objects (dtype, device, ties and optimizer state
    kept); module paths and state_dict keys do not change. Blocks of a known type
    (``normlab.convert.blocks``) whose norms all became normlab's get the forward that
    fuses their residual adds into the norms.

    Raises NormTypeError (a TypeError), changing nothing, when ``model`` is not a
    torch.nn.Module or ``include``/``exclude`` is not a str or an iterable of str.
    """
    check_module("swap_norms", "model", model)
    include = check_patterns("swap_norms", "include", include)
    exclude = check_patterns("swap_norms", "exclude", exclude)
    report = ConversionReport("swap_norms", model)
    paths = all_paths(model)
    for path, module in norm_modules(model):
        if isinstance(module, (LayerNorm, RMSNorm, ResidualNorm)):
            report.add(path, module, "left", "already a normlab module")
            continue
        if not all(selected(p, include, exclude) for p in paths[id(module)]):
            report.add(path, module, "left", "filtered out by include/exclude")
            continue
        sem = semantics(module)
        if isinstance(sem, str):
            report.add(path, module, "left", sem)
            continue
        new = sem.build(module)
        if (check := cast_check_for(module, sem)) is not None:
            new.cast_check = check  # verified on a probe in today's dtype: a later cast is checked
        for p in paths[id(module)]:
            replace_module(model, p, new)
        report.add(path, module, "swapped", _describe(sem, new))
    fuse_known_blocks(model, report)
    return report.attach()


def _describe(sem: NormSemantics, new: nn.Module) -> str:
    return f"-> normlab.{type(new).__name__} (eps={sem.eps}; {sem.verified})"


def shared_params(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every name it has in the model (several: tied)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


_NOT_NORMLAB = "some of its norms are not normlab modules"


def _submodule(block: nn.Module, path: str) -> nn.Module | None:
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


def fuse_blocker(block: nn.Module, spec, normlab=lambda m: isinstance(m, ResidualNorm)) -> str | None:
    """Why ``block`` (a known block with a fused forward) is not fused, or None: each norm
    its fused forward calls as ``norm(x, residual)`` (``spec.fused_norms``) must be a
    normlab module (``normlab(m)``), without hooks, which the fused call would pass two
    inputs and an ``(output, residual)`` pair rather than the original call's."""
    norms = [(n, _submodule(block, n)) for n in spec.fused_norms]
    if not all(normlab(m) for _, m in norms):
        return _NOT_NORMLAB
    for name, m in norms:
        kinds = hook_kinds(m)
        if kinds:
            return (f"{name} has {' and '.join(kinds)}; the fused forward would call it as "
                    f"{name}(x, residual), so they would see two inputs and an (output, residual) pair "
                    "instead of the original call's")
    return None


def fuse_known_blocks(model: nn.Module, report: ConversionReport, quiet: bool = False) -> None:
    for path, block in model.named_modules():
        base, entry = block_entry(block)
        if entry is None or entry.forward is None or is_fused(block):
            continue
        spec = block_spec(block)
        why = fuse_blocker(block, spec)
        if why is not None:
            if not quiet or why != _NOT_NORMLAB:
                report.add(path, block, "left", f"not fused: {why}")
            continue
        fuse(block)
        report.add(path, base.__name__, "fused",
                   "residual add fused into " + ", ".join(spec.fused_norms))
    # torch's encoder turns padded input into nested tensors on its fast path; normlab's
    # norms take dense tensors
    for _, m in model.named_modules():
        if isinstance(m, nn.TransformerEncoder) and getattr(m, "use_nested_tensor", False):
            m.use_nested_tensor = False
