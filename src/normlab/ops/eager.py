"""The torch backend: what runs on CPU tensors (and on CUDA with backend "torch").

Each op is the fastest exact torch formulation measured so far; where nothing beats it
the reference itself runs. Registered under backend "torch" in ``normlab.ops``.

* layer_norm: ``torch.nn.functional.layer_norm`` (one fused pass on every device).
* rms_norm: ``RMSNormFunction``, one fused reduction (``vector_norm``) for the
  statistics and a hand-written backward with few passes; torch's own rms_norm is a
  chain of pointwise ops on CPU and its autograd saves every intermediate.
* add_*_norm: the residual add (with dropout, one ``addcmul``) in a single pass, then
  the norm above.

Per-example gradient norms (``per_example_grad_sq``): the norm runs in an
autograd.Function whose backward also computes ``reference.per_example_param_grad_sq``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from normlab.ops import reference, register_impl

# ----------------------------------------------------------------------- per-example


def _write_per_example(buffer: Tensor, grad_out: Tensor, x_hat: Tensor, examples: int,
                       normalized_shape: Sequence[int], has_bias: bool) -> None:
    g = grad_out.reshape(examples, -1, *normalized_shape)
    sq_w, sq_b = reference.per_example_param_grad_sq(g, x_hat.reshape(g.shape), normalized_shape)
    buffer[0].copy_(sq_w)
    buffer[1].copy_(sq_b if has_bias else torch.zeros_like(sq_b))


# ----------------------------------------------------------------------- layer norm


class LayerNormFunction(torch.autograd.Function):
    """torch's fused layer norm, whose backward also writes per-example gradient norms.

    (forward + setup_context, so torch.func transforms such as vmap(grad) pass through;
    mean and rstd are non-differentiable outputs kept for the backward.)"""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, normalized_shape, weight, bias, eps, per_example_grad_sq):
        return torch.native_layer_norm(x, normalized_shape, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, normalized_shape, weight, bias, _, per_example_grad_sq = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.per_example_grad_sq = per_example_grad_sq  # written, not read: no version check
        ctx.normalized_shape = normalized_shape

    @staticmethod
    def backward(ctx, dout, _dmean, _drstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        buffer = ctx.per_example_grad_sq
        mask = [ctx.needs_input_grad[0], weight is not None, bias is not None]
        dx, dw, db = torch.ops.aten.native_layer_norm_backward(
            dout, x, ctx.normalized_shape, mean, rstd, weight, bias, mask
        )
        if buffer is not None:
            x_hat = (x.to(mean.dtype) - mean) * rstd
            _write_per_example(buffer, dout, x_hat, buffer.shape[1], ctx.normalized_shape,
                               bias is not None)
        return dx, None, dw, db, None, None


@register_impl("layer_norm", "torch")
def layer_norm(x, normalized_shape, weight, bias, eps, *, per_example_grad_sq=None):
    if per_example_grad_sq is None:
        # torch's native op is already one fused pass on every device
        return F.layer_norm(x, normalized_shape, weight, bias, eps)
    return LayerNormFunction.apply(x, list(normalized_shape), weight, bias, eps,
                                   per_example_grad_sq)[0]


# ----------------------------------------------------------------------- rms norm


class RMSNormFunction(torch.autograd.Function):
    """y = x * rstd * weight, rstd = 1 / sqrt(mean(x^2) + eps), in float32 (float64).

    Forward: one fused reduction (``vector_norm``) for rstd, then y in place. Backward,
    with P = dy * x, c = (P @ weight) * rstd^3 / N (a matrix-vector product):
    dx = (dy * weight) * rstd - x * c and dweight = P^T @ rstd, so dy and x are
    each read twice and no [rows, hidden] intermediate is kept. (forward + setup_context
    with a generated vmap rule, so torch.func transforms pass through; rstd is a
    non-differentiable output kept for the backward.)"""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, normalized_shape, weight, eps, per_example_grad_sq):
        hidden = math.prod(normalized_shape)
        ct = reference.compute_dtype(x.dtype)
        x2 = x.reshape(-1, hidden)
        if x2.dtype == ct:  # no conversion: y = x * rstd is the first pass that writes
            rstd = torch.linalg.vector_norm(x2, dim=1, keepdim=True)
            rstd = rstd.square_().div_(hidden).add_(eps).rsqrt_()
            y = x2 * rstd
        else:
            y = x2.to(ct)
            rstd = torch.linalg.vector_norm(y, dim=1, keepdim=True)
            rstd = rstd.square_().div_(hidden).add_(eps).rsqrt_()
            y.mul_(rstd)
        if weight is not None:
            y = y.mul_(weight.reshape(-1)) if weight.dtype != torch.float64 or ct == weight.dtype else y * weight.reshape(-1)
        return y.to(x.dtype).reshape(x.shape), rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, normalized_shape, weight, eps, per_example_grad_sq = inputs
        _, rstd = output
        ctx.mark_non_differentiable(rstd)
        ctx.save_for_backward(x, weight, rstd)
        ctx.eps = eps
        ctx.per_example_grad_sq = per_example_grad_sq
        ctx.normalized_shape = tuple(normalized_shape)

    @staticmethod
    def backward(ctx, dout, _drstd):
        x, weight, rstd = ctx.saved_tensors
        buffer = ctx.per_example_grad_sq
        ct = rstd.dtype
        hidden = math.prod(ctx.normalized_shape)
        x2 = x.reshape(-1, hidden)
        if buffer is not None:
            _write_per_example(buffer, dout.reshape(-1, hidden).to(ct), x2 * rstd, buffer.shape[1],
                               ctx.normalized_shape, False)
        if torch.is_grad_enabled():
            # create_graph (double backward): out-of-place ops, and rstd recomputed from x
            # so the second derivative flows through it too
            rstd = torch.rsqrt(x2.to(ct).square().mean(1, keepdim=True) + ctx.eps)
            dyf = dout.reshape(-1, hidden).to(ct)
        else:
            dyf = dout.reshape(-1, hidden).to(ct, copy=True)  # scratch, updated in place below
        p = dyf * x2
        dx = dw = None
        if weight is not None and ctx.needs_input_grad[2]:
            dw = torch.mv(p.t(), rstd.squeeze(1)).to(weight.dtype).reshape(weight.shape)
        if ctx.needs_input_grad[0]:
            w = weight.reshape(-1).to(ct) if weight is not None else None
            c = (torch.mv(p, w) if w is not None else p.sum(1)).unsqueeze(1) * rstd.pow(3) / hidden
            if torch.is_grad_enabled():
                g = dyf * w if w is not None else dyf
                dx = g * rstd - x2 * c
            else:
                g = dyf.mul_(w) if w is not None else dyf
                dx = g.mul_(rstd).addcmul_(x2, c, value=-1)
            dx = dx.to(x.dtype).reshape(x.shape)
        return dx, None, dw, None, None


@register_impl("rms_norm", "torch")
def rms_norm(x, normalized_shape, weight, eps, *, per_example_grad_sq=None):
    if eps is None:
        eps = reference.default_rms_eps(x.dtype)
    return RMSNormFunction.apply(x, tuple(normalized_shape), weight, eps, per_example_grad_sq)[0]


# ----------------------------------------------------------------------- residual add


@register_impl("dropout_add", "torch")
def dropout_add(x, residual, *, dropout_p=0.0, training=False, generator=None,
                residual_dtype=None):
    """residual + dropout(x), formed in float32 and rounded once to residual_dtype.

    The mask keeps an element when a uniform draw from ``generator`` is >= dropout_p
    (the Triton kernels' rule); one ``torch.rand`` is half the cost of ``bernoulli_``,
    and the scaled sum is one ``addcmul``."""
    if x.dtype == torch.float64 or (residual is not None and residual.dtype == torch.float64):
        return reference.dropout_add(x, residual, dropout_p=dropout_p, training=training,
                                     generator=generator, residual_dtype=residual_dtype)
    out_dtype = residual_dtype or x.dtype
    if not (training and dropout_p > 0.0):
        if residual is None:
            return x if out_dtype == x.dtype else x.to(out_dtype)
        if torch.promote_types(residual.dtype, x.dtype) == out_dtype:
            return residual + x  # torch forms half-precision sums in float32, rounds once
        return (residual.float() + x).to(out_dtype)
    keep_scaled = torch.rand(x.shape, generator=generator, device=x.device)
    keep_scaled.ge_(dropout_p).mul_(1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0)
    if residual is None:
        return torch.mul(x, keep_scaled).to(out_dtype)
    return torch.addcmul(residual, x, keep_scaled).to(out_dtype)


def _layer_norm_native_ok(h: Tensor, *params: Tensor | None) -> bool:
    allowed = (h.dtype, torch.float32) if h.dtype in (torch.float16, torch.bfloat16) else (h.dtype,)
    return all(p is None or p.dtype in allowed for p in params)


@register_impl("add_layer_norm", "torch")
def add_layer_norm(x, residual, weight, bias, eps, *, dropout_p=0.0, training=False,
                   generator=None, residual_dtype=None, normalized_shape=None,
                   per_example_grad_sq=None):
    new_residual = dropout_add(x, residual, dropout_p=dropout_p, training=training,
                               generator=generator, residual_dtype=residual_dtype)
    if _layer_norm_native_ok(new_residual, weight, bias):
        out = layer_norm(new_residual, normalized_shape, weight, bias, eps,
                         per_example_grad_sq=per_example_grad_sq)
    else:
        if per_example_grad_sq is not None:
            raise NotImplementedError(
                "add_layer_norm: per_example_grad_sq needs weight/bias in new_residual's dtype "
                "or float32 on the torch backend"
            )
        out = reference.layer_norm(new_residual, normalized_shape, weight, bias, eps)
    return out.to(x.dtype), new_residual


@register_impl("add_rms_norm", "torch")
def add_rms_norm(x, residual, weight, eps, *, dropout_p=0.0, training=False, generator=None,
                 residual_dtype=None, normalized_shape=None, per_example_grad_sq=None):
    new_residual = dropout_add(x, residual, dropout_p=dropout_p, training=training,
                               generator=generator, residual_dtype=residual_dtype)
    out = rms_norm(new_residual, normalized_shape, weight, eps,
                   per_example_grad_sq=per_example_grad_sq)
    return out.to(x.dtype), new_residual
