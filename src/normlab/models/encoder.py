"""TransformerEncoder: a bidirectional encoder with padding masks and an optional head."""

from __future__ import annotations

import numbers

from torch import Tensor, nn

from normlab.models.block import BlockStack, Embedding, check_padding_mask, check_tokens
from normlab.models.config import TransformerConfig
from normlab.models.init import init_weights
from normlab.models.placement import build_placement


class TransformerEncoder(BlockStack):
    """h = Stack(Embedding(tokens)), bidirectional; with a head, outputs = head(h).

    ``n_outputs``: width of an optional per-position linear head (``head``); a head over
    the vocabulary (n_outputs == vocab_size) shares the token embedding when
    ``tie_embeddings``. Modules: ``embed``, ``blocks``, ``final_norm``, ``head``.
    DeepNorm/Sub-LN constants are the encoder-only ones for N = n_layers."""

    def __init__(self, cfg: TransformerConfig, n_outputs: int | None = None) -> None:
        if n_outputs is not None and (isinstance(n_outputs, bool) or not isinstance(n_outputs, numbers.Integral)
                                      or n_outputs < 1):
            raise ValueError(f"TransformerEncoder: expected n_outputs to be None or an int >= 1, got {n_outputs!r}")
        n_outputs = None if n_outputs is None else int(n_outputs)
        placement = build_placement(cfg, "encoder", cfg.n_layers, 0)
        super().__init__(cfg, placement, cfg.n_layers, causal=False)
        self.cfg = cfg
        self.embed = Embedding(cfg, norm=cfg.embedding_norm or placement.embedding_norm)
        self.head = nn.Linear(cfg.d_model, n_outputs, bias=False) if n_outputs is not None else None
        if self.head is not None and cfg.tie_embeddings and n_outputs == cfg.vocab_size:
            self.head.weight = self.embed.tokens.weight
        init_weights(self, cfg)

    def encode(self, tokens: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """tokens [B, T] -> hidden states [B, T, d_model]. ``padding_mask`` [B, T], True =
        padded: padded positions change nothing at the real ones."""
        check_tokens("TransformerEncoder", tokens, self.cfg.max_seq_len, self.cfg.vocab_size)
        check_padding_mask("TransformerEncoder", "padding_mask", padding_mask, tokens)
        return self.run_blocks(self.embed(tokens, padding_mask), padding_mask=padding_mask)

    def forward(self, tokens: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """``head(encode(tokens))`` [B, T, n_outputs] with a head, else ``encode(tokens)``."""
        h = self.encode(tokens, padding_mask)
        return h if self.head is None else self.head(h)
