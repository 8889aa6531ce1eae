"""Small models the conversion tests run on: hand-built torch stacks and HF configs."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class PreLNLM(nn.Module):
    """Embedding + learned positions + torch Pre-LN encoder layers + final LN + head."""

    def __init__(self, vocab=64, d=32, heads=4, layers=2, max_len=16, tie=False, head_bias=False):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=head_bias)
        if tie:
            self.head.weight = self.tok.weight

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.ln_f(self.encoder(x)))


class MLPBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.proj(torch.relu(self.fc(self.ln(x))))


class MLPStack(nn.Module):
    """A hand-built Pre-LN stack that torch.fx traces end to end (parameter positions)."""

    def __init__(self, vocab=50, d=32, n=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, 16, d))
        self.blocks = nn.ModuleList(MLPBlock(d) for _ in range(n))
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.emb(idx) + self.pos[:, : idx.shape[1]]
        for b in self.blocks:
            x = b(x)
        return self.out(self.norm(x))


class ResidualTap(nn.Module):
    """The norm's output is both projected and added back: not foldable."""

    def __init__(self, d=16):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        h = self.ln(x)
        return self.fc(h) + h


def perturb(model: nn.Module, scale: float = 0.2, seed: int = 0) -> nn.Module:
    """Random non-trivial parameters (norm gammas/betas away from 1/0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)
    return model


def hf_model(name: str) -> nn.Module:
    transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install 'normlab[hf]')")
    small = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)
    if name == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**small))
    if name == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**small))
    if name == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**small))
    if name == "gemma":
        return transformers.GemmaForCausalLM(transformers.GemmaConfig(**small, head_dim=8))
    if name == "gemma2":
        return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**small, head_dim=8))
    if name == "gemma3":  # q/k norms too
        return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**small, head_dim=8))
    if name == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=16, bos_token_id=0,
            eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    if name == "bert":
        return transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0))
    layers = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    if name.startswith("gpt_neox"):  # gpt_neox: parallel residual; gpt_neox_sequential
        return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            **layers, intermediate_size=64, use_parallel_residual=name == "gpt_neox"))
    if name.startswith("opt"):  # opt; opt_project (narrower embedding); opt_post (350m's Post-LN)
        return transformers.OPTForCausalLM(transformers.OPTConfig(
            **layers, ffn_dim=64, max_position_embeddings=32, word_embed_proj_dim=16 if name == "opt_project" else 32,
            do_layer_norm_before=name != "opt_post"))
    if name.startswith("falcon"):  # falcon (7B layout); falcon_new (two norms); falcon_sequential
        extra = {"falcon": {}, "falcon_new": dict(new_decoder_architecture=True, num_kv_heads=2),
                 "falcon_sequential": dict(parallel_attn=False, bias=True)}[name]
        return transformers.FalconForCausalLM(transformers.FalconConfig(**layers, **extra))
    if name.startswith("phi") and name != "phi3":  # phi; phi_qk (LayerNorms on q and k)
        return transformers.PhiForCausalLM(transformers.PhiConfig(
            **layers, intermediate_size=64, qk_layernorm=name == "phi_qk"))
    if name == "phi3":
        return transformers.Phi3ForCausalLM(transformers.Phi3Config(
            **layers, intermediate_size=64, pad_token_id=0, bos_token_id=0, eos_token_id=0))
    if name == "qwen3":
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**small, head_dim=8))
    if name == "cohere":  # a parallel block; LayerNorms without bias, per-head ones on q and k
        return transformers.CohereForCausalLM(transformers.CohereConfig(**small, use_qk_norm=True, eos_token_id=2))
    if name == "olmo2":  # RMSNorms on the sublayers' outputs and on the whole q and k projections
        return transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**small, eos_token_id=2))
    if name == "roberta":
        return transformers.RobertaForMaskedLM(transformers.RobertaConfig(
            **layers, intermediate_size=64, max_position_embeddings=40, pad_token_id=1,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    if name == "bloom":  # a family outside normlab's table
        return transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=4))
    if name == "t5":
        return transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            decoder_start_token_id=0, dropout_rate=0.0))
    raise ValueError(name)


def hf_inputs(name: str, seed: int = 0) -> dict:
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(seed))
    kw = {"input_ids": ids}
    if name == "t5":
        kw["decoder_input_ids"] = ids.flip(-1)
    return kw
