"""The Triton backend: fused LayerNorm/RMSNorm kernels (``norm.py``) behind PyTorch
custom ops (``custom_ops.py``); the functions here have the names and signatures of
``normlab.ops.eager``'s. ``normlab.ops.triton_ops()`` imports this package on first use
(importing it registers the custom ops).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from normlab.ops import eager, reference
from normlab.ops.triton import custom_ops, launch
from normlab.ops.triton.launch import MAX_HIDDEN, force_looped

if torch.distributed.is_available():
    from normlab.ops.triton import sharding  # noqa: F401  (DTensor rules of the ops)

__all__ = ["MAX_HIDDEN", "custom_ops", "force_looped"]


def _seed(generator: torch.Generator | None) -> Tensor:
    """An int64 scalar seed for the Philox dropout stream, drawn from ``generator``."""
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64, generator=generator, device=device)


def _spec(
    op: str, x: Tensor, residual: Tensor | None, eps: float | None, normalized_shape: Sequence[int], *,
    is_rms: bool, dropout_p: float = 0.0, training: bool = False, generator: torch.Generator | None = None,
    residual_dtype: torch.dtype | None = None, offset: float = 0.0, casting_mode: str = "torch",
    out_dtype: torch.dtype | None = None,
) -> custom_ops.FusedSpec:
    """The fused op's settings for this call (its inputs after bias), checked."""
    hidden = normalized_shape[0] if len(normalized_shape) == 1 else math.prod(normalized_shape)
    launch.check_supported(op, x, hidden)
    if eps is None:
        eps = reference.default_rms_eps(x.dtype)
    p = dropout_p if training else 0.0
    if p > 0.0 and any(not pl.is_replicate() for pl in getattr(x, "placements", ())):
        # one seed for all shards: each shard would draw the mask of its local positions,
        # the same mask on every shard
        raise NotImplementedError(
            f"{op}: dropout on a sharded DTensor is not supported by the triton backend "
            f"(placements {tuple(x.placements)}); apply dropout before sharding, or replicate x"
        )
    seed = _seed(generator) if p > 0.0 else None
    store = residual is not None or seed is not None or residual_dtype not in (None, x.dtype)
    return custom_ops.FusedSpec(seed, float(eps), hidden, is_rms, p, residual_dtype, store, offset, casting_mode,
                                out_dtype)


def _dense(t: Tensor | None) -> Tensor | None:
    """A parameter as the kernels read it: contiguous (a strided or expanded weight is
    copied; autograd maps its gradient back)."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def _graph_wanted(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None) -> bool:
    """Autograd will record this call: grad mode is on and an input requires a gradient."""
    return torch.is_grad_enabled() and (x.requires_grad or (residual is not None and residual.requires_grad)
                                        or (weight is not None and weight.requires_grad)
                                        or (bias is not None and bias.requires_grad))


def _fused(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None,
           spec: custom_ops.FusedSpec) -> tuple[Tensor, Tensor]:
    """(out, new_residual): ``normlab::fused_norm``, or ``FusedNorm`` in plain eager calls."""
    if weight is not None and not weight.is_contiguous():
        weight = weight.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    if custom_ops.use_ops(x, residual, weight, bias):
        out, new_res, _mean, _rstd = torch.ops.normlab.fused_norm(x, residual, weight, bias, *spec)
        return out, (new_res if spec.store_residual else x)
    if not _graph_wanted(x, residual, weight, bias):  # inference: the kernel alone, no autograd node
        out, new_res, _mean, _rstd = custom_ops.spec_forward(x, residual, weight, bias, spec, store_stats=False)
        return out, (new_res if spec.store_residual else x)
    if spec.store_residual:
        return custom_ops.apply_fused(x, residual, weight, bias, spec)
    return custom_ops.apply_fused(x, residual, weight, bias, spec), x


def _in_torch_layout(out: Tensor, new_res: Tensor, x: Tensor, residual: Tensor | None,
                     is_rms: bool) -> tuple[Tensor, Tensor]:
    """(out, new_residual) in the layouts torch's unfused ops give them: new_residual in
    the residual's (x's without one), out in new_residual's for RMSNorm (layer_norm's is
    contiguous)."""
    fmt = eager.torch_format(residual if residual is not None else x)
    if fmt is None:
        return out, new_res
    if new_res is not x:  # (a stored new residual: with a residual, dropout or residual_dtype)
        new_res = new_res.contiguous(memory_format=fmt)
    return (out.contiguous(memory_format=fmt) if is_rms else out), new_res


# ``offset`` (the scale is offset + weight) and RMSNorm's ``casting_mode``
# (``reference.rms_norm_cast``) are taken by the kernels; ``normlab.functional`` passes
# them only where they differ from the defaults (offset 0, "torch")


def layer_norm(x, normalized_shape, weight, bias, eps, *, offset=0.0):
    spec = _spec("layer_norm", x, None, eps, normalized_shape, is_rms=False, offset=offset)
    return _fused(x, None, weight, bias, spec)[0]


def rms_norm(x, normalized_shape, weight, eps, *, offset=0.0, casting_mode="torch"):
    # llama: out in promote(weight's dtype, x's), as Hugging Face's LlamaRMSNorm returns
    out_dtype = None
    if casting_mode == "llama" and weight is not None and weight.dtype != x.dtype:
        out_dtype = torch.promote_types(weight.dtype, x.dtype)
    spec = _spec("rms_norm", x, None, eps, normalized_shape, is_rms=True, offset=offset,
                 casting_mode=casting_mode, out_dtype=out_dtype)
    out = _fused(x, None, weight, None, spec)[0]
    return out if x.dim() < 4 else _in_torch_layout(out, x, x, None, True)[0]


def add_layer_norm(x, residual, weight, bias, eps, *, normalized_shape, **kw):
    out, new_res = _fused(x, residual, weight, bias, _spec("add_layer_norm", x, residual, eps, normalized_shape,
                                                           is_rms=False, **kw))
    return (out, new_res) if x.dim() < 4 else _in_torch_layout(out, new_res, x, residual, False)


def add_rms_norm(x, residual, weight, eps, *, normalized_shape, **kw):
    out, new_res = _fused(x, residual, weight, None, _spec("add_rms_norm", x, residual, eps, normalized_shape,
                                                           is_rms=True, **kw))
    return (out, new_res) if x.dim() < 4 else _in_torch_layout(out, new_res, x, residual, True)


# ---------------------------------------------------------------- per-example variants
# The same ops with the [2, B] buffer (``normlab.diagnostics.per_example`` checks it):
# ``normlab::fused_norm_per_example``, or ``FusedNormPerExample`` in plain eager calls.


def _fused_per_example(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None,
                       spec: custom_ops.FusedSpec, per_example_grad_sq: Tensor) -> tuple[Tensor, Tensor]:
    weight, bias = _dense(weight), _dense(bias)
    if custom_ops.use_ops(x, residual, weight, bias, per_example_grad_sq):
        out, new_res, _mean, _rstd = torch.ops.normlab.fused_norm_per_example(
            x, residual, weight, bias, spec.seed, per_example_grad_sq, *spec[1:])
    else:
        res = custom_ops.FusedNormPerExample.apply(x, residual, weight, bias, spec, per_example_grad_sq)
        out, new_res = res if spec.store_residual else (res, None)
    return out, (new_res if spec.store_residual else x)


def layer_norm_per_example(x, normalized_shape, weight, bias, eps, per_example_grad_sq):
    spec = _spec("layer_norm", x, None, eps, normalized_shape, is_rms=False)
    return _fused_per_example(x, None, weight, bias, spec, per_example_grad_sq)[0]


def rms_norm_per_example(x, normalized_shape, weight, eps, per_example_grad_sq):
    spec = _spec("rms_norm", x, None, eps, normalized_shape, is_rms=True)
    out = _fused_per_example(x, None, weight, None, spec, per_example_grad_sq)[0]
    return out if x.dim() < 4 else _in_torch_layout(out, x, x, None, True)[0]


def add_layer_norm_per_example(x, residual, weight, bias, eps, per_example_grad_sq, *, normalized_shape, **kw):
    spec = _spec("add_layer_norm", x, residual, eps, normalized_shape, is_rms=False, **kw)
    out, new_res = _fused_per_example(x, residual, weight, bias, spec, per_example_grad_sq)
    return (out, new_res) if x.dim() < 4 else _in_torch_layout(out, new_res, x, residual, False)


def add_rms_norm_per_example(x, residual, weight, eps, per_example_grad_sq, *, normalized_shape, **kw):
    spec = _spec("add_rms_norm", x, residual, eps, normalized_shape, is_rms=True, **kw)
    out, new_res = _fused_per_example(x, residual, weight, None, spec, per_example_grad_sq)
    return (out, new_res) if x.dim() < 4 else _in_torch_layout(out, new_res, x, residual, True)


# dropout_add alone has no reduction to fuse: it is elementwise and torch's own ops run it
dropout_add = eager.dropout_add


def _announce() -> None:
    """Hand this module to ``normlab.ops`` (however it was imported), so choosing the triton
    backend never runs an import on the op path."""
    import sys

    import normlab.ops

    normlab.ops._triton = sys.modules[__name__]


_announce()


# fused AdaLN (norm + modulation), on its own kernels
from normlab.ops.triton.adaln import adaln_modulate  # noqa: E402, F401
