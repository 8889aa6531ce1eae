"""Run a model on example inputs and collect its floating-point outputs, for before/after checks."""

from __future__ import annotations

import copy
from itertools import chain

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


def compare(before: list[Tensor], after: list[Tensor], atol: float, rtol: float) -> tuple[bool, float]:
    """Whether every output pair agrees within ``atol``/``rtol`` (compared in float64),
    and the largest absolute difference."""
    pairs = [(x.double(), y.double()) for x, y in zip(before, after)]
    worst = max((float((x - y).abs().max()) for x, y in pairs if x.numel()), default=0.0)
    ok = len(before) == len(after) and all(
        x.shape == y.shape and torch.allclose(x, y, atol=atol, rtol=rtol) for x, y in pairs)
    return ok, worst


def low_precision(model: nn.Module) -> str | None:
    """The names of the model's floating-point parameter/buffer dtypes narrower than
    float32 ("bfloat16", "float16", ...), or None when there are none."""
    narrow = {t.dtype for t in chain(model.parameters(), model.buffers())
              if t.is_floating_point() and torch.finfo(t.dtype).bits < 32}
    return ", ".join(sorted(str(d).removeprefix("torch.") for d in narrow)) or None


# a module's hook dicts: a copy made for a check runs without the user's hooks (which may
# not even copy: a bound method of an object holding a lock)
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


def copy_without_hooks(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose modules have no hooks (the originals keep theirs)."""
    memo = {id(hooks): type(hooks)() for m in module.modules() for attr in HOOK_DICTS
            if isinstance(hooks := getattr(m, attr, None), dict)}
    return copy.deepcopy(module, memo)


_HALF = (torch.float16, torch.bfloat16)


def float32_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``, without hooks, with its half-precision parameters and
    buffers in float32 (float32 and float64 ones as they are; ties kept): where a
    half-precision model's conversion is checked."""
    return copy_without_hooks(model)._apply(lambda t: t.float() if t.dtype in _HALF else t)


def inputs_in_float32(example_inputs):
    """``example_inputs`` with their narrower-than-float32 floating tensors in float32."""
    if isinstance(example_inputs, Tensor):
        narrow = example_inputs.is_floating_point() and torch.finfo(example_inputs.dtype).bits < 32
        return example_inputs.float() if narrow else example_inputs
    if isinstance(example_inputs, dict):
        return {k: inputs_in_float32(v) for k, v in example_inputs.items()}
    if isinstance(example_inputs, (tuple, list)):
        out = [inputs_in_float32(v) for v in example_inputs]
        return out if isinstance(example_inputs, list) else tuple(out)
    return example_inputs


def hf_feature_inputs(model: nn.Module, g: torch.Generator, device, dtype) -> list:
    """A Hugging Face vision or speech model's input, from its ``main_input_name`` and its
    config: images [2, num_channels, image_size, image_size] for ``pixel_values`` (ViT,
    DINOv2, CLIP's vision tower), log-mel features [2, num_mel_bins, 2 * max_source_positions]
    for ``input_features`` (Whisper's encoder); with target ids for an encoder-decoder.
    Empty for any other model."""
    config, name = getattr(model, "config", None), getattr(model, "main_input_name", None)
    if config is None or not isinstance(name, str):
        return []
    if name == "pixel_values":
        size = getattr(config, "image_size", None)
        size = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, (tuple, list)) else ()
        shape = (2, getattr(config, "num_channels", 3), *size)
    elif name == "input_features" and isinstance(getattr(config, "num_mel_bins", None), int):
        shape = (2, config.num_mel_bins, 2 * getattr(config, "max_source_positions", 1500))
    else:
        return []
    if len(shape) != 4 and name == "pixel_values" or not all(isinstance(n, int) and n > 0 for n in shape):
        return []
    inputs = {name: torch.randn(shape, generator=g).to(device, dtype)}
    if getattr(config, "is_encoder_decoder", False):
        vocab = getattr(config, "vocab_size", None)
        if not isinstance(vocab, int) or vocab < 1:
            return []
        inputs["decoder_input_ids"] = torch.randint(0, vocab, (2, 8), generator=g).to(device)
    return [inputs]
