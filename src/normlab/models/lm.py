"""TransformerLM: a decoder-only, causal language model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.models.block import BlockStack, Embedding, check_padding_mask, check_tokens
from normlab.models.config import TransformerConfig
from normlab.models.init import init_weights
from normlab.models.placement import build_placement


class TransformerLM(BlockStack):
    """logits = head(Stack_causal(Embedding(tokens))).

    Modules: ``embed`` (``embed.tokens``, ``embed.positions``, ``embed.norm``), ``blocks``,
    ``final_norm``, ``head`` (sharing ``embed.tokens.weight`` when ``tie_embeddings``).
    DeepNorm/Sub-LN constants are the decoder-only ones for M = n_layers.

    Causality holds in the attention. A norm on batch statistics (``batchnorm`` in
    training, ``powernorm`` in training during its warm-up) takes them over every real
    position of the batch, later ones included, so in training position t's output also
    depends on tokens after t (as in any causal model with batch normalization); in eval
    mode, and with every other norm, it does not."""

    def __init__(self, cfg: TransformerConfig) -> None:
        placement = build_placement(cfg, "decoder", 0, cfg.n_layers)
        super().__init__(cfg, placement, cfg.n_layers, causal=True)
        self.cfg = cfg
        self.embed = Embedding(cfg, norm=cfg.embedding_norm or placement.embedding_norm)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.tokens.weight
        init_weights(self, cfg)

    def forward(self, tokens: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """tokens [B, T] (long) -> logits [B, T, vocab_size]; position t sees tokens <= t
        (in training with a batch-statistics norm, the statistics mix every position: see
        the class docstring).

        ``padding_mask`` [B, T] (True = padded) keeps padded keys out of attention and
        padded positions out of batch-statistics norms."""
        check_tokens("TransformerLM", tokens, self.cfg.max_seq_len, self.cfg.vocab_size)
        check_padding_mask("TransformerLM", "padding_mask", padding_mask, tokens)
        x = self.embed(tokens, padding_mask)
        return self.head(self.run_blocks(x, padding_mask=padding_mask))

    def loss(self, tokens: Tensor, targets: Tensor, padding_mask: Tensor | None = None,
             ignore_index: int = -100) -> Tensor:
        """Mean cross-entropy of ``forward(tokens)`` against ``targets`` [B, T], over the
        positions that are neither padded (``padding_mask`` True) nor ``ignore_index``."""
        logits = self(tokens, padding_mask)
        if not isinstance(targets, Tensor) or targets.shape != tokens.shape or targets.is_floating_point() \
                or targets.is_complex() or targets.dtype == torch.bool:
            got = f"{tuple(targets.shape)} {targets.dtype}" if isinstance(targets, Tensor) else type(targets).__name__
            raise ValueError(f"TransformerLM.loss: expected targets of tokens' shape {tuple(tokens.shape)} and an "
                             f"integer dtype, got {got}")
        targets = targets.long()  # (before the fill: ignore_index -100 wraps around in uint8)
        if padding_mask is not None:
            targets = targets.masked_fill(padding_mask, ignore_index)  # a padded position has no target
        # (half-precision logits in float32; float32 and float64 as they are)
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index)
