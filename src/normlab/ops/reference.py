"""The one pure-torch reference of every normlab op.

Every other implementation (the eager torch path, the Triton kernels) is tested
against these functions. They favour clarity over speed:

* statistics are computed in float32 (float64 for float64 input), as torch does;
* the variance is the biased one (divide by N);
* the result is cast back to the input's dtype once, at the end.

Autograd differentiates them, so they also define the reference gradients.
Arguments are assumed valid here: ``normlab.functional`` checks them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_F32_EPS, _F64_EPS = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps


def default_rms_eps(dtype: torch.dtype) -> float:
    """RMSNorm's eps when none is given, as torch's code does: the machine epsilon of
    the compute dtype (float32's for fp16/bf16/fp32 input, float64's for fp64)."""
    return _F64_EPS if dtype == torch.float64 else _F32_EPS


def _dims(normalized_shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(range(-len(normalized_shape), 0))


def _norm_shape(x: Tensor, param: Tensor | None) -> tuple[int, ...]:
    """Without normalized_shape, the fused add+norm ops normalize over the parameter's shape,
    or the last dim without one."""
    return tuple(param.shape) if param is not None else tuple(x.shape[-1:])


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    # type promotion: a float32 y times a bf16 weight stays float32, as in torch
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def layer_norm(
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias over the trailing dims (Ba et al. 2016)."""
    dims = _dims(normalized_shape)
    xf = x.to(compute_dtype(x.dtype))
    centered = xf - xf.mean(dims, keepdim=True)
    var = centered.square().mean(dims, keepdim=True)
    return _affine(centered * torch.rsqrt(var + eps), weight, bias).to(x.dtype)


def rms_norm(
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight over the trailing dims (Zhang & Sennrich 2019)."""
    if eps is None:
        eps = default_rms_eps(x.dtype)
    dims = _dims(normalized_shape)
    xf = x.to(compute_dtype(x.dtype))
    rstd = torch.rsqrt(xf.square().mean(dims, keepdim=True) + eps)
    return _affine(xf * rstd, weight, None).to(x.dtype)


CASTING_MODES = ("torch", "llama", "gemma")


def rms_norm_cast(
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    eps: float | None,
    *,
    offset: float = 0.0,
    casting_mode: str = "torch",
) -> Tensor:
    """RMSNorm with a weight offset and one of the casting orders practitioners' models use,
    op for op as they compute it (so the bits match):

        "torch": y = x / sqrt(mean(x^2) + eps) in float32 (float64), times (offset + w)
                 formed in float32, rounded once to x's dtype;
        "llama": h = x / sqrt(mean(x^2) + eps) in float32 (float64 for float64 x, where
                 Hugging Face's modules stay in float32), cast to x's dtype, then
                 (offset + w) * h in the weight's dtype, (offset + w) formed in float32 and
                 rounded once to it (Hugging Face's LlamaRMSNorm is offset 0);
        "gemma": h = x / sqrt(mean(x^2) + eps) in float32 (float64), times (offset + w) in float32,
                 cast to x's dtype (Hugging Face's GemmaRMSNorm with offset 1).

    The offset is added in float32 (float64 for float64), never to a half-precision weight
    first: 1 + 0.0039 rounds to 1.0 in bfloat16 (only the llama order then rounds the sum,
    because it multiplies in the weight's dtype)."""
    if eps is None:
        eps = default_rms_eps(x.dtype)
    dims = _dims(normalized_shape)
    ct = compute_dtype(x.dtype)
    h = x.to(ct)
    h = h * torch.rsqrt(h.pow(2).mean(dims, keepdim=True) + eps)
    if casting_mode == "llama":
        h = h.to(x.dtype)
        if weight is None:
            return h if offset == 0.0 else h * offset
        w = weight if offset == 0.0 else (weight.to(ct) + offset).to(weight.dtype)
        return w * h
    if weight is not None:
        h = h * (weight.to(ct) + offset)
    elif offset != 0.0:
        h = h * offset
    return h.to(x.dtype)


def dropout_add(
    x: Tensor,
    residual: Tensor | None,
    *,
    dropout_p: float = 0.0,
    training: bool = False,
    generator: torch.Generator | None = None,
    residual_dtype: torch.dtype | None = None,
) -> Tensor:
    """new_residual = residual + dropout(x), summed in the compute dtype and rounded once
    to ``residual_dtype`` (default: x.dtype). ``residual=None`` means a zero residual."""
    ct = compute_dtype(x.dtype) if residual is None else torch.promote_types(
        compute_dtype(x.dtype), compute_dtype(residual.dtype)
    )
    h = x.to(ct)
    if training and dropout_p > 0.0:
        if dropout_p >= 1.0:
            h = h * 0.0  # (as torch's dropout: every element dropped, an inf or nan one to nan)
        else:
            # keep where a uniform draw is >= dropout_p (the eager path's and the kernels'
            # rule), drawn out of place: vmap(randomness="different") refuses in-place draws
            # (generator=None passed explicitly fails under torch.compile once the shape is symbolic)
            draw = (torch.rand(x.shape, dtype=ct, device=x.device) if generator is None
                    else torch.rand(x.shape, dtype=ct, device=x.device, generator=generator))
            keep = (draw >= dropout_p).to(ct)
            h = h * keep / (1.0 - dropout_p)
    if residual is not None:
        h = residual.to(ct) + h
    return h.to(residual_dtype or x.dtype)


def add_layer_norm(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float = 1e-5,
    *,
    dropout_p: float = 0.0,
    training: bool = False,
    generator: torch.Generator | None = None,
    residual_dtype: torch.dtype | None = None,
    normalized_shape: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """(layer_norm(new_residual), new_residual) with new_residual = residual + dropout(x).

    The norm reads the stored (rounded) new_residual, so ``out`` is exactly the norm of
    the tensor the next block sees; ``out`` has x's dtype."""
    new_residual = dropout_add(
        x, residual, dropout_p=dropout_p, training=training, generator=generator,
        residual_dtype=residual_dtype,
    )
    shape = normalized_shape or _norm_shape(x, weight if weight is not None else bias)
    out = layer_norm(new_residual, shape, weight, bias, eps)
    return out.to(x.dtype), new_residual


def add_rms_norm(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    eps: float | None = None,
    *,
    dropout_p: float = 0.0,
    training: bool = False,
    generator: torch.Generator | None = None,
    residual_dtype: torch.dtype | None = None,
    normalized_shape: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """(rms_norm(new_residual), new_residual) with new_residual = residual + dropout(x)."""
    new_residual = dropout_add(
        x, residual, dropout_p=dropout_p, training=training, generator=generator,
        residual_dtype=residual_dtype,
    )
    out = rms_norm(new_residual, normalized_shape or _norm_shape(x, weight), weight, eps)
    return out.to(x.dtype), new_residual


def per_example_param_grad_sq(
    grad_out: Tensor, x_hat: Tensor, normalized_shape: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """Per-example squared norms of a norm layer's weight and bias gradients.

    For y = x_hat * weight + bias with examples along dim 0 of ``x_hat`` (shape
    [B, ..., *normalized_shape]), example b contributes
    dL_b/dweight = sum over b's positions of grad_out * x_hat and
    dL_b/dbias = sum over b's positions of grad_out. Returns float32 [B] tensors
    (||dL_b/dweight||^2, ||dL_b/dbias||^2) (Gray et al. 2024: these alone predict the
    gradient noise scale). ``x_hat`` is the normalized input before the affine step."""
    b = grad_out.shape[0]
    n = len(normalized_shape)
    ct = torch.promote_types(compute_dtype(grad_out.dtype), compute_dtype(x_hat.dtype))
    positions = math.prod(grad_out.shape[1:grad_out.dim() - n])  # (explicit: -1 is ambiguous for B = 0)
    g = grad_out.to(ct).reshape(b, positions, *normalized_shape)
    dweight = (g * x_hat.to(ct).reshape(g.shape)).sum(1)
    dbias = g.sum(1)
    dims = tuple(range(1, n + 1))
    return dweight.square().sum(dims).float(), dbias.square().sum(dims).float()


ADALN_NORMS = ("layernorm", "rmsnorm")


def adaln_modulate(
    x: Tensor,
    normalized_shape: Sequence[int],
    scale: Tensor,
    shift: Tensor,
    eps: float,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    norm: str = "layernorm",
) -> Tensor:
    """Adaptive normalization (DiT's adaLN modulation, Peebles & Xie 2023):

        y = (Norm(x) * weight + bias) * (1 + scale) + shift

    Norm is layer norm or RMS norm (``norm``) over the trailing ``normalized_shape`` dims,
    with the optional affine ``weight`` and ``bias`` (of normalized_shape, any floating
    dtype); scale and shift broadcast against x: [B, 1, ..., D] (one modulation per
    example), x's shape (one per token), or any shape that broadcasts. Computed in float32
    (float64 when x, scale or shift is float64; weight and bias are cast to that dtype) and
    rounded once to the promoted dtype of x, scale and shift (the unfused expression's
    dtype)."""
    out_dtype = torch.promote_types(torch.promote_types(x.dtype, scale.dtype), shift.dtype)
    ct = compute_dtype(out_dtype)
    dims = _dims(normalized_shape)
    xf = x.to(ct)
    if norm == "rmsnorm":
        h = xf * torch.rsqrt(xf.square().mean(dims, keepdim=True) + eps)
    else:
        centered = xf - xf.mean(dims, keepdim=True)
        h = centered * torch.rsqrt(centered.square().mean(dims, keepdim=True) + eps)
    h = _affine(h, None if weight is None else weight.to(ct), None if bias is None else bias.to(ct))
    return (h * (1 + scale.to(ct)) + shift.to(ct)).to(out_dtype)
