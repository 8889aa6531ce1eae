"""Batch statistics over every rank (``sync_batch_statistics``), and PowerNorm under a
loss scaler's overflow step."""


import pytest
import torch

from normlab.errors import NormArgumentError
from normlab.norms import MaskedBatchNorm, PowerNorm, sync_batch_statistics
from tests._gloo import gloo_group, leave

WORLD = 2
D = 4


def _batches():
    """Three steps of a whole batch (6 sequences of 3 positions, some padded), split by
    sequence over the ranks unevenly: rank 0 takes 4 and rank 1 takes 2, and on the last
    step rank 1 takes none."""
    g = torch.Generator().manual_seed(0)
    steps = []
    for step in range(3):
        x = torch.randn(6, 3, D, generator=g, dtype=torch.float64) * 2 + 1
        mask = torch.zeros(6, 3, dtype=torch.bool)
        mask[1, 2] = mask[4, 1:] = True
        cot = torch.randn(6, 3, D, generator=g, dtype=torch.float64)
        split = 6 if step == 2 else 4
        steps.append((x, mask, cot, split))
    return steps


def _make(kind):
    torch.manual_seed(0)
    if kind == "batchnorm":
        norm = MaskedBatchNorm(D, dtype=torch.float64)
    else:
        norm = PowerNorm(D, warmup_iters=1, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, D))
        norm.bias.copy_(torch.linspace(-0.2, 0.2, D))
    return norm


def _run(norm, rows, masked):
    """Each step: the norm on ``rows`` of the whole batch, the loss sum(y * cot) over those
    rows backpropagated; returns each step's output and input gradient, the parameters'
    gradients and the buffers at the end."""
    outs = []
    for x, mask, cot, split in _batches():
        sl = rows(split)
        xs = x[sl].clone().requires_grad_(True)
        y = norm(xs, padding_mask=mask[sl] if masked else None)
        (y * cot[sl]).sum().backward()
        outs.append((y.detach(), xs.grad))
    params = [p.grad.clone() for p in norm.parameters()]
    return outs, params, {k: v.clone() for k, v in norm.named_buffers()}


def _worker(rank, store_path, out_path):
    import warnings

    warnings.simplefilter("error")  # (no deprecated collective, no other warning)
    with gloo_group(rank, store_path, WORLD):
        results = {}
        for kind in ("batchnorm", "powernorm"):
            for masked in (False, True):
                norm = sync_batch_statistics(_make(kind))
                results[kind, masked] = _run(norm, lambda split: slice(0, split) if rank == 0 else slice(split, 6),
                                             masked)
        # the edges as one process takes them, on every rank alike
        edges = {}
        bn, pn = sync_batch_statistics(MaskedBatchNorm(D)), sync_batch_statistics(PowerNorm(D))
        padded = torch.ones(2, 3, dtype=torch.bool)
        for name, norm in (("bn", bn), ("pn", pn)):
            try:  # every position on every rank padded: refused
                norm(torch.randn(2, 3, D), padding_mask=padded)
                edges[name, "padded"] = "ran"
            except NormArgumentError as e:
                edges[name, "padded"] = str(e)
            y = norm(torch.randn(0, 3, D))  # every rank empty: no statistics (BatchNorm counts the batch)
            edges[name, "empty"] = (tuple(y.shape), int(norm.num_batches_tracked if name == "bn" else norm.iters))
        results["edges"] = edges
        torch.save(results, f"{out_path}.{rank}")
    leave()


def test_two_ranks_compute_what_one_process_computes(tmp_path):
    import torch.multiprocessing as mp

    with pytest.MonkeyPatch.context() as mp_env:
        mp_env.setenv("OMP_NUM_THREADS", "1")
        mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=WORLD, join=True)
    ranks = [torch.load(f"{tmp_path / 'out'}.{r}") for r in range(WORLD)]
    for kind in ("batchnorm", "powernorm"):
        for masked in (False, True):
            whole = _run(_make(kind), lambda split: slice(None), masked)
            (outs0, params0, bufs0), (outs1, params1, bufs1) = ranks[0][kind, masked], ranks[1][kind, masked]
            for step, ((y, gx), (y0, gx0), (y1, gx1)) in enumerate(zip(whole[0], outs0, outs1, strict=True)):
                split = _batches()[step][3]
                # each rank's rows: the whole batch's output and input gradient (the
                # gradient reaching every rank through the shared statistics)
                torch.testing.assert_close(torch.cat([y0, y1]), y, msg=f"{kind} masked={masked} step {step} output")
                torch.testing.assert_close(torch.cat([gx0, gx1]), gx,
                                           msg=f"{kind} masked={masked} step {step} input gradient")
                assert y0.shape[0] == split
            for p, p0, p1 in zip(whole[1], params0, params1, strict=True):  # (DDP would sum these)
                torch.testing.assert_close(p0 + p1, p)
            for name, buf in whole[2].items():  # running statistics, PowerNorm's nu: the same on every rank
                torch.testing.assert_close(bufs0[name], buf, msg=f"{kind} {name}")
                torch.testing.assert_close(bufs1[name], buf, msg=f"{kind} {name}")
    for rank in ranks:
        edges = rank["edges"]
        assert "MaskedBatchNorm: expected more than 1 real (unpadded) position" in edges["bn", "padded"]
        assert "got 0 over all ranks" in edges["bn", "padded"]
        assert "PowerNorm: expected at least one real (unpadded) position over all ranks" in edges["pn", "padded"]
        assert edges["bn", "empty"] == ((0, 3, D), 1) and edges["pn", "empty"] == ((0, 3, D), 0)
    # and without the sync each rank normalizes its own slice: the test can tell
    local = _run(_make("batchnorm"), lambda split: slice(0, split), False)
    assert not torch.allclose(local[2]["running_mean"], ranks[0]["batchnorm", False][2]["running_mean"])


def test_outside_torch_distributed_a_synced_norm_computes_as_before():
    for kind in ("batchnorm", "powernorm"):
        for masked in (False, True):
            plain = _run(_make(kind), lambda split: slice(None), masked)
            synced = _run(sync_batch_statistics(torch.nn.Sequential(_make(kind)))[0], lambda split: slice(None),
                          masked)
            for (y, gx), (ys, gxs) in zip(plain[0], synced[0], strict=True):
                assert torch.equal(y, ys) and torch.equal(gx, gxs)


def test_sync_batch_statistics_marks_only_batch_statistic_norms_and_checks_its_model():
    model = torch.nn.Sequential(MaskedBatchNorm(D), PowerNorm(D), torch.nn.LayerNorm(D))
    assert sync_batch_statistics(model, process_group="g") is model
    assert [getattr(m, "sync_statistics", None) for m in model] == [True, True, None]
    assert model[0].process_group == "g" and model[1].process_group == "g"
    assert not MaskedBatchNorm(D).sync_statistics and not PowerNorm(D).sync_statistics
    sync_batch_statistics(model)  # back to the default group
    assert model[0].process_group is None
    with pytest.raises(NormArgumentError, match="sync_batch_statistics: expected model to be a torch.nn.Module"):
        sync_batch_statistics([MaskedBatchNorm(D)])


def test_powernorm_keeps_nu_through_a_loss_scalers_overflow_step():
    torch.manual_seed(0)
    norm = PowerNorm(D, warmup_iters=0)
    x = torch.randn(8, D)
    cot = torch.randn(8, D)
    (norm(x.clone().requires_grad_(True)) * cot).sum().backward()
    nu = norm.grad_ema.clone()
    assert nu.abs().sum() > 0 and torch.isfinite(nu).all()
    # an overflowing step (GradScaler skips it): the gradient is not finite
    y = norm(x.clone().requires_grad_(True))
    (y * cot * torch.tensor([1.0, float("inf"), 1.0, 1.0])).sum().backward()
    assert torch.equal(norm.grad_ema, nu)
    # and the next finite step trains on
    xg = x.clone().requires_grad_(True)
    (norm(xg) * cot).sum().backward()
    assert torch.isfinite(xg.grad).all() and torch.isfinite(norm.grad_ema).all()
    assert not torch.equal(norm.grad_ema, nu)
