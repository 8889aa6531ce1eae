"""``normlab audit MODEL``: load a model from a factory or a local Hugging Face checkpoint and audit it."""

from __future__ import annotations

import importlib
import os
import pickle
import sys
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.markup import escape
from torch import nn

from normlab.diagnostics.audit import audit, findings_table
from normlab.errors import NormArgumentError

_FACTORY = "pkg.module:factory, a callable taking no arguments that returns an nn.Module or (nn.Module, example_input)"
# the weight files transformers' from_pretrained reads (sharded ones through their index)
_WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")


def load_model(spec: str) -> tuple[nn.Module, object, str | None]:
    """(model, example_input or None, note or None) from ``pkg.module:factory`` or a Hugging Face checkpoint.

    ``pkg.module`` is imported with the working directory first on sys.path (as
    ``python -m`` has it). A factory takes no arguments and returns a model or
    (model, example_input); anything else (or a factory that raises) is a
    ``typer.BadParameter``. A checkpoint is a local
    directory with a config.json, or a name already in the local Hugging Face cache
    (nothing is downloaded): the model class is the config's ``architectures`` entry
    (else AutoModelForCausalLM, else AutoModel), loaded with its saved weights; where
    there are none it is built from the config with random weights and ``note`` says so.
    An empty ``spec`` is refused (a path would read it as the current directory)."""
    if not spec.strip():
        raise typer.BadParameter("expected pkg.module:factory, a local Hugging Face checkpoint or config, or a "
                                 "normlab .safetensors file, got an empty path", param_hint="MODEL")
    if ":" in spec and not Path(spec).exists():
        model, example_input = _from_factory(spec)
        return model, example_input, None
    if Path(spec).is_file() and Path(spec).suffix == ".safetensors":
        return _from_normlab_file(Path(spec)), None, None
    if Path(spec).is_dir():
        # what `normlab convert` writes for a normlab model (its config.json has no model_type):
        # MODEL is the file it holds
        from normlab.convert.cli import refuse_normlab_dir

        refuse_normlab_dir(Path(spec), "MODEL")
    return _from_hugging_face(spec)


def _from_normlab_file(path: Path) -> nn.Module:
    """A model ``normlab.models.save_model`` wrote (its class and config in the metadata)."""
    from safetensors import SafetensorError, safe_open

    from normlab.convert.cli import load_failure
    from normlab.models import load_model

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise typer.BadParameter(f"cannot read '{path}' as a safetensors file ({e})", param_hint="MODEL") from None
    if "normlab.model" not in meta:
        raise typer.BadParameter(f"'{path}' is a safetensors file without normlab's metadata (a state dict alone "
                                 f"does not say which model it is); expected a file normlab.models.save_model wrote, "
                                 f"a local Hugging Face checkpoint directory, or {_FACTORY}", param_hint="MODEL")
    try:
        return load_model(path)
    except (ValueError, RuntimeError) as e:
        if isinstance(e, torch.OutOfMemoryError):  # (a RuntimeError, not the file's fault)
            raise
        raise typer.BadParameter(f"cannot load '{path}' ({load_failure(e)})", param_hint="MODEL") from None


def _from_factory(spec: str) -> tuple[nn.Module, object]:
    mod_name, _, attr = spec.partition(":")
    # the console script's sys.path starts with its own bin directory, not the working
    # directory that `python -m normlab` puts first: a module there must import as well
    cwd = os.getcwd()
    if sys.path[:1] not in ([cwd], [""]):
        sys.path.insert(0, cwd)
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except Exception as e:  # no such module or name, an empty or relative name, the module's own error
        raise typer.BadParameter(f"cannot import '{spec}' ({type(e).__name__}: {e}); expected pkg.module:factory",
                                 param_hint="MODEL") from None
    if not callable(factory):
        raise typer.BadParameter(f"'{spec}' is a {type(factory).__name__}, not callable; expected {_FACTORY}",
                                 param_hint="MODEL")
    try:
        made = factory()
    except Exception as e:  # the factory's own error, reported as one line
        raise typer.BadParameter(f"calling '{spec}' failed ({type(e).__name__}: {e}); expected {_FACTORY}",
                                 param_hint="MODEL") from None
    model, example_input = made, None
    if isinstance(made, tuple) and made:
        model, example_input = made[0], (made[1] if len(made) > 1 else None)
    if not isinstance(model, nn.Module):
        got = "None" if made is None else f"a {type(made).__name__}" + (
            f" whose first item is a {type(model).__name__}" if model is not made else "")
        raise typer.BadParameter(f"'{spec}' returned {got}; expected {_FACTORY}", param_hint="MODEL")
    return model, example_input


def _model_classes(transformers, config) -> list:
    """The saved architecture's class (``config.architectures``), then the Auto classes."""
    classes = []
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            classes.append(cls)
    return classes + [transformers.AutoModelForCausalLM, transformers.AutoModel]


def _unreadable() -> tuple[type[BaseException], ...]:
    """What reading a damaged or foreign weights file raises: torch.load's unpickling and
    its RuntimeErrors, a truncated file, safetensors' own error."""
    errors: list[type[BaseException]] = [pickle.UnpicklingError, EOFError, RuntimeError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:
        pass
    return tuple(errors)


_UNREADABLE = _unreadable()


def _in_hf_cache(spec: str) -> bool:
    """``spec`` names a Hugging Face model whose config.json is in the local cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(spec, "config.json"), str)
    except (ImportError, ValueError):  # no huggingface_hub, or not a model name at all
        return False


def _from_hugging_face(spec: str) -> tuple[nn.Module, object, str | None]:
    try:
        import transformers
    except ImportError:
        raise typer.BadParameter(
            f"'{spec}' is not an import path (pkg.module:factory) and transformers is not installed "
            f"to read it as a Hugging Face config", param_hint="MODEL") from None
    from normlab.integrations.hf import WeightsDoNotFit, load_pretrained

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        config = transformers.AutoConfig.from_pretrained(spec, local_files_only=True)
    except Exception as e:  # (OSError, ValueError, and the config validation's own errors)
        # (for a mistyped path transformers asks to check the internet connection: nothing is downloaded)
        if not Path(spec).exists() and not _in_hf_cache(spec):
            raise typer.BadParameter(
                f"'{spec}': no such file or directory, nor a Hugging Face model of that name in the local cache "
                f"(nothing is downloaded); expected a local Hugging Face checkpoint or config, or {_FACTORY}",
                param_hint="MODEL") from None
        if Path(spec).is_dir() and not (Path(spec) / "config.json").is_file():
            raise typer.BadParameter(
                f"'{spec}' is a directory without a config.json; expected a local Hugging Face checkpoint or "
                f"config, or {_FACTORY}", param_hint="MODEL") from None
        if Path(spec).exists():
            raise typer.BadParameter(f"'{spec}': transformers cannot build a model config from it "
                                     f"({type(e).__name__}: {e})", param_hint="MODEL") from None
        raise typer.BadParameter(
            f"'{spec}' is neither pkg.module:factory nor a local Hugging Face config ({e})",
            param_hint="MODEL") from None
    where = Path(spec)
    # a checkpoint's own config.json: the checkpoint, its weights included (another config
    # file beside a checkpoint is that config, built with random weights)
    if where.is_file() and where.name == "config.json" and any(any(where.parent.glob(p)) for p in _WEIGHT_FILES):
        spec = str(where.parent)
        where = where.parent
    local = where.is_dir()
    # a config file alone (config.json) holds no weights: the model is built from it
    has_weights = (any(any(where.glob(p)) for p in _WEIGHT_FILES) if local
                   else False if where.is_file() else None)
    errors = []
    unfit = None  # the first class the saved weights did not fill
    for cls in _model_classes(transformers, config):
        auto = cls.__module__.startswith("transformers.models.auto")
        if has_weights is not False:
            try:
                model = load_pretrained(cls, spec)
                return model, None, (None if unfit is None else
                                     f"{unfit}; audited as {type(model).__name__}, which they fill")
            except WeightsDoNotFit as e:  # (an Auto class of another head: the next class may fit)
                unfit = unfit or e
                errors.append(f"{cls.__name__}: {e}")
                continue
            except ValueError as e:  # an Auto class that does not know this config
                errors.append(f"{cls.__name__}: {e}")
                continue
            except OSError as e:
                if has_weights:
                    raise typer.BadParameter(f"cannot load the weights in '{spec}' ({e})",
                                             param_hint="MODEL") from None
                has_weights = False  # a cached config without weights: build it below
            except _UNREADABLE as e:  # weights torch cannot read (a damaged or foreign file)
                if isinstance(e, torch.OutOfMemoryError):  # (a RuntimeError, not the file's fault)
                    raise
                raise typer.BadParameter(f"cannot load the weights in '{spec}' ({type(e).__name__}: {e})",
                                         param_hint="MODEL") from None
        try:
            model = cls.from_config(config) if auto else cls(config)
        except (ValueError, AssertionError, TypeError, IndexError, KeyError) as e:
            # (a config its own model class refuses: e.g. a pad_token_id outside the vocabulary)
            errors.append(f"{cls.__name__}: {type(e).__name__}: {e}")
            continue
        return model, None, (f"no weights in '{spec}': {type(model).__name__} was built from its config with "
                             f"random weights, so the weight checks (dead-norm, norm-far-from-init) describe "
                             f"an untrained model")
    if unfit is not None:  # weights that no class takes whole
        raise typer.BadParameter(str(unfit), param_hint="MODEL")
    raise typer.BadParameter(f"no transformers model class builds the config in '{spec}' ({'; '.join(errors)})",
                             param_hint="MODEL")


def audit_command(spec: str) -> None:
    """Print the audit of the model named by ``spec``; exit 1 if any finding is an error."""
    from normlab.bench.common import check_backend

    model, example_input, note = load_model(spec)
    device = next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))
    if device.type != "meta":  # (audit refuses a model on the meta device itself)
        check_backend(device)  # the audit's forward runs there
    try:
        findings = audit(model, example_input)
    except NormArgumentError as e:  # a model audit cannot take (on the meta device, ...): one line
        raise typer.BadParameter(f"cannot audit '{spec}': {str(e).removeprefix('audit: ')}",
                                 param_hint="MODEL") from None
    console = Console()
    name = escape(f"{type(model).__name__} ({spec})")
    if note is not None:
        console.print(f"normlab audit: {escape(note)}")
    if not findings:
        console.print(f"normlab audit: no findings for {name}")
        return
    console.print(findings_table(findings, title=f"normlab audit: {name}"))
    if any(f.severity == "error" for f in findings):
        raise typer.Exit(1)
