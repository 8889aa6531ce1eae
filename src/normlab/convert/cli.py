"""``normlab convert``: apply the transforms to a saved model and write the result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

TRANSFORMS = ("swap", "fold", "rms")


def _load_hf(src: Path):
    try:
        import transformers
    except ImportError as err:
        raise typer.BadParameter("a Hugging Face model directory needs transformers: "
                                 "pip install 'normlab[hf]'") from err
    config = transformers.AutoConfig.from_pretrained(src, local_files_only=True)
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        cls = transformers.AutoModel
    return cls.from_pretrained(src, local_files_only=True)


def _load_normlab(weights: Path, config: Path):
    """A normlab model from its JSON config (TransformerConfig fields) and a safetensors state dict."""
    try:
        from normlab.models import TransformerConfig, TransformerLM
    except ImportError as err:
        raise typer.BadParameter("normlab.models is not available in this installation; "
                                 "convert a Hugging Face model directory instead") from err
    from safetensors.torch import load_model

    model = TransformerLM(TransformerConfig(**json.loads(config.read_text())))
    load_model(model, weights)
    return model


def _example_inputs(model):
    import torch

    cfg = getattr(model, "config", None)
    vocab = getattr(cfg, "vocab_size", None)
    if not vocab:
        return None
    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids}
    if getattr(cfg, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids
    return inputs


def convert(
    src: Annotated[Path, typer.Argument(help="A local Hugging Face model directory, or a normlab .safetensors state dict.")],
    out: Annotated[Path, typer.Argument(help="Directory to write the converted model and report to.")],
    transform: Annotated[list[str] | None, typer.Option("--transform", "-t", help="swap | fold | rms; repeat to chain, applied in order (default: swap).")] = None,
    config: Annotated[Path | None, typer.Option(help="The normlab model's JSON config (with a .safetensors SRC).")] = None,
) -> None:
    """Convert a saved model: swap its norms for normlab's, fold norm affines, or turn
    Pre-LN into Pre-RMSNorm; write it to OUT with the report (normlab_convert.json)."""
    from rich.console import Console

    from normlab.convert import ConversionError, fold_norm_affine, layernorm_to_rmsnorm, swap_norms

    console = Console()
    transform = transform or ["swap"]
    bad = [t for t in transform if t not in TRANSFORMS]
    if bad:
        raise typer.BadParameter(f"expected each --transform in {', '.join(TRANSFORMS)}, got {', '.join(bad)}")
    if src.is_dir():
        model, kind = _load_hf(src), "hf"
    elif src.suffix == ".safetensors":
        if config is None:
            raise typer.BadParameter("a .safetensors SRC needs --config (the normlab model's JSON config)")
        model, kind = _load_normlab(src, config), "normlab"
    else:
        raise typer.BadParameter(f"SRC must be a model directory or a .safetensors file, got {src}")
    model.eval()
    reports = []
    for t in transform:
        try:
            if t == "swap":
                r = swap_norms(model)
            elif t == "fold":
                r = fold_norm_affine(model)
            else:
                r = layernorm_to_rmsnorm(model, example_inputs=_example_inputs(model))
        except ConversionError as err:
            console.print(f"[red]{err}[/red]")
            raise typer.Exit(1) from err
        console.print(str(r), highlight=False, soft_wrap=True)
        reports.append(r.to_dict())
    out.mkdir(parents=True, exist_ok=True)
    if kind == "hf":
        # the state dict is what is saved: swapped norms load back as the original classes
        # (re-apply normlab.integrations.hf.apply_normlab); folded and RMS-converted
        # weights stay exact in the original architecture (norm weights 1, zero-mean stream)
        model.save_pretrained(out)
    else:
        from safetensors.torch import save_model

        save_model(model, str(out / "model.safetensors"))
        (out / "config.json").write_text(config.read_text())
    (out / "normlab_convert.json").write_text(json.dumps(reports, indent=2))
    console.print(f"wrote {out}")
