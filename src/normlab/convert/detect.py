"""Recognize a norm module's exact semantics, so it can be replaced by normlab's.

torch.nn.LayerNorm / torch.nn.RMSNorm are normlab's own semantics by construction.
Any other module that looks like a per-row norm (no children, a ``weight`` (and
``bias``) of the normalized shape, an eps attribute) is checked numerically: a copy
with random parameters is run next to the normlab candidate on a probe input, forward
and backward. It is accepted only if both agree within the dtype's rounding; otherwise
the reason is returned. A weight-only norm that matches neither norm is probed as
Gemma's ``x * (1 + weight)`` (RMSNorm with offset 1), and one whose weight has several
dims as a LayerNorm over the last dim with one weight per head (``weight_shape``:
Cohere's q/k norm). Float32 parameters are also probed on bfloat16 input: a norm whose
output there is float32 (Hugging Face's LlamaRMSNorm and its copies, T5LayerNorm: the
weight times the normalized input, in the promoted dtype) is taken as
``PromotedRMSNorm``, which gives that dtype.
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from normlab import functional as F
from normlab.convert.verify import copy_without_hooks
from normlab.norms import LayerNorm, RMSNorm
from normlab.norms.base import ResidualNorm
from normlab.ops.reference import default_rms_eps

EPS_ATTRS = ("eps", "variance_epsilon", "epsilon", "layer_norm_eps")

# forward and input-gradient agreement demanded of a candidate, by probe dtype: a runtime
# acceptance rule (a foreign norm may round in another order than normlab's, within one
# rounding of its dtype), not a test tolerance; the tests' one table is tests/_tolerances.py
PROBE_TOL = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 2e-2),
}


class PromotedRMSNorm(RMSNorm):
    """normlab.RMSNorm whose output dtype is the promoted dtype of its input and weight, as
    Hugging Face's ``LlamaRMSNorm`` (``weight * x_hat.to(input_dtype)``): bfloat16 input to
    a float32 weight gives float32, where normlab.RMSNorm keeps the input's dtype. Where
    the two dtypes differ it computes with ``casting_mode="llama"`` (bit for bit
    LlamaRMSNorm's); where they are equal, as normlab.RMSNorm (identical in float32,
    within one rounding in half precision). Float64 input is computed as LlamaRMSNorm
    computes it, bit for bit: normalized in float32 (Hugging Face's norms form their
    statistic in float32 whatever the input's dtype), cast back to float64, times the
    weight; so a float64 model keeps its outputs (normlab.RMSNorm computes float64 in
    float64, about 1e-7 from it). The fused add+norm (``norm(x, residual)``) gives its
    output in the same dtype: where the weight's dtype is wider than ``x``'s, or ``x`` is
    float64, it adds, then normalizes (unfused)."""

    # without a weight (its gamma folded into the next layer: ``fold_norm_affine``), the
    # dtype the folded weight had: the output keeps the promoted dtype the next layer takes
    weight_dtype: torch.dtype | None = None

    def _apply(self, fn, recurse=True):
        # ``weight_dtype`` follows the module's conversions as the weight it stands for
        # would (``.to(torch.bfloat16)``, ``.half()``: a model folded in float32, then cast)
        out = super()._apply(fn, recurse)
        if self.weight_dtype is not None and self._parameters.get("weight") is None:
            moved = fn(torch.empty(0, dtype=self.weight_dtype))
            if isinstance(moved, Tensor):
                self.weight_dtype = moved.dtype
        return out

    @property
    def per_example_in_backward(self) -> bool:
        """The fused backward's per-example norms are of normlab.RMSNorm's order; a weight
        wider than half precision makes half-precision input take llama's (the promoted
        output), so such a module is recorded by hooks, around the forward it runs anyway
        (``per_example_grad_norms``)."""
        w = self._parameters.get("weight")
        return super().per_example_in_backward and (w is None or w.dtype in (torch.float16, torch.bfloat16))

    def _promoted(self, x: Tensor) -> torch.dtype | None:
        """The output dtype where it differs from ``x``'s (a weight of a wider dtype), else None."""
        w = self._parameters.get("weight")
        wdt = w.dtype if w is not None else self.weight_dtype
        if wdt is None or wdt is x.dtype:
            return None
        dt = torch.promote_types(x.dtype, wdt)
        return None if dt is x.dtype else dt

    def _llama_float64(self) -> bool:
        """Whether float64 input takes LlamaRMSNorm's path (``_as_llama_float64``): a plain
        norm (no offset, torch's casting), not recording per-example gradient norms (which
        normlab's own op gives)."""
        return self.offset == 0.0 and self.casting_mode == "torch" and not self.collect_per_example_grad_sq

    def _rstd(self, x32: Tensor) -> Tensor:
        """1 / sqrt(mean(x^2) + eps) over the normalized dims of ``x32``, x's float32 copy,
        as Hugging Face's LlamaRMSNorm and T5LayerNorm form it whatever x's dtype (the
        caller makes the copy: LlamaRMSNorm normalizes that copy, so one cast node feeds
        both, and their gradients sum as Hugging Face's)."""
        shape = F._check_normalized_shape("rms_norm", x32, self.normalized_shape)
        eps = default_rms_eps(torch.float32) if self.eps is None else self.eps
        dims = -1 if len(shape) == 1 else tuple(range(-len(shape), 0))
        return torch.rsqrt(x32.pow(2).mean(dims, keepdim=True) + eps)

    def _as_llama_float64(self, x: Tensor) -> Tensor:
        """LlamaRMSNorm on float64 input, op for op (so the bits match): normalized in
        float32 (``hidden_states.to(torch.float32)``), cast back to float64, times the weight."""
        h = x.to(torch.float32)
        h = h * self._rstd(h)
        w = self._parameters.get("weight")
        return h.to(x.dtype) if w is None else w * h.to(x.dtype)

    def normalize(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        dt = self._promoted(x)
        if dt is None:
            if x.dtype is torch.float64 and self._llama_float64():
                return self._as_llama_float64(x)
            return super().normalize(x, padding_mask)
        if (self.weight is None or self.collect_per_example_grad_sq or self.offset != 0.0
                or self.casting_mode != "torch"):
            # (without a weight: normalized in float32, rounded to x's dtype, as LlamaRMSNorm's
            # hidden_states.to(input_dtype), then given the dtype the next layer takes)
            return super().normalize(x, padding_mask).to(dt)
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps, casting_mode="llama")

    def add_normalize(self, x, residual, dropout_p, residual_dtype, padding_mask):
        if self._promoted(x) is None and not (x.dtype is torch.float64 and self._llama_float64()):
            return super().add_normalize(x, residual, dropout_p, residual_dtype, padding_mask)
        # as the unfused block: norm(residual + x), in the promoted dtype (float64: in
        # LlamaRMSNorm's float32, ``normalize``)
        new_residual = F.dropout_add(x, residual, dropout_p=dropout_p, training=self.training,
                                     residual_dtype=residual_dtype)
        return self.normalize(new_residual, padding_mask), new_residual


@dataclass(frozen=True)
class NormSemantics:
    """What a norm computes: normlab's ``kind`` ("layernorm" | "rmsnorm") with these arguments."""

    kind: str
    shape: tuple[int, ...]
    eps: float | None
    affine: bool
    bias: bool
    verified: str  # how the match was established
    offset: float = 0.0          # RMSNorm: the scale is offset + weight (Gemma: 1)
    casting_mode: str = "torch"  # RMSNorm: "torch" | "llama" | "gemma"
    # LayerNorm: the weight/bias shape where it has dims in front of ``shape`` (one weight
    # per head: Cohere's q/k norm); None: ``shape``
    weight_shape: tuple[int, ...] | None = None
    # RMSNorm: "input" (normlab's: the input's dtype) or "promoted" (the promoted dtype of
    # input and weight, as Hugging Face's LlamaRMSNorm: PromotedRMSNorm)
    output_dtype: str = "input"

    @property
    def plain(self) -> bool:
        """The norm's weight is its scale (no offset, torch's casting): the form the
        transforms fold and convert."""
        return self.offset == 0.0 and self.casting_mode == "torch"

    def build(self, like: nn.Module) -> nn.Module:
        """A normlab module with these semantics, sharing ``like``'s parameter objects."""
        w = getattr(like, "weight", None)
        b = getattr(like, "bias", None)
        factory = {"device": "meta"}
        if self.kind == "layernorm":
            new = LayerNorm(self.shape, eps=self.eps, elementwise_affine=self.affine,
                            bias=self.bias, offset=self.offset, weight_shape=self.weight_shape, **factory)
        else:
            cls = PromotedRMSNorm if self.output_dtype == "promoted" else RMSNorm
            new = cls(self.shape, eps=self.eps, elementwise_affine=self.affine, offset=self.offset,
                      casting_mode=self.casting_mode, **factory)
            if cls is PromotedRMSNorm and not self.affine:  # the dtype of the weight folded away
                new.weight_dtype = w.dtype if isinstance(w, torch.Tensor) else getattr(like, "weight_dtype", None)
        # the very same Parameter objects: tied weights and optimizer state stay valid
        if self.affine:
            new.weight = w
        if self.bias:
            new.bias = b
        new.train(like.training)
        return new


# (original class, semantics, dtype) -> None where the probe agrees there, else why not
_CAST_VERDICTS: dict[tuple, str | None] = {}
_CAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class CastCheck:
    """What ``swap_norms`` attaches to a module it swapped in for a norm it verified on a
    probe (``cast_check``): the probe ran in the model's dtype at the swap, and a later
    cast (``model.half()``, ``.double()``) can take the module to a dtype where the
    original computes otherwise (T5LayerNorm in half precision, Gemma's norms in
    float64). The original is probed in every other floating dtype at the swap (once
    per class, semantics and dtype in a process); called by the module after each
    conversion (``_apply``), a cast to a dtype where it differs is warned about, naming
    the original and the reason. Holds names and dtypes only (it pickles whatever
    classes a ``patch`` has replaced)."""

    def __init__(self, original: nn.Module, sem: NormSemantics) -> None:
        self.name = type(original).__name__
        self.dtype = next(original.parameters()).dtype
        self.why: dict[torch.dtype, str] = {}
        probe = copy_without_hooks(original).to("cpu")  # (its values do not matter: probes randomize)
        for dtype in _CAST_DTYPES:
            if dtype is self.dtype:
                continue
            key = (type(original), sem, dtype)
            if key not in _CAST_VERDICTS:
                cast = probe.to(dtype)
                ok, detail = _probe(cast, sem)
                _CAST_VERDICTS[key] = None if ok else (_known_variant(cast, dtype) or detail)
            if _CAST_VERDICTS[key] is not None:
                self.why[dtype] = _CAST_VERDICTS[key]

    def __call__(self, module: nn.Module) -> None:
        p = next(module.parameters(recurse=False), None)
        why = None if p is None else self.why.get(p.dtype)
        if why is not None:
            import warnings

            was = str(self.dtype).removeprefix("torch.")
            warnings.warn(
                f"normlab.convert: a {self.name} swapped for normlab.{type(module).__name__} in {was} was cast to "
                f"{str(p.dtype).removeprefix('torch.')}, where it computes otherwise than {self.name}: {why}. Cast "
                f"the original model first, then swap (swap_norms / apply_normlab probe the dtype the model "
                f"has), or keep it in {was}", stacklevel=2)


def cast_check_for(module: nn.Module, sem: NormSemantics) -> CastCheck | None:
    """The ``CastCheck`` a module swapped in for ``module`` carries: one for a norm whose
    semantics a probe established (in one dtype), none for torch's own LayerNorm/RMSNorm
    (normlab's semantics in every dtype by construction) or a norm without floating
    parameters (nothing a cast changes)."""
    if _inherits_forward(module, nn.LayerNorm) or _inherits_forward(module, nn.RMSNorm):
        return None
    if not any(p.is_floating_point() for p in module.parameters(recurse=False)):
        return None
    return CastCheck(module, sem)


def _eps_of(module: nn.Module) -> float | None:
    for attr in EPS_ATTRS:
        v = getattr(module, attr, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def _inherits_forward(module: nn.Module, base: type) -> bool:
    return isinstance(module, base) and type(module).forward is base.forward


def _is_exactly(module: nn.Module, cls: type) -> bool:
    """An instance of normlab's ``cls`` computing what ``cls`` computes (no override)."""
    t = type(module)
    return isinstance(module, cls) and all(
        getattr(t, f) is getattr(cls, f) for f in ("forward", "normalize", "add_normalize"))


def _extra_state(module: nn.Module) -> str | None:
    """Why ``module`` holds state a normlab norm would not carry over (its state_dict
    would lose keys), or None: a parametrization, parameters besides weight/bias,
    persistent buffers, or a ``get_extra_state``."""
    if parametrize.is_parametrized(module):
        names = ", ".join(module.parametrizations.keys())
        return (f"parametrized ({names} computed by torch.nn.utils.parametrize): a normlab norm holds "
                "plain parameters, so the parametrization and its state_dict keys would be lost")
    params = dict(module.named_parameters(recurse=False))
    extra = sorted(set(params) - {"weight", "bias"}) + [
        n for n, _ in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set]
    if type(module).get_extra_state is not nn.Module.get_extra_state:
        extra.append("get_extra_state")
    if extra:
        return f"has state besides weight/bias ({', '.join(extra)})"
    return None


def _signature_why(module: nn.Module) -> str | None:
    """Why ``module``'s forward is not ``forward(x)`` (one argument): a norm taking a second
    argument (a conditioning input, a mask, ``*args``), even with a default, computes
    something normlab's ``forward(x, residual=None)`` would take differently. normlab's
    own protocol (``ResidualNorm.forward``) passes its extra arguments to ``add_normalize``."""
    forward = type(module).forward
    if forward in (ResidualNorm.forward, LayerNorm.forward):  # (LayerNorm's: the protocol, input named as torch's)
        return None
    try:
        params = list(inspect.signature(forward).parameters.values())[1:]  # without self
    except (TypeError, ValueError):
        return "its forward's signature cannot be read"
    plain = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if len(params) == 1 and params[0].kind in plain:
        return None
    shown = ", ".join(str(p) for p in params)
    return (f"its forward takes ({shown}), not one input: normlab's norms take forward(x, residual=None), "
            "so a second argument would be read as a residual")


def semantics(module: nn.Module) -> NormSemantics | str:
    """The module's semantics as a normlab norm, or the reason it has none."""
    if isinstance(module, (nn.GroupNorm, nn.modules.batchnorm._NormBase)):
        return f"{type(module).__name__} normalizes over channels or the batch, not per row"
    why = _extra_state(module)
    if why:
        return why
    if _is_exactly(module, LayerNorm):
        return NormSemantics("layernorm", tuple(module.normalized_shape), module.eps,
                             module.elementwise_affine, module.bias is not None, "normlab.LayerNorm", module.offset,
                             weight_shape=module.weight_shape)
    for cls, out_dtype in ((RMSNorm, "input"), (PromotedRMSNorm, "promoted")):
        if _is_exactly(module, cls):
            return NormSemantics("rmsnorm", tuple(module.normalized_shape), module.eps, module.elementwise_affine,
                                 False, f"normlab.{cls.__name__}", module.offset, module.casting_mode,
                                 output_dtype=out_dtype)
    if _inherits_forward(module, nn.LayerNorm):
        return NormSemantics("layernorm", tuple(module.normalized_shape), module.eps,
                             module.elementwise_affine, module.bias is not None, "torch.nn.LayerNorm")
    if _inherits_forward(module, nn.RMSNorm):
        return NormSemantics("rmsnorm", tuple(module.normalized_shape), module.eps,
                             module.elementwise_affine, False, "torch.nn.RMSNorm")
    if list(module.children()):
        return "has submodules; not a plain per-row norm"
    params = dict(module.named_parameters(recurse=False))
    if list(module.buffers(recurse=False)):
        return f"has state besides weight/bias ({', '.join(n for n, _ in module.named_buffers(recurse=False))})"
    why = _signature_why(module)
    if why:
        return why
    eps = _eps_of(module)
    if eps is None:
        return f"no eps attribute ({' / '.join(EPS_ATTRS)})"
    shape = getattr(module, "normalized_shape", None)
    per_head = shape is None  # the shape read off the weight: its leading dims may be heads
    ref = params.get("weight", params.get("bias"))
    if shape is None and ref is not None:
        shape = tuple(ref.shape)
    if shape is None:
        return "no weight and no normalized_shape: cannot tell the normalized shape"
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    for p in params.values():
        if tuple(p.shape) != shape:
            return f"parameter of shape {list(p.shape)} does not match the normalized shape {list(shape)}"
    has_w, has_b = "weight" in params, "bias" in params
    if has_b and not has_w:
        return "a bias without a weight has no normlab counterpart"
    if any(p.is_meta for p in params.values()):
        return ("parameters on the meta device: its forward is checked on a probe, which needs their values "
                "(load the weights first)")
    try:  # the probes run copies of it
        copy_without_hooks(module)
    except Exception as err:  # (a lock, an open file, ... among its attributes)
        return f"cannot be copied to probe its forward ({type(err).__name__}: {err})"
    kinds = ("layernorm",) if has_b else ("rmsnorm", "layernorm")
    dtype = next(iter(params.values())).dtype if params else torch.float32  # the probes' (``_probe``)
    diffs = []
    for kind in kinds:
        cand = NormSemantics(kind, shape, eps, has_w, has_b, "")
        ok, detail = _probe(module, cand)
        promotes = detail.startswith(_PROMOTES)
        if not ok and kind == "rmsnorm" and has_w and (promotes or dtype is torch.float64):
            # the weight times the normalized input, in the promoted dtype; float64 input
            # normalized in float32 (LlamaRMSNorm)
            pcand = replace(cand, output_dtype="promoted")
            pok, pdetail = _probe(module, pcand)
            if pok:
                cand, ok = pcand, True
                detail = ("as PromotedRMSNorm (" + ("LlamaRMSNorm's numerics: float64 input normalized in float32, "
                                                    if dtype is torch.float64 else "")
                          + f"output in the promoted dtype of input and weight), {pdetail}")
            elif promotes:
                detail = pdetail
        if ok:
            return replace(cand, verified=detail)
        diffs.append(f"{kind}: {detail}")
    if has_w and not has_b:  # Gemma's zero-centred gamma: x / rms(x) * (1 + weight), in float32
        cand = NormSemantics("rmsnorm", shape, eps, True, False, "", 1.0, "gemma")
        ok, detail = _probe(module, cand)
        if ok:
            return replace(cand, verified=f"as RMSNorm(offset=1, casting_mode='gemma'), {detail}")
        diffs.append(f"rmsnorm(offset=1, gemma): {detail}")
    if per_head and len(shape) > 1:  # one weight per head, each head normalized over the last dim
        cand = NormSemantics("layernorm", shape[-1:], eps, has_w, has_b, "", weight_shape=shape)
        ok, detail = _probe(module, cand)
        if ok:
            return replace(cand, verified=f"over the last dim with a weight per head, {detail}")
        diffs.append(f"layernorm over the last dim, a weight per head: {detail}")
    known = _known_variant(module, dtype)
    if known:
        return f"{type(module).__name__} {known} (probe: " + "; ".join(diffs) + ")"
    return ("forward differs from normlab's " + "; ".join(diffs) + " (e.g. a (1 + weight) scale, a different cast "
            "order" + (", a statistic formed in float32 whatever the input's dtype" if dtype is torch.float64
                       else "") + " or a mean-free variance)")


# Hugging Face norms known to compute something else than normlab's norms; the probe
# decides, these name the difference in the reason, each for the parameter dtypes it
# describes (None: any)
_GEMMA = ("scales by (1 + weight) (Gemma's zero-centred gamma) in float32 whatever its input's dtype; "
          "normlab's RMSNorm(offset=1, casting_mode='gemma') differs from it here")
_T5_HALF = ("casts its output to its weight's half-precision dtype whatever its input's (transformers keeps T5's "
            "wo in float32, so in a float16/bfloat16 T5 its norms see float32 input and return the weight's "
            "dtype), which normlab's casting modes do not; normlab.integrations.hf.patch('t5') builds T5 with a "
            "norm that does")
_T5_FLOAT64 = ("forms its variance in float32 whatever its input's dtype (float64 here) and scales the float64 "
               "input by it, which normlab's norms do not (normlab.RMSNorm computes float64 in float64; "
               "PromotedRMSNorm, as LlamaRMSNorm, normalizes a float32 copy): about 1e-7 apart; "
               "normlab.integrations.hf.patch('t5') builds T5 with a norm that computes as it does")
_KNOWN_VARIANTS: dict[str, tuple[tuple[tuple[torch.dtype, ...] | None, str], ...]] = {
    "GemmaRMSNorm": ((None, _GEMMA),), "Gemma2RMSNorm": ((None, _GEMMA),), "Gemma3RMSNorm": ((None, _GEMMA),),
    "T5LayerNorm": (((torch.float16, torch.bfloat16), _T5_HALF), ((torch.float64,), _T5_FLOAT64)),
}


def _known_variant(module: nn.Module, dtype: torch.dtype) -> str | None:
    """The known difference of a Hugging Face norm from normlab's for parameters of ``dtype``
    (the probes' dtype), or None where none is known for it."""
    if not type(module).__module__.startswith("transformers."):
        return None
    for dtypes, why in _KNOWN_VARIANTS.get(type(module).__name__, ()):
        if dtypes is None or dtype in dtypes:
            return why
    return None


# probe inputs: (std, mean) of x; the small ones are where eps matters (activations of
# std 0.02 are common at init), the large one where it does not
PROBE_SCALES = ((3.0, 1.5), (0.02, 0.0), (1e-3, 0.0))


_PROMOTES = "output in the promoted dtype of input and weight"


def _probe(module: nn.Module, cand: NormSemantics) -> tuple[bool, str]:
    """Run a randomized copy of ``module`` (without its hooks) and the candidate on the
    same probes, at several input scales; compare outputs (values and dtype) and input
    gradients. For half-precision parameters, also on float32 input (a model that keeps
    some layers in float32 feeds its norms float32): where the module takes it, the
    candidate must give the same dtype and values; and bfloat16 input to float32 parameters
    (on a float32 copy), where the output dtype tells the input's from the promoted one."""
    ref_p = next(module.parameters(), None)
    if ref_p is not None and ref_p.device.type == "meta":
        return False, "parameters on the meta device: cannot verify"
    dtype = ref_p.dtype if ref_p is not None else torch.float32
    device = ref_p.device if ref_p is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode(False), torch.enable_grad():  # (apply_normlab may run under inference_mode)
        # without the user's hooks: they must not fire on probe data, and one that changes
        # the output is carried over to the swapped module
        orig = copy_without_hooks(module).train(False)
        with torch.no_grad():
            for p in orig.parameters():
                p.copy_(torch.randn(p.shape, generator=gen).mul_(0.5).add_(1.0))
        new = cand.build(orig)
        shape = (3, 5, *(cand.weight_shape or cand.shape))
        worst = 0.0
        for k, (std, mean) in enumerate(PROBE_SCALES):
            x = (torch.randn(shape, generator=gen) * std + mean).to(device, dtype)
            ok, detail, dy = _compare(orig, new, x, torch.randn(shape, generator=gen).to(device, dtype), dtype,
                                      must_run=k == 0)
            if not ok:
                return False, detail + ("" if k == 0 else f" (inputs of std {std:g})")
            worst = max(worst, dy)
        if dtype in (torch.float16, torch.bfloat16):
            x = (torch.randn(shape, generator=gen) * 3 + 1.5).to(device)
            ok, detail, _ = _compare(orig, new, x, torch.randn(shape, generator=gen).to(device), dtype,
                                     must_run=False)
            if not ok:
                return False, detail + f" with float32 input to {str(dtype).removeprefix('torch.')} parameters"
        # bfloat16 input to float32 parameters (a float32 model fed bfloat16, or run under
        # autocast): the output dtype tells normlab's (the input's) from LlamaRMSNorm's (the
        # promoted one); on a float32 copy where the parameters are in another dtype
        o32 = orig if dtype is torch.float32 else copy.deepcopy(orig).float()
        n32 = new if dtype is torch.float32 else cand.build(o32).train(False)
        x = (torch.randn(shape, generator=gen) * 3 + 1.5).to(device, torch.bfloat16)
        ok, detail, _ = _compare(o32, n32, x, torch.randn(shape, generator=gen).to(device), torch.float32,
                                 must_run=False)
        if not ok:
            if detail.startswith("output dtype") and cand.output_dtype == "input":
                return False, f"{_PROMOTES} ({detail} with bfloat16 input to float32 parameters)"
            return False, detail + " with bfloat16 input to float32 parameters"
        x = (torch.randn(shape, generator=gen) * 3 + 1.5).to(device, dtype)
        ok, detail = _probe_training(orig, new, x, dtype)
        if not ok:
            return False, detail
    return True, (f"verified on {str(dtype).removeprefix('torch.')} probes at {len(PROBE_SCALES)} input scales "
                  f"(max |diff| {worst:.1e})")


def _probe_training(orig: nn.Module, new: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> tuple[bool, str]:
    """The same forward in training mode: ``orig`` called twice must give the same output
    (a norm with dropout inside does not), and that must be the candidate's. The global
    RNG state is restored after (the probe must not move a user's random stream)."""
    devices = [x.device] if x.device.type == "cuda" else []
    orig.train(True)
    new.train(True)
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            try:
                y0, y1 = orig(x), orig(x)
            except Exception as err:
                return False, f"probe in training mode failed ({type(err).__name__}: {err})"
            yn = new(x)
    finally:
        orig.train(False)
        new.train(False)
    if not (isinstance(y0, torch.Tensor) and isinstance(y1, torch.Tensor)) or not torch.equal(y0, y1):
        return False, ("in training mode two calls on the same input differ (dropout or another random op "
                       "inside the norm), which normlab's norm does not reproduce")
    if y0.dtype != yn.dtype:
        return False, f"in training mode: output dtype {y0.dtype} vs normlab's {yn.dtype}"
    atol, rtol = PROBE_TOL.get(dtype, (1e-5, 1e-5))
    if not torch.allclose(y0.double(), yn.double(), atol=atol, rtol=rtol):
        dy = (y0.double() - yn.double()).abs().max().item()
        return False, f"in training mode: max |output diff| {dy:.3g} on a probe"
    return True, ""


def _compare(orig: nn.Module, new: nn.Module, x: torch.Tensor, g: torch.Tensor, dtype: torch.dtype,
             must_run: bool) -> tuple[bool, str, float]:
    """(ok, why not, max |output diff|) of ``orig`` and ``new`` on ``x`` (output gradient
    ``g``). An input ``orig`` itself refuses fails the probe only when ``must_run``."""
    outs = []
    for m in (orig, new):
        xi = x.clone().requires_grad_(True)
        try:
            y = m(xi)
        except Exception as err:  # a module that rejects the probe cannot be verified
            if m is orig and not must_run:
                return True, "", 0.0  # the original does not take such input either
            return False, f"probe failed ({type(err).__name__}: {err})", math.inf
        (gx,) = torch.autograd.grad(y, xi, g.to(y.dtype))
        outs.append((y.detach(), gx))
    (y0, g0), (y1, g1) = outs
    if y0.dtype != y1.dtype:
        return False, f"output dtype {y0.dtype} vs normlab's {y1.dtype}", math.inf
    atol, rtol = PROBE_TOL.get(min(dtype, x.dtype, key=lambda d: torch.finfo(d).bits), (1e-5, 1e-5))
    dy = (y0.double() - y1.double()).abs().max().item()
    if not torch.allclose(y0.double(), y1.double(), atol=atol, rtol=rtol):
        return False, f"max |output diff| {dy:.3g} on a probe", dy
    scale = max(1.0, g0.double().abs().max().item())
    if not torch.allclose(g0.double(), g1.double(), atol=atol * 10 * scale, rtol=rtol * 10):
        return False, "input gradients differ on a probe", dy
    return True, "", dy
