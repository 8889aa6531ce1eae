"""DTensor sharding rules of ``normlab::fused_norm`` / ``normlab::fused_norm_backward``
and of their per-example variants ``normlab::fused_norm_per_example`` /
``normlab::fused_norm_per_example_backward``.

A norm works row by row, so on a DTensor it runs shard-locally whenever the shards
hold whole rows (the weight offset and casting mode change nothing here). Per mesh
dim, the strategies offered are:

* rows sharded: x (and residual, and out/new_residual and the per-row mean/rstd)
  ``Shard(d)`` for every row dim d, i.e. every dim in front of the normalized ones
  (sequence parallelism shards the sequence dim, data parallelism the batch dim);
  weight and bias ``Replicate()``. In the backward, dx/dresidual are ``Shard(d)`` like
  their inputs and dweight/dbias ``Partial()`` (each shard holds the sum over its own
  rows; the sum over shards is the gradient).
* everything ``Replicate()`` (the fallback: DTensor redistributes to it when the
  inputs' placements match no other strategy).

Sharding along a normalized dim is not offered: each row's mean and variance would
need a reduction across shards, which the kernels do not do. An input sharded that way
is redistributed (all-gathered) to one of the strategies above.

The per-example ops' ``per_example_grad_sq`` [2, B] follows the example dim (dim 0):
``Shard(1)`` when x is ``Shard(0)``, ``Replicate()`` when x is replicated. With x
sharded along another row dim (e.g. the sequence) one example's positions are spread
over shards and its squared gradient norm is not a sum of per-shard terms, so those
ops are offered only those two strategies.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec
from torch.distributed.tensor.experimental import register_sharding

from normlab.ops.triton import custom_ops  # noqa: F401  (defines the ops registered below)
from normlab.ops.triton.launch import normalized_dims

_R = Replicate()


def _row_placements(x: DTensorSpec, hidden: int, per_example: bool) -> list:
    """Replicate, then Shard(d) for every row dim d (only d = 0 with ``per_example``)."""
    rows = len(x.shape) - normalized_dims(tuple(x.shape), hidden)
    dims = range(min(rows, 1)) if per_example else range(rows)
    return [_R, *(Shard(d) for d in dims)]


def _given(spec: object, placement):
    """``placement`` for a DTensor argument, None for an absent (or plain scalar) one."""
    return placement if isinstance(spec, DTensorSpec) else None


def _buffer_placement(p):
    return Shard(1) if isinstance(p, Shard) else _R


# the ops' inputs after the tensors (eps ... out_dtype; hidden ... casting_mode)
_FORWARD_SETTINGS = 9
_BACKWARD_SETTINGS = 8


def _forward_strategies(x, residual, weight, bias, seed, buffer, hidden, is_rms, store_residual):
    """``buffer``: the per-example ops' per_example_grad_sq, None for the plain ops."""
    strategies = []
    for p in _row_placements(x, hidden, buffer is not None):
        outputs = [p, p if store_residual else _R, _R if is_rms else p, p]
        inputs = [p, _given(residual, p), _given(weight, _R), _given(bias, _R), _given(seed, _R)]
        if buffer is not None:
            inputs.append(_given(buffer, _buffer_placement(p)))
        strategies.append((outputs, inputs + [None] * _FORWARD_SETTINGS))
    return strategies


def _backward_strategies(dnew_residual, h, weight, seed, buffer, hidden, is_rms, residual_grad_dtype, bias_dtype):
    """``buffer`` as ``_forward_strategies``'s; the per-example ops return its squares last."""
    strategies = []
    for p in _row_placements(h, hidden, buffer is not None):
        param_grad = Partial() if isinstance(p, Shard) else _R
        outputs = [p, p if residual_grad_dtype is not None else _R,
                   param_grad if weight is not None else _R,
                   param_grad if bias_dtype is not None else _R]
        inputs = [p, _given(dnew_residual, p), p, _given(weight, _R), _R if is_rms else p, p, _given(seed, _R)]
        if buffer is not None:
            outputs.append(_buffer_placement(p))
            inputs.append(_given(buffer, _buffer_placement(p)))
        strategies.append((outputs, inputs + [None] * _BACKWARD_SETTINGS))
    return strategies


@register_sharding(torch.ops.normlab.fused_norm.default)
def _fused_norm_sharding(x, residual, weight, bias, seed, eps, hidden, is_rms, dropout_p, residual_dtype,
                         store_residual, offset=0.0, casting_mode="torch", out_dtype=None):
    return _forward_strategies(x, residual, weight, bias, seed, None, hidden, is_rms, store_residual)


@register_sharding(torch.ops.normlab.fused_norm_per_example.default)
def _fused_norm_per_example_sharding(x, residual, weight, bias, seed, per_example_grad_sq, eps, hidden, is_rms,
                                     dropout_p, residual_dtype, store_residual, offset=0.0, casting_mode="torch",
                                     out_dtype=None):
    return _forward_strategies(x, residual, weight, bias, seed, per_example_grad_sq, hidden, is_rms,
                               store_residual)


@register_sharding(torch.ops.normlab.fused_norm_backward.default)
def _fused_norm_backward_sharding(dout, dnew_residual, h, weight, mean, rstd, seed, hidden, is_rms, dropout_p,
                                  x_dtype, residual_grad_dtype, bias_dtype, offset=0.0, casting_mode="torch"):
    return _backward_strategies(dnew_residual, h, weight, seed, None, hidden, is_rms, residual_grad_dtype,
                                bias_dtype)


@register_sharding(torch.ops.normlab.fused_norm_per_example_backward.default)
def _fused_norm_per_example_backward_sharding(dout, dnew_residual, h, weight, mean, rstd, seed,
                                              per_example_grad_sq, hidden, is_rms, dropout_p, x_dtype,
                                              residual_grad_dtype, bias_dtype, offset=0.0, casting_mode="torch"):
    return _backward_strategies(dnew_residual, h, weight, seed, per_example_grad_sq, hidden, is_rms,
                                residual_grad_dtype, bias_dtype)
