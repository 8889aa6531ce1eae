"""Transformers with every norm placement: one Block, the placement a strategy object.

    cfg = TransformerConfig(vocab_size=1000, d_model=256, n_heads=4, n_layers=6,
                            norm="rmsnorm", placement="deepnorm")
    lm = TransformerLM(cfg)            # lm(tokens) -> logits
    enc = TransformerEncoder(cfg)      # enc(tokens, padding_mask) -> hidden states
    s2s = Seq2SeqTransformer(cfg)      # s2s(src, tgt, src_padding_mask, tgt_padding_mask) -> logits

Placements (``placement_names()``): post, pre, sandwich, deepnorm, subln, resi_dual,
peri, olmo2, parallel, none; each class's docstring holds its equation and paper.
``placement_options`` sets a placement's options (``{"shared_norm": False}``: the
parallel block's two input norms); ``qk_norm`` adds per-head QK-norm to every attention.

Module names (stable; diagnostics may rely on them). ``S`` is the stack prefix: empty
for TransformerLM and TransformerEncoder, ``encoder.`` / ``decoder.`` in Seq2SeqTransformer.

    embed.tokens, embed.positions (learned), embed.norm     token/position embeddings, embedding norm
    S blocks.{i}.attn.{q_proj,k_proj,v_proj,out_proj}      self-attention projections
    S blocks.{i}.attn.{q_norm,k_norm}                        QK-norm (``qk_norm``; also in cross_attn)
    S blocks.{i}.cross_attn.{q_proj,k_proj,v_proj,out_proj} cross-attention (seq2seq decoder)
    S blocks.{i}.ffn.w1, S blocks.{i}.ffn.w2                 FFN input / output projections
    S blocks.{i}.norms.{sublayer}_{slot}                     every norm of block i:
        sublayer in attn, cross_attn, ffn; slot in
        in (Norm(x) feeds F), out (Norm(F) before the add), add (Norm(x + F)),
        inner (inside F before its output projection; FFN's is d_ff wide)
    S final_norm                                             the norm after the last block
    head                                                     output projection

Every norm module's qualified name contains "norm" and every block's FFN and attention
projections are nn.Linear. The init (``init_weights``) is in one function.
"""

from normlab.models.attention import Attention
from normlab.models.block import Block, BlockStack, Embedding, FeedForward, Stack, Stream
from normlab.models.checkpoint import load_model, save_model
from normlab.models.config import TransformerConfig
from normlab.models.encoder import TransformerEncoder
from normlab.models.init import init_weights
from normlab.models.lm import TransformerLM
from normlab.models.placement import (
    DeepNormConstants,
    Placement,
    build_placement,
    deepnorm_constants,
    get_placement,
    placement_names,
    register_placement,
    subln_gains,
)
from normlab.models.seq2seq import Seq2SeqTransformer

__all__ = [
    "Attention", "Block", "BlockStack", "DeepNormConstants", "Embedding", "FeedForward", "Placement", "Seq2SeqTransformer",
    "Stack", "Stream", "TransformerConfig", "TransformerEncoder", "TransformerLM", "build_placement",
    "deepnorm_constants", "get_placement", "init_weights", "load_model", "placement_names",
    "register_placement", "save_model", "subln_gains",
]
