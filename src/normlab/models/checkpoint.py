"""save_model / load_model: a model's weights and its config in one safetensors file.

safetensors comes with the ``study`` extra and is imported only when a model is saved
or loaded, so ``import normlab.models`` needs torch alone."""

from __future__ import annotations

import json
import os

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


def load_model(path: str | os.PathLike, device: str = "cpu") -> nn.Module:
    """The model ``save_model`` wrote: rebuilt from its config, weights loaded strictly."""
    st = _safetensors()
    with st.safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "normlab.model" not in meta or meta["normlab.model"] not in _MODELS:
        raise ValueError(f"load_model: {os.fspath(path)!r} has no normlab model metadata (was it written by save_model?)")
    cfg = TransformerConfig.from_dict(json.loads(meta["normlab.config"]))
    cls = _MODELS[meta["normlab.model"]]
    if cls is TransformerEncoder:
        n_out = meta.get("normlab.n_outputs")
        model = cls(cfg, n_outputs=int(n_out) if n_out else None)
    else:
        model = cls(cfg)
    st.torch.load_model(model, os.fspath(path), strict=True, device=device)
    return model.to(device)
