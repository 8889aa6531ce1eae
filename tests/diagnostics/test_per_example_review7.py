"""Two backward passes of one forward: the numbers are the latest backward's only."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab
from normlab.diagnostics import per_example_grad_norms


def _two(norm):
    torch.manual_seed(0)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.n1, self.lin, self.n2, self.head = norm(4), nn.Linear(4, 4), norm(4), nn.Linear(4, 2)
            for n in (self.n1, self.n2):
                with torch.no_grad():
                    n.weight.uniform_(0.5, 1.5)

        def forward(self, x):
            a = self.n1(x)
            return self.head(self.n2(self.lin(a))), a

    return Two()


def _brute(model, loss_of, x):
    """Per-example squared grad norms of n1's weight and bias, one example at a time."""
    out = []
    for b in range(x.shape[0]):
        model.zero_grad()
        loss_of(*model(x[b:b + 1])).backward()
        out.append(sum(p.grad.square().sum() for p in model.n1.parameters()))
    model.zero_grad()
    return torch.stack(out)


@pytest.mark.parametrize("norm", [nn.LayerNorm, normlab.LayerNorm, normlab.RMSNorm])
def test_a_second_backward_of_one_forward_replaces_every_entry(norm):
    model = _two(norm)
    x = torch.randn(3, 4)

    def main(y, a):
        return y.square().sum()

    def aux(y, a):
        return (a * torch.arange(4.0)).sum(-1).square().sum()

    want = _brute(model, aux, x)
    with per_example_grad_norms(model) as rec:
        y, a = model(x)
        main(y, a).backward(retain_graph=True)
        assert set(rec.keys()) == {"n1", "n2"}
        model.zero_grad()
        aux(y, a).backward()  # reaches n1 only
        batch = sum(p.grad.square().sum() for p in model.n1.parameters())
        assert list(rec.keys()) == ["n1"]
        torch.testing.assert_close(rec.total(), want, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(torch.tensor(rec.batch_grad_sq()), batch, rtol=1e-5, atol=1e-7)


def test_one_backward_keeps_every_norm_it_reached():
    model = _two(nn.LayerNorm)
    with per_example_grad_norms(model) as rec:
        y, a = model(torch.randn(3, 4))
        (y.square().sum() + a.sum().square()).backward()
        assert set(rec.keys()) == {"n1", "n2"}
