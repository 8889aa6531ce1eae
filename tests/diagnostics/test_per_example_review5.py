"""per_example_grad_norms, from a review against brute-force per-example gradients: a
LayerNorm subclass with a forward of its own is left out (it normalizes other dims than
the hooks would), an input modified in place after the norm is refused rather than read
changed, a fused norm's input is not kept alive by the recorder, a create_graph backward
leaves no graph in the numbers, and a converted Llama norm computes the same output
while recorded."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import normlab
from normlab.diagnostics import per_example_grad_norms


class _ChannelsFirstLayerNorm(nn.LayerNorm):
    """As Hugging Face's ConvNext norm: input [B, C, W], normalized over C."""

    def forward(self, x):
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class _PlainSubclass(nn.LayerNorm):
    pass


def test_a_norm_subclass_with_its_own_forward_is_not_recorded():
    torch.manual_seed(0)
    model = nn.ModuleDict({"cf": _ChannelsFirstLayerNorm(4), "plain": _PlainSubclass(6)})
    x, cot = torch.randn(3, 4, 6), torch.randn(3, 4, 6)
    with per_example_grad_norms(model) as rec:
        (model["plain"](model["cf"](x)) * cot).sum().backward()
        assert set(rec.keys()) == {"plain"}
        with pytest.raises(KeyError, match="forward of its own"):
            rec["cf"]
        got = rec["plain"]
    for b in range(3):  # the plain subclass against brute force
        model.zero_grad()
        (model["plain"](model["cf"](x[b:b + 1])) * cot[b:b + 1]).sum().backward()
        for k in ("weight", "bias"):
            torch.testing.assert_close(got[k][b], getattr(model["plain"], k).grad.square().sum())


def test_an_input_modified_in_place_after_the_norm_is_refused():
    torch.manual_seed(0)
    model = nn.ModuleDict({"lin": nn.Linear(8, 8), "norm": nn.RMSNorm(8)}).bfloat16()
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    with per_example_grad_norms(model):
        h = model["lin"](x)
        y = model["norm"](h)
        h += 1.0  # torch's own backward accepts it: its half-precision RMSNorm saved an upcast copy
        with pytest.raises(RuntimeError, match="modified in place"):
            (y + h).float().sum().backward()


@pytest.mark.parametrize("norm", [normlab.LayerNorm, normlab.RMSNorm])
def test_a_fused_norms_input_is_not_kept_alive_by_the_recorder(norm):
    model = nn.ModuleDict({"lin": nn.Linear(64, 64), "norm": norm(64)})
    with per_example_grad_norms(model) as rec:
        h = model["lin"](torch.randn(4, 256, 64))
        ptr = h.data_ptr()
        y = model["norm"](h)
        y.sum().backward()
        del h
        gc.collect()
        alive = [o for o in gc.get_objects() if type(o) in (torch.Tensor, nn.Parameter) and o.data_ptr() == ptr]
        assert alive == [], "the norm's input outlived the backward while its output is kept"
        assert rec["norm"]["weight"].shape == (4,)
    del y


@pytest.mark.parametrize("norm", [normlab.LayerNorm, nn.LayerNorm, normlab.RMSNorm])
def test_a_create_graph_backward_leaves_no_graph_in_the_numbers(norm):
    torch.manual_seed(0)
    model = nn.ModuleDict({"lin": nn.Linear(8, 8), "norm": norm(8)})
    x = torch.randn(3, 5, 8, requires_grad=True)
    with per_example_grad_norms(model) as rec:
        y = model["norm"](model["lin"](x))
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)  # a gradient penalty
        first = rec["norm"]
        assert all(not t.requires_grad and t.grad_fn is None for t in first.values())
        gx.square().sum().backward()
        model.zero_grad()
        y = model["norm"](model["lin"](x))
        (y * torch.randn_like(y)).sum().backward()
        again = rec["norm"]
    assert again["weight"].shape == (3,) and not again["weight"].requires_grad


def test_a_converted_llama_norm_computes_the_same_output_while_recorded():
    from normlab.convert.detect import PromotedRMSNorm
    torch.manual_seed(0)
    norm = PromotedRMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    model = nn.ModuleDict({"norm": norm})
    x = (torch.randn(2, 3, 8) * 3).bfloat16().requires_grad_()
    outside = norm(x)
    assert outside.dtype == torch.float32  # llama's order: the weight's wider dtype
    with per_example_grad_norms(model) as rec:
        inside = norm(x)
        assert torch.equal(inside, outside)
        cot = torch.randn(2, 3, 8)
        (inside * cot).sum().backward()
        got = rec["norm"]["weight"]
    want = []
    for b in range(2):
        (g,) = torch.autograd.grad((norm(x[b:b + 1]) * cot[b:b + 1]).sum(), norm.weight)
        want.append(g.square().sum())
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-2, atol=1e-3)


def test_a_kept_evaluation_pass_under_grad_is_named_in_the_next_forwards_error():
    # torch's norms (hooks) refuse the next forward; the error names the kept pass as a
    # cause, beside shared parameters, as docs/diagnostics.md says
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 1))
    x = torch.randn(3, 4, 8)
    with per_example_grad_norms(model):
        kept = model(x).mean()  # a validation loss computed under grad, kept for logging
        with pytest.raises(RuntimeError, match=r"called more than once(.|\n)*torch\.no_grad"):
            model(x).square().sum().backward()
    assert kept.requires_grad
