"""normlab in Hugging Face transformers models (``pip install 'normlab[hf]'``).

    apply_normlab(model)          an existing model: swap its norms for normlab's and
                                  fuse the residual adds of known blocks (in place)
    patch("llama")                before instantiation: models built while patched are
                                  created with normlab's norms and fused blocks;
                                  ``patch(...)`` is also a context manager, ``.undo()``

Supported: Llama, Mistral, Qwen2, Qwen3 (RMSNorm; fused add+norm after attention),
GPT-2 (LayerNorm, Pre-LN; fused before the MLP and cross-attention), BERT (LayerNorm,
Post-LN; fused in BertSelfOutput/BertOutput), T5 (T5LayerNorm == RMSNorm, as
``T5StyleRMSNorm``: output in a half-precision weight's dtype, as T5LayerNorm; not fused).
Gemma's ``x * (1 + weight)`` norms are swapped by ``apply_normlab`` (not by ``patch``,
which has no "gemma"): as ``normlab.RMSNorm(offset=1, casting_mode="gemma")``, which
computes Gemma's float32 ``x * (1 + weight)``, so the logits stay bit for bit equal in
float32 and bf16; Gemma's blocks are not fused.
Numerics: identical in float32; in bf16/fp16 within one rounding, because LlamaRMSNorm
(and T5LayerNorm) round to the input dtype before multiplying by the weight and normlab
rounds once after; in float64 identical, bit for bit: Hugging Face's norms form their
statistic in float32 whatever the input's dtype (where normlab.RMSNorm computes float64
in float64, about 1e-7 apart), and the patched norms compute float64 input (T5's: a
float64 input or weight) op for op as they do. ``apply_normlab`` swaps a float64
LlamaRMSNorm (and its copies) for ``PromotedRMSNorm``, which does the same, and leaves a
float64 T5LayerNorm (it scales the float64 input by its float32 variance; the report
says so) and Gemma's norms (float32 whatever the input) in a float64 model. Output
dtypes are Hugging Face's: LlamaRMSNorm returns the promoted dtype of input and weight
(bf16 input to a float32 weight, as under autocast or from bf16 ``inputs_embeds``,
gives float32), and so do the swapped and patched norms
(``LlamaStyleRMSNorm`` is a ``PromotedRMSNorm``, which computes that case exactly as
LlamaRMSNorm; ``T5StyleRMSNorm`` computes it in float32, as T5LayerNorm).
``apply_normlab`` checks each norm on a probe input before swapping (a float32 weight
is also probed on bf16 input, which tells the two output dtypes apart); ``patch``
replaces the classes without a probe. A fused block calls a norm that has hooks
(registered after fusion, or torch's global module hooks) unfused, ``norm(residual + x)``,
so the hooks see what they see on the original model.
"""

from __future__ import annotations

import importlib
import types

import torch
from torch import Tensor, nn

from normlab.convert import swap_norms
from normlab.convert.detect import PromotedRMSNorm
from normlab.convert.fused import fused_class
from normlab.errors import NormTypeError
from normlab.norms import LayerNorm, RMSNorm


def _transformers():
    try:
        return importlib.import_module("transformers")
    except ImportError as err:
        raise ImportError(
            "normlab.integrations.hf needs Hugging Face transformers: pip install 'normlab[hf]'"
        ) from err


def apply_normlab(model: nn.Module) -> nn.Module:
    """Swap a Hugging Face model's norms for normlab's and fuse known blocks, in place.

    Same as ``normlab.convert.swap_norms`` (the report is ``model.normlab_report``), after checking that the
    model is a transformers PreTrainedModel."""
    t = _transformers()
    if not isinstance(model, t.PreTrainedModel):
        raise NormTypeError(f"apply_normlab(model): expected a transformers PreTrainedModel, got "
                            f"{type(model).__name__}; use normlab.convert.swap_norms for other models")
    swap_norms(model).normlab_report.transform = "apply_normlab"
    return model


def _hf_norm_class(base: type, name: str) -> type:
    """A normlab norm taking Hugging Face's constructor arguments ``(hidden_size, eps)``."""

    def __init__(self, hidden_size, eps=1e-6, **kwargs):
        base.__init__(self, hidden_size, eps=eps, **kwargs)

    return type(name, (base,), {
        "__init__": __init__, "__module__": __name__, "__qualname__": name,
        "variance_epsilon": property(lambda self: self.eps),
        "__doc__": f"normlab.{base.__name__} built with Hugging Face's {name}(hidden_size, eps) arguments.",
    })


LlamaStyleRMSNorm = _hf_norm_class(PromotedRMSNorm, "LlamaStyleRMSNorm")

_HALF = (torch.float16, torch.bfloat16)
_F64 = torch.float64


class T5StyleRMSNorm(LlamaStyleRMSNorm):
    """normlab.RMSNorm with T5LayerNorm's output dtype: the weight's where that is half
    precision, whatever the input's (transformers keeps T5's ``wo`` in float32, so a
    float16/bfloat16 T5 feeds its norms float32 and its next Linear layers expect the
    weight's dtype), else the promoted dtype of input and weight (a float32 weight on
    bfloat16 input gives float32, computed in float32 as T5LayerNorm). Computed in float32
    and rounded once; T5LayerNorm rounds twice (to the weight's dtype, then the product),
    so the two agree within one rounding. Where the input or the weight is float64 it
    computes as T5LayerNorm, op for op (the same bits): the variance in float32 whatever
    the input's dtype, the input scaled by it in the promoted dtype, times the weight."""

    def _as_t5(self, x: Tensor, w: Tensor | None) -> Tensor:
        """T5LayerNorm's forward (float64 input or weight, where normlab's float64 differs)."""
        h = x * self._rstd(x.to(torch.float32))
        if w is None:
            return h
        if w.dtype in _HALF:
            h = h.to(w.dtype)
        return w * h

    def _promoted(self, x: Tensor) -> torch.dtype | None:
        """The dtype T5LayerNorm returns where it differs from ``x``'s (the fused add+norm,
        ``PromotedRMSNorm``'s, then adds and normalizes in it)."""
        w = self._parameters.get("weight")
        if w is None or w.dtype is x.dtype:
            return None
        dt = w.dtype if w.dtype in _HALF else torch.promote_types(x.dtype, w.dtype)
        return None if dt is x.dtype else dt

    def normalize(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        dt = self._promoted(x)
        if (x.dtype is _F64 or dt is _F64) and self._llama_float64():  # T5LayerNorm's own ops
            return self._as_t5(x, self._parameters.get("weight"))
        if dt is None:
            return RMSNorm.normalize(self, x, padding_mask)
        if dt in _HALF:  # a half-precision weight: computed in the input's dtype, then cast
            return RMSNorm.normalize(self, x, padding_mask).to(dt)
        return RMSNorm.normalize(self, x.to(dt), padding_mask)  # T5LayerNorm computes in float32


class _TorchNNWithNormlab(types.ModuleType):
    """``torch.nn`` as seen by a patched modeling file: LayerNorm/RMSNorm are normlab's."""

    def __init__(self) -> None:
        super().__init__("torch.nn")
        self.LayerNorm = LayerNorm
        self.RMSNorm = RMSNorm

    def __getattr__(self, name: str):
        return getattr(nn, name)


# architecture -> (modeling module, {attribute: replacement maker}, fused block classes)
_LLAMA_LIKE = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
ARCHITECTURES = (*_LLAMA_LIKE, "gpt2", "bert", "t5")


def _plan(architecture: str) -> tuple[str, dict[str, object], tuple[str, ...]]:
    if architecture in _LLAMA_LIKE:
        p = _LLAMA_LIKE[architecture]
        return (f"transformers.models.{architecture}.modeling_{architecture}",
                {f"{p}RMSNorm": LlamaStyleRMSNorm}, (f"{p}DecoderLayer",))
    if architecture == "gpt2":
        return "transformers.models.gpt2.modeling_gpt2", {"nn": _TorchNNWithNormlab()}, ("GPT2Block",)
    if architecture == "bert":
        return ("transformers.models.bert.modeling_bert", {"nn": _TorchNNWithNormlab()},
                ("BertSelfOutput", "BertOutput"))
    if architecture == "t5":
        return "transformers.models.t5.modeling_t5", {"T5LayerNorm": T5StyleRMSNorm}, ()
    raise ValueError(f"patch(architecture): expected one of {', '.join(ARCHITECTURES)}, got {architecture!r}")


# architecture -> [the modeling module, its original attributes, active handles]: the
# first handle saves the originals and patches; the last one undone restores them, in
# whatever order the handles are undone
_ACTIVE: dict[str, list] = {}


class patch:
    """Patch a transformers architecture so models built afterwards use normlab.

    >>> with patch("llama"):
    ...     model = LlamaForCausalLM(config)     # normlab RMSNorm, fused decoder layers
    >>> handle = patch("gpt2"); ...; handle.undo()

    Only construction is affected: models built before, or after ``undo()``, are not.
    Handles for one architecture may overlap and be undone in any order: it stays patched
    until every handle is undone, and then has its original classes again. A handle
    entered again (``with handle:`` after its block ended or ``undo()``) patches again
    until that block ends; ``with handle:`` blocks of one handle may nest, and the handle
    is released when the outermost ends (``undo()`` releases it at once). Models built
    while patched pickle and unpickle, with the patch active or not."""

    def __init__(self, architecture: str) -> None:
        _transformers()
        if not isinstance(architecture, str):  # (also a ValueError, which this raised before)
            raise NormTypeError(f"patch(architecture): expected one of {', '.join(ARCHITECTURES)}, "
                                f"got {type(architecture).__name__} {architecture!r}")
        module_name, replacements, blocks = _plan(architecture.lower())
        self.architecture = architecture.lower()
        self._module = importlib.import_module(module_name)
        self._replacements, self._blocks = replacements, blocks
        self._active = False
        self._depth = 0  # ``with`` blocks of this handle entered and not yet exited
        self._activate()

    def _activate(self) -> None:
        self._active = True
        state = _ACTIVE.get(self.architecture)
        if state is not None:
            state[2] += 1
            return
        saved: dict[str, object] = {}
        for name, new in self._replacements.items():
            saved[name] = getattr(self._module, name)
            setattr(self._module, name, new)
        for name in self._blocks:
            base = getattr(self._module, name)
            saved[name] = base
            setattr(self._module, name, fused_class(base))
        _ACTIVE[self.architecture] = [self._module, saved, 1]

    def undo(self) -> None:
        """Release this handle (a second call does nothing); when no other handle for the
        architecture is active, restore its original classes."""
        self._depth = 0  # (a block entered again after this starts counting afresh)
        if not self._active:
            return
        self._active = False
        state = _ACTIVE[self.architecture]
        state[2] -= 1
        if state[2] == 0:
            module, saved, _ = _ACTIVE.pop(self.architecture)
            for name, old in saved.items():
                setattr(module, name, old)

    def __enter__(self) -> patch:
        # a handle used as a context manager again after its ``with`` block (or ``undo()``)
        # patches again, until the block ends; a block nested in another of the same handle
        # (``with p:`` inside ``with p:``) leaves it patched for the rest of the outer one
        if not self._active:
            self._activate()
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth = max(self._depth - 1, 0)
        if self._depth == 0:
            self.undo()

    def __repr__(self) -> str:
        return f"patch({self.architecture!r}, active={self._active})"


def _rebuilt(model: nn.Module, key: str) -> bool:
    """The model's own init (``_init_weights``) rebuilds parameter ``key`` to one table
    whatever the seed, and not a constant (a sinusoidal position table, which the file
    need not hold). A constant (a norm's ones, a zero bias) is not the saved value, and an
    init that does not write the parameter (it stays nan here) rebuilds nothing. False
    where that cannot be told."""
    path, _, name = key.rpartition(".")
    try:
        module = model.get_submodule(path)
        param = getattr(module, name)
        saved = param.detach().clone()
        built = []
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for seed in (1, 2):
                param.fill_(float("nan"))
                torch.manual_seed(seed)
                model._init_weights(module)
                built.append(param.detach().clone())
            param.copy_(saved)
    except Exception:  # no such init, or one that fails on its own module
        return False
    a, b = built
    return (a.numel() > 1 and bool(torch.isfinite(a).all()) and torch.equal(a, b)
            and not bool((a == a.flatten()[0]).all()))


class WeightsDoNotFit(ValueError):
    """Saved weights that leave some of a model's parameters at their initialization."""


def load_pretrained(cls: type, path: object, *, keep_every_weight: bool = False, **kw) -> nn.Module:
    """``cls.from_pretrained(path, local_files_only=True, **kw)``, refused where the saved
    weights do not fill the model: a weight or buffer missing from the file or of another
    shape would be left at its initialization (transformers only logs it), so a model
    built from mismatched files would pass for the saved one. Weights the class has no
    place for (a head that a base-model class drops) are left out, as transformers does,
    or, with ``keep_every_weight`` (a model that will be written back), refused too.
    Raises WeightsDoNotFit (a ValueError) naming the first few keys."""
    # (mismatched sizes reported rather than raised, so that they are named with the rest)
    model, info = cls.from_pretrained(path, local_files_only=True, output_loading_info=True,
                                      ignore_mismatched_sizes=True, **kw)
    # a parameter or buffer left out is not the saved model's (random, a constant, running
    # statistics at their init), but for a table the model's init rebuilds (``_rebuilt``)
    # and a batch-norm step count (older checkpoints lack it; it matters only to momentum=None)
    params = dict(model.named_parameters())
    missing = sorted(k for k in info.get("missing_keys") or ()
                     if not k.endswith("num_batches_tracked") and not (k in params and _rebuilt(model, k)))
    mismatched = [k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys") or ()]

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f", and {len(keys) - 3} more" if len(keys) > 3 else "")

    if missing or mismatched:
        parts = ([f"{len(missing)} weight(s) of {cls.__name__} missing from the files ({few(missing)})"]
                 if missing else []) + ([f"{len(mismatched)} of another shape ({few(mismatched)})"]
                                        if mismatched else [])
        raise WeightsDoNotFit(f"the weights in {path} do not fit {cls.__name__}: {'; '.join(parts)}; loaded, "
                              "they would keep their random initialization")
    unexpected = sorted(info.get("unexpected_keys") or ())
    if keep_every_weight and unexpected:
        raise WeightsDoNotFit(f"{len(unexpected)} weight(s) in {path} have no place in {type(model).__name__} "
                              f"({few(unexpected)}): the model written back would lack them")
    return model
