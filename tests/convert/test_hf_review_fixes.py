"""Review fixes in the Hugging Face integration: output dtypes of the swapped RMSNorms on
half-precision input to float32 weights, pickling fused models while a patch is active,
hooks on a fused norm, and re-entering a patch handle."""

import io
import pickle

import pytest
import torch

from normlab.convert import fuse, unfuse
from normlab.convert.blocks import _add_norm
from normlab.convert.detect import semantics
from normlab.convert.fused import is_fused

transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install 'normlab[hf]')")
from normlab.integrations.hf import LlamaStyleRMSNorm, T5StyleRMSNorm, apply_normlab, patch  # noqa: E402

ml = pytest.importorskip("transformers.models.llama.modeling_llama")


def _llama_cfg():
    return transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, vocab_size=64)


def _qwen3_cfg():
    return transformers.Qwen3Config(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, vocab_size=64, head_dim=8)


def _t5_cfg():
    return transformers.T5Config(d_model=16, d_ff=32, d_kv=8, num_layers=2, num_heads=2, vocab_size=64)


def _build(cls, cfg, seed=0):
    """A float32 model in eval mode with norm weights away from 1."""
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _variants(cls, cfg, arch):
    """(original, apply_normlab'd copy, built under patch(arch) with the same weights)."""
    orig = _build(cls, cfg)
    applied = _build(cls, cfg)
    apply_normlab(applied)
    with patch(arch):
        patched = cls(cfg).eval()
    patched.load_state_dict(orig.state_dict())
    return orig, applied, patched


_IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------- 1. output dtype: bf16 input, fp32 weight


def test_llama_fp32_model_on_bf16_embeddings_matches_the_original():
    orig, applied, patched = _variants(transformers.LlamaForCausalLM, _llama_cfg(), "llama")
    emb = orig.model.embed_tokens(_IDS).detach().bfloat16()
    with torch.no_grad():
        want = orig(inputs_embeds=emb).logits
        assert want.dtype is torch.float32
        for model in (applied, patched):
            got = model(inputs_embeds=emb).logits
            assert got.dtype is want.dtype
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # float32 input: identical, as before
    with torch.no_grad():
        want = orig(_IDS).logits
        for model in (applied, patched):
            torch.testing.assert_close(model(_IDS).logits, want, atol=0, rtol=0)


def test_swapped_llama_norms_are_promoted_and_still_plain_for_the_transforms():
    from normlab.convert.detect import PromotedRMSNorm

    applied = _build(transformers.LlamaForCausalLM, _llama_cfg())
    apply_normlab(applied)
    norm = applied.model.layers[0].input_layernorm
    assert isinstance(norm, PromotedRMSNorm)
    for m in (norm, LlamaStyleRMSNorm(16), ml.LlamaRMSNorm(16)):
        sem = semantics(m)
        assert sem.output_dtype == "promoted" and sem.plain and sem.casting_mode == "torch"
    # equal dtypes: normlab's numerics (one rounding), the input's dtype
    x = torch.randn(3, 16).bfloat16()
    assert norm.bfloat16()(x).dtype is torch.bfloat16


@pytest.mark.parametrize("fused_input_dtype", [torch.bfloat16, torch.float32])
def test_fused_add_norm_returns_the_unfused_blocks_dtype(fused_input_dtype):
    """The fused Llama block's norm after attention, on bf16 x and residual with a float32
    weight: LlamaRMSNorm(residual + x) is float32."""
    torch.manual_seed(0)
    hf = ml.LlamaRMSNorm(16, eps=1e-6)
    with torch.no_grad():
        hf.weight.add_(torch.randn(16) * 0.3)
    ours = LlamaStyleRMSNorm(16, eps=1e-6)
    ours.load_state_dict(hf.state_dict())
    x, r = torch.randn(2, 5, 16).to(fused_input_dtype), torch.randn(2, 5, 16).bfloat16()
    want = hf(r + x)
    out, new_residual = _add_norm(ours, x, r)
    assert out.dtype is want.dtype
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    torch.testing.assert_close(new_residual, r + x, atol=0, rtol=0)
    # and the whole fused layer, on bf16 hidden states
    torch.manual_seed(0)
    layer = ml.LlamaDecoderLayer(_llama_cfg(), 0).eval()
    with torch.no_grad():
        layer.post_attention_layernorm.weight.add_(torch.randn(16) * 0.3)
    fused = ml.LlamaDecoderLayer(_llama_cfg(), 0).eval()
    fused.load_state_dict(layer.state_dict())
    for name in ("input_layernorm", "post_attention_layernorm"):
        new = LlamaStyleRMSNorm(16, eps=getattr(fused, name).variance_epsilon)
        new.load_state_dict(getattr(fused, name).state_dict())
        setattr(fused, name, new)
    fuse(fused)
    h = torch.randn(2, 5, 16).bfloat16()
    rope = ml.LlamaRotaryEmbedding(_llama_cfg())
    pe = rope(h, torch.arange(5)[None].expand(2, -1))
    with torch.no_grad():
        want, got = layer(h, position_embeddings=pe), fused(h, position_embeddings=pe)
    assert got.dtype is want.dtype
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_qwen3_fp32_model_under_bf16_autocast_matches_the_original():
    orig, applied, patched = _variants(transformers.Qwen3ForCausalLM, _qwen3_cfg(), "qwen3")
    seen = {}
    for name, model in (("orig", orig), ("applied", applied), ("patched", patched)):
        model.model.layers[0].self_attn.q_norm.register_forward_hook(
            lambda m, i, o, name=name: seen.setdefault(name, (i[0].dtype, o.dtype)) and None)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = orig(_IDS).logits
        got = [applied(_IDS).logits, patched(_IDS).logits]
    assert seen["orig"] == (torch.bfloat16, torch.float32)
    assert seen["applied"] == seen["patched"] == seen["orig"]
    for g in got:
        assert g.dtype is want.dtype
        torch.testing.assert_close(g, want, atol=1e-6, rtol=0)


def test_t5_encoder_fp32_model_on_bf16_embeddings_matches_the_original():
    orig, applied, patched = _variants(transformers.T5EncoderModel, _t5_cfg(), "t5")
    emb = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0)).bfloat16()
    with torch.no_grad():
        want = orig(inputs_embeds=emb).last_hidden_state
        got_patched = patched(inputs_embeds=emb).last_hidden_state
        got_applied = applied(inputs_embeds=emb).last_hidden_state
    assert want.dtype is got_patched.dtype is got_applied.dtype is torch.float32
    # patch: T5StyleRMSNorm computes in float32, as T5LayerNorm
    torch.testing.assert_close(got_patched, want, atol=1e-6, rtol=1e-6)
    # apply_normlab: T5LayerNorm is swapped for PromotedRMSNorm, which rounds the
    # normalized input to bf16 before the weight (Llama's order): within bf16 rounding
    torch.testing.assert_close(got_applied, want, atol=3e-2, rtol=2e-2)
    # float32 input: identical
    with torch.no_grad():
        want = orig(inputs_embeds=emb.float()).last_hidden_state
        torch.testing.assert_close(patched(inputs_embeds=emb.float()).last_hidden_state, want, atol=0, rtol=0)
    assert T5StyleRMSNorm(16)(emb).dtype is torch.float32
    assert T5StyleRMSNorm(16).bfloat16()(emb.float()).dtype is torch.bfloat16


# --------------------------------------------------- 2. pickling while a patch is active


def _logits(model):
    with torch.no_grad():
        return model(_IDS).logits


def test_models_pickle_while_their_patch_is_active():
    original = ml.LlamaDecoderLayer
    applied = _build(transformers.LlamaForCausalLM, _llama_cfg())
    apply_normlab(applied)
    outside = pickle.dumps(applied)
    with patch("llama"):
        built = transformers.LlamaForCausalLM(_llama_cfg()).eval()
        for model in (built, applied):
            want = _logits(model)
            copies = [pickle.loads(pickle.dumps(model))]
            buf = io.BytesIO()
            torch.save(model, buf)
            buf.seek(0)
            copies.append(torch.load(buf, weights_only=False))
            for c in copies:
                assert type(c.model.layers[0]) is type(model.model.layers[0])
                torch.testing.assert_close(_logits(c), want, atol=0, rtol=0)
        # pickled outside the patch, loaded inside: fused once, not a fused fused class
        inside = pickle.loads(outside)
    layer = inside.model.layers[0]
    assert is_fused(layer) and type(layer).__mro__[1] is original
    torch.testing.assert_close(_logits(inside), _logits(applied), atol=0, rtol=0)
    unfuse(layer)
    assert type(layer) is original


def test_gpt2_apply_normlab_model_pickles_under_patch():
    cfg = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    apply_normlab(model)
    with patch("gpt2"):
        copy = pickle.loads(pickle.dumps(model))
    assert type(copy.transformer.h[0]) is type(model.transformer.h[0])
    torch.testing.assert_close(_logits(copy), _logits(model), atol=0, rtol=0)


# ------------------------------------------------------------ 3. hooks on a fused norm


def test_hooks_on_a_fused_norm_see_the_original_call():
    orig, applied, patched = _variants(transformers.LlamaForCausalLM, _llama_cfg(), "llama")
    assert is_fused(applied.model.layers[0]) and is_fused(patched.model.layers[0])
    seen = {}
    for name, model in (("orig", orig), ("applied", applied), ("patched", patched)):
        norm = model.model.layers[0].post_attention_layernorm
        norm.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, (len(i), type(o))))
        norm.register_forward_pre_hook(lambda m, args: (args[0] * 2.0,))
    with torch.no_grad():
        want = orig(_IDS).logits
        for model in (applied, patched):
            torch.testing.assert_close(model(_IDS).logits, want, atol=1e-6, rtol=0)
            model(_IDS[:1])  # a batch of one: the pre-hook's tuple is not unpacked as (out, residual)
    assert seen == {k: (1, torch.Tensor) for k in ("orig", "applied", "patched")}


def test_global_module_hooks_see_the_original_call_of_a_fused_norm():
    orig, applied, _ = _variants(transformers.LlamaForCausalLM, _llama_cfg(), "llama")
    targets = {id(m.model.layers[0].post_attention_layernorm): name for name, m in (("orig", orig),
                                                                                     ("applied", applied))}
    seen = {}

    def hook(m, i, o):
        if id(m) in targets:
            seen[targets[id(m)]] = (len(i), type(o))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        with torch.no_grad():
            want = orig(_IDS).logits
            torch.testing.assert_close(applied(_IDS).logits, want, atol=0, rtol=0)
    finally:
        handle.remove()
    assert seen == {"orig": (1, torch.Tensor), "applied": (1, torch.Tensor)}


# --------------------------------------------------------- 4. re-entering a patch handle


def test_a_patch_handle_patches_again_in_a_second_with_block():
    original = ml.LlamaRMSNorm
    p = patch("llama")
    with p:
        m1 = transformers.LlamaForCausalLM(_llama_cfg())
    assert ml.LlamaRMSNorm is original and "active=False" in repr(p)
    with p:
        assert "active=True" in repr(p)
        m2 = transformers.LlamaForCausalLM(_llama_cfg())
    assert isinstance(m1.model.norm, LlamaStyleRMSNorm) and isinstance(m2.model.norm, LlamaStyleRMSNorm)
    assert is_fused(m2.model.layers[0])
    assert ml.LlamaRMSNorm is original and "active=False" in repr(p)
    p.undo()  # still nothing to undo
    assert ml.LlamaRMSNorm is original


def test_promoted_fused_norm_normalizes_the_stored_float32_residual():
    # with residual_dtype=float32 the sum was rounded to the input's dtype before the norm
    # (0.02 off the unfused norm of the stored residual)
    from normlab.convert.detect import PromotedRMSNorm

    torch.manual_seed(0)
    norm = PromotedRMSNorm(16)
    x, res = torch.randn(2, 16).bfloat16(), torch.randn(2, 16)
    out, new_res = norm(x, res, residual_dtype=torch.float32)
    assert out.dtype == new_res.dtype == torch.float32
    assert torch.equal(out, norm(new_res))


@pytest.mark.parametrize("swap_first", [False, True])
def test_a_folded_promoted_norm_keeps_the_dtype_the_next_layer_takes(swap_first):
    # the weightless norm a folded LlamaRMSNorm became kept bf16: a float32 model fed bf16
    # inputs_embeds stopped at the next float32 Linear with a dtype error
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from normlab.convert import fold_norm_affine
    from normlab.convert.detect import PromotedRMSNorm
    from normlab.integrations.hf import apply_normlab

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64)
    original = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in original.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    folded = copy.deepcopy(original)
    if swap_first:
        apply_normlab(folded)
    fold_norm_affine(folded)
    norm = folded.model.layers[0].input_layernorm
    assert isinstance(norm, PromotedRMSNorm) and norm.weight is None and norm.weight_dtype == torch.float32
    ids = torch.randint(0, 64, (2, 6))
    emb = original.model.embed_tokens(ids).detach().bfloat16()
    want, got = original(inputs_embeds=emb).logits, folded(inputs_embeds=emb).logits
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded(ids).logits, original(ids).logits, rtol=1e-5, atol=1e-5)
