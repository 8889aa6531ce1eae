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


@pytest.mark.parametrize("name", ["torch", pytest.param("triton", marks=needs_kernels)])
@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm", "dropout_add", "add_rms_norm_offset"])
def test_dropout_with_a_generator_refuses_to_be_recomputed(name, reentrant, op):
    # checkpointing restores torch's global RNG, not the caller's generator: the
    # recomputed forward drew another mask, and the gradients silently used it
    torch.manual_seed(0)
    x = torch.randn(4, H, device=DEVICE, requires_grad=True)
    r, w = torch.randn(4, H, device=DEVICE), torch.randn(H, device=DEVICE, requires_grad=True)
    gen = torch.Generator(device=DEVICE).manual_seed(1)

    def call(t, training=True):
        kw = dict(dropout_p=0.5, training=training, generator=gen)
        if op == "dropout_add":
            return NF.dropout_add(t, r, **kw)
        if op == "add_rms_norm_offset":
            return NF.add_rms_norm(t, r, w, offset=1.0, **kw)[0]
        return (NF.add_rms_norm(t, r, w, **kw) if op == "add_rms_norm" else NF.add_layer_norm(t, r, w, None, **kw))[0]

    with backend(name):
        y = checkpoint(call, x, use_reentrant=reentrant)
        with pytest.raises(RuntimeError, match="explicit generator cannot run again inside a backward pass"):
            y.square().sum().backward()
        # without dropout in force (eval), and outside checkpointing, the generator is fine
        checkpoint(lambda t: call(t, training=False), x, use_reentrant=reentrant).sum().backward()
        call(x).sum().backward()


@pytest.mark.parametrize("training", ["no", 1, torch.tensor(True), None])
def test_training_must_be_a_bool_as_torch_dropout_asks(training):
    x, r = torch.randn(2, H), torch.randn(2, H)
    for p in (0.0, 0.5):  # the short path (no dropout) too
        with pytest.raises(TypeError, match="expected training to be a bool"):
            NF.add_rms_norm(x, r, torch.ones(H), dropout_p=p, training=training)
    with pytest.raises(TypeError, match="expected training to be a bool"):
        NF.add_layer_norm(x, r, torch.ones(H), None, dropout_p=0.5, training=training)
    with pytest.raises(TypeError, match="expected training to be a bool"):
        NF.dropout_add(x, r, dropout_p=0.5, training=training)
    with pytest.raises(TypeError):
        torch.nn.functional.dropout(x, 0.5, training=training)


@needs_kernels
def test_triton_adaln_keeps_no_activation_alive_under_checkpointing():
    # the second-derivative anchors (x, scale) were held on ctx, out of reach of
    # checkpointing's saved-tensor hooks: the checkpointed block's activations stayed alive
    import gc
    import weakref

    lin = nn.Linear(H, H).to(DEVICE)
    x = torch.randn(2, 4, H, device=DEVICE, requires_grad=True)
    s, sh = torch.randn(2, 1, H, device=DEVICE, requires_grad=True), torch.randn(2, 1, H, device=DEVICE)
    refs = []

    def block(x, s, sh):
        h = lin(x) * 2
        refs.append(weakref.ref(h))
        return NF.adaln_modulate(h, s, sh)

    with backend("triton"):
        y = checkpoint(block, x, s, sh, use_reentrant=False)
        gc.collect()
        assert refs[0]() is None
        y.square().sum().backward()
    with backend("torch"):
        x2 = x.detach().clone().requires_grad_()
        NF.adaln_modulate(lin(x2) * 2, s.detach(), sh).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reentrant", [False, True])
def test_the_default_generator_is_restored_by_checkpointing_and_taken(reentrant):
    # checkpointing restores torch's global RNG: a recomputation with it draws the forward's mask
    torch.manual_seed(0)
    x = torch.randn(4, H, requires_grad=True)
    r = torch.randn(4, H)

    def call(t):
        return NF.dropout_add(t, r, dropout_p=0.5, training=True, generator=torch.default_generator).square()

    torch.manual_seed(1)
    checkpoint(call, x, use_reentrant=reentrant).sum().backward()
    got, x.grad = x.grad, None
    torch.manual_seed(1)
    call(x).sum().backward()
    torch.testing.assert_close(got, x.grad, rtol=0, atol=0)
