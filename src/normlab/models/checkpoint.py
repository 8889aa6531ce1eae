"""save_model / load_model: a model's weights and its config in one safetensors file.

safetensors comes with the ``study`` extra and is imported only when a model is saved
or loaded, so ``import normlab.models`` needs torch alone."""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from normlab.models.config import TransformerConfig
from normlab.models.encoder import TransformerEncoder
from normlab.models.lm import TransformerLM
from normlab.models.seq2seq import Seq2SeqTransformer

_MODELS = {cls.__name__: cls for cls in (TransformerLM, TransformerEncoder, Seq2SeqTransformer)}


def _safetensors():
    """The safetensors module, or an ImportError that names the extra to install."""
    try:
        import safetensors
        import safetensors.torch
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] != "safetensors":
            raise
        raise ImportError(
            "normlab.models.save_model/load_model need safetensors: pip install 'normlab[study]'"
        ) from None
    return safetensors


def save_model(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model``'s state_dict (tied weights stored once) with its config and class
    in the file's metadata, so ``load_model(path)`` rebuilds it."""
    name = type(model).__name__
    if name not in _MODELS:
        raise ValueError(f"save_model: expected one of {', '.join(_MODELS)}, got {name}")
    meta = {"normlab.model": name, "normlab.config": json.dumps(model.cfg.to_dict())}
    head = getattr(model, "head", None)
    if isinstance(model, TransformerEncoder) and head is not None:
        meta["normlab.n_outputs"] = str(head.out_features)
    _safetensors().torch.save_model(model, os.fspath(path), metadata=meta)


# safetensors' dtype names (``get_slice(...).get_dtype()``) of the dtypes a model holds
_STORED_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                  "I64": torch.int64, "I32": torch.int32, "BOOL": torch.bool}


def _json_kind(v: object) -> str:
    """The JSON name of a decoded value's type (an array, a string, ...)."""
    kinds = ((bool, "boolean"), (list, "array"), (str, "string"), ((int, float), "number"), (type(None), "null"))
    return next((name for t, name in kinds if isinstance(v, t)), type(v).__name__)


def load_model(path: str | os.PathLike, device: str | int | torch.device = "cpu") -> nn.Module:
    """The model ``save_model`` wrote: rebuilt from its config, weights loaded strictly,
    each parameter and buffer in the dtype it was stored in (a float64 or bfloat16 model
    comes back as it was, not as float32), on ``device`` (a name, a CUDA index or a
    torch.device)."""
    if isinstance(device, torch.device):
        device = str(device)
    elif isinstance(device, bool) or not isinstance(device, (str, int)):
        raise TypeError(f"load_model: expected device to be a str, an int (a CUDA index) or a torch.device, "
                        f"got {type(device).__name__}")
    st = _safetensors()
    with st.safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata() or {}
        stored = {k: _STORED_DTYPES.get(f.get_slice(k).get_dtype()) for k in f.keys()}
    where = os.fspath(path)
    if "normlab.model" not in meta:
        raise ValueError(f"load_model: {where!r} has no normlab model metadata (was it written by save_model?)")
    if meta["normlab.model"] not in _MODELS:
        raise ValueError(f"load_model: {where!r} has normlab.model {meta['normlab.model']!r} in its metadata, "
                         f"not a class save_model writes; expected one of {', '.join(_MODELS)}")
    if "normlab.config" not in meta:
        raise ValueError(f"load_model: {where!r} has no normlab.config entry; expected the model's config as "
                         f"save_model writes it")
    try:
        d = json.loads(meta["normlab.config"])
    except json.JSONDecodeError as e:
        raise ValueError(f"load_model: {where!r} has a normlab.config that is not JSON ({e}); expected the "
                         f"model's config as save_model writes it") from None
    if not isinstance(d, dict):
        raise ValueError(f"load_model: {where!r} has a normlab.config that is a JSON {_json_kind(d)}; expected "
                         f"a JSON object (dict) of TransformerConfig fields, as save_model writes it")
    try:
        cfg = TransformerConfig.from_dict(d)
    except (TypeError, ValueError) as e:  # unknown fields, values TransformerConfig refuses
        why = " ".join(str(e).split()).removeprefix("TransformerConfig.from_dict: ").removeprefix("TransformerConfig: ")
        raise ValueError(f"load_model: {where!r} has a normlab.config that TransformerConfig refuses: {why}") from None
    cls = _MODELS[meta["normlab.model"]]
    if cls is TransformerEncoder:
        n_out = meta.get("normlab.n_outputs")
        if n_out and not (n_out.isascii() and n_out.isdigit() and int(n_out) >= 1):
            raise ValueError(f"load_model: {where!r} has normlab.n_outputs {n_out!r}; expected a positive "
                             f"integer (the width of the encoder's head)")
        model = cls(cfg, n_outputs=int(n_out) if n_out else None)
    else:
        model = cls(cfg)
    for name, t in model.state_dict(keep_vars=True).items():
        # (a tied weight is stored once: its other name shares the cast tensor)
        if stored.get(name) is not None and t.dtype != stored[name]:
            t.data = t.data.to(stored[name])
    st.torch.load_model(model, os.fspath(path), strict=True, device=device)
    return model.to(device)
