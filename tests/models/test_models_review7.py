"""A Block used on its own keeps the causality it was built with, masks padded keys and
applies RoPE; configs with tuple norm options read back equal; load_model takes a
torch.device."""
from __future__ import annotations

import json

import pytest
import torch

from normlab.models import Block, TransformerConfig, TransformerLM, load_model, save_model
from normlab.models.attention import rope_tables, self_attention_mask
from normlab.models.block import Stream
from normlab.models.placement import build_placement


def _block(positional="learned", causal=True, placement="pre"):
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=50, d_model=16, n_heads=2, n_layers=1, dropout=0.0,
                            placement=placement, positional=positional)
    return cfg, Block(cfg, build_placement(cfg, "decoder", 0, 1), causal=causal, cross_attention=False).eval()


@pytest.mark.parametrize("placement", ["pre", "post", "parallel"])
def test_a_causal_block_on_its_own_does_not_read_later_positions(placement):
    _, blk = _block(placement=placement)
    x = torch.randn(2, 6, 16)
    x2 = x.clone()
    x2[:, 5] = torch.randn(16)
    y, y2 = blk(Stream(x)).value, blk(Stream(x2)).value
    torch.testing.assert_close(y[:, :5], y2[:, :5])
    assert not torch.allclose(y[:, 5], y2[:, 5])


def test_a_bidirectional_block_reads_every_position():
    _, blk = _block(causal=False)
    x = torch.randn(1, 6, 16)
    x2 = x.clone()
    x2[:, 5] = torch.randn(16)
    assert not torch.allclose(blk(Stream(x)).value[:, 0], blk(Stream(x2)).value[:, 0])


def test_a_block_on_its_own_masks_padded_keys_as_a_stack_does():
    _, blk = _block()
    x = torch.randn(1, 6, 16)
    pm = torch.tensor([[False] * 4 + [True] * 2])
    x2 = x.clone()
    x2[:, 4:] = torch.randn(2, 16)
    y = blk(Stream(x), padding_mask=pm).value
    torch.testing.assert_close(y[:, :4], blk(Stream(x2), padding_mask=pm).value[:, :4])
    mask, is_causal = self_attention_mask(pm, True)
    torch.testing.assert_close(y, blk(Stream(x), attn_mask=mask, is_causal=is_causal, padding_mask=pm).value)


def test_a_rope_block_on_its_own_applies_rope():
    cfg, blk = _block(positional="rope")
    x = torch.randn(1, 6, 16)
    rope = rope_tables(6, cfg.head_dim, x.dtype, x.device)
    want = blk(Stream(x), is_causal=True, rope=rope).value
    torch.testing.assert_close(blk(Stream(x)).value, want)
    # (without the tables the output differs: the test sees RoPE)
    assert not torch.allclose(blk(Stream(x), is_causal=True, rope=(torch.ones_like(rope[0]), torch.zeros_like(rope[1]))).value, want)


def test_an_explicit_mask_decides_alone():
    _, blk = _block()
    x = torch.randn(1, 5, 16)
    full = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    x2 = x.clone()
    x2[:, 4] = torch.randn(16)
    # a mask given (all allowed) is not made causal behind the caller's back
    assert not torch.allclose(blk(Stream(x), attn_mask=full).value[:, 0], blk(Stream(x2), attn_mask=full).value[:, 0])


def test_tuple_norm_options_read_back_equal(tmp_path):
    cfg = TransformerConfig(vocab_size=50, d_model=16, n_heads=2, n_layers=1, norm_options={"weight_shape": (16,)})
    assert TransformerConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    model = TransformerLM(cfg)
    save_model(model, tmp_path / "m.safetensors")
    assert load_model(tmp_path / "m.safetensors").cfg == cfg


def test_load_model_takes_a_torch_device(tmp_path):
    model = TransformerLM(TransformerConfig(vocab_size=50, d_model=16, n_heads=2, n_layers=1))
    save_model(model, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors", device=torch.device("cpu"))
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(TypeError, match="expected device to be a str, an int \\(a CUDA index\\) or a torch.device, got float"):
        load_model(tmp_path / "m.safetensors", device=0.0)


def test_a_block_pickled_without_rope_dim_still_runs():
    _, blk = _block()
    del blk.__dict__["rope_dim"]  # as a Block pickled before it held one
    x = torch.randn(1, 4, 16)
    assert blk(Stream(x)).value.shape == x.shape
