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
from normlab.convert.detect import semantics
from normlab.convert.report import ConversionError, ConversionReport
from normlab.convert.swap import (
    all_paths,
    fuse_known_blocks,
    norm_modules,
    replace_module,
    shared_params,
)
from normlab.convert.verify import run_outputs
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


def _outputs(model: nn.Module, example_inputs) -> list[Tensor]:
    return run_outputs(model, example_inputs)


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

    Raises ConversionError, leaving the model unchanged, when the stream's writers
    cannot all be established (Post-LN blocks, a stream starting at a model input, an
    unknown module on the stream, a norm that is not a LayerNorm reading it), or when
    ``example_inputs`` (a tensor, tuple or dict for ``model(...)``) are given and the
    outputs before and after differ beyond ``atol``/``rtol``.
    """
    a = analyse(model)
    if isinstance(a.writers, str):
        raise ConversionError(f"layernorm_to_rmsnorm: {a.writers}")
    plans, left = [], []
    for path, m in norm_modules(model):
        sem = m if isinstance(m, RMSNormWithBias) else semantics(m)
        if isinstance(sem, str):
            raise ConversionError(f"layernorm_to_rmsnorm: {path} ({type(m).__name__}) is not a norm "
                                  f"normlab reproduces: {sem}")
        if sem is m or sem.kind != "layernorm":
            if path in a.stream_norms:
                raise ConversionError(
                    f"layernorm_to_rmsnorm: {path} ({type(m).__name__}) reads the residual stream and "
                    "is not a LayerNorm: centering the stream would change its output")
            continue
        if path in a.branch_norms:
            left.append((path, m, f"{a.branch_norms[path]}: stays a LayerNorm"))
            continue
        if not sem.plain:
            raise ConversionError(f"layernorm_to_rmsnorm: {path}'s scale is offset + weight (offset={sem.offset:g}): "
                                  "the conversion does not take a weight offset yet")
        if sem.weight_shape is not None:
            raise ConversionError(f"layernorm_to_rmsnorm: {path} has one weight per head "
                                  f"{list(sem.weight_shape)}: the conversion takes a weight of the normalized shape")
        if path not in a.stream_norms:
            raise ConversionError(f"layernorm_to_rmsnorm: the LayerNorm {path} does not read the "
                                  "residual stream (its input is not a known sum of writers)")
        plans.append((path, m, sem))
    if not plans:
        raise ConversionError("layernorm_to_rmsnorm: the model has no LayerNorm to convert")
    before = None if example_inputs is None else _outputs(model, example_inputs)

    report = ConversionReport("layernorm_to_rmsnorm", model)
    for path, m, why in left:
        report.add(path, m, "left", why)
    undo = []
    shared = shared_params(model)
    seen = set()
    with torch.no_grad():
        for v in a.writers:
            key = (id(v.module), v.rows)
            if key in seen:
                continue
            seen.add(key)
            params = v.parameters()
            for p in params:
                others = [n for n in shared[id(p)] if not _is_writer_name(n, v)]
                if others and isinstance(v.module, nn.Embedding) and p is v.module.weight:
                    original = v.module.weight
                    v.module.weight = nn.Parameter(original.detach().clone(), original.requires_grad)
                    undo.append(lambda m=v.module, o=original: setattr(m, "weight", o))
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
            replace_module(model, p, new)
            undo.append(lambda p=p, m=m: replace_module(model, p, m))
        report.add(path, m, "converted", f"-> {type(new).__name__} (eps={sem.eps})")
    fuse_known_blocks(model, report, quiet=True)
    if before is not None:
        after = _outputs(model, example_inputs)
        worst = max((float((x.double() - y.double()).abs().max()) for x, y in zip(before, after)), default=0.0)
        if not all(torch.allclose(x.double(), y.double(), atol=atol, rtol=rtol) for x, y in zip(before, after)):
            for fn in reversed(undo):
                fn()
            raise ConversionError(f"layernorm_to_rmsnorm: outputs changed by up to {worst:.3g} on the "
                                  "example inputs; the model is left unchanged")
        report.add("<root>", model, "verified", f"outputs equal on the example inputs (max |diff| {worst:.2g})")
    return report.attach()


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
