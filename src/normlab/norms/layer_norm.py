"""normlab.LayerNorm and normlab.RMSNorm: drop-in for torch.nn.LayerNorm / torch.nn.RMSNorm.

They subclass torch's modules, so constructor arguments, defaults, parameter names,
state_dict keys, ``reset_parameters`` and ``extra_repr`` are torch's own; only the
forward changes: it runs normlab's ops (fused Triton kernels on CUDA) and takes an
optional residual for the fused add + dropout + norm.

Per-example gradient norms: set ``module.collect_per_example_grad_sq = True``; each
forward then allocates a float32 [2, x.shape[0]] buffer, runs the op's per-example
variant with it (``normlab.diagnostics.per_example``), and ``module.per_example_grad_sq``
returns it; after the backward it holds each example's ||dL_b/dweight||^2 and
||dL_b/dbias||^2. The default forward tests that one attribute and nothing else of it.
A norm called more than once before the backward (shared parameters) has per-example
gradients g1_b + g2_b, whose norms the per-call buffers cannot give: reading
``per_example_grad_sq`` then raises instead of answering.
"""

from __future__ import annotations

import numbers
import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

from normlab import backend as _backend
from normlab import functional as F
from normlab.backend import AUTO_TRITON_MIN_ELEMENTS, forward_ad_active, get_backend
from normlab.errors import NormArgumentError
from normlab.norms.base import ResidualNorm, refuse_traced_default
from normlab.norms.registry import register_norm
from normlab.ops import backend_ops


class _CheckedOnce:
    """Mixin: a norm call's arguments are checked once per call signature (the input's
    type, dtype, device, rank and last dim, and the backend in force; the parameters'
    shapes, dtypes and device as it saw them); later calls with
    that signature go straight to the implementation the first call resolved (norms over
    one dim; over several dims every call is checked). Changing
    the parameters (``.to()``, assigning weight, bias or eps) forgets the signatures.
    Under torch.compile, under torch.func transforms, and while per-example gradients are
    collected, every call takes the checked path."""

    def _call(self, op: str, public: Callable, x: Tensor, *args) -> Tensor:
        """``public(x, *args)`` (the checked op) on a signature's first call, then the
        implementation it resolved to, unchecked."""
        if torch._C._are_functorch_transforms_active() or forward_ad_active() or not isinstance(x, Tensor):
            # torch.func transforms and forward-mode AD run the torch path (backend.resolve)
            # whatever the backend: not a signature to remember; an input that is no
            # tensor is named by the checked op
            return public(x, *args)
        shape = x.shape
        # on CUDA ``auto`` chooses by size: the size class is part of the signature there
        size_class = x.numel() >= AUTO_TRITON_MIN_ELEMENTS if x.is_cuda else None
        key = (x.__class__, x.dtype, x.device, shape[-1] if len(shape) else None, len(shape), get_backend(),
               size_class)
        # (args: normalized_shape, weight[, bias], eps; either None where the norm has none)
        w, b = args[1], (args[2] if len(args) == 4 else None)
        impls = self.__dict__.get("_impls")
        hit = impls.get(key) if impls is not None else None
        # the parameters as the check saw them (shape, dtype, device): an assignment to
        # ``weight.data``, torch.func.functional_call and writes to ``_parameters`` pass no
        # __setattr__ of the module, and the kernels read as many values, of the dtype and
        # on the device, the check saw
        if hit is not None and (w is None or (w.shape == hit[1] and w.dtype is hit[3] and w.device == hit[5])) \
                and (b is None or (b.shape == hit[2] and b.dtype is hit[4] and b.device == hit[5])):
            return hit[0](x, *args)
        out = public(x, *args)  # raises normlab's argument errors for a bad call
        self.__dict__.setdefault("_impls", {})[key] = (
            getattr(backend_ops(x), op), None if w is None else w.shape, None if b is None else b.shape,
            None if w is None else w.dtype, None if b is None else b.dtype, x.device)
        return out

    def __getstate__(self):
        # the signatures' implementations are not pickled: they name the backend's module
        # (unpickling one that saw the triton backend would import triton)
        state = super().__getstate__()
        state.pop("_impls", None)
        return state

    def __setstate__(self, state):
        # (a module pickled by an earlier version holds its signatures, in their format then)
        state.pop("_impls", None)
        super().__setstate__(state)

    def _forget_signatures(self) -> None:
        self.__dict__.pop("_impls", None)

    def _apply(self, fn, recurse=True):
        self._forget_signatures()
        out = super()._apply(fn, recurse)
        # a norm normlab.convert swapped in, verified in the dtype it had: a cast re-probed
        cast_check = self.__dict__.get("cast_check")
        if cast_check is not None:
            cast_check(self)
        return out

    def __setattr__(self, name: str, value) -> None:
        if name in ("weight", "bias", "eps", "normalized_shape"):
            self.__dict__.pop("_impls", None)
        super().__setattr__(name, value)


_NEW_BUFFER_OUTSIDE_GRAPH = None


class _MarkDone:
    """A per-example call's gradient hook: marks the call done (a weak reference to it
    tells whether the call's graph is still held)."""

    __slots__ = ("entry", "task", "__weakref__")

    def __init__(self, entry: list) -> None:
        self.entry, self.task = entry, None

    def __call__(self, grad: Tensor) -> None:
        self.entry[1] = True
        self.task = torch._C._current_graph_task_id()  # the backward that reached the call


def _zero_buffer(x: Tensor) -> Tensor:
    """A call's [2, B] float32 buffer, zeros, that its backward fills."""
    return torch.zeros(2, x.shape[0], dtype=torch.float32, device=x.device)


def _reached_in(call: list, task: int) -> bool:
    """The call's gradient came in graph task ``task``."""
    hook = call[2]() if call[2] is not None else None
    return hook is not None and hook.task == task


def _dropped(call: list) -> bool:
    """A per-example call whose graph was freed before any gradient reached it."""
    return not call[1] and call[2] is not None and call[2]() is None


def _outside_graph():
    """``_PerExampleGradSq._new_buffer`` under ``torch.compiler.disable``, made on first use
    (when a norm's collection is switched on): disabling imports torch._dynamo, which a
    plain ``import normlab`` does not pay for."""
    global _NEW_BUFFER_OUTSIDE_GRAPH
    if _NEW_BUFFER_OUTSIDE_GRAPH is None:
        _NEW_BUFFER_OUTSIDE_GRAPH = torch.compiler.disable(_PerExampleGradSq._new_buffer)
    return _NEW_BUFFER_OUTSIDE_GRAPH


class _PerExampleGradSq:
    """Mixin: ``collect_per_example_grad_sq`` switches on the per-example buffer.

    Each forward's buffer is kept with a flag that a gradient reaching the forward's
    outputs sets; a forward after every earlier one got its gradient starts over. A
    forward whose graph was freed with no gradient (a skipped step, an exception in the
    middle of a forward) is forgotten: no backward can come for it. (Under torch.compile
    that is not known: such a forward counts until ``per_example_grad_sq = None``.) A
    forward that activation checkpointing runs again inside the backward is not a call:
    the first forward's buffer is the one its backward fills."""

    collect_per_example_grad_sq: bool = False
    _refused_options = ""  # the options the fused per-example backward does not take

    def _per_example(self, op: str, x: Tensor, *args, **kw):
        """``normlab.diagnostics.per_example.<op>(x, *args, **kw)`` with this call's buffer
        (with none, so the plain op, for a norm without a weight or outside grad mode)."""
        from normlab.diagnostics import per_example  # the variants (diagnostics imports the norms)

        if not self.per_example_in_backward:
            raise NotImplementedError(f"{type(self).__name__}: per-example gradient norms do not take "
                                      f"{self._refused_options} yet")
        if _backend.checkpoint_recompute() and self.__dict__.get("_per_example_calls"):
            # non-reentrant checkpointing recomputing a recorded call (reentrant
            # checkpointing's first forward ran without grad, so recorded none, and its
            # forward in the backward is the call): a buffer of the same shape, which
            # nothing reads
            buffer = self._per_example_buffer(x, record=False)
            return getattr(per_example, op)(x, *args, per_example_grad_sq=buffer, **kw)
        buffer = self._per_example_buffer(x)
        if buffer is None:
            return getattr(per_example, op)(x, *args, per_example_grad_sq=None, **kw)
        try:
            out = getattr(per_example, op)(x, *args, per_example_grad_sq=buffer, **kw)
        except BaseException:
            self._per_example_calls.pop()  # a refused call: no backward will come for it
            raise
        return self._watch_backward(out)

    def __setattr__(self, name: str, value) -> None:
        if name == "collect_per_example_grad_sq" and value:
            _outside_graph()  # made here, outside any compiled region
        super().__setattr__(name, value)

    def _per_example_buffer(self, x: Tensor, record: bool = True) -> Tensor | None:
        """This call's [2, B] buffer, made outside any compiled graph (the backward writes
        it; allocated inside a graph it would be an intermediate the partitioner cannot
        hand back); ``record``: kept as a call (``per_example_grad_sq``)."""
        if (not self.collect_per_example_grad_sq or self.weight is None or not torch.is_grad_enabled()
                or not isinstance(x, Tensor) or x.dim() == 0):  # (the op names what a bad input lacks)
            return None
        return _outside_graph()(self, x) if record else _zero_buffer(x)

    def _new_buffer(self, x: Tensor) -> Tensor:
        calls = self.__dict__.setdefault("_per_example_calls", [])
        calls[:] = [c for c in calls if not _dropped(c)]
        task = torch._C._current_graph_task_id()
        # every earlier call got its gradient: a new step, unless one got it in the backward
        # running now (a call from inside it, as reentrant checkpointing's, shares this step)
        if all(c[1] for c in calls) and not (task != -1 and any(_reached_in(c, task) for c in calls)):
            calls.clear()
        buffer = _zero_buffer(x)
        calls.append([buffer, False, None])  # [buffer, gradient came, weakref to the graph's node]
        return buffer

    def _watch_backward(self, result):
        """Mark the latest call done when a gradient reaches any of its outputs."""
        calls = self.__dict__.get("_per_example_calls")
        if calls:
            entry = calls[-1]
            outs = [t for t in (result if isinstance(result, tuple) else (result,)) if t.requires_grad]
            if torch.compiler.is_compiling():
                for t in outs:
                    t.register_hook(lambda grad, entry=entry: entry.__setitem__(1, True))
                return result
            if not outs:  # nothing requires grad (frozen weights, a detached input): no backward will come
                calls.pop()
                return result
            # the hook lives as long as the graph that can run the backward (its nodes hold it):
            # a weak reference to it says whether that graph is still there
            hook = _MarkDone(entry)
            for t in outs:
                t.register_hook(hook)
            entry[2] = weakref.ref(hook)
        return result

    @property
    def per_example_grad_sq(self) -> Tensor | None:
        calls = [c for c in self.__dict__.get("_per_example_calls") or () if not _dropped(c)]
        if len(calls) > 1:
            raise RuntimeError(
                f"{type(self).__name__}: per_example_grad_sq is undefined: the norm ran {len(calls)} "
                "times before its backward (shared parameters, or an earlier forward's graph still held: "
                "a validation loss kept from a pass under grad, or any such pass under torch.compile; "
                "run those under torch.no_grad()); per-example gradient norms need one call per backward"
            )
        return calls[0][0] if calls else None

    @per_example_grad_sq.setter
    def per_example_grad_sq(self, value: None) -> None:
        if value is not None:
            raise ValueError("per_example_grad_sq can only be reset to None")
        self.__dict__.pop("_per_example_calls", None)

    def __getstate__(self):
        # calls whose gradient came are pickled with their buffers (``per_example_grad_sq``
        # is the user's data), without their hooks (weak references); calls still waiting
        # for a gradient are not: no backward can reach a copy's
        state = super().__getstate__()
        calls = state.pop("_per_example_calls", None)
        if calls:
            state["_per_example_calls"] = [[c[0], True, None] for c in calls if c[1]]
        return state


class _WeightOffset:
    """Mixin: the scale is offset + weight, so the weight starts at 1 - offset (gain 1)."""

    offset: float = 0.0

    @staticmethod
    def _check_offset_has_weight(name: str, offset: float, elementwise_affine: bool) -> None:
        """An offset parametrizes the weight: without one (elementwise_affine=False) the
        scale would be the offset alone, a constant gain of ``offset``, not the gain 1 the
        offset keeps."""
        if not elementwise_affine and float(offset) != 0.0:
            raise NormArgumentError(
                f"{name}: offset={offset!r} shifts the weight (the scale is offset + weight), which "
                f"elementwise_affine=False leaves out: the output would be scaled by {offset!r}; expected "
                f"offset=0 without a weight (or elementwise_affine=True)")

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.offset != 0.0 and getattr(self, "weight", None) is not None:
            with torch.no_grad():
                self.weight.fill_(1.0 - self.offset)


@register_norm("layernorm")
class LayerNorm(_CheckedOnce, _PerExampleGradSq, _WeightOffset, ResidualNorm, nn.LayerNorm):
    """y = (x - E[x]) / sqrt(Var[x] + eps) * gamma + beta (Ba et al. 2016, "Layer Normalization").

    ``offset``: the scale is (offset + gamma), formed in float32, and gamma starts at
    1 - offset (LayerNorm1p / zero-centred gamma: offset=1, gamma starts at 0).

    ``weight_shape``: the shape of gamma and beta when it has dims in front of
    ``normalized_shape`` (default: normalized_shape). The statistics are over
    normalized_shape and gamma/beta broadcast over those leading dims, so the input ends
    with weight_shape: one gamma per head. Cohere's q/k norm is
    ``LayerNorm(head_dim, bias=False, weight_shape=(heads, head_dim))`` on queries of
    shape [..., heads, head_dim]. Such a norm runs torch ops in float32 (float64 for
    float64 input), rounded once to the input's dtype, on every device: the fused kernels
    take a gamma of the normalized shape only (an offset they take)."""

    offset: float = 0.0
    weight_shape: tuple[int, ...] | None = None  # None: normalized_shape
    _refused_options = "offset or weight_shape"

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, *, offset: float = 0.0, weight_shape=None) -> None:
        F._check_cast("LayerNorm", offset, "torch")
        self._check_offset_has_weight("LayerNorm", offset, elementwise_affine)
        self.__dict__["offset"] = float(offset)
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)
        if weight_shape is not None and not elementwise_affine:
            raise NormArgumentError(f"LayerNorm: weight_shape={weight_shape!r} shapes gamma and beta, which "
                                    f"elementwise_affine=False leaves out; expected weight_shape=None there")
        if weight_shape is not None:
            dims = (weight_shape,) if isinstance(weight_shape, int) else weight_shape
            if (isinstance(dims, (str, bytes)) or not isinstance(dims, (tuple, list, torch.Size))
                    or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in dims)
                    or not all(d >= 1 for d in dims[:len(dims) - len(self.normalized_shape)])):
                raise NormArgumentError(f"LayerNorm: expected weight_shape to be a sequence of ints, the "
                                        f"leading ones >= 1, ending with normalized_shape "
                                        f"{list(self.normalized_shape)}, got {weight_shape!r}")
            shape = tuple(int(d) for d in dims)
            n = len(self.normalized_shape)
            if shape[len(shape) - n:] != self.normalized_shape:
                raise NormArgumentError(f"LayerNorm: expected weight_shape to end with normalized_shape "
                                        f"{list(self.normalized_shape)}, got {list(shape)}")
            if shape != self.normalized_shape:
                self.__dict__["weight_shape"] = shape
                factory = {"device": device, "dtype": dtype}
                if self.weight is not None:
                    self.weight = nn.Parameter(torch.empty(shape, **factory))
                if self.bias is not None:
                    self.bias = nn.Parameter(torch.empty(shape, **factory))
                self.reset_parameters()

    def forward(self, input: Tensor, residual: Tensor | None = None, *, dropout_p: float = 0.0,
                residual_dtype: torch.dtype | None = None,
                padding_mask: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """``ResidualNorm.forward``, its input named ``input`` as ``torch.nn.LayerNorm``'s is
        (a drop-in called as ``norm(input=x)``)."""
        if residual is None:
            return self.normalize(input, padding_mask)
        if residual.__class__ is not Tensor:
            refuse_traced_default(self, residual)
        return self.add_normalize(input, residual, dropout_p, residual_dtype, padding_mask)

    def extra_repr(self) -> str:
        return (super().extra_repr() + (f", offset={self.offset!r}" if self.offset != 0.0 else "")
                + (f", weight_shape={self.weight_shape}" if self.weight_shape is not None else ""))

    @property
    def per_example_in_backward(self) -> bool:
        """The fused backward fills per-example gradient norms (no offset, no per-head weight)."""
        return self.offset == 0.0 and self.weight_shape is None

    def normalize(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        if self.collect_per_example_grad_sq:
            return self._per_example("layer_norm", x, self.normalized_shape, self.weight, self.bias, self.eps)
        params = self._parameters  # nn.Module.__getattr__ costs ~1 us a parameter
        if self.weight_shape is None and self.offset != 0.0:  # (the functional op's short path first)
            both = "weight" in params and "bias" in params
            return F.layer_norm(x, self.normalized_shape, params["weight"] if both else self.weight,
                                params["bias"] if both else self.bias, self.eps, offset=self.offset)
        if self.weight_shape is not None:
            return F._layer_norm_torch_ops(x, self.normalized_shape, self.weight, self.bias, self.eps,
                                           self.offset, self.weight_shape)
        if "weight" in params and "bias" in params:
            # functional's short path to torch's op (not under a forced triton backend,
            # CPU tensors under the Triton interpreter: checked once, as on CUDA)
            if x.__class__ is Tensor and x.is_cpu and _backend._current != "triton":
                return F.layer_norm(x, self.normalized_shape, params["weight"], params["bias"], self.eps)
            if x.__class__ is not Tensor and F._traced(x):  # (torch.fx's Proxy: the call is recorded)
                return F.layer_norm(x, self.normalized_shape, params["weight"], params["bias"], self.eps)
            if len(self.normalized_shape) == 1 and not torch.compiler.is_compiling():
                return self._call("layer_norm", F.layer_norm, x, self.normalized_shape,
                                  params["weight"], params["bias"], self.eps)
        return F._layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def add_normalize(self, x, residual, dropout_p, residual_dtype, padding_mask):
        if self.collect_per_example_grad_sq:
            return self._per_example("add_layer_norm", x, residual, self.weight, self.bias, self.eps,
                                     dropout_p=dropout_p, training=self.training, residual_dtype=residual_dtype,
                                     normalized_shape=self.normalized_shape)
        if self.weight_shape is not None:  # the add, then normalize: no fused op takes a per-head gamma
            return ResidualNorm.add_normalize(self, x, residual, dropout_p, residual_dtype, padding_mask)
        return F.add_layer_norm(x, residual, self.weight, self.bias, self.eps, dropout_p=dropout_p,
                                training=self.training, residual_dtype=residual_dtype,
                                normalized_shape=self.normalized_shape,
                                **({"offset": self.offset} if self.offset != 0.0 else {}))


@register_norm("rmsnorm")
class RMSNorm(_CheckedOnce, _PerExampleGradSq, _WeightOffset, ResidualNorm, nn.RMSNorm):
    """y = x / sqrt(mean(x^2) + eps) * gamma (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization").

    ``offset``: the scale is (offset + gamma), formed in float32, and gamma starts at
    1 - offset (Gemma's zero-centred gamma: offset=1, gamma starts at 0).
    ``casting_mode``: "torch" (``nn.RMSNorm``'s numerics, the default), "llama" or
    "gemma" (Hugging Face's casting orders, bit for bit below float64; see
    ``normlab.functional.rms_norm``)."""

    offset: float = 0.0
    casting_mode: str = "torch"
    _refused_options = "offset or casting_mode"

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True,
                 device=None, dtype=None, *, offset: float = 0.0, casting_mode: str = "torch") -> None:
        F._check_cast("RMSNorm", offset, casting_mode)
        self._check_offset_has_weight("RMSNorm", offset, elementwise_affine)
        self.__dict__["offset"], self.__dict__["casting_mode"] = float(offset), casting_mode
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, device=device,
                         dtype=dtype)

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={getattr(self, k)!r}" for k, default in (("offset", 0.0), ("casting_mode", "torch"))
                        if getattr(self, k) != default)
        return super().extra_repr() + extra

    @property
    def per_example_in_backward(self) -> bool:
        """The fused backward fills per-example gradient norms (no offset, torch's casting)."""
        return self.offset == 0.0 and self.casting_mode == "torch"

    def normalize(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        if self.collect_per_example_grad_sq:
            return self._per_example("rms_norm", x, self.normalized_shape, self.weight, self.eps)
        params = self._parameters  # nn.Module.__getattr__ costs ~1 us a parameter
        if self.offset != 0.0 or self.casting_mode != "torch":
            return F.rms_norm(x, self.normalized_shape, params["weight"] if "weight" in params else self.weight,
                              self.eps, offset=self.offset, casting_mode=self.casting_mode)
        if "weight" in params:
            # functional's short path to torch's op (not under a forced triton backend,
            # CPU tensors under the Triton interpreter: checked once, as on CUDA)
            if x.__class__ is Tensor and x.is_cpu and _backend._current != "triton":
                return F.rms_norm(x, self.normalized_shape, params["weight"], self.eps)
            if x.__class__ is not Tensor and F._traced(x):  # (torch.fx's Proxy: the call is recorded)
                return F.rms_norm(x, self.normalized_shape, params["weight"], self.eps)
            if len(self.normalized_shape) == 1 and not torch.compiler.is_compiling():
                return self._call("rms_norm", F.rms_norm, x, self.normalized_shape, params["weight"],
                                  self.eps)
        return F._rms_norm(x, self.normalized_shape, self.weight, self.eps)

    def add_normalize(self, x, residual, dropout_p, residual_dtype, padding_mask):
        if self.collect_per_example_grad_sq:
            return self._per_example("add_rms_norm", x, residual, self.weight, self.eps, dropout_p=dropout_p,
                                     training=self.training, residual_dtype=residual_dtype,
                                     normalized_shape=self.normalized_shape)
        cast = self.offset != 0.0 or self.casting_mode != "torch"
        return F.add_rms_norm(x, residual, self.weight, self.eps, dropout_p=dropout_p, training=self.training,
                              residual_dtype=residual_dtype, normalized_shape=self.normalized_shape,
                              **({"offset": self.offset, "casting_mode": self.casting_mode} if cast else {}))
