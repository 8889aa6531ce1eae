"""Assert that no hook of any kind is left on a model or its parameters."""

from __future__ import annotations

from torch import nn

MODULE_HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
    "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
    "_state_dict_hooks", "_load_state_dict_pre_hooks",
)


def hook_count(model: nn.Module) -> int:
    n = 0
    for mod in model.modules():
        for attr in MODULE_HOOK_DICTS:
            n += len(getattr(mod, attr, {}) or {})
    for p in model.parameters():
        n += len(p._backward_hooks or {})
        n += len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
    return n
