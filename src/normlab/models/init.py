"""init_weights: the one place a model's parameters get their initial values."""

from __future__ import annotations

import math

from torch import nn

from normlab.models.block import BlockStack, Embedding
from normlab.models.config import TransformerConfig


def init_weights(model: nn.Module, cfg: TransformerConfig) -> None:
    """Initialise every Linear and Embedding of ``model``; norms keep their own defaults.

    "xavier" (Vaswani et al. 2017; the setting of Xiong et al. 2020's analysis):
        Linear weights Xavier-uniform, biases 0; token embeddings N(0, 1/d_model), which
        the Embedding multiplies by sqrt(d_model), so each coordinate of the first block's
        input has unit variance (plus the positional term: learned positions start at
        N(0, 0.02^2), sinusoidal ones are the fixed table).
    "gpt2" (Radford et al. 2019, as nanoGPT): every weight N(0, 0.02^2), biases 0; the
        residual output projections (``attn.out_proj``, ``cross_attn.out_proj``,
        ``ffn.w2``) get std 0.02 / sqrt(number of residual branches in their stack),
        i.e. 1/sqrt(2 n_layers) in an LM or encoder (3 branches per seq2seq decoder block).
    Then, under either scheme, the placement's ``branch_gain`` multiplies the FFN
    (``w1``, ``w2``), value and output projections: DeepNorm's beta (Wang et al. 2022,
    cross-attention included) and Sub-LN's gamma (self-attention and FFN only).
    A tied head shares the token embedding and is not initialised twice.
    """
    tied = {id(m.tokens.weight) for m in model.modules() if isinstance(m, Embedding)}
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in tied:
            if cfg.init == "xavier":
                nn.init.xavier_uniform_(module.weight)
            else:
                nn.init.normal_(module.weight, 0.0, 0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, Embedding):
            std = 1.0 / math.sqrt(cfg.d_model) if cfg.init == "xavier" else 0.02
            nn.init.normal_(module.tokens.weight, 0.0, std)
            if module.positions is not None:
                nn.init.normal_(module.positions.weight, 0.0, 0.02)

    for stack in (m for m in model.modules() if isinstance(m, BlockStack)):
        n_branches = sum(len(block.sublayer_names) for block in stack.blocks)
        gain = stack.placement.branch_gain
        for block in stack.blocks:
            attns = [block.attn] + ([block.cross_attn] if block.cross_attn is not None else [])
            if cfg.init == "gpt2":
                for proj in [a.out_proj for a in attns] + [block.ffn.w2]:
                    proj.weight.data.div_(math.sqrt(n_branches))
            if gain != 1.0:
                gained = attns if stack.placement.gain_cross_attention else attns[:1]
                for proj in [p for a in gained for p in (a.v_proj, a.out_proj)] + [block.ffn.w1, block.ffn.w2]:
                    proj.weight.data.mul_(gain)
                    proj.bias.data.mul_(gain)
