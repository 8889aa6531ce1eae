"""Per-example recording across steps (a norm that sits out a step, an output the loss
ignores, frozen parameters), under activation checkpointing, and GradientMonitor over
several backward calls: each against brute force (one-example backward passes)."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import normlab
from normlab.diagnostics import GradientMonitor, per_example_grad_norms

H = 8
NORMS = [nn.LayerNorm, nn.RMSNorm, normlab.LayerNorm, normlab.RMSNorm]


def _per_example_sq(loss_of, example_count, param):
    """||d loss_b / d param||^2 for each example b, one backward each."""
    out = []
    for b in range(example_count):
        (g,) = torch.autograd.grad(loss_of(b), param)
        out.append(float(g.double().square().sum()))
    return torch.tensor(out)


class _TwoNorms(nn.Module):
    def __init__(self, cls):
        super().__init__()
        self.lin, self.a, self.b = nn.Linear(H, H), cls(H), cls(H)

    def forward(self, x, use_b=True):
        y = self.a(self.lin(x))
        return self.b(y * 2 + 1).sin() if use_b else y


@pytest.mark.parametrize("cls", NORMS)
def test_a_norm_that_sits_out_a_step_has_no_stale_entry(cls):
    torch.manual_seed(0)
    m = _TwoNorms(cls)
    x1, x2 = torch.randn(4, 3, H), torch.randn(4, 3, H)
    with per_example_grad_norms(m) as rec:
        m(x1).pow(2).sum().backward()
        assert set(rec) == {"a", "b"}
        m(x2, use_b=False).pow(2).sum().backward()
        assert set(rec) == {"a"}  # b did not take part in the latest backward
        total, batch = rec.total(), rec.batch_grad_sq()
    params = [m.a.weight] + ([m.a.bias] if getattr(m.a, "bias", None) is not None else [])
    want = sum(_per_example_sq(lambda b: m(x2[b:b + 1], use_b=False).pow(2).sum(), 4, p) for p in params)
    torch.testing.assert_close(total.double(), want.double(), rtol=1e-5, atol=1e-6)
    full = torch.autograd.grad(m(x2, use_b=False).pow(2).sum(), params)
    assert batch == pytest.approx(sum(float(g.square().sum()) for g in full), rel=1e-5)


@pytest.mark.parametrize("cls", [nn.LayerNorm, normlab.LayerNorm])
def test_an_output_the_loss_ignored_does_not_break_later_steps(cls):
    torch.manual_seed(0)
    m = _TwoNorms(cls)
    x = torch.randn(4, H)
    with per_example_grad_norms(m) as rec:
        for step in range(3):
            h = m.lin(x)
            a, b = m.a(h), m.b(h)
            (a if step == 0 else a + b).pow(2).sum().backward()
            assert set(rec) == ({"a"} if step == 0 else {"a", "b"})


@pytest.mark.parametrize("cls", NORMS)
@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing(cls, reentrant):
    torch.manual_seed(0)
    blk = nn.Sequential(nn.Linear(H, H), cls(H), nn.Linear(H, H))
    x = torch.randn(3, 5, H, requires_grad=True)
    w = torch.arange(1.0, 4.0)[:, None, None]

    def losses():
        return (checkpoint(blk, x, use_reentrant=reentrant).sin() * w).pow(2).sum((1, 2))

    with per_example_grad_norms(blk) as rec:
        losses().sum().backward()
        got = rec["1"]["weight"]
    want = _per_example_sq(lambda b: (blk(x).sin() * w).pow(2).sum((1, 2))[b], 3, blk[1].weight)
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [nn.LayerNorm, normlab.LayerNorm])
def test_a_frozen_bias_is_left_out(cls):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(H, H), cls(H))
    m[1].bias.requires_grad_(False)
    x = torch.randn(4, H)
    with per_example_grad_norms(m) as rec:
        m(x).pow(3).sum().backward()
        assert list(rec["1"]) == ["weight"]
        total, batch = rec.total(), rec.batch_grad_sq()
    want = _per_example_sq(lambda b: m(x[b:b + 1]).pow(3).sum(), 4, m[1].weight)
    torch.testing.assert_close(total.double(), want.double(), rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(m(x).pow(3).sum(), m[1].weight)
    assert batch == pytest.approx(float(g.square().sum()), rel=1e-5)


def test_gradient_monitor_sums_a_steps_backward_calls():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    x = torch.randn(5, 4)
    m(x).sum().backward()  # a gradient left from an earlier step, outside the monitor
    left = {n: p.grad.clone() for n, p in m.named_parameters()}
    with GradientMonitor(m) as mon:
        y = m(x)
        y[:, 0].pow(2).sum().backward(retain_graph=True)
        y[:, 1].sum().backward()
    got = {r.name: r.grad_norm for r in mon.last}
    for n, p in m.named_parameters():
        assert got[n] == pytest.approx(float((p.grad - left[n]).norm()), rel=1e-5), n


@pytest.mark.parametrize("reentrant", [False])  # (reentrant: a documented limit, see _new_round)
def test_every_norm_inside_checkpoints_and_one_sits_out_a_step(reentrant):
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.a, self.b = nn.Linear(8, 8), nn.LayerNorm(8), nn.LayerNorm(8)

        def forward(self, x, use_b):
            x = checkpoint(self.a, self.lin(x), use_reentrant=reentrant)
            return checkpoint(self.b, x, use_reentrant=reentrant) if use_b else x

    net = Net()
    with per_example_grad_norms(net) as rec:
        net(torch.randn(4, 8), True).square().sum().backward()
        assert set(rec) == {"a", "b"}
        with torch.no_grad():
            net(torch.randn(4, 8), True)  # an evaluation pass (even in train mode) keeps the numbers
        assert set(rec) == {"a", "b"} and rec.total().shape == (4,)
        net(torch.randn(4, 8), False).square().sum().backward()
        assert set(rec) == {"a"}


@pytest.mark.parametrize("cls", NORMS)
@pytest.mark.parametrize("shape", [(0, H), (0, 3, H), (3, 0, H)])
def test_an_empty_batch_records_empty_numbers(cls, shape):
    # an empty last shard: the step runs inside the context as outside it
    m = nn.Sequential(nn.Linear(H, H), cls(H), nn.Linear(H, 1))
    with per_example_grad_norms(m) as rec:
        m(torch.randn(*shape)).sum().backward()
        got = rec["1"]
    assert got["weight"].shape == (shape[0],) and got["bias" if "bias" in got else "weight"].shape == (shape[0],)
    assert torch.equal(got["weight"], torch.zeros(shape[0]))


@pytest.mark.parametrize("cls", NORMS)
def test_numbers_read_stay_as_read_after_another_backward(cls):
    # a second backward through the same graph (retain_graph) gives new numbers; the
    # tensors read after the first keep the first's, as torch's norms' fresh tensors do
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(H, H), cls(H), nn.Linear(H, 1))
    x = torch.randn(3, H)
    with per_example_grad_norms(m) as rec:
        out = m(x)
        out.sum().backward(retain_graph=True)
        first = rec["1"]["weight"]
        kept = first.clone()
        (10 * out.sum()).backward()
        second = rec["1"]["weight"]
        by_items = dict(rec.items())["1"]["weight"]
    assert torch.equal(first, kept)
    torch.testing.assert_close(second, 100 * kept)
    torch.testing.assert_close(by_items, second)
