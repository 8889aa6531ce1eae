"""Small Post-LN / Pre-LN language models built from torch.nn.TransformerEncoderLayer.

The diagnostics must work on any nn.Module, so their tests use torch's own layers.
``LM_FACTORIES`` maps a name to a factory with the signature of :func:`torch_lm`;
pointing a test at another implementation (normlab's models) is one more entry.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

VOCAB = 256


class TorchLM(nn.Module):
    """Byte embedding -> blocks (TransformerEncoderLayer, causal) -> [final norm] -> head."""

    def __init__(self, placement: str, n_layers: int, d_model: int, n_heads: int, d_ff: int,
                 norm: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__()
        if placement not in ("post", "pre"):
            raise ValueError(f"placement must be 'post' or 'pre', got {placement!r}")
        self.embed = nn.Embedding(VOCAB, d_model)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, n_heads, d_ff, dropout=0.0, batch_first=True,
                                       norm_first=placement == "pre")
            for _ in range(n_layers)
        )
        if norm is not None:
            for block in self.blocks:
                block.norm1, block.norm2 = norm(d_model), norm(d_model)
        self.final_norm = (norm or nn.LayerNorm)(d_model) if placement == "pre" else None
        self.head = nn.Linear(d_model, VOCAB)

    def forward(self, tokens: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        t = tokens.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).triu(1)  # True = masked
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, src_mask=causal, src_key_padding_mask=padding_mask, is_causal=True)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.head(x)


def xavier_init(model: nn.Module) -> nn.Module:
    """Xavier-uniform linear weights (attention in-projections included), zero biases,
    N(0, 1) embeddings (unit variance per coordinate)."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                nn.init.xavier_uniform_(mod.weight)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.MultiheadAttention):
                nn.init.xavier_uniform_(mod.in_proj_weight)
                nn.init.zeros_(mod.in_proj_bias)
            elif isinstance(mod, nn.Embedding):
                nn.init.normal_(mod.weight, 0.0, 1.0)
    return model


def torch_lm(placement: str, *, n_layers: int = 2, d_model: int = 32, n_heads: int = 4,
             d_ff: int | None = None, seed: int = 0,
             norm: Callable[[int], nn.Module] | None = None) -> nn.Module:
    """A Xavier-initialized TorchLM; forward(tokens [B, T], padding_mask=None) -> logits [B, T, 256]."""
    torch.manual_seed(seed)
    model = TorchLM(placement, n_layers, d_model, n_heads, d_ff or 4 * d_model, norm)
    return xavier_init(model)


def normlab_lm(placement: str, *, n_layers: int = 2, d_model: int = 32, n_heads: int = 4,
               d_ff: int | None = None, seed: int = 0) -> nn.Module:
    """normlab's TransformerLM in the original Transformer's setting (ReLU FFN, sinusoidal
    positions, Xavier init), the setting Xiong et al. analyse."""
    from normlab.models import TransformerConfig, TransformerLM

    torch.manual_seed(seed)
    return TransformerLM(TransformerConfig(
        vocab_size=VOCAB, d_model=d_model, n_heads=n_heads, n_layers=n_layers, d_ff=d_ff,
        placement=placement, dropout=0.0, activation="relu", positional="sinusoidal",
        init="xavier", max_seq_len=512))


LM_FACTORIES: dict[str, Callable[..., nn.Module]] = {"torch": torch_lm, "normlab": normlab_lm}


def stdlib_bytes(n_bytes: int = 200_000) -> Tensor:
    """Real text without a download: the standard library's Python sources, as bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= n_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:n_bytes]), dtype=torch.uint8).long()


def text_batches(n_batches: int, batch: int, seq_len: int, seed: int = 0) -> list[Tensor]:
    """``n_batches`` random windows [batch, seq_len + 1] of stdlib source bytes."""
    data = stdlib_bytes()
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        starts = torch.randint(0, data.numel() - seq_len - 1, (batch,), generator=g)
        out.append(torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()]))
    return out


def lm_loss(model: nn.Module, window: Tensor) -> Tensor:
    """Mean next-byte cross-entropy of a window [B, T + 1]."""
    logits = model(window[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))


# ---------------------------------------------------------------- factories for `normlab audit`


def small_torch_transformer() -> nn.Module:
    """torch.nn.Transformer (Post-LN default, so with its double LayerNorm), small."""
    return nn.Transformer(d_model=32, nhead=2, num_encoder_layers=2, num_decoder_layers=2,
                          dim_feedforward=64, dropout=0.0, batch_first=True)


def zero_eps_lm() -> nn.Module:
    """A Pre-LN LM whose norms are float16 with eps=0."""
    model = torch_lm("pre", n_layers=2, d_model=16, n_heads=2)
    for mod in model.modules():
        if isinstance(mod, nn.LayerNorm):
            mod.eps = 0.0
            mod.half()
    return model
