"""Post-LN and Pre-LN with LayerNorm reproduce torch.nn.TransformerEncoderLayer(norm_first=False/True)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normlab.models import TransformerConfig, TransformerEncoder, TransformerLM


def _copy_block(ours, theirs, placement):
    a = ours.attn
    with torch.no_grad():
        theirs.self_attn.in_proj_weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        theirs.self_attn.in_proj_bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
        theirs.self_attn.out_proj.weight.copy_(a.out_proj.weight)
        theirs.self_attn.out_proj.bias.copy_(a.out_proj.bias)
        theirs.linear1.weight.copy_(ours.ffn.w1.weight)
        theirs.linear1.bias.copy_(ours.ffn.w1.bias)
        theirs.linear2.weight.copy_(ours.ffn.w2.weight)
        theirs.linear2.bias.copy_(ours.ffn.w2.bias)
        slot = "add" if placement == "post" else "in"
        for norm, sub in ((theirs.norm1, "attn"), (theirs.norm2, "ffn")):
            mine = ours.norms[f"{sub}_{slot}"]
            mine.weight.normal_(1.0, 0.3)      # non-trivial affine, the same on both sides
            mine.bias.normal_(0.0, 0.3)
            norm.weight.copy_(mine.weight)
            norm.bias.copy_(mine.bias)


def _torch_stack(model, placement, cfg, dtype):
    layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, dropout=cfg.dropout,
                                       activation=cfg.activation, batch_first=True,
                                       norm_first=placement == "pre", dtype=dtype)
    final = nn.LayerNorm(cfg.d_model, dtype=dtype) if placement == "pre" else None
    ref = nn.TransformerEncoder(layer, cfg.n_layers, norm=final, enable_nested_tensor=False)
    for ours, theirs in zip(model.blocks, ref.layers, strict=True):
        _copy_block(ours, theirs, placement)
    if final is not None:
        with torch.no_grad():
            model.final_norm.weight.normal_(1.0, 0.3)
            final.weight.copy_(model.final_norm.weight)
            final.bias.copy_(model.final_norm.bias)
    return ref.eval()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("placement", ["post", "pre"])
def test_encoder_matches_torch(placement, activation, dtype, tol):
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=11, d_model=32, n_heads=4, n_layers=2, d_ff=48, dropout=0.1,
                            activation=activation, placement=placement, norm="layernorm")
    model = TransformerEncoder(cfg).to(dtype).eval()
    ref = _torch_stack(model, placement, cfg, dtype)
    x = torch.randn(3, 9, cfg.d_model, dtype=dtype)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[1, 6:] = True
    pad[2, 2:] = True
    torch.testing.assert_close(model.run_blocks(x), ref(x), rtol=tol, atol=tol)
    real = ~pad  # at padded positions torch attends to real keys only, normlab also to itself
    torch.testing.assert_close(model.run_blocks(x, padding_mask=pad)[real],
                               ref(x, src_key_padding_mask=pad)[real], rtol=tol, atol=tol)


@pytest.mark.parametrize("placement", ["post", "pre"])
def test_causal_lm_matches_torch(placement):
    torch.manual_seed(1)
    cfg = TransformerConfig(vocab_size=11, d_model=16, n_heads=2, n_layers=2, d_ff=32, dropout=0.0,
                            activation="relu", placement=placement)
    model = TransformerLM(cfg).double().eval()
    ref = _torch_stack(model, placement, cfg, torch.float64)
    x = torch.randn(2, 7, cfg.d_model, dtype=torch.float64)
    causal = nn.Transformer.generate_square_subsequent_mask(7, dtype=torch.float64)
    torch.testing.assert_close(model.run_blocks(x), ref(x, mask=causal, is_causal=True),
                               rtol=1e-12, atol=1e-12)
