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
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's Conv1D (GPT-2): y = x @ weight + bias, weight [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def recomputed_by(module: nn.Module) -> str | None:
    """How ``module``'s weight is recomputed from other tensors on every call, or None: a
    ``torch.nn.utils.parametrize`` parametrization (``parametrizations.weight_norm``,
    ``orthogonal``, ...) or torch's older hook-based ``weight_norm`` / ``spectral_norm``.
    Rewriting such a weight in place does not last: the next call computes it again."""
    if parametrize.is_parametrized(module):
        names = ", ".join(module.parametrizations.keys())
        return f"{names} computed by torch.nn.utils.parametrize from other tensors on every call"
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, (WeightNorm, SpectralNorm)):
            kind = "weight_norm" if isinstance(hook, WeightNorm) else "spectral_norm"
            return f"{hook.name} recomputed by torch.nn.utils.{kind}, a forward pre-hook, on every call"
    return None


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

    def weight_param(self) -> nn.Parameter:
        """The parameter holding W (a packed MultiheadAttention's ``in_proj_weight``)."""
        m = self.module
        if isinstance(m, nn.Parameter):
            return m
        return m.in_proj_weight if isinstance(m, nn.MultiheadAttention) else m.weight

    def bias_param(self) -> nn.Parameter | None:
        m = self.module
        if isinstance(m, nn.MultiheadAttention):
            return m.in_proj_bias
        return None if isinstance(m, nn.Parameter) else getattr(m, "bias", None)

    def layout(self) -> tuple[str, str]:
        """How W sits in its parameter: ("conv1d" (stored [in, out]) | "linear", rows). Two
        views of one parameter with the same layout rewrite the same entries."""
        return ("conv1d" if is_conv1d(self.module) else "linear", self.rows)

    def fold_beta(self, beta: Tensor) -> None:
        """b -> b + W beta (with W before ``scale_input``: W(gamma x + beta) + b folds into
        (W diag(gamma)) x + (W beta + b)); the caller gives the view a bias. One view; a
        tensor several views share is rewritten once (``fold._fold``)."""
        b = self.bias()
        b.copy_((b.double() + self.weight().double() @ beta.double()).to(b.dtype))

    def scale_input(self, gamma: Tensor) -> None:
        """W -> W diag(gamma)."""
        w = self.weight()
        w.copy_((w.double() * gamma.double()).to(w.dtype))

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
