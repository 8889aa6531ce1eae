"""Activation checkpointing (torch.utils.checkpoint, as Hugging Face's
gradient_checkpointing_enable uses it): every op's backward unpacks its saved tensors
once, which non-reentrant checkpointing requires; the gradients equal the plain run's."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import normlab
import normlab.functional as NF
from tests.ops.helpers import DEVICE, backend, needs_kernels

H = 16


class _Block(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.lin = nn.Linear(H, H)
        self.norm = (normlab.RMSNorm if kind.startswith("rms") else normlab.LayerNorm)(H)
        self.mod = nn.Linear(H, 2 * H)

    def forward(self, x, residual):
        h = self.lin(x)
        if self.kind == "adaln":
            scale, shift = self.mod(residual.mean(1, keepdim=True)).chunk(2, -1)
            return NF.adaln_modulate(h, scale, shift, weight=self.norm.weight, bias=self.norm.bias), residual
        if self.kind.endswith("alone"):  # the norm alone (the public ops' short paths)
            return self.norm(h + residual), residual
        return self.norm(h, residual)  # the fused residual add + norm: (out, new residual)


def _grads(block, x, r, ckpt, collect):
    block.zero_grad()
    x, r = x.clone().requires_grad_(), r.clone().requires_grad_()
    if collect:
        block.norm.collect_per_example_grad_sq = True
    try:
        out, res = checkpoint(block, x, r, use_reentrant=False) if ckpt else block(x, r)
        (out.sin().sum() + res.cos().sum()).backward()
    finally:
        block.norm.collect_per_example_grad_sq = False
    return [x.grad, r.grad] + [p.grad for p in block.parameters()]


@pytest.mark.parametrize("name", ["torch", pytest.param("triton", marks=needs_kernels)])
@pytest.mark.parametrize("kind", ["layer", "rms", "layer-alone", "rms-alone", "adaln"])
@pytest.mark.parametrize("collect", [False, True])
def test_non_reentrant_checkpointing(name, kind, collect):
    if kind == "adaln" and collect:
        pytest.skip("per-example norms are the norms' (AdaLN takes none)")
    torch.manual_seed(0)
    block = _Block(kind).to(DEVICE)
    x, r = torch.randn(3, 5, H, device=DEVICE), torch.randn(3, 5, H, device=DEVICE)
    with backend(name):
        plain = _grads(block, x, r, False, collect)
        ckpt = _grads(block, x, r, True, collect)
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b)
