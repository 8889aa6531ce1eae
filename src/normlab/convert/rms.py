"""layernorm_to_rmsnorm: exact Pre-LN -> Pre-RMSNorm (Jiang et al. 2023).

In a Pre-LN transformer the residual stream x is the sum of what the embeddings and
each block's output projections write. If each writer's output is made zero-mean
(subtract its mean over the output dim from the weight and bias), x is zero-mean, and
then LayerNorm(x) = x / sqrt(mean(x^2) + eps) * gamma + beta, an RMSNorm plus beta,
with the same eps: every LayerNorm reading x becomes an RMSNorm. Outputs after the
norms are unchanged; the residual stream itself becomes its centered version.
(Jiang, Gu, Zhu, Pan 2023, "Pre-RMSNorm and Pre-CRMSNorm Transformers: Equivalent
and Efficient Pre-LN Transformers".)
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from normlab import functional as F
from normlab.convert.analysis import analyse
from normlab.convert.args import check_module, check_tolerance
from normlab.convert.detect import semantics
from normlab.convert.fused import is_fused, unfuse
from normlab.convert.linear import recomputed_by
from normlab.convert.report import ConversionError, ConversionReport
from normlab.convert.swap import (
    all_paths,
    fuse_known_blocks,
    norm_modules,
    refuse_meta,
    replace_module,
    shared_params,
)
from normlab.convert.verify import (
    compare,
    float32_copy,
    inputs_in_float32,
    low_precision,
    run_outputs,
)
from normlab.errors import NormTypeError
from normlab.norms import RMSNorm


class RMSNormWithBias(RMSNorm):
    """y = x / sqrt(mean(x^2) + eps) * weight + bias: a LayerNorm on zero-mean input.

    What ``layernorm_to_rmsnorm`` puts in place of a LayerNorm with a bias, so the
    state_dict keys (weight, bias) stay the LayerNorm's; ``fold_norm_affine`` then
    moves weight and bias into the Linear layers reading it."""

    def __init__(self, normalized_shape, eps: float | None = None, device=None, dtype=None) -> None:
        super().__init__(normalized_shape, eps=eps, elementwise_affine=True, device=device, dtype=dtype)
        self.bias = nn.Parameter(torch.zeros(self.normalized_shape, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if getattr(self, "bias", None) is not None:
            nn.init.zeros_(self.bias)

    def normalize(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        return (F.rms_norm(x, self.normalized_shape, self.weight, self.eps) + self.bias).to(x.dtype)

    def add_normalize(self, x, residual, dropout_p, residual_dtype, padding_mask):
        out, new_residual = F.add_rms_norm(
            x, residual, self.weight, self.eps, dropout_p=dropout_p, training=self.training,
            residual_dtype=residual_dtype, normalized_shape=self.normalized_shape,
        )
        return (out + self.bias).to(x.dtype), new_residual


_ALREADY = ("already converted: an RMSNorm reading a zero-mean residual stream (every writer of the "
            "stream is centered), the form layernorm_to_rmsnorm leaves; nothing to do")


def layernorm_to_rmsnorm(model: nn.Module, *, example_inputs=None, atol: float = 1e-4,
                         rtol: float = 1e-4) -> nn.Module:
    """Convert a Pre-LN transformer to Pre-RMSNorm, exactly, in place; returns the model
    (the report is ``model.normlab_report``).

    Every module writing the residual stream (embeddings, positional tables, attention
    and FFN output projections) gets zero-mean outputs; every LayerNorm reading the
    stream becomes a normlab.RMSNorm with the same gamma and eps (an
    ``RMSNormWithBias`` if it has a beta; ``fold_norm_affine`` can then fold both into
    the following Linear layers). An embedding tied to an output layer is untied first
    (the output layer keeps the original weights). Exact in eval mode: dropout on a
    residual branch breaks the zero mean in training.

    With ``example_inputs`` (a tensor, tuple or dict for ``model(...)``) the outputs
    before and after are compared within ``atol``/``rtol``. The conversion is exact in
    real arithmetic, so a model with bfloat16/float16 parameters is checked in float32:
    a float32 copy of it is converted and compared on the example inputs (their
    half-precision tensors made float32), then the model itself is converted in its own
    dtype (each new weight computed in float64 and rounded once) and its new weights
    are checked to be the float32 copy's, rounded. The copy costs the model's size in
    float32 for the duration of the call. The report's "verified" line says which dtype
    the check ran in.

    A model that is already converted (every norm on the residual stream an RMSNorm
    and every writer of the stream centered, as this function leaves it) is left as it
    is: a no-op whose report lists those norms as left, "already converted".

    Raises ConversionError, leaving the model unchanged (weights, ties, config, module
    and block classes), when the model has parameters on the meta device (the new
    weights are computed from their values), when the stream's writers cannot all be established (Post-LN
    blocks, a stream starting at a model input, a stream that is a model output or feeds
    the head with no final norm, an unknown module on the stream, a writer whose parameter
    the forward also reads directly, a norm that is not a LayerNorm reading a stream that
    is not centered), or when the outputs
    on ``example_inputs`` differ beyond ``atol``/``rtol`` (every change is undone).
    Raises NormTypeError (a TypeError) when ``model`` is not a torch.nn.Module,
    ``example_inputs`` is none of a tensor, tuple, list or dict, or a tolerance is no
    number (a model that fails on ``example_inputs``: ConversionError, unchanged), NormArgumentError (a ValueError) when a tolerance is negative
    or not finite: before any work.
    """
    check_module("layernorm_to_rmsnorm", "model", model)
    if example_inputs is not None and not isinstance(example_inputs, (Tensor, tuple, list, dict)):
        raise NormTypeError(f"layernorm_to_rmsnorm: expected example_inputs to be a tensor, a tuple or list "
                            f"(model(*inputs)) or a dict (model(**inputs)), got {type(example_inputs).__name__}")
    atol = check_tolerance("layernorm_to_rmsnorm", "atol", atol)
    rtol = check_tolerance("layernorm_to_rmsnorm", "rtol", rtol)
    refuse_meta(model, "layernorm_to_rmsnorm",
                "centering the residual stream's writers computes their new weights from their values")
    a, plans, left, done = _plan(model)
    report = ConversionReport("layernorm_to_rmsnorm", model)
    for path, m, why in left:
        report.add(path, m, "left", why)
    for path, m in done:
        report.add(path, m, "left", _ALREADY)
    if not plans:
        return report.attach()
    low = None if example_inputs is None else low_precision(model)
    if low is None:
        check = None if example_inputs is None else _outputs_check(model, example_inputs, atol, rtol,
                                                                   f"in {_dtypes(model)}")
        _apply(model, a, plans, report, check)
        return report.attach()
    # half precision: its rounding (about 4e-3 in bfloat16) would drown the check and fail
    # a correct conversion; the conversion's math is checked on a float32 copy instead,
    # and the model's own new weights must be that copy's, rounded to its dtype
    shadow = float32_copy(model)
    sa, splans, _, _ = _plan(shadow)
    verified = _apply(shadow, sa, splans, ConversionReport("layernorm_to_rmsnorm", shadow), _outputs_check(
        shadow, inputs_in_float32(example_inputs), atol, rtol, f"in float32, on a float32 copy of the {low} model"))
    del sa, splans
    _apply(model, a, plans, report, lambda: _rounded_check(model, shadow, verified, low))
    return report.attach()


def _plan(model: nn.Module):
    """What the conversion does, or a ConversionError: (analysis, LayerNorms to convert,
    norms left with the reason, RMSNorms of an already converted model)."""
    a = analyse(model)
    if isinstance(a.writers, str):
        raise ConversionError(f"layernorm_to_rmsnorm: {a.writers}")
    for v in a.writers:
        recomputed = recomputed_by(v.module) if isinstance(v.module, nn.Module) else None
        if recomputed:
            raise ConversionError(f"layernorm_to_rmsnorm: writer of the residual stream {v.path} is parametrized "
                                  f"({recomputed}): its weight cannot be centered in place")
    plans, left, done = [], [], []
    centered = None
    every = all_paths(model)
    for path, m in norm_modules(model):
        # a norm module used at several paths is converted at all of them: each must read the stream
        paths = every[id(m)]
        sem = m if isinstance(m, RMSNormWithBias) else semantics(m)
        if isinstance(sem, str):
            raise ConversionError(f"layernorm_to_rmsnorm: {path} ({type(m).__name__}) is not a norm "
                                  f"normlab reproduces: {sem}")
        if sem is m or sem.kind != "layernorm":
            if any(p in a.stream_norms for p in paths):
                if centered is None:
                    centered = all(_centered(v) for v in a.writers)
                if centered and (sem is m or (sem.offset == 0.0 and sem.weight_shape is None)):
                    done.append((path, m))
                    continue
                raise ConversionError(
                    f"layernorm_to_rmsnorm: {path} ({type(m).__name__}) reads the residual stream and "
                    "is not a LayerNorm: centering the stream would change its output")
            continue
        branch = [p for p in paths if p in a.branch_norms]
        if branch and len(branch) == len(paths):
            left.append((path, m, f"{a.branch_norms[branch[0]]}: stays a LayerNorm"))
            continue
        if branch:
            raise ConversionError(f"layernorm_to_rmsnorm: the LayerNorm {path} is shared: it reads a branch at "
                                  f"{', '.join(branch)} and the residual stream elsewhere; as an RMSNorm its "
                                  "output on the branch (not zero-mean) would change")
        if not sem.plain:
            raise ConversionError(f"layernorm_to_rmsnorm: {path}'s scale is offset + weight (offset={sem.offset:g}): "
                                  "the conversion does not take a weight offset yet")
        if sem.weight_shape is not None:
            raise ConversionError(f"layernorm_to_rmsnorm: {path} has one weight per head "
                                  f"{list(sem.weight_shape)}: the conversion takes a weight of the normalized shape")
        outside = [p for p in paths if p not in a.stream_norms]
        if outside:
            raise ConversionError(f"layernorm_to_rmsnorm: the LayerNorm {outside[0]} does not read the "
                                  "residual stream (its input is not a known sum of writers)")
        plans.append((path, m, sem))
    if not plans and not done:
        raise ConversionError("layernorm_to_rmsnorm: the model has no LayerNorm to convert")
    return a, plans, left, done


def _centered(v) -> bool:
    """Whether a writer's outputs are already zero-mean over the hidden dim, within one
    rounding of its dtype (what ``center_output`` leaves)."""
    m = v.module
    if isinstance(m, (nn.Embedding, nn.Parameter)):
        parts = [(m.weight if isinstance(m, nn.Embedding) else m).detach()]
        dim = -1
    else:
        parts = [t for t in (v.weight(), v.bias()) if t is not None]
        dim = 0
    for t in parts:
        if not t.is_floating_point():
            return False
        t64 = t.double()
        if bool((t64.mean(dim).abs() > torch.finfo(t.dtype).eps * t64.abs().mean(dim)).any()):
            return False
    return True


def _dtypes(model: nn.Module) -> str:
    names = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()})
    return ", ".join(names) or "the model's dtype"


def _outputs_check(model: nn.Module, example_inputs, atol: float, rtol: float, where: str):
    """A check of ``model``'s outputs after the conversion against those before (run now)."""
    try:
        before = run_outputs(model, example_inputs)
    except torch.OutOfMemoryError:  # (not the inputs' fault: the caller's to handle, as it is)
        raise
    except Exception as e:  # (the model's own error, e.g. "'int' object has no attribute 'size'")
        raise ConversionError(f"layernorm_to_rmsnorm: the model failed on example_inputs ({type(e).__name__}: "
                              f"{e}); the model is left unchanged") from e

    def check() -> str:
        ok, worst = compare(before, run_outputs(model, example_inputs), atol, rtol)
        if not ok:
            raise ConversionError(f"layernorm_to_rmsnorm: outputs changed by up to {worst:.3g} on the example "
                                  f"inputs (checked {where}; atol={atol:g}, rtol={rtol:g}); the model is left "
                                  "unchanged")
        return f"outputs equal on the example inputs, checked {where} (max |diff| {worst:.2g})"

    return check


def _rounded_check(model: nn.Module, shadow: nn.Module, verified: str, low: str) -> str:
    """``model``'s converted state is the verified float32 ``shadow``'s, rounded to the
    model's dtypes (within one rounding: float64 -> float32 -> bfloat16 may round twice)."""
    want = shadow.state_dict()
    for key, t in model.state_dict().items():
        s = want[key].to(t.dtype)
        if t.is_floating_point():
            fi = torch.finfo(t.dtype)
            same = torch.allclose(t.double(), s.double(), rtol=fi.eps, atol=fi.tiny)
        else:
            same = torch.equal(t, s)
        if not same:
            raise ConversionError(f"layernorm_to_rmsnorm: {key} converted in {t.dtype} differs from the float32 "
                                  "copy's conversion that was checked; the model is left unchanged")
    return f"{verified}; the model itself converted in {low}: its weights are that copy's, rounded"


def _apply(model: nn.Module, a, plans, report: ConversionReport, check=None) -> str | None:
    """Convert ``model`` by the plan; then ``check()`` (it returns the "verified" detail or
    raises). On any error every change is undone before it propagates."""
    undo: list = []
    try:
        _convert(model, a, plans, report, undo)
        detail = None if check is None else check()
    except BaseException:
        for fn in reversed(undo):
            fn()
        raise
    if detail is not None:
        report.add("<root>", model, "verified", detail)
    return detail


def _convert(model: nn.Module, a, plans, report: ConversionReport, undo: list) -> None:
    """The changes, each with its inverse appended to ``undo`` before it is made."""
    shared = shared_params(model)
    seen = set()
    with torch.no_grad():
        for v in a.writers:
            key = (id(v.module), v.rows)
            if key in seen:
                continue
            seen.add(key)
            for p in v.parameters():
                others = [n for n in shared[id(p)] if not _is_writer_name(n, v)]
                if others and isinstance(v.module, nn.Embedding) and p is v.module.weight:
                    original = v.module.weight
                    undo.append(lambda m=v.module, o=original: setattr(m, "weight", o))
                    v.module.weight = nn.Parameter(original.detach().clone(), original.requires_grad)
                    undo.append(_untie_config(model))
                    report.add(v.path, v.module, "untied", f"from {', '.join(others)}, which keeps the original weights")
                elif others:
                    raise ConversionError(
                        f"layernorm_to_rmsnorm: {v.path}'s parameter is shared with {', '.join(others)}; "
                        "centering it would change that use too")
            for p in v.parameters():
                saved = p.detach().clone()
                undo.append(lambda p=p, s=saved: p.data.copy_(s))
            v.center_output()
            report.add(v.path + ("" if v.rows == "all" else f"[{v.rows}]"),
                       v.module if not isinstance(v.module, nn.Parameter) else "Parameter",
                       "centered", "outputs made zero-mean over the hidden dim")
    paths = all_paths(model)
    for path, m, sem in plans:
        if sem.bias:
            new = RMSNormWithBias(sem.shape, eps=sem.eps, device="meta")
            new.weight, new.bias = m.weight, m.bias
        else:
            new = RMSNorm(sem.shape, eps=sem.eps, elementwise_affine=sem.affine, device="meta")
            if sem.affine:
                new.weight = m.weight
        new.train(m.training)
        for p in paths[id(m)]:
            undo.append(lambda p=p, m=m: replace_module(model, p, m))
            replace_module(model, p, new)
        report.add(path, m, "converted", f"-> {type(new).__name__} (eps={sem.eps})")
    # fuse_known_blocks swaps block classes and turns off torch encoders' nested-tensor
    # fast path: both are undone too, so a refusal leaves the original forward
    fused_before = {id(m) for m in model.modules() if is_fused(m)}
    nested = [(m, m.use_nested_tensor) for m in model.modules()
              if isinstance(m, nn.TransformerEncoder) and hasattr(m, "use_nested_tensor")]

    def unfuse_new() -> None:
        for m in model.modules():
            if is_fused(m) and id(m) not in fused_before:
                unfuse(m)
        for m, was in nested:
            m.use_nested_tensor = was

    undo.append(unfuse_new)
    fuse_known_blocks(model, report, quiet=True)


def _is_writer_name(name: str, v) -> bool:
    return name.rpartition(".")[0] == v.path or name == v.path


def _untie_config(model: nn.Module):
    """Record the untying in the model's config (Hugging Face ``config.tie_word_embeddings``,
    normlab's frozen ``cfg.tie_embeddings``); returns the undo."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
        was = cfg.tie_word_embeddings
        cfg.tie_word_embeddings = False
        return lambda: setattr(cfg, "tie_word_embeddings", was)
    cfg = getattr(model, "cfg", None)
    if dataclasses.is_dataclass(cfg) and getattr(cfg, "tie_embeddings", False):
        model.cfg = dataclasses.replace(cfg, tie_embeddings=False)
        return lambda: setattr(model, "cfg", cfg)
    return lambda: None
