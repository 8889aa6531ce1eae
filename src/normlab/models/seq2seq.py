"""Seq2SeqTransformer: encoder-decoder with cross-attention (Vaswani et al. 2017)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab.models.block import Embedding, Stack, check_padding_mask, check_tokens
from normlab.models.config import TransformerConfig
from normlab.models.init import init_weights
from normlab.models.placement import build_placement


class Seq2SeqTransformer(nn.Module):
    """logits = head(Decoder(Embedding(tgt), memory)), memory = Encoder(Embedding(src)).

    Encoder blocks: self-attention, FFN. Decoder blocks: causal self-attention,
    cross-attention to the memory, FFN; every sublayer gets its norms from the placement.
    Source and target share ``embed`` (one vocabulary). Modules: ``embed``,
    ``encoder.blocks``, ``encoder.final_norm``, ``decoder.blocks``, ``decoder.final_norm``,
    ``head``. DeepNorm/Sub-LN constants are the encoder-decoder ones for
    N = n_layers, M = n_decoder_layers."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n, m = cfg.n_layers, cfg.n_decoder_layers
        enc_place = build_placement(cfg, "encoder", n, m)
        dec_place = build_placement(cfg, "decoder", n, m)
        self.embed = Embedding(cfg, norm=cfg.embedding_norm or enc_place.embedding_norm)
        self.encoder = Stack(cfg, enc_place, n, causal=False)
        self.decoder = Stack(cfg, dec_place, m, causal=True, cross_attention=True)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.tokens.weight
        init_weights(self, cfg)

    def encode(self, src: Tensor, src_padding_mask: Tensor | None = None) -> Tensor:
        """src [B, S] -> memory [B, S, d_model]."""
        check_tokens("Seq2SeqTransformer", src, self.cfg.max_seq_len, self.cfg.vocab_size, "src")
        check_padding_mask("Seq2SeqTransformer", "src_padding_mask", src_padding_mask, src)
        return self.encoder(self.embed(src, src_padding_mask), padding_mask=src_padding_mask)

    def decode(self, tgt: Tensor, memory: Tensor, src_padding_mask: Tensor | None = None,
               tgt_padding_mask: Tensor | None = None) -> Tensor:
        """tgt [B, T] and memory [B, S, d_model] -> logits [B, T, vocab_size]. ``memory`` has
        the model's dtype and device (under autocast any floating dtype autocast casts: not float64)."""
        check_tokens("Seq2SeqTransformer", tgt, self.cfg.max_seq_len, self.cfg.vocab_size, "tgt")
        check_padding_mask("Seq2SeqTransformer", "tgt_padding_mask", tgt_padding_mask, tgt)
        if (not isinstance(memory, Tensor) or not memory.is_floating_point() or memory.dim() != 3
                or memory.shape[0] != tgt.shape[0] or memory.shape[-1] != self.cfg.d_model):
            got = f"{list(memory.shape)} {memory.dtype}" if isinstance(memory, Tensor) else type(memory).__name__
            raise ValueError(f"Seq2SeqTransformer: expected memory to be a floating-point tensor of shape "
                             f"[{tgt.shape[0]}, S, {self.cfg.d_model}] (encode()'s output for tgt's batch), got {got}")
        w = self.embed.tokens.weight
        # (autocast casts float32, float16 and bfloat16 inputs of its ops, never float64)
        autocast = torch.is_autocast_enabled(memory.device.type) and memory.dtype != torch.float64
        if memory.device != w.device or (memory.dtype != w.dtype and not autocast):
            raise ValueError(f"Seq2SeqTransformer: expected memory as the model's parameters: {w.dtype} on "
                             f"{w.device} (encode()'s output; under autocast any floating dtype but float64), "
                             f"got {memory.dtype} on {memory.device}")
        check_padding_mask("Seq2SeqTransformer", "src_padding_mask", src_padding_mask, memory.shape[:2],
                           "memory's [B, S]")
        h = self.decoder(self.embed(tgt, tgt_padding_mask), padding_mask=tgt_padding_mask,
                         context=memory, context_padding_mask=src_padding_mask)
        return self.head(h)

    def forward(self, src: Tensor, tgt: Tensor, src_padding_mask: Tensor | None = None,
                tgt_padding_mask: Tensor | None = None) -> Tensor:
        """src [B, S], tgt [B, T] (long; True = padded in the masks) -> logits [B, T, vocab_size]."""
        if (isinstance(src, Tensor) and isinstance(tgt, Tensor) and src.dim() == tgt.dim() == 2
                and src.shape[0] != tgt.shape[0]):  # (anything else wrong with them: encode's and decode's checks)
            raise ValueError(f"Seq2SeqTransformer: expected src and tgt of one batch size, got src of shape "
                             f"{list(src.shape)} and tgt of shape {list(tgt.shape)}")
        memory = self.encode(src, src_padding_mask)
        return self.decode(tgt, memory, src_padding_mask, tgt_padding_mask)
