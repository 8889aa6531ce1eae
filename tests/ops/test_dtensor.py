"""The Triton ops on DTensor inputs: two gloo processes on the CPU (Triton interpreter),
sequence-parallel (x sharded on the sequence dim, weight replicated) and data-parallel
(batch dim, with the per-example buffer), against the single-process result."""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch

import normlab
from tests._gloo import gloo_group, leave
from tests.ops.helpers import DEVICE, needs_kernels

dist = pytest.importorskip("torch.distributed")
pytestmark = [
    needs_kernels,
    pytest.mark.skipif(DEVICE != "cpu" or not dist.is_available() or not dist.is_gloo_available(),
                       reason="runs the kernels on CPU tensors under gloo"),
]

WORLD = 2


def _close(got, want, what):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, 16, generator=g) * 2 + 0.5
    r = torch.randn(2, 6, 16, generator=g)
    w = torch.randn(16, generator=g) * 0.5 + 1
    b = torch.randn(16, generator=g) * 0.5
    cots = [torch.randn(2, 6, 16, generator=g) for _ in range(2)]
    return x, r, w, b, cots


def _run(fn, tensors, cots, wrap):
    """fn's outputs and the gradients of sum(out_i * cot_i) w.r.t. ``tensors``, each
    tensor and cotangent passed through ``wrap(i, t)`` first (DTensor or identity)."""
    leaves = [wrap(i, t).detach().requires_grad_() for i, t in enumerate(tensors)]
    outs = fn(*leaves)
    loss = sum((o * wrap(0, c)).sum() for o, c in zip(outs, cots, strict=False))
    loss.backward()
    return outs, [t.grad for t in leaves]


def _check_case(mesh, fn, tensors, cots, placements, expect_out, counts):
    from torch.distributed.tensor import distribute_tensor

    with normlab.set_backend("triton"):
        want, want_grads = _run(fn, tensors, cots, lambda i, t: t)
        before = (counts["fwd"].call_count, counts["bwd"].call_count)
        got, got_grads = _run(fn, tensors, cots,
                              lambda i, t: distribute_tensor(t, mesh, [placements[min(i, len(placements) - 1)]]))
    # the custom op ran (once forward, once backward), shard-locally where expected
    assert (counts["fwd"].call_count - before[0], counts["bwd"].call_count - before[1]) == (1, 1)
    for i, (o, w) in enumerate(zip(got, want, strict=True)):
        assert tuple(o.placements) == (expect_out,), (i, o.placements)
        _close(o.full_tensor(), w, f"output {i}")
    for i, (g, w) in enumerate(zip(got_grads, want_grads, strict=True)):
        _close(g.full_tensor(), w, f"grad {i}")


def _worker(rank, store_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import normlab.ops.triton.custom_ops as custom_ops

    with gloo_group(rank, store_path, WORLD):
        mesh = init_device_mesh("cpu", (WORLD,))
        F = normlab.functional
        import normlab.diagnostics.per_example as PE
        x, r, w, b, cots = _inputs()
        with (mock.patch.object(custom_ops, "norm_forward", wraps=custom_ops.norm_forward) as fwd,
              mock.patch.object(custom_ops, "norm_backward", wraps=custom_ops.norm_backward) as bwd):
            counts = {"fwd": fwd, "bwd": bwd}
            seq, rep = Shard(1), Replicate()

            # sequence parallel: x (and residual) on the sequence dim, parameters replicated
            _check_case(mesh, lambda x, w, b: (F.layer_norm(x, 16, w, b),), [x, w, b], cots,
                        [seq, rep], seq, counts)
            _check_case(mesh, lambda x, r, w: F.add_rms_norm(x, r, w), [x, r, w], cots,
                        [seq, seq, rep], seq, counts)
            # the weight offset and a casting mode: settings of the same ops
            _check_case(mesh, lambda x, r, w: F.add_rms_norm(x, r, w, offset=1.0, casting_mode="llama"),
                        [x, r, w], cots, [seq, seq, rep], seq, counts)
            _check_case(mesh, lambda x, w, b: (F.layer_norm(x, 16, w, b, offset=0.5),), [x, w, b], cots,
                        [Shard(0), rep], Shard(0), counts)
            # sharded along the normalized dim: not offered, DTensor replicates first
            _check_case(mesh, lambda x, w, b: (F.layer_norm(x, 16, w, b),), [x, w, b], cots,
                        [Shard(2), rep], rep, counts)

            # dropout would draw the same mask on every shard: refused
            with normlab.set_backend("triton"), pytest.raises(NotImplementedError, match="dropout"):
                F.add_rms_norm(distribute_tensor(x, mesh, [seq]), None,
                               distribute_tensor(w, mesh, [rep]), dropout_p=0.1, training=True)

            # data parallel with the per-example buffer sharded along the examples
            with normlab.set_backend("triton"):
                want = torch.zeros(2, 2)
                _run(lambda x, w: (PE.layer_norm(x, 16, w, per_example_grad_sq=want),), [x, w],
                     cots, lambda i, t: t)
                buf = distribute_tensor(torch.zeros(2, 2), mesh, [Shard(1)])
                _run(lambda x, w: (PE.layer_norm(x, 16, w, per_example_grad_sq=buf),), [x, w], cots,
                     lambda i, t: distribute_tensor(t, mesh, [Shard(0) if i == 0 else rep]))
            assert tuple(buf.placements) == (Shard(1),)
            assert want[0].min() > 0
            _close(buf.full_tensor(), want, "per_example_grad_sq")
    leave()


def test_dtensor_matches_single_process(tmp_path):
    import torch.multiprocessing as mp

    env = {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    with mock.patch.dict(os.environ, env):
        mp.spawn(_worker, args=(str(tmp_path / "store"),), nprocs=WORLD, join=True)
