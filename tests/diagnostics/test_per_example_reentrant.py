"""One norm module in two reentrant activation-checkpoint segments (a layer shared between
depths, checkpointed per layer) gave the last segment's numbers as the step's; reading it
now raises, as a shared call in a plain forward does, while separate norms in reentrant
segments still match brute force step after step in one recorder."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import normlab
from normlab.diagnostics import per_example_grad_norms
from tests.diagnostics.test_per_example_rounds import NORMS, _per_example_sq

H = 8


class _Layers(nn.Module):
    """Two linear layers, each after a norm: one norm shared by both (``shared``) or one each."""

    def __init__(self, cls, shared):
        super().__init__()
        self.l1, self.l2 = nn.Linear(H, H), nn.Linear(H, H)
        self.n1 = cls(H)
        self.n2 = self.n1 if shared else cls(H)
        self.reentrant = True

    def forward(self, x):
        def seg(h, n, lin):
            return lin(n(h))

        if self.reentrant is None:
            return seg(seg(x, self.n1, self.l1), self.n2, self.l2)
        h = checkpoint(seg, x, self.n1, self.l1, use_reentrant=self.reentrant)
        return checkpoint(seg, h, self.n2, self.l2, use_reentrant=self.reentrant)


@pytest.mark.parametrize("cls", NORMS)
def test_one_norm_in_two_reentrant_segments_is_refused(cls):
    torch.manual_seed(0)
    m = _Layers(cls, shared=True)
    x = torch.randn(4, H, requires_grad=True)
    with per_example_grad_norms(m) as rec:
        for _ in range(2):  # every step, not only the first
            m(x).pow(2).sum().backward()
            with pytest.raises(RuntimeError, match="'n1' ran more than once in one backward"):
                rec["n1"]
            with pytest.raises(RuntimeError, match="use_reentrant=False"):
                rec.total()
    # without checkpointing the shared call is refused in the forward, as before
    m.reentrant = None
    with per_example_grad_norms(m), pytest.raises(RuntimeError, match="called more than once before backward"):
        m(x).pow(2).sum().backward()


@pytest.mark.parametrize("cls", NORMS)
def test_separate_norms_in_reentrant_segments_match_brute_force_every_step(cls):
    torch.manual_seed(0)
    m = _Layers(cls, shared=False)
    xs = [torch.randn(3, H, requires_grad=True) for _ in range(3)]
    with per_example_grad_norms(m) as rec:
        for x in xs:  # one recorder: the reentrant forward runs under no_grad, so no new round starts
            m(x).pow(2).sum().backward()
            got = {name: rec[name]["weight"] for name in ("n1", "n2")}
            m.reentrant = None
            for name in ("n1", "n2"):
                want = _per_example_sq(lambda b, x=x: m(x[b:b + 1]).pow(2).sum(), 3, getattr(m, name).weight)
                torch.testing.assert_close(got[name].double(), want.double(), rtol=1e-5, atol=1e-6)
            m.reentrant = True


def test_a_shared_norm_under_non_reentrant_checkpointing_is_refused_in_the_forward():
    m = _Layers(normlab.LayerNorm, shared=True)
    m.reentrant = False
    with per_example_grad_norms(m), pytest.raises(RuntimeError, match="called more than once before backward"):
        m(torch.randn(4, H)).pow(2).sum().backward()
