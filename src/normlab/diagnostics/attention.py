"""The largest attention logit of each self-attention layer: what grows before a
transformer diverges at a high learning rate (Dehghani et al. 2023; Wortsman et al. 2023).

``AttentionLogitMonitor(model)`` hooks every normlab ``Attention`` module but the
cross-attention of normlab's decoder blocks (named ``cross_attn``) and, on each forward
pass inside the ``with`` block, recomputes that call's logits q . k / sqrt(head_dim)
(QK-norm and RoPE included; the keys from the call's ``context`` where it has one) without
gradients (its calls of the projections and norms are marked as a replay, which
normlab's other monitors do not record), and keeps the largest over the positions the call may attend to. The model's
own forward is untouched: the attention still runs through SDPA, which never forms the
logits, so this costs one extra q/k product per monitored call.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from normlab.diagnostics.activations import replaying
from normlab.diagnostics.structure import check_model
from normlab.errors import NormArgumentError


class AttentionLogitMonitor:
    """Context manager: ``by_layer()`` -> the largest logit of each self-attention module
    (in module order) over the calls seen, or NaN for one not called (queries at padded
    positions left out: ``max_logit``)."""

    def __init__(self, model: nn.Module) -> None:
        from normlab.models.attention import Attention

        check_model("AttentionLogitMonitor", model)
        self.modules = [(name, m) for name, m in model.named_modules()
                        if isinstance(m, Attention) and not name.endswith("cross_attn")]
        if not self.modules:
            raise NormArgumentError(
                f"AttentionLogitMonitor: expected a model with normlab's self-attention "
                f"(normlab.models.attention.Attention, as in normlab's TransformerLM), got a "
                f"{type(model).__name__} with none: the logits are recomputed from that module's "
                f"projections, and other attention modules (torch's, Hugging Face's) are not read")
        self._max: dict[str, Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> AttentionLogitMonitor:
        self._max.clear()
        if not self._handles:  # (entered again while attached: one set of hooks, not two recomputing each logit)
            for name, m in self.modules:
                self._handles.append(m.register_forward_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module, args, kwargs, output):
            context = args[1] if len(args) > 1 else kwargs.get("context")
            value = max_logit(module, args[0] if args else kwargs["x"], context=context,
                              attn_mask=kwargs.get("attn_mask"),
                              is_causal=bool(kwargs.get("is_causal", False)), rope=kwargs.get("rope"),
                              padding_mask=kwargs.get("padding_mask"))
            prev = self._max.get(name)
            self._max[name] = value if prev is None else torch.maximum(prev, value)

        return hook

    def by_layer(self) -> list[float]:
        # (-inf: every call's queries were padded, so no logit was read)
        values = [float(self._max[name]) if name in self._max else math.nan for name, _ in self.modules]
        return [math.nan if v == -math.inf else v for v in values]


@torch.no_grad()
def max_logit(attn: nn.Module, x: Tensor, *, context: Tensor | None = None, attn_mask: Tensor | None = None,
              is_causal: bool = False, rope: tuple[Tensor, Tensor] | None = None,
              padding_mask: Tensor | None = None) -> Tensor:
    """The largest q . k / sqrt(head_dim) of ``attn`` (a normlab ``Attention``) over the
    (query, key) pairs the mask allows: queries from ``x`` [B, T, d], keys from
    ``context`` [B, S, d] where given (cross-attention, as the module's forward), else
    from ``x``. Queries at padded positions (``padding_mask`` [B, T], True = padded) are
    left out: the model discards their rows (the mask lets a padded query attend to
    itself only so that its row is not empty), so their logits, which depend on the pad
    token, say nothing of the model's; -inf when every query is padded (no reading:
    ``AttentionLogitMonitor.by_layer`` gives NaN). A padding mask that is not bool is read
    as its nonzero entries (True = padded)."""
    from normlab.models.attention import apply_rope

    # the modules are called as the model calls them (their hooks run: FSDP's unshard,
    # casts), under ``replaying``, which normlab's own monitors skip, so ActivationMonitor
    # sees each QK-norm call of the model once
    with replaying():
        q = attn._heads(attn.q_proj(x), attn.q_norm)
        k = attn._heads(attn.k_proj(x if context is None else context), attn.k_norm)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    logits = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(attn.head_dim)
    allowed = torch.ones(logits.shape[-2:], dtype=torch.bool, device=logits.device)
    if is_causal:
        allowed = allowed.tril()
    if attn_mask is not None:
        allowed = allowed & attn_mask
    if padding_mask is not None:
        padded = padding_mask if padding_mask.dtype is torch.bool else padding_mask != 0
        allowed = allowed & ~padded[:, None, :, None]
    if logits.numel() == 0:  # an empty batch (or no keys): no logit, as when every query is padded
        return logits.new_full((), -math.inf)
    return logits.masked_fill(~allowed, -math.inf).amax()
