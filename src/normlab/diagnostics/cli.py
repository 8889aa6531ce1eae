"""``normlab audit MODEL``: load a model from a factory or a local Hugging Face config and audit it."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import typer
from rich.console import Console
from torch import nn

from normlab.diagnostics.audit import audit, findings_table


def load_model(spec: str) -> tuple[nn.Module, object]:
    """(model, example_input or None) from ``pkg.module:factory`` or a Hugging Face config.

    A factory may return a model or (model, example_input). A config is a local directory
    with a config.json, or a name already in the local Hugging Face cache; the model is
    built from it with random weights (nothing is downloaded)."""
    if ":" in spec and not Path(spec).exists():
        mod_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as e:
            raise typer.BadParameter(f"cannot import '{spec}' ({e}); expected pkg.module:factory",
                                     param_hint="MODEL") from None
        made = factory()
        if isinstance(made, tuple):
            return made[0], (made[1] if len(made) > 1 else None)
        return made, None
    try:
        import transformers
    except ImportError:
        raise typer.BadParameter(
            f"'{spec}' is not an import path (pkg.module:factory) and transformers is not installed "
            f"to read it as a Hugging Face config", param_hint="MODEL") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        config = transformers.AutoConfig.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError) as e:
        raise typer.BadParameter(
            f"'{spec}' is neither pkg.module:factory nor a local Hugging Face config ({e})",
            param_hint="MODEL") from None
    try:
        model = transformers.AutoModelForCausalLM.from_config(config)
    except ValueError:
        model = transformers.AutoModel.from_config(config)
    return model, None


def audit_command(spec: str) -> None:
    """Print the audit of the model named by ``spec``; exit 1 if any finding is an error."""
    model, example_input = load_model(spec)
    findings = audit(model, example_input)
    console = Console()
    if not findings:
        console.print(f"normlab audit: no findings for {type(model).__name__} ({spec})")
        return
    console.print(findings_table(findings, title=f"normlab audit: {type(model).__name__} ({spec})"))
    if any(f.severity == "error" for f in findings):
        raise typer.Exit(1)
