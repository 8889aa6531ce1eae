"""Models, from a review: an 'add' slot's output (the next residual) keeps the stream's
dtype under autocast, a decoder block without context and an encoder block with one are
refused, and configs, checkpoints and Attention name what is wrong with their input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from normlab.models import Seq2SeqTransformer, TransformerConfig, TransformerEncoder, TransformerLM
from normlab.models.attention import Attention
from normlab.models.block import Stack
from normlab.models.checkpoint import load_model, save_model
from normlab.models.placement import build_placement


def _cfg(**kw):
    base = dict(vocab_size=32, d_model=32, n_heads=4, n_layers=6, d_ff=64, dropout=0.0, max_seq_len=16)
    return TransformerConfig(**{**base, **kw})


@pytest.mark.parametrize("placement", ["post", "deepnorm", "resi_dual", "pre", "none"])
def test_autocast_keeps_the_stream_float32(placement):
    torch.manual_seed(0)
    model = TransformerLM(_cfg(placement=placement))
    tokens = torch.randint(0, 32, (2, 12))
    streams, last = [], []
    hooks = [b.register_forward_hook(lambda m, a, out: streams.append(out.x.dtype)) for b in model.blocks]
    hooks.append(model.blocks[-1].register_forward_hook(lambda m, a, out: last.append(out.value.detach().float())))
    model(tokens)
    streams.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(tokens)
    for h in hooks:
        h.remove()
    assert streams == [torch.float32] * 6
    if placement == "deepnorm":
        # the error is the branches' bf16 matmuls', not a bf16 stream's: alpha * x rounded
        # to bf16 at every sublayer gave 0.008
        assert float((last[1] - last[0]).abs().mean() / last[0].abs().mean()) < 0.002


def test_add_slot_output_is_the_norm_of_the_float32_sum():
    torch.manual_seed(0)
    model = TransformerLM(_cfg(placement="deepnorm", n_layers=1))
    block = model.blocks[0]
    x = torch.randn(2, 5, 32)
    seen = {}
    block.norms["attn_add"].register_forward_hook(lambda m, a, out: seen.setdefault("in", a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        from normlab.models.block import Stream
        out = block.sublayer("attn", Stream(x), lambda h: block.attn(h, is_causal=True), 0.0, None)
    f, residual = seen["in"]
    assert f.dtype == residual.dtype == torch.float32 and out.x.dtype == torch.float32


def test_decoder_block_needs_context_and_encoder_block_refuses_one():
    cfg = _cfg(n_layers=2)
    dec = Stack(cfg, build_placement(cfg, "decoder", 2, 2), 2, causal=True, cross_attention=True)
    enc = Stack(cfg, build_placement(cfg, "encoder", 2, 2), 2, causal=False)
    x, mem = torch.randn(2, 6, 32), torch.randn(2, 4, 32)
    assert dec(x, context=mem).shape == (2, 6, 32)
    with pytest.raises(ValueError, match="expects context"):
        dec(x)
    with pytest.raises(ValueError, match="no cross-attention"):
        enc(x, context=mem)
    model = Seq2SeqTransformer(_cfg(n_layers=1, n_decoder_layers=1))  # passes the memory itself
    assert model(torch.randint(0, 32, (2, 5)), torch.randint(0, 32, (2, 4))).shape[:2] == (2, 4)


def test_seq2seq_names_the_sequence_too_long():
    model = Seq2SeqTransformer(_cfg(n_layers=1, n_decoder_layers=1, max_seq_len=8))
    with pytest.raises(ValueError, match="expected src with seq_len <= max_seq_len=8, got seq_len 12"):
        model(torch.zeros(1, 12, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="expected tgt with seq_len"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 12, dtype=torch.long))


def test_numpy_bool_option_is_saved_and_loaded(tmp_path):
    cfg = _cfg(n_layers=1, norm_options={"elementwise_affine": np.bool_(False)})
    assert type(cfg.norm_options["elementwise_affine"]) is bool
    json.dumps(cfg.to_dict())
    save_model(TransformerLM(cfg), tmp_path / "m.safetensors")
    assert load_model(tmp_path / "m.safetensors").cfg == cfg


def test_load_model_names_bad_metadata(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "a.safetensors"
    save_file({"w": torch.zeros(1)}, path, metadata={"normlab.model": "TransformerLM"})
    with pytest.raises(ValueError, match="a.safetensors' has no normlab.config entry"):
        load_model(path)
    save_file({"w": torch.zeros(1)}, path, metadata={"normlab.model": "TransformerLM", "normlab.config": "{oops"})
    with pytest.raises(ValueError, match="normlab.config that is not JSON"):
        load_model(path)


def test_config_checks_the_ffn_inner_norm_at_d_ff():
    with pytest.raises(ValueError, match="inside the FFN, over d_ff=32 features.*groups"):
        TransformerConfig(norm="powernorm", norm_options={"groups": 3}, d_model=12, n_heads=3, placement="subln",
                          d_ff=32)
    TransformerConfig(norm="powernorm", norm_options={"groups": 3}, d_model=12, n_heads=3, placement="subln", d_ff=36)


def test_config_refuses_eps_in_norm_options_and_hashes():
    with pytest.raises(ValueError, match="norm_options sets eps.*norm_eps"):
        _cfg(norm_options={"eps": 1e-6})
    a, b = _cfg(norm="dyt", norm_options={"alpha_init": 0.7}), _cfg(norm="dyt", norm_options={"alpha_init": 0.7})
    assert a == b and hash(a) == hash(b) and len({a, b, _cfg()}) == 2


def test_attention_checks_its_sizes():
    with pytest.raises(ValueError, match=r"d_model \(10\) to be divisible by n_heads \(3\)"):
        Attention(10, 3)
    with pytest.raises(ValueError, match=r"d_model \(8\) to be divisible by n_heads \(16\)"):
        Attention(8, 16)
    with pytest.raises(ValueError, match="n_heads to be an int >= 1, got 0"):
        Attention(8, 0)
    with pytest.raises(ValueError, match="attention_dropout in"):
        Attention(8, 2, 1.5)
    assert Attention(np.int64(8), np.int64(2)).head_dim == 4


def test_encoder_takes_a_numpy_head_width():
    model = TransformerEncoder(_cfg(n_layers=1), n_outputs=np.int64(3))
    assert model.head.out_features == 3 and type(model.head.out_features) is int
