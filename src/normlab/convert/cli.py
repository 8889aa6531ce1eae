"""``normlab convert``: apply the transforms to a saved model and write the result."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated

import typer

TRANSFORMS = ("swap", "fold", "rms")
# the files convert writes (save_pretrained's, save_model's, its report), and the weights of
# another checkpoint there, which reloading OUT would read with them
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json", "normlab_convert.json")
# and the shards an index names (save_pretrained's ``max_shard_size``)
_SHARD = re.compile(r"model-\d+-of-\d+\.safetensors|pytorch_model-\d+-of-\d+\.bin")


def _path(param_hint: str, expected: str):
    """A callback for a path parameter that Typer hands over as given (``path_type=str``):
    an empty one is refused, naming ``param_hint`` (Typer would read "" as the current
    directory), and the rest become Paths."""

    def check(value: str | None) -> Path | None:
        if value is None:
            return None
        if not value.strip():
            raise typer.BadParameter(f"expected {expected}, got an empty path", param_hint=param_hint)
        return Path(value)

    return check


def _model_files(out: Path) -> list[Path]:
    """The files in ``out`` that writing a converted model there replaces (``_MODEL_FILES``
    and weight shards), sorted; nothing else (a tokenizer, a README) is one of them."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.name in _MODEL_FILES or _SHARD.fullmatch(p.name))


def _load_hf(src: Path):
    refuse_normlab_dir(src, "SRC")
    if not (src / "config.json").is_file():  # (transformers would ask for a model_type key in it)
        raise typer.BadParameter(f"{src} is a directory without a config.json; expected a Hugging Face model "
                                 "directory or a normlab .safetensors file", param_hint="SRC")
    try:
        import transformers
    except ImportError as err:
        raise typer.BadParameter("a Hugging Face model directory needs transformers: "
                                 "pip install 'normlab[hf]'") from err
    try:
        config = transformers.AutoConfig.from_pretrained(src, local_files_only=True)
        archs = getattr(config, "architectures", None) or []
        cls = getattr(transformers, archs[0], None) if archs else None
        from normlab.integrations.hf import WeightsDoNotFit, load_pretrained

        if cls is not None:  # the class the checkpoint names: what it keeps is transformers' to say
            return load_pretrained(cls, src)
        # no class named (or one transformers has not, a remote-code checkpoint's): the base
        # model of its model_type, refused where the files hold more (a head it would drop)
        try:
            return load_pretrained(transformers.AutoModel, src, keep_every_weight=True)
        except WeightsDoNotFit as err:
            named = f"names {archs[0]!r}, which transformers has not" if archs else "names no architectures"
            raise typer.BadParameter(
                f"cannot load {src} whole: its config.json {named}, and the base model of its model_type "
                f"({config.model_type}) has no place for some of its weights: {_first_line(err)}; set "
                f"\"architectures\" in config.json to the model's transformers class (e.g. LlamaForCausalLM)",
                param_hint="SRC") from err
    except (OSError, ValueError) as err:  # no config or weights, an unknown model_type, weights that do not fit, ...
        raise typer.BadParameter(f"cannot load {src} as a Hugging Face model directory: {_first_line(err)}",
                                 param_hint="SRC") from err


def _first_line(err: BaseException) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def _normlab_metadata(weights: Path, param_hint: str = "SRC") -> dict:
    """The metadata of a safetensors file; a file that is not one is refused (as ``param_hint``)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise typer.BadParameter(f"cannot read {weights} as a safetensors file: {_first_line(err)}",
                                 param_hint=param_hint) from err


def refuse_normlab_dir(directory: Path, param_hint: str) -> None:
    """Refuse (as ``param_hint``) a directory that holds a normlab model, not a Hugging Face
    one: what ``normlab convert`` writes for a normlab model (model.safetensors with
    ``normlab.models.save_model``'s metadata, a config.json without a model_type), which is
    given as its file. (``normlab audit`` refuses it alike.)"""
    weights = directory / "model.safetensors"
    if weights.is_file() and _normlab_metadata(weights, param_hint).get("normlab.model"):
        raise typer.BadParameter(f"{directory} holds a normlab model (normlab.models.save_model), not a Hugging "
                                 f"Face model; expected its file as {param_hint}: {weights}", param_hint=param_hint)


def load_failure(err: Exception) -> str:
    """Why ``normlab.models.load_model`` refused a file, in one line: its ValueErrors (metadata
    it cannot rebuild a model from) as they are, weights that do not fit the model its
    metadata describes summarized by ``_mismatch``."""
    head = re.match(r"Error\(s\) in loading state_dict for (\w+)", str(err).strip())
    if isinstance(err, RuntimeError) and head:
        return f"its weights do not fit the {head[1]} of its own normlab.config: {_mismatch(err)}"
    return _first_line(err)


def _load_normlab(weights: Path, config: Path | None):
    """A normlab model from a safetensors file: rebuilt from the config and class that
    ``normlab.models.save_model`` stores in its metadata, or, for a plain state dict, a
    TransformerLM built from ``config`` (a JSON of TransformerConfig fields)."""
    import safetensors.torch
    import torch

    from normlab.models import TransformerConfig, TransformerLM, load_model

    meta = _normlab_metadata(weights)
    if config is not None and "normlab.model" in meta:
        raise typer.BadParameter(f"{weights} holds its own config (normlab.models.save_model's metadata), which "
                                 f"{config} would replace; --config is for a state dict without it: drop --config",
                                 param_hint="--config")
    if config is None:
        if "normlab.model" not in meta:
            raise typer.BadParameter(f"{weights} has no normlab model metadata (normlab.models.save_model "
                                     "writes it); pass --config with the TransformerConfig JSON", param_hint="SRC")
        try:
            # converted and written in float32 (as the written file is rebuilt): a bfloat16
            # checkpoint's transforms run on its float32 copy, and its check compares like with like
            return load_model(weights).float()
        except (ValueError, RuntimeError) as err:
            if isinstance(err, torch.OutOfMemoryError):  # (a RuntimeError, not the file's fault)
                raise
            raise typer.BadParameter(f"cannot load {weights}: {load_failure(err)}", param_hint="SRC") from err
    try:
        d = json.loads(config.read_text())
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object of TransformerConfig fields, got {type(d).__name__}")
        cfg = TransformerConfig.from_dict(d)
    except OSError as err:
        raise typer.BadParameter(f"cannot read {config}: {err.strerror or err}", param_hint="--config") from err
    except ValueError as err:
        raise typer.BadParameter(f"{config}: {_first_line(err)}", param_hint="--config") from err
    model = TransformerLM(cfg)
    state = safetensors.torch.load_file(str(weights))
    _complete_tied(model, state, f"{weights} does not fit the TransformerLM of {config}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # missing/unexpected keys, size mismatches: lines after a header
        raise typer.BadParameter(f"{weights} does not fit the TransformerLM of {config}: {_mismatch(err)}",
                                 param_hint="--config") from err
    return model


def _complete_tied(model, state: dict, what: str) -> None:
    """Complete ``state`` (read from a file) for the weights ``model`` ties (one tensor
    under several keys: the token embedding and the head): a file may hold each name
    (``safetensors.torch.save_file`` of a state dict) or one of them (``save_model``,
    which stores a tied tensor once). A file whose tied names hold different values is
    refused, naming them: loading it would keep one and silently drop the other."""
    import torch

    groups: dict[tuple, list[str]] = {}
    for key, t in model.state_dict().items():
        groups.setdefault((t.data_ptr(), t.shape, t.stride()), []).append(key)
    for keys in (k for k in groups.values() if len(k) > 1):
        given = [k for k in keys if k in state]
        if not given:
            continue  # missing: load_state_dict names them
        first = state[given[0]]
        for other in given[1:]:
            t = state[other]
            if t.shape == first.shape and not (t.dtype == first.dtype and torch.equal(t, first)):
                raise typer.BadParameter(
                    f"{what}: {given[0]} and {other} hold different values in the file, but the model ties them "
                    "(one tensor, tie_embeddings); expected equal tensors, or one of them", param_hint="--config")
        for key in keys:
            state.setdefault(key, first)


_SHOWN = 3  # keys named in a one-line mismatch summary


def _mismatch(err: RuntimeError) -> str:
    """A state dict that does not fit the model, in one line: how many keys are missing,
    unexpected or of another shape, naming the first few of each."""
    text = str(err)
    parts = []
    for label, head in (("missing key", "Missing key(s) in state_dict:"),
                        ("unexpected key", "Unexpected key(s) in state_dict:")):
        line = next((line for line in text.splitlines() if head in line), None)
        if line is not None:
            keys = re.findall(r'"([^"]+)"', line.partition(head)[2])
            parts.append(_count(len(keys), label) + f" ({_few(keys)})")
    sizes = re.findall(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) "
                       r"from checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)", text)
    if sizes:
        key, a, b = sizes[0]
        parts.append(_count(len(sizes), "size mismatch", "es")
                     + f" ({'first: ' if len(sizes) > 1 else ''}{key} is {a} in the file, {b} in the model)")
    if parts:
        return "; ".join(parts)
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(err).__name__]
    return lines[-1] if len(lines) < 3 else f"{lines[1]} (and {len(lines) - 2} more lines)"


def _count(n: int, noun: str, plural: str = "s") -> str:
    return f"{n} {noun}{'' if n == 1 else plural}"


def _few(items: list[str]) -> str:
    return ", ".join(items[:_SHOWN]) + (f", and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def _rebuild(model):
    """A fresh model of ``model``'s class and config (its head width for an encoder)."""
    from normlab.models import TransformerEncoder

    if isinstance(model, TransformerEncoder):
        return TransformerEncoder(model.cfg, n_outputs=None if model.head is None else model.head.out_features)
    return type(model)(model.cfg)


def _save_normlab(model, out: Path) -> Path:
    """Write the converted weights in the model's own architecture with ``save_model``.

    The norms a transform made non-affine reload with weight 1 (and bias 0), which is
    exact; a LayerNorm that layernorm_to_rmsnorm turned into an RMSNorm reloads as a
    LayerNorm, exact on the now zero-mean stream (re-apply the transforms after loading
    for the speed: they leave converted weights unchanged)."""
    import torch

    from normlab.models import save_model
    from normlab.norms import is_norm

    fresh = _rebuild(model)
    result = fresh.load_state_dict(model.state_dict(), strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"convert: weights {', '.join(result.unexpected_keys)} have no place in "
                           f"{type(model).__name__}({model.cfg})")
    with torch.no_grad():
        for key in result.missing_keys:
            path, _, name = key.rpartition(".")
            module = fresh.get_submodule(path)
            if not is_norm(module) or name not in ("weight", "bias"):
                raise RuntimeError(f"convert: the converted model has no {key}, which is not a norm affine")
            getattr(module, name).fill_(1.0 if name == "weight" else 0.0)
    path = out / "model.safetensors"
    save_model(fresh, path)
    (out / "config.json").write_text(json.dumps(model.cfg.to_dict(), indent=2))
    return path


def _hf_state(model, original: dict) -> dict:
    """The converted model's state dict, with the norm weights (1) and biases (0) that a
    transform removed written explicitly: the original architecture reloads them from the
    file, not from its initializer (T5's scales them by ``initializer_factor``)."""
    import torch

    from normlab.norms import is_norm

    state = model.state_dict()
    for key, (shape, dtype) in original.items():
        if key in state:
            continue
        path, _, name = key.rpartition(".")
        module = model.get_submodule(path) if path else model
        if not is_norm(module) or name not in ("weight", "bias"):
            raise RuntimeError(f"convert: the converted model has no {key}, which is not a norm affine")
        device = next((t.device for t in state.values()), None)
        state[key] = (torch.ones if name == "weight" else torch.zeros)(shape, dtype=dtype, device=device)
    return state


def _verify_hf(model, state: dict, out: Path) -> str:
    """Reload the written Hugging Face model with its own class: every tensor must be the
    written one, and its outputs the converted model's (a half-precision model compared
    in float32, within its dtype's rounding); else RuntimeError."""
    import torch

    from normlab.convert.verify import compare, float32_copy, low_precision, run_outputs

    back = type(model).from_pretrained(out, local_files_only=True).eval()
    for key, t in back.state_dict().items():
        want = state.get(key)
        if want is None or want.dtype != t.dtype or not torch.equal(want.to(t.device), t):
            got = "absent from the written file" if want is None else "not the converted weights"
            raise RuntimeError(f"convert: the written model does not reload as converted: {key} is {got} "
                               f"({type(model).__name__}.from_pretrained({out}))")
    inputs = _example_inputs(model)
    if inputs is None:
        return (f"reloaded {out} with {type(model).__name__}.from_pretrained: weights as written; outputs not "
                f"compared (no example input is known for {type(model).__name__})")
    low = low_precision(model)
    a, b = (model, back) if low is None else (float32_copy(model), float32_copy(back))
    tol = 1e-4 if low is None else max(torch.finfo(t.dtype).eps for t in model.parameters()
                                       if t.is_floating_point())
    ok, worst = compare(run_outputs(a, inputs), run_outputs(b, inputs), tol, tol)
    if not ok:
        raise RuntimeError(f"convert: the written model's outputs differ from the converted model's by up "
                           f"to {worst:.3g} (reloaded with {type(model).__name__}.from_pretrained)")
    where = "" if low is None else f", compared in float32 within {low} rounding"
    return (f"reloaded {out} with {type(model).__name__}.from_pretrained: weights as written, outputs equal "
            f"the converted model's (max |diff| {worst:.2g}{where})")


def _example_inputs(model):
    import torch

    from normlab.models import Seq2SeqTransformer, TransformerConfig

    gen = torch.Generator().manual_seed(0)
    cfg = getattr(model, "cfg", None)
    if isinstance(cfg, TransformerConfig):  # normlab's models take token ids positionally
        ids = torch.randint(0, cfg.vocab_size, (2, min(8, cfg.max_seq_len)), generator=gen)
        return (ids, ids.flip(-1)) if isinstance(model, Seq2SeqTransformer) else (ids,)
    from normlab.convert.verify import hf_feature_inputs

    # a vision or speech model: images or log-mel features (float32 for a half-precision
    # model: its float32 copy runs them)
    p = next(model.parameters(), None)
    features = hf_feature_inputs(model, gen, None, p.dtype if p is not None and p.dtype == torch.float64
                                 else torch.float32)
    if features:
        return features[0]
    cfg = getattr(model, "config", None)
    vocab = getattr(cfg, "vocab_size", None)
    if not vocab:
        return None
    ids = torch.randint(0, vocab, (2, 8), generator=gen)
    inputs = {"input_ids": ids}
    if getattr(cfg, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids
    return inputs


def convert(
    src: Annotated[Path, typer.Argument(help="A local Hugging Face model directory, or a normlab .safetensors file (normlab.models.save_model, or a state dict with --config).",
                                        path_type=str, callback=_path("SRC", "a model directory or a .safetensors file"))],
    out: Annotated[Path, typer.Argument(help="Directory to write the converted model and report to.",
                                        path_type=str, callback=_path("OUT", "a directory to write to"))],
    transform: Annotated[list[str] | None, typer.Option("--transform", "-t", help="swap | fold | rms; repeat to chain, applied in order (default: swap).")] = None,
    config: Annotated[Path | None, typer.Option(help="A TransformerConfig JSON, for a .safetensors SRC without normlab metadata (built as a TransformerLM).",
                                                path_type=str, callback=_path("--config", "a TransformerConfig JSON file"))] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into an OUT that already holds a model: its model files (config, weights, shards and their index, the report) are removed and replaced; other files stay.")] = False,
) -> None:
    """Convert a saved model: swap its norms for normlab's, fold norm affines, or turn Pre-LN into Pre-RMSNorm.

    Writes it to OUT with the report (normlab_convert.json)."""
    from rich.console import Console

    from normlab.convert import ConversionError, fold_norm_affine, layernorm_to_rmsnorm, swap_norms

    console = Console()
    transform = transform or ["swap"]
    bad = [t for t in transform if t not in TRANSFORMS]
    if bad:
        raise typer.BadParameter(f"expected each --transform in {', '.join(TRANSFORMS)}, got {', '.join(bad)}",
                                 param_hint="--transform")
    if not src.is_dir() and (src.suffix != ".safetensors" or not src.is_file()):
        raise typer.BadParameter(f"expected a model directory or a .safetensors file, got {src}"
                                 + ("" if src.exists() else " (no such file or directory)"), param_hint="SRC")
    # the model is written to OUT: refuse to write over SRC (in place, or inside it)
    src_path, out_path = src.resolve(), out.resolve()
    if src.is_dir() and (out_path == src_path or src_path in out_path.parents):
        raise typer.BadParameter(f"{out} is {'SRC' if out_path == src_path else 'inside SRC'}: converting "
                                 "would write over the source model; expected another directory",
                                 param_hint="OUT")
    # SRC or --config as one of the files converting writes or removes in OUT (model.safetensors,
    # a shard, config.json: ``_model_files``) would be lost
    # (the file itself, a link resolved: a link elsewhere to OUT/model.safetensors is that file)
    for given, what in ((src, "SRC"), (config, "--config")):
        real = None if given is None or given.is_dir() else given.resolve()
        if real is not None and real.parent == out_path and (real.name in _MODEL_FILES or _SHARD.fullmatch(real.name)):
            raise typer.BadParameter(f"{out}/{real.name} is {what}: converting writes (or removes) that file "
                                     "of OUT: it would write over the source; expected another directory", param_hint="OUT")
    if src.is_dir() and config is not None:
        raise typer.BadParameter(f"{config} applies only to a .safetensors SRC (a state dict without normlab "
                                 f"metadata); {src} is a Hugging Face model directory, built from its own "
                                 "config.json: drop --config", param_hint="--config")
    import torch

    from normlab.bench.common import check_backend, check_out_dir

    check_out_dir(out, param_hint="OUT")
    held = _model_files(out)
    if held and not overwrite:
        raise typer.BadParameter(f"{out} already holds a model ({', '.join(p.name for p in held)}), which "
                                 "converting would write over; expected an empty or new directory, or --overwrite",
                                 param_hint="OUT")
    check_backend(torch.device("cpu"))  # the model is loaded, probed and verified on the CPU
    if src.is_dir():
        model, kind = _load_hf(src), "hf"
    else:
        model, kind = _load_normlab(src, config), "normlab"
    model.eval()
    original = {k: (t.shape, t.dtype) for k, t in model.state_dict().items()}
    reports = []
    for t in transform:
        try:
            if t == "swap":
                r = swap_norms(model).normlab_report
            elif t == "fold":
                r = fold_norm_affine(model).normlab_report
            else:
                r = layernorm_to_rmsnorm(model, example_inputs=_example_inputs(model)).normlab_report
        except ConversionError as err:
            _error(str(err))
            raise typer.Exit(1) from err
        console.print(str(r), highlight=False, soft_wrap=True, markup=False)
        reports.append(r.to_dict())
    try:
        _remove_model_files(out)  # (after the transforms: a refused conversion leaves OUT as it was)
        _write(model, kind, original, reports, out, console)
    except KeyboardInterrupt:
        _error(f"interrupted while writing and checking {out}: its files may be incomplete or unchecked; do not "
               "use them")
        raise typer.Exit(130) from None


def _remove_model_files(out: Path) -> None:
    """Remove the model files an overwritten OUT holds (``_model_files``): what is written
    replaces some of them, and any left would be read with it (a sharded checkpoint's
    index, naming shards and keys of the old model, beside the new single file)."""
    for p in _model_files(out):
        if p.is_file() or p.is_symlink():
            try:
                p.unlink()
            except OSError as err:
                _error(f"cannot remove {p}, a file of the model in {out} that converting replaces: "
                       f"{err.strerror or err}; nothing was written, but {out} may have lost some of its old "
                       "model's files: do not use it")
                raise typer.Exit(1) from err


def _write(model, kind: str, original: dict, reports: list, out: Path, console) -> None:
    """Write the converted model and its report to ``out``, reloaded and verified."""
    out.mkdir(parents=True, exist_ok=True)
    if kind == "hf":
        # the state dict is what is saved: swapped norms load back as the original classes
        # (re-apply normlab.integrations.hf.apply_normlab); folded and RMS-converted
        # weights stay exact in the original architecture (norm weights 1, zero-mean stream)
        try:
            state = _hf_state(model, original)
            model.save_pretrained(out, state_dict=dict(state))  # (it drops tied keys from the dict)
            console.print(_verify_hf(model, state, out), highlight=False, soft_wrap=True, markup=False)
        except RuntimeError as err:
            _error(f"{err}; the files written to {out} are left for inspection: do not use them")
            raise typer.Exit(1) from err
        saved = f" (weights in {_dtypes(model)})"
    else:
        from normlab.convert.verify import compare, run_outputs
        from normlab.models import load_model

        path = _save_normlab(model, out)
        inputs = _example_inputs(model)
        ok, worst = compare(run_outputs(model, inputs), run_outputs(load_model(path), inputs), 1e-4, 1e-4)
        if not ok:
            _error(f"the written model's outputs differ from the converted model's by up to {worst:.3g}; the "
                   f"files written to {out} are left for inspection: do not use them")
            raise typer.Exit(1)
        console.print(f"reloaded {path.name} with normlab.models.load_model: outputs equal the converted "
                      f"model's (max |diff| {worst:.2g})", highlight=False)
        saved = ""
    (out / "normlab_convert.json").write_text(json.dumps(reports, indent=2))
    console.print(f"wrote {out}{saved}", highlight=False, soft_wrap=True, markup=False)


def _error(message: str) -> None:
    """An error on stderr, in red, on one line (never wrapped), with no markup read from it."""
    from rich.console import Console
    from rich.text import Text

    Console(stderr=True).print(Text(message, style="red"), soft_wrap=True)


def _dtypes(model) -> str:
    names = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()})
    return ", ".join(names)
