"""DTensor sharding rules of ``normlab::fused_norm`` and ``normlab::fused_norm_backward``.

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

``per_example_grad_sq`` [2, B] follows the example dim (dim 0): ``Shard(1)`` when x
is ``Shard(0)``, ``Replicate()`` when x is replicated. With x sharded along another
row dim (e.g. the sequence) one example's positions are spread over shards and its
squared gradient norm is not a sum of per-shard terms, so with the buffer given only
those two strategies are offered.
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


@register_sharding(torch.ops.normlab.fused_norm.default)
def _fused_norm_sharding(x, residual, weight, bias, seed, per_example_grad_sq, eps, hidden,
                         is_rms, dropout_p, residual_dtype, store_residual, offset=0.0,
                         casting_mode="torch", out_dtype=None):
    per_example = per_example_grad_sq is not None
    strategies = []
    for p in _row_placements(x, hidden, per_example):
        outputs = [p, p if store_residual else _R, _R if is_rms else p, p]
        inputs = [p, _given(residual, p), _given(weight, _R), _given(bias, _R),
                  _given(seed, _R), _given(per_example_grad_sq, _buffer_placement(p)),
                  None, None, None, None, None, None, None, None, None]
        strategies.append((outputs, inputs))
    return strategies


@register_sharding(torch.ops.normlab.fused_norm_backward.default)
def _fused_norm_backward_sharding(dout, dnew_residual, h, weight, mean, rstd, seed,
                                  per_example_grad_sq, hidden, is_rms, dropout_p, x_dtype,
                                  residual_grad_dtype, bias_dtype, offset=0.0, casting_mode="torch"):
    per_example = per_example_grad_sq is not None
    strategies = []
    for p in _row_placements(h, hidden, per_example):
        param_grad = Partial() if isinstance(p, Shard) else _R
        outputs = [p, p if residual_grad_dtype is not None else _R,
                   param_grad if weight is not None else _R,
                   param_grad if bias_dtype is not None else _R,
                   _buffer_placement(p) if per_example else _R]
        inputs = [p, _given(dnew_residual, p), p, _given(weight, _R),
                  _R if is_rms else p, p, _given(seed, _R),
                  _given(per_example_grad_sq, _buffer_placement(p)),
                  None, None, None, None, None, None, None, None]
        strategies.append((outputs, inputs))
    return strategies
