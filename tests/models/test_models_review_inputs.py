"""Models, from a review of their inputs: a Stack and a Block check their padding masks
and context (shape and dtype, a ValueError naming the argument, not SDPA's error);
Seq2SeqTransformer.decode checks memory's dtype (any under autocast) and forward names
src and tgt when their batches differ; a ResiDual Block on its own starts its dual
stream at x, as a stack does, and a bare tensor for ``stream`` is a TypeError; under
autocast a stack's final norm returns the stream's dtype (float32) under every
placement, and without autocast the same bits as before."""
from __future__ import annotations

import pytest
import torch

from normlab.models import Seq2SeqTransformer, TransformerConfig, TransformerEncoder
from normlab.models.block import Stack, Stream
from normlab.models.placement import build_placement, placement_names


def _cfg(**kw):
    return TransformerConfig(**{**dict(vocab_size=50, d_model=16, n_heads=2, n_layers=2, d_ff=32, dropout=0.0,
                                       max_seq_len=16), **kw})


@pytest.fixture(scope="module")
def s2s():
    torch.manual_seed(0)
    return Seq2SeqTransformer(_cfg()).eval()


X = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------- 1. padding masks


@pytest.mark.parametrize("mask", [torch.zeros(2, 4, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.long),
                                  torch.zeros(3, dtype=torch.bool)], ids=["shape", "long", "1d"])
def test_a_stack_names_a_bad_padding_mask(s2s, mask):
    with pytest.raises(ValueError, match=r"Stack: expected padding_mask of shape \(2, 3\) \(\[B, T\].*torch\.bool"):
        s2s.encoder(X, padding_mask=mask)


@pytest.mark.parametrize("mask", [torch.zeros(2, 5, dtype=torch.bool), torch.zeros(2, 4, dtype=torch.float32)],
                         ids=["shape", "float"])
def test_a_stack_names_a_bad_context_padding_mask(s2s, mask):
    with pytest.raises(ValueError, match=r"expected context_padding_mask of shape \(2, 4\) \(\[B, S\].*torch\.bool"):
        s2s.decoder(X, context=torch.randn(2, 4, 16), context_padding_mask=mask)


def test_a_context_padding_mask_without_context_is_refused(s2s):
    with pytest.raises(ValueError, match="context_padding_mask without context"):
        s2s.encoder(X, context_padding_mask=torch.zeros(2, 4, dtype=torch.bool))


def test_a_block_on_its_own_names_a_bad_padding_mask(s2s):
    with pytest.raises(ValueError, match=r"Block: expected padding_mask of shape \(2, 3\) \(\[B, T\]"):
        s2s.encoder.blocks[0](Stream(X), padding_mask=torch.zeros(2, 4, dtype=torch.bool))


def test_good_masks_still_run_and_mask(s2s):
    pad, cpad = torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 4, dtype=torch.bool)
    pad[1, 2], cpad[0, 3] = True, True
    ctx = torch.randn(2, 4, 16)
    y = s2s.decoder(X, padding_mask=pad, context=ctx, context_padding_mask=cpad)
    ctx2 = ctx.clone()
    ctx2[0, 3] = 1e3  # a padded context position changes nothing
    torch.testing.assert_close(s2s.decoder(X, padding_mask=pad, context=ctx2, context_padding_mask=cpad), y)


# ---------------------------------------------------------------------------- 2. context


@pytest.mark.parametrize("ctx", [torch.randn(2, 4, 8), torch.randn(3, 4, 16), torch.randn(4, 16)],
                         ids=["width", "batch", "2d"])
def test_a_block_names_a_bad_context(s2s, ctx):
    with pytest.raises(ValueError, match=r"Block: expected context of shape \[B, S, d_model\] = \[2, S, 16\]"):
        s2s.decoder.blocks[0](Stream(X), context=ctx)
    with pytest.raises(ValueError, match=r"Stack: expected context of shape \[B, S, d_model\]"):
        s2s.decoder(X, context=ctx)


# ---------------------------------------------------------------------------- 3. memory, src/tgt


def test_decode_names_memory_of_another_dtype(s2s):
    tgt = torch.randint(0, 50, (2, 3))
    memory = torch.randn(2, 4, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"expected memory as the model's parameters: torch\.float32.*got torch\.float64"):
        s2s.decode(tgt, memory)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for dtype in (torch.float16, torch.bfloat16):  # autocast casts them, as AdaLN's cond
            assert s2s.decode(tgt, memory.to(dtype)).shape == (2, 3, 50)
        with pytest.raises(ValueError, match=r"expected memory .*got torch\.float64"):  # not float64
            s2s.decode(tgt, memory)


def test_forward_names_src_and_tgt_of_different_batches(s2s):
    with pytest.raises(ValueError, match=r"expected src and tgt of one batch size, got src of shape \[2, 3\] "
                                         r"and tgt of shape \[3, 3\]"):
        s2s(torch.randint(0, 50, (2, 3)), torch.randint(0, 50, (3, 3)))


# ---------------------------------------------------------------------------- 4. ResiDual Block, stream type


def test_a_resi_dual_block_on_its_own_is_the_stacks_block():
    torch.manual_seed(0)
    cfg = _cfg(placement="resi_dual", n_layers=1)
    stack = Stack(cfg, build_placement(cfg, "encoder", 1, 0), 1, causal=False).eval()
    seen = []
    hook = stack.blocks[0].register_forward_hook(lambda m, a, out: seen.append(out))
    y = stack(X)
    hook.remove()
    alone = stack.blocks[0](Stream(X))
    assert torch.equal(alone.x, seen[0].x) and torch.equal(alone.dual, seen[0].dual)
    assert torch.equal(alone.x + stack.final_norm(alone.dual), y)
    # a dual stream given is kept: d_1 = d_0 + f, whatever d_0 is
    d0 = torch.randn_like(X)
    torch.testing.assert_close(stack.blocks[0](Stream(X, None, d0)).dual - d0, alone.dual - X)


def test_a_bare_tensor_for_stream_is_a_type_error(s2s):
    with pytest.raises(TypeError, match=r"expected stream to be a normlab\.models\.block\.Stream .*got Tensor"):
        s2s.encoder.blocks[0](X)


# ---------------------------------------------------------------------------- 5. final norm dtype


def _old_stack_output(m, s: Stream) -> torch.Tensor:
    """What run_blocks returned from the last block's stream before the fix (eval, no dropout)."""
    if m.final_norm is None:
        return s.x if s.pending is None else s.x + s.pending
    if m.placement.final_norm_reads == "dual":
        return s.x + m.final_norm(s.dual)
    return m.final_norm(s.x) if s.pending is None else m.final_norm(s.pending, s.x)[0]


@pytest.mark.parametrize("placement", placement_names())
def test_the_final_norm_returns_the_streams_dtype_under_autocast(placement):
    torch.manual_seed(0)
    m = TransformerEncoder(_cfg(placement=placement)).eval()
    tokens = torch.randint(0, 50, (2, 5))
    last = []
    hook = m.blocks[-1].register_forward_hook(lambda mod, a, out: last.append(out))
    with torch.no_grad():
        y = m(tokens)
        assert torch.equal(y, _old_stack_output(m, last[-1]))  # float32: the same bits as before
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_bf16 = m(tokens)
    hook.remove()
    assert last[-1].x.dtype == torch.float32
    assert y_bf16.dtype == torch.float32, placement
    assert float((y_bf16 - y).abs().max() / y.abs().max()) < 0.05, placement


# ---------------------------------------------------------------------------- the checks compile


def test_the_checks_compile_in_one_graph(s2s):
    """The checks read shapes and dtypes only: Dynamo traces the whole seq2seq model, masks
    and memory check included, in one graph."""
    src, tgt = torch.randint(0, 50, (2, 4)), torch.randint(0, 50, (2, 3))
    src_pad, tgt_pad = torch.zeros(2, 4, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.bool)
    src_pad[0, 3] = True
    compiled = torch.compile(s2s, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(src, tgt, src_pad, tgt_pad), s2s(src, tgt, src_pad, tgt_pad))


def test_a_cross_attention_block_on_its_own_takes_the_contexts_padding_mask(s2s):
    # it had no context_padding_mask: only context_mask, unchecked and of the opposite
    # sense (True = may attend), which a padding mask passed as it is silently inverted
    from normlab.models.attention import cross_attention_mask

    block = s2s.decoder.blocks[0]
    ctx, cpad = torch.randn(2, 4, 16), torch.zeros(2, 4, dtype=torch.bool)
    cpad[0, 2:] = True
    y = block(Stream(X), context=ctx, context_padding_mask=cpad)
    torch.testing.assert_close(y.value, block(Stream(X), context=ctx, context_mask=cross_attention_mask(cpad)).value)
    ctx2 = ctx.clone()
    ctx2[0, 2:] = 1e3  # padded context positions change nothing
    torch.testing.assert_close(block(Stream(X), context=ctx2, context_padding_mask=cpad).value, y.value)
    assert not torch.allclose(block(Stream(X), context=ctx).value, y.value)
    with pytest.raises(ValueError, match=r"Block: expected context_padding_mask .*\[B, S\] of the context"):
        block(Stream(X), context=ctx, context_padding_mask=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="Block: got a context mask without context"):
        s2s.encoder.blocks[0](Stream(X), context_padding_mask=cpad)
    with pytest.raises(ValueError, match="Block: got both context_padding_mask and context_mask"):
        block(Stream(X), context=ctx, context_padding_mask=cpad, context_mask=cross_attention_mask(cpad))
