"""The table of known transformer blocks and models: where their norms sit.

For each block type, one entry says

* ``pre_norms``: norm -> the Linear-like layers that read its output (Pre-LN: the
  output feeds only those layers, so its affine can be folded into them);
* ``post_norms``: norms whose output *is* the residual stream (Post-LN);
* ``inner_norms``: norm -> the Linear-like layers reading its output, for norms inside
  a sublayer (Sub-LN): foldable like ``pre_norms``, but they read a branch, not the stream;
* ``writer_norms``: norm -> what it is, for norms whose output is written into the
  residual stream (Sandwich-/Peri-LN's Norm_out(F), an embedding norm): not foldable,
  and the stream they write cannot be centered;
* ``writers``: the layers whose output is added to the residual stream;
* ``forward``: the same block's forward with the residual add fused into the norm that
  follows it (normlab's ``norm(x, residual) -> (norm(residual + x), residual + x)``).

Model entries add the model-level pieces: the embeddings that start the residual
stream and the final norm(s) with their consumers. Supporting a new architecture is
one ``register_block`` (and, for whole-model transforms, one ``register_model``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from normlab.convert.args import check_names
from normlab.errors import NormTypeError
from normlab.norms.base import ResidualNorm


@dataclass(frozen=True)
class Consumer:
    """A Linear-like layer reading a norm's output (``rows`` for packed attention inputs)."""

    path: str
    rows: str = "all"


@dataclass(frozen=True)
class BlockSpec:
    """Where a block's norms sit (paths relative to the block); ``unknown``: why the
    block's structure cannot be told (its norms are left and its stream refused)."""

    pre_norms: dict[str, tuple[Consumer, ...]] = field(default_factory=dict)
    post_norms: tuple[str, ...] = ()
    writers: tuple[str, ...] = ()
    fused_norms: tuple[str, ...] = ()  # the norms the fused forward calls with a residual
    inner_norms: dict[str, tuple[Consumer, ...] | str] = field(default_factory=dict)  # str: why not foldable
    writer_norms: dict[str, str] = field(default_factory=dict)
    unknown: str | None = None
    # module path (relative to the block) -> sublayer kind of the parameters under it:
    # "attention", "ffn_w1" (the FFN's input projections) or "ffn_w2" (its output one);
    # what normlab.diagnostics groups gradients by
    kinds: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSpec:
    """``final_norms``: norm path -> consumers (None: the output leaves the model; a str:
    why its output is not read only by Linear layers).
    ``embeddings``: modules (or parameters) whose output starts the residual stream
    (None: the stream starts at a model input; a str: why the stream's start cannot be
    made zero-mean)."""

    final_norms: dict[str, tuple[Consumer, ...] | str | None]
    embeddings: tuple[str, ...] | str | None
    # final norm path -> the output the model returns on request that is this norm's output
    # (``hidden_states[-1]`` with ``output_hidden_states=True``): folding the norm into its
    # consumers keeps the logits and changes that output (it becomes n(x)); the report says so
    final_outputs: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _BlockEntry:
    spec: Callable[[nn.Module], BlockSpec]
    forward: Callable | None


_BLOCKS: dict[str, _BlockEntry] = {}
_MODELS: dict[str, Callable[[nn.Module], ModelSpec]] = {}


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


_QUALIFIED = "the class's module and qualified name, as 'transformers.models.llama.modeling_llama.LlamaDecoderLayer'"


def _check_spec(where: str, spec: object) -> None:
    if not callable(spec):
        raise NormTypeError(f"{where}: expected the decorated spec to be a callable taking the module, got "
                            f"{type(spec).__name__}")


def register_block(*qualified_names: str, forward: Callable | None = None):
    """Decorator: ``spec(module) -> BlockSpec`` for the classes named ``module.QualName``
    (``forward``: the block's fused forward, or None). Raises NormTypeError / NormArgumentError
    for a name that is not a non-empty str, no name, or a ``forward`` that is not callable."""
    check_names("register_block", "qualified name", qualified_names, _QUALIFIED)
    if forward is not None and not callable(forward):
        raise NormTypeError(f"register_block: expected forward to be None or the block's fused forward (a "
                            f"callable), got {type(forward).__name__}")

    def wrap(spec: Callable[[nn.Module], BlockSpec]):
        _check_spec("register_block", spec)
        for name in qualified_names:
            _BLOCKS[name] = _BlockEntry(spec, forward)
        return spec

    return wrap


def register_model(*qualified_names: str):
    """Decorator: ``spec(model) -> ModelSpec`` for the classes named ``module.QualName``
    (checked as ``register_block``'s)."""
    check_names("register_model", "qualified name", qualified_names, _QUALIFIED)

    def wrap(spec: Callable[[nn.Module], ModelSpec]):
        _check_spec("register_model", spec)
        for name in qualified_names:
            _MODELS[name] = spec
        return spec

    return wrap


def _lookup(table: dict, module: nn.Module | type):
    """(the registered class, its entry) for ``module``'s class or its nearest registered
    base. A subclass that defines its own ``forward`` computes something the entry does
    not describe: a block with a layer scale or an adapter; a model whose final norm
    feeds a second head. It is not known (None, None), and the transforms leave it.
    normlab's fused subclasses (``convert.fused``) are the registered block's own forward."""
    t = module if isinstance(module, type) else type(module)
    for k, cls in enumerate(t.__mro__):
        entry = table.get(_qualified(cls))
        if entry is not None:
            if any("forward" in sub.__dict__ and "_normlab_base" not in sub.__dict__ for sub in t.__mro__[:k]):
                return None, None
            return cls, entry
    return None, None


def block_entry(module: nn.Module | type) -> tuple[type | None, _BlockEntry | None]:
    """(the registered base class, its entry) for a known block (or class), else (None, None)."""
    return _lookup(_BLOCKS, module)


def block_spec(module: nn.Module) -> BlockSpec | None:
    _, entry = block_entry(module)
    return None if entry is None else entry.spec(module)


def structure_kinds(model: nn.Module) -> dict[str, str]:
    """Module path -> sublayer kind ("attention", "ffn_w1", "ffn_w2", "embedding",
    "head") for every part of ``model`` the table describes: its known blocks' sublayers,
    the known model's embeddings, and the Linear layers reading its final norm outside
    every block (the head)."""
    out: dict[str, str] = {}
    blocks = []
    for path, m in model.named_modules():
        spec = block_spec(m)
        if spec is None:
            continue
        blocks.append(path)
        for sub, kind in spec.kinds.items():
            out[f"{path}.{sub}" if path else sub] = kind
    mspec = model_spec(model)
    if mspec is not None:
        if isinstance(mspec.embeddings, tuple):
            out.update({e: "embedding" for e in mspec.embeddings})
        for cons in mspec.final_norms.values():
            for c in cons if isinstance(cons, tuple) else ():
                if not any(c.path.startswith(b + ".") for b in blocks):
                    out[c.path] = "head"
    return out


def hf_families() -> list[str]:
    """The Hugging Face model families in the model table (``gpt2``, ``llama``, ...)."""
    return sorted({name.split(".")[2] for name in _MODELS if name.startswith("transformers.models.")})


def model_spec(module: nn.Module) -> ModelSpec | None:
    _, spec = _lookup(_MODELS, module)
    return None if spec is None else spec(module)


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def _consumers(module: nn.Module, *paths: str) -> tuple[Consumer, ...]:
    return tuple(Consumer(p) for p in paths if _has(module, p))


# the hooks that see a module's call (its own, and torch's global module hooks)
_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
_GLOBAL_HOOKS = tuple(getattr(torch.nn.modules.module, f"_global{h}", {}) for h in _HOOKS)


def _hooked(norm: nn.Module) -> bool:
    d = norm.__dict__
    return any(d.get(h) for h in _HOOKS) or any(_GLOBAL_HOOKS)


def _add_norm(norm: nn.Module, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
    """``norm(x, residual)``, the fused residual add + norm, in the dtype of the unfused
    ``residual + x``: under autocast a sublayer's output is bfloat16 and the residual
    stream float32, and the stream stays float32, as in the original block.

    A norm with hooks at call time (registered after fusion, or torch's global module
    hooks) is called unfused, ``norm(residual + x)``, so its hooks see the one input
    and the one output the original block's call gives them; so is a norm that is no
    longer a normlab one (replaced or wrapped after fusion: an adapter, the original
    class put back), which takes one input."""
    if x.dtype is not residual.dtype:
        x = x.to(torch.promote_types(x.dtype, residual.dtype))
    if _hooked(norm) or not isinstance(norm, ResidualNorm):
        new_residual = residual + x
        return norm(new_residual), new_residual
    return norm(x, residual)


# ---------------------------------------------------------------------- torch.nn blocks

_TORCH_KINDS = {"self_attn": "attention", "multihead_attn": "attention", "linear1": "ffn_w1",
                "linear2": "ffn_w2"}


def _torch_encoder_layer_forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
    # the masks go to self_attn as given: MultiheadAttention checks and converts them
    # itself (torch's layer converts them first only for its fused fast path)
    x = src
    if self.norm_first:
        sa = self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
        h, x = _add_norm(self.norm2, sa, x)
        return x + self._ff_block(h)
    x, _ = _add_norm(self.norm1, self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal), x)
    x, _ = _add_norm(self.norm2, self._ff_block(x), x)
    return x


@register_block("torch.nn.modules.transformer.TransformerEncoderLayer",
                forward=_torch_encoder_layer_forward)
def _torch_encoder_layer(m: nn.Module) -> BlockSpec:
    kinds = _TORCH_KINDS
    if m.norm_first:
        return BlockSpec(
            pre_norms={"norm1": (Consumer("self_attn", "all"),), "norm2": (Consumer("linear1"),)},
            writers=("self_attn.out_proj", "linear2"), fused_norms=("norm2",), kinds=kinds,
        )
    return BlockSpec(post_norms=("norm1", "norm2"), writers=("self_attn.out_proj", "linear2"),
                     fused_norms=("norm1", "norm2"), kinds=kinds)


def _torch_decoder_layer_forward(self, tgt, memory, tgt_mask=None, memory_mask=None,
                                 tgt_key_padding_mask=None, memory_key_padding_mask=None,
                                 tgt_is_causal=False, memory_is_causal=False):
    x = tgt
    if self.norm_first:
        sa = self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
        h, x = _add_norm(self.norm2, sa, x)
        ca = self._mha_block(h, memory, memory_mask, memory_key_padding_mask, memory_is_causal)
        h, x = _add_norm(self.norm3, ca, x)
        return x + self._ff_block(h)
    x, _ = _add_norm(self.norm1, self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal), x)
    x, _ = _add_norm(self.norm2, self._mha_block(x, memory, memory_mask, memory_key_padding_mask,
                                                 memory_is_causal), x)
    x, _ = _add_norm(self.norm3, self._ff_block(x), x)
    return x


@register_block("torch.nn.modules.transformer.TransformerDecoderLayer",
                forward=_torch_decoder_layer_forward)
def _torch_decoder_layer(m: nn.Module) -> BlockSpec:
    writers = ("self_attn.out_proj", "multihead_attn.out_proj", "linear2")
    if m.norm_first:
        return BlockSpec(
            pre_norms={"norm1": (Consumer("self_attn", "all"),),
                       "norm2": (Consumer("multihead_attn", "q"),),
                       "norm3": (Consumer("linear1"),)},
            writers=writers, fused_norms=("norm2", "norm3"), kinds=_TORCH_KINDS,
        )
    return BlockSpec(post_norms=("norm1", "norm2", "norm3"), writers=writers,
                     fused_norms=("norm1", "norm2", "norm3"), kinds=_TORCH_KINDS)


# ------------------------------------------------------------- Hugging Face transformers

_QK_NORM = ("it normalizes the query or key heads, whose output feeds the rotary embedding "
            "and the attention scores, not Linear layers")

# Llama and the architectures sharing its decoder layer (same attribute names, same forward)
LLAMA_LIKE = {
    "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
}


def _llama_layer_forward(self, hidden_states, *args, **kwargs):
    if args:  # positional extras: bind them to the original signature's names
        bound = inspect.signature(type(self)._normlab_base.forward).bind(
            self, hidden_states, *args, **kwargs)
        kwargs = {k: v for k, v in bound.arguments.items() if k not in ("self", "hidden_states")}
        kwargs.update(kwargs.pop("kwargs", {}))
    h, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
    h, residual = _add_norm(self.post_attention_layernorm, h, hidden_states)
    return residual + self.mlp(h)


def _llama_layer(m: nn.Module) -> BlockSpec:
    # Qwen3's RMSNorms on the query and key heads read the attention's branch
    inner = {n: _QK_NORM for n in ("self_attn.q_norm", "self_attn.k_norm") if _has(m, n)}
    return BlockSpec(
        pre_norms={
            "input_layernorm": _consumers(m, "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "post_attention_layernorm": _consumers(m, "mlp.gate_proj", "mlp.up_proj"),
        },
        writers=("self_attn.o_proj", "mlp.down_proj"),
        fused_norms=("post_attention_layernorm",),
        inner_norms=inner,
        kinds={"self_attn": "attention", "mlp.gate_proj": "ffn_w1", "mlp.up_proj": "ffn_w1",
               "mlp.down_proj": "ffn_w2"},
    )


for _mod, _prefix in LLAMA_LIKE.items():
    register_block(f"transformers.models.{_mod}.modeling_{_mod}.{_prefix}DecoderLayer",
                   forward=_llama_layer_forward)(_llama_layer)


def _cache_keyword(attention: nn.Module) -> str:
    """The name GPT-2's attention takes the KV cache under: ``cache`` from transformers
    5.25 (``past_key_values`` is deprecated there, and goes in 5.40), else ``past_key_values``."""
    name = _CACHE_KEYWORD.get(type(attention))
    if name is None:
        params = inspect.signature(type(attention).forward).parameters
        name = _CACHE_KEYWORD[type(attention)] = "cache" if "cache" in params else "past_key_values"
    return name


_CACHE_KEYWORD: dict[type, str] = {}


def _gpt2_block_forward(self, hidden_states, past_key_values=None, attention_mask=None,
                        encoder_hidden_states=None, encoder_attention_mask=None,
                        use_cache=False, **kwargs):
    # (the second parameter is the cache under either name: the block's caller passes it
    # positionally, or by keyword as ``past_key_values`` or ``cache``)
    if "cache" in kwargs:
        cached = kwargs.pop("cache")
        past_key_values = cached if past_key_values is None else past_key_values
    cache = {_cache_keyword(self.attn): past_key_values}
    residual = hidden_states
    attn, _ = self.attn(self.ln_1(hidden_states), **cache,
                        attention_mask=attention_mask, use_cache=use_cache, **kwargs)
    if encoder_hidden_states is not None:
        if not hasattr(self, "crossattention"):
            raise ValueError(f"If `encoder_hidden_states` are passed, {self} has to be instantiated "
                             "with cross-attention layers by setting `config.add_cross_attention=True`")
        h, residual = _add_norm(self.ln_cross_attn, attn, residual)
        attn, _ = self.crossattention(h, **{_cache_keyword(self.crossattention): past_key_values},
                                      attention_mask=attention_mask,
                                      encoder_hidden_states=encoder_hidden_states,
                                      encoder_attention_mask=encoder_attention_mask)
    h, residual = _add_norm(self.ln_2, attn, residual)
    return residual + self.mlp(h)


@register_block("transformers.models.gpt2.modeling_gpt2.GPT2Block", forward=_gpt2_block_forward)
def _gpt2_block(m: nn.Module) -> BlockSpec:
    pre = {"ln_1": (Consumer("attn.c_attn"),), "ln_2": (Consumer("mlp.c_fc"),)}
    writers = ["attn.c_proj", "mlp.c_proj"]
    fused = ["ln_2"]
    if _has(m, "ln_cross_attn"):
        pre["ln_cross_attn"] = (Consumer("crossattention.q_attn"),)
        writers.append("crossattention.c_proj")
        fused.append("ln_cross_attn")
    return BlockSpec(pre_norms=pre, writers=tuple(writers), fused_norms=tuple(fused),
                     kinds={"attn": "attention", "crossattention": "attention", "mlp.c_fc": "ffn_w1",
                            "mlp.c_proj": "ffn_w2"})


def _bert_output_forward(self, hidden_states, input_tensor):
    return _add_norm(self.LayerNorm, self.dropout(self.dense(hidden_states)), input_tensor)[0]


@register_block("transformers.models.bert.modeling_bert.BertSelfOutput",
                "transformers.models.bert.modeling_bert.BertOutput",
                forward=_bert_output_forward)
def _bert_output(m: nn.Module) -> BlockSpec:
    return BlockSpec(post_norms=("LayerNorm",), writers=("dense",), fused_norms=("LayerNorm",))


# the layer holding BERT's sublayers: only which of its parameters are which
@register_block("transformers.models.bert.modeling_bert.BertLayer",
                "transformers.models.roberta.modeling_roberta.RobertaLayer")
def _bert_layer(m: nn.Module) -> BlockSpec:
    return BlockSpec(kinds={"attention": "attention", "crossattention": "attention",
                            "intermediate.dense": "ffn_w1", "output.dense": "ffn_w2"})


@register_block("transformers.models.bert.modeling_bert.BertEmbeddings")
def _bert_embeddings(m: nn.Module) -> BlockSpec:
    return BlockSpec(post_norms=("LayerNorm",))


# T5: each sublayer normalizes its input (Pre-LN, RMS); the residual add ends the
# sublayer and the next norm sits in the next sublayer, so there is no in-block fusion.
@register_block("transformers.models.t5.modeling_t5.T5LayerSelfAttention")
def _t5_self_attention(m: nn.Module) -> BlockSpec:
    return BlockSpec(pre_norms={"layer_norm": _consumers(m, "SelfAttention.q", "SelfAttention.k",
                                                         "SelfAttention.v")},
                     writers=("SelfAttention.o",), kinds={"SelfAttention": "attention"})


@register_block("transformers.models.t5.modeling_t5.T5LayerCrossAttention")
def _t5_cross_attention(m: nn.Module) -> BlockSpec:
    return BlockSpec(pre_norms={"layer_norm": _consumers(m, "EncDecAttention.q")},
                     writers=("EncDecAttention.o",), kinds={"EncDecAttention": "attention"})


@register_block("transformers.models.t5.modeling_t5.T5LayerFF")
def _t5_ff(m: nn.Module) -> BlockSpec:
    return BlockSpec(
        pre_norms={"layer_norm": _consumers(m, "DenseReluDense.wi", "DenseReluDense.wi_0",
                                            "DenseReluDense.wi_1")},
        writers=("DenseReluDense.wo",),
        kinds={"DenseReluDense.wi": "ffn_w1", "DenseReluDense.wi_0": "ffn_w1", "DenseReluDense.wi_1": "ffn_w1",
               "DenseReluDense.wo": "ffn_w2"},
    )


# GPT-NeoX (Pythia): two LayerNorms read the stream; with ``use_parallel_residual`` both
# read the block's input (x + attn(ln1(x)) + mlp(ln2(x))), else the second reads x + attn.
# Either way each norm reads the stream and feeds only its branch's input projection.
@register_block("transformers.models.gpt_neox.modeling_gpt_neox.GPTNeoXLayer")
def _gpt_neox_layer(m: nn.Module) -> BlockSpec:
    return BlockSpec(
        pre_norms={"input_layernorm": _consumers(m, "attention.query_key_value"),
                   "post_attention_layernorm": _consumers(m, "mlp.dense_h_to_4h")},
        writers=("attention.dense", "mlp.dense_4h_to_h"),
        kinds={"attention": "attention", "mlp.dense_h_to_4h": "ffn_w1", "mlp.dense_4h_to_h": "ffn_w2"},
    )


# OPT: Pre-LN with ``do_layer_norm_before`` (every size but 350m), else Post-LN.
@register_block("transformers.models.opt.modeling_opt.OPTDecoderLayer")
def _opt_layer(m: nn.Module) -> BlockSpec:
    writers = ("self_attn.out_proj", "fc2")
    kinds = {"self_attn": "attention", "fc1": "ffn_w1", "fc2": "ffn_w2"}
    if not m.do_layer_norm_before:
        return BlockSpec(post_norms=("self_attn_layer_norm", "final_layer_norm"), writers=writers, kinds=kinds)
    return BlockSpec(
        pre_norms={"self_attn_layer_norm": _consumers(m, "self_attn.q_proj", "self_attn.k_proj",
                                                      "self_attn.v_proj"),
                   "final_layer_norm": _consumers(m, "fc1")},
        writers=writers, kinds=kinds,
    )


# Falcon: a parallel block (attention and MLP read the same input, both outputs added)
# with one shared norm (7B/40B layout, ``num_ln_in_parallel_attn=1``) or one per branch
# (``ln_attn``/``ln_mlp``, the new decoder architecture), or a sequential Pre-LN block.
@register_block("transformers.models.falcon.modeling_falcon.FalconDecoderLayer")
def _falcon_layer(m: nn.Module) -> BlockSpec:
    cfg = m.config
    writers = ("self_attention.dense", "mlp.dense_4h_to_h")
    qkv, mlp_in = "self_attention.query_key_value", "mlp.dense_h_to_4h"
    if cfg.new_decoder_architecture and cfg.num_ln_in_parallel_attn == 2:
        pre = {"ln_attn": _consumers(m, qkv), "ln_mlp": _consumers(m, mlp_in)}
    elif cfg.new_decoder_architecture or cfg.parallel_attn:
        pre = {"input_layernorm": _consumers(m, qkv, mlp_in)}
    else:
        pre = {"input_layernorm": _consumers(m, qkv), "post_attention_layernorm": _consumers(m, mlp_in)}
    return BlockSpec(pre_norms=pre, writers=writers,
                     kinds={"self_attention": "attention", mlp_in: "ffn_w1", "mlp.dense_4h_to_h": "ffn_w2"})


# Phi (phi-1, phi-1.5, phi-2): a parallel block with one shared LayerNorm; optional
# LayerNorms on the query and key heads read the attention's branch, not the stream.
@register_block("transformers.models.phi.modeling_phi.PhiDecoderLayer")
def _phi_layer(m: nn.Module) -> BlockSpec:
    inner = {n: _QK_NORM for n in ("self_attn.q_layernorm", "self_attn.k_layernorm") if _has(m, n)}
    return BlockSpec(
        pre_norms={"input_layernorm": _consumers(m, "self_attn.q_proj", "self_attn.k_proj",
                                                 "self_attn.v_proj", "mlp.fc1")},
        writers=("self_attn.dense", "mlp.fc2"), inner_norms=inner,
        kinds={"self_attn": "attention", "mlp.fc1": "ffn_w1", "mlp.fc2": "ffn_w2"},
    )


# Phi-3: Llama's layout with packed projections (qkv_proj, gate_up_proj).
@register_block("transformers.models.phi3.modeling_phi3.Phi3DecoderLayer")
def _phi3_layer(m: nn.Module) -> BlockSpec:
    return BlockSpec(
        pre_norms={"input_layernorm": _consumers(m, "self_attn.qkv_proj"),
                   "post_attention_layernorm": _consumers(m, "mlp.gate_up_proj")},
        writers=("self_attn.o_proj", "mlp.down_proj"),
        kinds={"self_attn": "attention", "mlp.gate_up_proj": "ffn_w1", "mlp.down_proj": "ffn_w2"},
    )


# Gemma: Llama's layout; its RMSNorm scales by (1 + weight), which normlab.convert.detect
# verifies as RMSNorm(offset=1, casting_mode="gemma") and swaps (the block is not fused).
@register_block("transformers.models.gemma.modeling_gemma.GemmaDecoderLayer")
def _gemma_layer(m: nn.Module) -> BlockSpec:
    return _llama_layer(m)


# Cohere (Command-R): a parallel block, x + attn(norm(x)) + mlp(norm(x)), with one shared
# LayerNorm (no bias); with ``use_qk_norm``, per-head LayerNorms on the query and key
# heads read the attention's branch, not the stream.
@register_block("transformers.models.cohere.modeling_cohere.CohereDecoderLayer")
def _cohere_layer(m: nn.Module) -> BlockSpec:
    inner = {n: _QK_NORM for n in ("self_attn.q_norm", "self_attn.k_norm") if _has(m, n)}
    return BlockSpec(
        pre_norms={"input_layernorm": _consumers(m, "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                 "mlp.gate_proj", "mlp.up_proj")},
        writers=("self_attn.o_proj", "mlp.down_proj"), inner_norms=inner,
        kinds={"self_attn": "attention", "mlp.gate_proj": "ffn_w1", "mlp.up_proj": "ffn_w1",
               "mlp.down_proj": "ffn_w2"},
    )


# OLMo 2: a norm on each sublayer's output inside the residual, x + Norm(F(x)) (normlab's
# olmo2 placement): those norms write the stream; its q/k RMSNorms over the whole query and
# key projections read the attention's branch.
@register_block("transformers.models.olmo2.modeling_olmo2.Olmo2DecoderLayer")
def _olmo2_layer(m: nn.Module) -> BlockSpec:
    inner = {n: _QK_NORM for n in ("self_attn.q_norm", "self_attn.k_norm") if _has(m, n)}
    return BlockSpec(
        writers=("self_attn.o_proj", "mlp.down_proj"), inner_norms=inner,
        writer_norms={"post_attention_layernorm": "OLMo 2: Norm(attention's output) before the residual add",
                      "post_feedforward_layernorm": "OLMo 2: Norm(FFN's output) before the residual add"},
        kinds={"self_attn": "attention", "mlp.gate_proj": "ffn_w1", "mlp.up_proj": "ffn_w1",
               "mlp.down_proj": "ffn_w2"},
    )


register_model("transformers.models.olmo2.modeling_olmo2.Olmo2ForCausalLM")(
    lambda r: _lm_head(r, "model.norm", ("model.embed_tokens",)))
register_model("transformers.models.olmo2.modeling_olmo2.Olmo2Model")(lambda r: _lm_head(r, "norm", ("embed_tokens",)))


# RoBERTa: BERT's Post-LN sublayer outputs and embeddings under other class names.
register_block("transformers.models.roberta.modeling_roberta.RobertaSelfOutput",
               "transformers.models.roberta.modeling_roberta.RobertaOutput",
               forward=_bert_output_forward)(_bert_output)
register_block("transformers.models.roberta.modeling_roberta.RobertaEmbeddings")(_bert_embeddings)


# ------------------------------------------------------------------------- models


def _hidden_output(name: str = "hidden_states") -> str:
    return (f"{name}[-1] (returned with output_hidden_states=True) is this norm's output: folded, it is n(x) "
            "without gamma and beta; the logits are unchanged")


def _lm_head(root: nn.Module, norm: str, embeddings: tuple[str, ...], head: str = "lm_head") -> ModelSpec:
    # a Hugging Face model's last hidden state is its final norm's output: a model without a
    # head returns it (last_hidden_state: left); a model with one returns it only on request
    # (hidden_states[-1]), so the norm folds into the head and the report names that output
    consumers = (Consumer(head),) if _has(root, head) else None
    return ModelSpec(final_norms={norm: consumers},
                     embeddings=tuple(e for e in embeddings if _has(root, e)),
                     final_outputs={norm: _hidden_output()} if consumers else {})


for _mod, _prefix in LLAMA_LIKE.items():
    _base = f"transformers.models.{_mod}.modeling_{_mod}.{_prefix}"
    register_model(f"{_base}ForCausalLM")(lambda r: _lm_head(r, "model.norm", ("model.embed_tokens",)))
    register_model(f"{_base}Model")(lambda r: _lm_head(r, "norm", ("embed_tokens",)))

_HF = "transformers.models"
register_model(f"{_HF}.gpt_neox.modeling_gpt_neox.GPTNeoXForCausalLM")(  # older 5.x releases name the head embed_out
    lambda r: _lm_head(r, "gpt_neox.final_layer_norm", ("gpt_neox.embed_in",),
                       head="lm_head" if _has(r, "lm_head") else "embed_out"))
register_model(f"{_HF}.gpt_neox.modeling_gpt_neox.GPTNeoXModel")(
    lambda r: _lm_head(r, "final_layer_norm", ("embed_in",)))
register_model(f"{_HF}.falcon.modeling_falcon.FalconForCausalLM")(
    lambda r: _lm_head(r, "transformer.ln_f", ("transformer.word_embeddings",)))
register_model(f"{_HF}.falcon.modeling_falcon.FalconModel")(lambda r: _lm_head(r, "ln_f", ("word_embeddings",)))
for _mod, _prefix in {"phi": "Phi", "phi3": "Phi3", "gemma": "Gemma", "cohere": "Cohere"}.items():
    _norm = "final_layernorm" if _mod == "phi" else "norm"
    register_model(f"{_HF}.{_mod}.modeling_{_mod}.{_prefix}ForCausalLM")(
        lambda r, n=_norm: _lm_head(r, f"model.{n}", ("model.embed_tokens",)))
    register_model(f"{_HF}.{_mod}.modeling_{_mod}.{_prefix}Model")(
        lambda r, n=_norm: _lm_head(r, n, ("embed_tokens",)))


_BERT_START = "the stream starts at the embeddings' LayerNorm (Post-LN): not a sum of writers"
for _mod, _prefix, _head_norm, _decoder in (
        ("bert", "Bert", "cls.predictions.transform.LayerNorm", "cls.predictions.decoder"),
        ("roberta", "Roberta", "lm_head.layer_norm", "lm_head.decoder")):
    # the masked-LM head's norm reads the head's dense + activation, and feeds its decoder
    register_model(f"{_HF}.{_mod}.modeling_{_mod}.{_prefix}ForMaskedLM")(
        lambda r, n=_head_norm, d=_decoder: ModelSpec(final_norms={n: (Consumer(d),)}, embeddings=_BERT_START))
    register_model(f"{_HF}.{_mod}.modeling_{_mod}.{_prefix}Model")(
        lambda r: ModelSpec(final_norms={}, embeddings=_BERT_START))


def _opt(root: nn.Module, decoder: str) -> ModelSpec:
    """OPT: the stream starts at the token embedding (through ``project_in`` where the
    embedding is narrower) plus the learned positions; the final norm (Pre-LN sizes only)
    feeds ``project_out`` where present, else the head."""
    d = root.get_submodule(decoder)
    pre = decoder + "."
    tokens = pre + ("project_in" if d.project_in is not None else "embed_tokens")
    finals: dict[str, tuple[Consumer, ...] | str | None] = {}
    outputs: dict[str, str] = {}
    if d.final_layer_norm is not None:
        reader = pre + "project_out" if d.project_out is not None else "lm_head"
        finals[pre + "final_layer_norm"] = (Consumer(reader),) if _has(root, reader) else None
        if reader == "lm_head" and _has(root, reader):  # (project_out's output is the hidden state)
            outputs[pre + "final_layer_norm"] = _hidden_output()
    return ModelSpec(final_norms=finals, embeddings=(tokens, pre + "embed_positions"), final_outputs=outputs)


register_model(f"{_HF}.opt.modeling_opt.OPTForCausalLM")(lambda r: _opt(r, "model.decoder"))
register_model(f"{_HF}.opt.modeling_opt.OPTModel")(lambda r: _opt(r, "decoder"))
register_model("transformers.models.gpt2.modeling_gpt2.GPT2LMHeadModel")(
    lambda r: _lm_head(r, "transformer.ln_f", ("transformer.wte", "transformer.wpe")))
register_model("transformers.models.gpt2.modeling_gpt2.GPT2Model")(
    lambda r: _lm_head(r, "ln_f", ("wte", "wpe")))
# the encoder's final norm output is always returned (encoder_last_hidden_state): not folded;
# the decoder's is returned only on request (decoder_hidden_states[-1]): folded, and named
register_model("transformers.models.t5.modeling_t5.T5ForConditionalGeneration")(
    lambda r: ModelSpec(final_norms={"encoder.final_layer_norm": None,
                                     "decoder.final_layer_norm": (Consumer("lm_head"),)},
                        embeddings=("shared",),
                        final_outputs={"decoder.final_layer_norm": _hidden_output("decoder_hidden_states")}))


@register_model("torch.nn.modules.transformer.Transformer")
def _torch_transformer(root: nn.Module) -> ModelSpec:
    # the encoder's output (memory) feeds only the decoder layers' cross-attention k/v
    finals: dict[str, tuple[Consumer, ...] | None] = {}
    if root.encoder.norm is not None:
        finals["encoder.norm"] = tuple(
            Consumer(f"decoder.layers.{i}.multihead_attn", "kv") for i in range(len(root.decoder.layers)))
    if root.decoder.norm is not None:
        finals["decoder.norm"] = None
    return ModelSpec(final_norms=finals, embeddings=None)


# ------------------------------------------------------------------ normlab's own models
#
# One Block class for every placement, read from the placement's declared structure
# (normlab.models.placement: ``norm_roles``, ``input_norm_of``, ``parallel``,
# ``final_norm_reads``): a norm feeding its sublayer's input reads the stream (foldable
# into the input projections; a parallel block's shared input norm into those of every
# sublayer it feeds), one feeding the output projection reads the branch, one whose
# output is added to the stream writes it (Sandwich-, Peri-LN, OLMo 2), and one whose
# output is the stream is Post-LN. QK-norm (``attn.q_norm``, ``attn.k_norm``) reads the
# attention's branch and feeds the attention scores, not a Linear layer. The Block
# already calls norm(x, residual) (the fused add+norm protocol), so no forward is
# registered.

_NORMLAB_INPUTS = {
    "attn": ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
    "cross_attn": ("cross_attn.q_proj",),  # its keys and values read the encoder's output
    "ffn": ("ffn.w1",),
}
_NORMLAB_OUTPUTS = {"attn": "attn.out_proj", "cross_attn": "cross_attn.out_proj", "ffn": "ffn.w2"}
_NORMLAB_QK_NORM = ("QK-norm: it normalizes each query or key head (or, scoped to the projection, the "
                    "whole query or key projection), whose output feeds the attention "
                    "scores (through RoPE where used), not Linear layers")


@register_block("normlab.models.block.Block")
def _normlab_block(m: nn.Module) -> BlockSpec:
    place = m.placement
    subs = m.sublayer_names
    writers = tuple(_NORMLAB_OUTPUTS[s] for s in subs)
    pre: dict[str, tuple[Consumer, ...]] = {}
    inner: dict[str, tuple[Consumer, ...] | str] = {}
    post: list[str] = []
    out: dict[str, str] = {}
    for s in subs:
        for slot, role in place.norm_roles(s):
            path = f"norms.{s}_{slot}"
            if role.output == "sublayer_input":
                # the inputs of every sublayer this norm feeds (a parallel block's shared norm)
                pre[path] = tuple(Consumer(c) for t in subs if place.input_norm_of(t) == s
                                  for c in _NORMLAB_INPUTS[t])
            elif role.output == "output_projection":
                inner[path] = (Consumer(_NORMLAB_OUTPUTS[s]),)
            elif role.output == "stream":
                post.append(path)
            else:
                out[path] = f"{place.name} placement: Norm_out(F) before the residual add"
        sublayer = m.get_submodule(s)
        for qk in ("q_norm", "k_norm"):
            if getattr(sublayer, qk, None) is not None:
                inner[f"{s}.{qk}"] = _NORMLAB_QK_NORM
    # the norms called with a residual (the fused add): every input norm of a sequential
    # block, only the first one of a parallel block (the others read the same sum)
    fused = tuple(p for p in pre if not place.parallel or p == f"norms.{subs[0]}_in") + tuple(post)
    return BlockSpec(pre_norms=pre, post_norms=tuple(post), writers=writers,
                     fused_norms=fused, inner_norms=inner, writer_norms=out,
                     kinds={"attn": "attention", "cross_attn": "attention", "ffn.w1": "ffn_w1", "ffn.w2": "ffn_w2"})


@register_block("normlab.models.block.Embedding")
def _normlab_embedding(m: nn.Module) -> BlockSpec:
    if m.norm is None:
        return BlockSpec()
    return BlockSpec(writer_norms={"norm": "the embedding norm: its output is the stream's start x_0"})


def _normlab_final(stack: nn.Module, path: str, consumers: tuple[Consumer, ...] | None) -> dict:
    if stack.final_norm is None:
        return {}
    if stack.placement.final_norm_reads == "dual":
        return {path: "its output is added to the Post-LN stream (ResiDual: y = x_L + Norm_final(d_L)), "
                      "not read only by Linear layers"}
    return {path: consumers}


def _normlab_embeddings(root: nn.Module) -> tuple[str, ...] | str:
    embed = root.embed
    if embed.sinusoidal:
        return ("embed adds a fixed sinusoidal position table to the residual stream: it is not "
                "zero-mean and has no parameter to center (learned or RoPE positions convert)")
    return ("embed.tokens",) + (("embed.positions",) if embed.positions is not None else ())


@register_model("normlab.models.lm.TransformerLM")
def _normlab_lm(root: nn.Module) -> ModelSpec:
    return ModelSpec(final_norms=_normlab_final(root, "final_norm", (Consumer("head"),)),
                     embeddings=_normlab_embeddings(root))


@register_model("normlab.models.encoder.TransformerEncoder")
def _normlab_encoder(root: nn.Module) -> ModelSpec:
    head = (Consumer("head"),) if root.head is not None else None
    return ModelSpec(final_norms=_normlab_final(root, "final_norm", head),
                     embeddings=_normlab_embeddings(root))


@register_model("normlab.models.seq2seq.Seq2SeqTransformer")
def _normlab_seq2seq(root: nn.Module) -> ModelSpec:
    # the encoder's output (memory) feeds only the decoder blocks' cross-attention keys/values
    memory = tuple(Consumer(f"decoder.blocks.{i}.cross_attn.{p}")
                   for i in range(len(root.decoder.blocks)) for p in ("k_proj", "v_proj"))
    finals = _normlab_final(root.encoder, "encoder.final_norm", memory)
    finals.update(_normlab_final(root.decoder, "decoder.final_norm", (Consumer("head"),)))
    return ModelSpec(final_norms=finals, embeddings=_normlab_embeddings(root))
