"""Run a model on example inputs and collect its floating-point outputs, for before/after checks."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _tensors(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out.detach()] if out.is_floating_point() else []
    if isinstance(out, dict) or hasattr(out, "items"):
        return [t for _, v in out.items() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []


def call(model: nn.Module, example_inputs):
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def run_outputs(model: nn.Module, example_inputs) -> list[Tensor]:
    """The model's floating-point outputs (logits first for Hugging Face outputs), in eval mode."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = call(model, example_inputs)
    finally:
        model.train(was)
    if hasattr(out, "logits"):
        out = out.logits
    return _tensors(out)
