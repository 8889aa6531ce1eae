"""Linear maps the transforms rewrite: y = x W^T + b.

A ``LinearView`` is one such map inside a model: a torch.nn.Linear, a Hugging Face
Conv1D (GPT-2; weight stored [in, out]), some rows of a torch.nn.MultiheadAttention's
packed input projection, an embedding table (a linear map of one-hot rows) or a bare
parameter added to the residual stream (a learned positional table). Every update is
done in float64 and rounded once to the parameter's dtype, in place, so Parameter
objects (and so tied weights and optimizer state) keep their identity.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's Conv1D (GPT-2): y = x @ weight + bias, weight [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


@dataclass
class LinearView:
    """``rows`` selects a packed MultiheadAttention projection: "all", "q" or "kv"."""

    module: nn.Module
    path: str
    rows: str = "all"

    def _rows(self) -> slice:
        e = self.module.embed_dim
        return {"all": slice(0, 3 * e), "q": slice(0, e), "kv": slice(e, 3 * e)}[self.rows]

    def check(self) -> str | None:
        """None if this view can be rewritten, else the reason."""
        m = self.module
        if isinstance(m, nn.MultiheadAttention):
            if not m._qkv_same_embed_dim or m.in_proj_weight is None:
                return f"{self.path}: MultiheadAttention without a packed in_proj_weight"
            return None
        if is_linear_like(m) or isinstance(m, (nn.Embedding, nn.Parameter)):
            return None
        return f"{self.path}: {type(m).__name__} is not a Linear, Conv1D or MultiheadAttention"

    # W as [out, in] and b as [out], both views into the parameters
    def weight(self) -> Tensor:
        m = self.module
        if isinstance(m, nn.MultiheadAttention):
            return m.in_proj_weight.data[self._rows()]
        if is_conv1d(m):
            return m.weight.data.t()
        return m.weight.data

    def bias(self) -> Tensor | None:
        m = self.module
        if isinstance(m, nn.MultiheadAttention):
            return None if m.in_proj_bias is None else m.in_proj_bias.data[self._rows()]
        return None if getattr(m, "bias", None) is None else m.bias.data

    def parameters(self) -> list[nn.Parameter]:
        m = self.module
        if isinstance(m, nn.Parameter):
            return [m]
        if isinstance(m, nn.MultiheadAttention):
            return [p for p in (m.in_proj_weight, m.in_proj_bias) if p is not None]
        return [p for p in (m.weight, getattr(m, "bias", None)) if p is not None]

    def fold_input_affine(self, gamma: Tensor | None, beta: Tensor | None) -> None:
        """W(gamma * x + beta) + b  ->  (W diag(gamma)) x + (W beta + b).

        Without a bias, beta must be zero (the caller checks)."""
        w = self.weight()
        w64 = w.double()
        b = self.bias()
        if beta is not None and b is not None:
            b.copy_((b.double() + w64 @ beta.double()).to(b.dtype))
        if gamma is not None:
            w.copy_((w64 * gamma.double()).to(w.dtype))

    def center_output(self) -> None:
        """Make every output zero-mean over the output dim: W -= mean_out(W), b -= mean(b).

        For an embedding table (or an added parameter table) each row is centered."""
        m = self.module
        if isinstance(m, (nn.Embedding, nn.Parameter)):
            t = m.weight.data if isinstance(m, nn.Embedding) else m.data
            t.copy_((t.double() - t.double().mean(-1, keepdim=True)).to(t.dtype))
            return
        w = self.weight()
        w.copy_((w.double() - w.double().mean(0, keepdim=True)).to(w.dtype))
        b = self.bias()
        if b is not None:
            b.copy_((b.double() - b.double().mean()).to(b.dtype))
