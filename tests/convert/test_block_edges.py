"""Known blocks at their edges: a user subclass with its own forward, autocast's mixed
dtypes in the residual stream, GPT-2's KV cache under either keyword, hooks on a norm,
norms the probe must tell apart (eps placement, float32 input to half parameters)."""

import copy
import warnings

import pytest
import torch
from torch import nn

from normlab.convert import swap_norms

transformers = pytest.importorskip("transformers")
from normlab.integrations.hf import apply_normlab  # noqa: E402

transformers.logging.set_verbosity_error()


def _llama(layers=2):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, vocab_size=128)
    return cfg, transformers.LlamaForCausalLM(cfg).eval()


def _gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64, resid_pdrop=0, embd_pdrop=0,
        attn_pdrop=0)).eval()


def test_a_subclass_with_its_own_forward_is_not_fused():
    from transformers.models.llama import modeling_llama as ML

    class ScaledLayer(ML.LlamaDecoderLayer):
        def forward(self, hidden_states, **kw):  # layer scale 0.5
            h, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kw)
            hidden_states = hidden_states + 0.5 * h
            return hidden_states + 0.5 * self.mlp(self.post_attention_layernorm(hidden_states))

    cfg, model = _llama()
    model.model.layers = nn.ModuleList([ScaledLayer(cfg, i) for i in range(2)])
    ids = torch.randint(0, 128, (2, 6))
    want = model(ids).logits
    patched = apply_normlab(copy.deepcopy(model))
    assert not [e for e in patched.normlab_report.entries if e.action == "fused"]
    torch.testing.assert_close(patched(ids).logits, want, rtol=0, atol=1e-6)

    class Doubled(nn.TransformerEncoderLayer):
        def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
            return super().forward(src, src_mask, src_key_padding_mask, is_causal) * 2.0

    enc = nn.Sequential(Doubled(16, 2, 32, dropout=0.0, batch_first=True)).eval()
    x = torch.randn(2, 5, 16)
    want = enc(x)
    swap_norms(enc)
    torch.testing.assert_close(enc(x), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("make", [lambda: _llama(4)[1], _gpt2])
def test_under_autocast_the_residual_stream_stays_float32(make):
    model = make()
    patched = apply_normlab(copy.deepcopy(model))
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a = model(ids, output_hidden_states=True)
        b = patched(ids, output_hidden_states=True)
    assert [h.dtype for h in b.hidden_states] == [h.dtype for h in a.hidden_states]
    for ha, hb in zip(a.hidden_states, b.hidden_states, strict=True):
        torch.testing.assert_close(hb, ha, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-2, atol=1e-2)


def test_gpt2_generation_uses_the_cache_under_its_current_keyword():
    model = _gpt2()
    patched = apply_normlab(copy.deepcopy(model))
    ids = torch.randint(0, 128, (2, 5))
    kw = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated keyword on the way
        want = model.generate(ids, **kw)
        got = patched.generate(ids, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_hooks_carry_over_and_do_not_fire_on_probes():
    _, model = _llama(1)
    calls = []
    norm = model.model.norm
    norm.register_forward_hook(lambda m, a, o: calls.append("fwd"))
    norm.register_full_backward_pre_hook(lambda m, g: calls.append("bwd_pre"))
    norm.register_full_backward_hook(lambda m, gi, go: calls.append("bwd"))
    apply_normlab(model)
    assert calls == []  # the probe ran a copy without them
    assert type(model.model.norm).__module__.startswith("normlab")
    model(torch.randint(0, 128, (2, 6))).logits.sum().backward()
    assert calls == ["fwd", "bwd_pre", "bwd"]


class _EpsOutsideRMSNorm(nn.Module):
    """x / (rms(x) + eps) * w: eps outside the square root."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        return x / (x.pow(2).mean(-1, keepdim=True).sqrt() + self.eps) * self.weight


def test_a_norm_that_differs_only_at_small_inputs_is_left():
    model = nn.Sequential(nn.Linear(8, 8), _EpsOutsideRMSNorm(8, eps=1e-6))
    report = swap_norms(model).normlab_report
    assert isinstance(model[1], _EpsOutsideRMSNorm)
    (entry,) = [e for e in report.entries if e.path == "1"]
    assert entry.action == "left" and "std 0.02" in entry.detail


def test_float32_input_to_half_precision_parameters_is_probed():
    """T5's norm casts its output to a half-precision weight's dtype, whatever the input's
    (transformers keeps T5's wo in float32): normlab's casting modes do not, so it is left."""
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    model = transformers.T5ForConditionalGeneration(cfg).half().eval()
    model.encoder.block[0].layer[1].DenseReluDense.wo.float()  # as _keep_in_fp32_modules does
    ids = torch.randint(0, 64, (1, 5))
    want = model(input_ids=ids, decoder_input_ids=ids).logits
    apply_normlab(model)
    torch.testing.assert_close(model(input_ids=ids, decoder_input_ids=ids).logits, want)


def test_apply_normlab_under_inference_mode():
    _, model = _llama(1)
    ids = torch.randint(0, 128, (2, 6))
    with torch.inference_mode():
        want = model(ids).logits
        apply_normlab(model)
        got = model(ids).logits
    assert type(model.model.norm).__module__.startswith("normlab")
    torch.testing.assert_close(got, want)


def test_a_model_subclass_with_its_own_forward_is_not_restructured():
    """Its forward may feed the final norm to a second head, which the table does not
    list: folding into lm_head alone would change that head's output."""
    from normlab.convert import fold_norm_affine
    from normlab.convert.blocks import model_spec

    class TwoHeads(transformers.GPT2LMHeadModel):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.value = nn.Linear(cfg.n_embd, 1)

        def forward(self, input_ids):
            h = self.transformer(input_ids).last_hidden_state
            return self.lm_head(h), self.value(h)

    torch.manual_seed(0)
    model = TwoHeads(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=16,
                                             tie_word_embeddings=False)).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.normal_()
    assert model_spec(model) is None
    ids = torch.randint(0, 64, (2, 5))
    want = model(ids)
    fold_norm_affine(model)
    for a, b in zip(model(ids), want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_norm_whose_hook_cannot_be_copied_is_probed_and_swapped():
    import threading

    from normlab.diagnostics import audit

    class Counter:
        def __init__(self):
            self.lock, self.n = threading.Lock(), 0  # (a lock does not deep-copy)

        def hook(self, module, args, output):
            with self.lock:
                self.n += 1

    _, model = _llama(1)
    counter = Counter()
    model.model.norm.register_forward_hook(counter.hook)
    assert isinstance(audit(model), list)  # (the audit's own forward passes call it)
    before = counter.n
    apply_normlab(model)
    assert counter.n == before  # the probes ran without it
    assert type(model.model.norm).__module__.startswith("normlab")
    model(torch.randint(0, 128, (1, 4)))
    assert counter.n == before + 1
