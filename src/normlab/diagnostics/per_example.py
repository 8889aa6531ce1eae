"""Per-example squared gradient norms of every LayerNorm/RMSNorm's weight and bias.

For a norm y = x_hat * weight + bias applied to a batch whose dim 0 is the example,
example b's contribution to the weight gradient is sum over b's positions of
grad_out * x_hat, and to the bias gradient sum over b's positions of grad_out
(``normlab.ops.reference.per_example_param_grad_sq``). Recording these squared norms
costs one reduction per norm layer, and Gray et al. 2024 ("Normalization Layer
Per-Example Gradients are Sufficient to Predict Gradient Noise Scale in Transformers")
showed they predict the whole model's gradient noise scale.

    with per_example_grad_norms(model) as rec:
        loss = loss_fn(model(tokens))          # the forward runs inside the context
        loss.backward()
    rec["blocks.0.norm1"]  # {"weight": float32 [B], "bias": float32 [B]}
    rec.total()            # float32 [B]: summed over all norm layers
    rec.batch_grad_sq()    # ||gradient of this backward||^2 over the same parameters

Positions whose grad_out is zero (padding that the loss ignores) contribute nothing.
For normlab's LayerNorm/RMSNorm the numbers come from the fused backward itself: while
the context is active they run the op variants below, whose ``per_example_grad_sq``
buffer the backward fills (no extra pass); the plain ops carry none of it. For torch's
nn.LayerNorm/nn.RMSNorm, and for normlab norms with a weight offset, a casting mode or
a per-head weight (Gemma's and Cohere's, swapped), they come from a forward hook (which
keeps the norm's input) and a tensor hook on its output (which sees grad_out); x_hat is
then recomputed in float32, so a casting mode's rounding of it is not in the numbers.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from normlab import functional as _F
from normlab.backend import in_backward as _in_backward
from normlab.diagnostics.structure import check_model
from normlab.errors import NormArgumentError
from normlab.ops import backend_ops, reference

# ----------------------------------------------------------------------- the op variants
# The public ops (``normlab.functional``) carry no per-example buffer; these variants take
# one (checked here), and run the backends' ``*_per_example`` ops, whose backward fills it
# from the fused pass. Otherwise their arguments and checks are the public ops'; with
# ``per_example_grad_sq=None`` they are the public ops.


def _check_per_example(op: str, buffer: Tensor, x: Tensor, shape: tuple[int, ...], weight: Tensor | None) -> None:
    """per_example_grad_sq: float32 [2, x.shape[0]] on x's device, for an input with an
    example dim in front of the normalized dims, and a weight to take gradients of."""
    if not isinstance(buffer, Tensor):
        raise TypeError(f"{op}: expected per_example_grad_sq to be a torch.Tensor or None, got {type(buffer).__name__}")
    if x.dim() <= len(shape):
        raise NormArgumentError(
            f"{op}: per_example_grad_sq needs an example dim (dim 0) in front of the normalized "
            f"dims: expected input with more than {len(shape)} dims, got shape {list(x.shape)}"
        )
    if weight is None:
        raise NormArgumentError(f"{op}: per_example_grad_sq needs weight (the parameter whose per-example "
                                "gradient norms it holds), got None")
    expected = [2, x.shape[0]]
    if buffer.dtype != torch.float32 or list(buffer.shape) != expected or buffer.device != x.device:
        raise NormArgumentError(
            f"{op}: expected per_example_grad_sq to be a float32 tensor of shape {expected} on "
            f"{x.device}, got {buffer.dtype} of shape {list(buffer.shape)} on {buffer.device}"
        )


def _norm(op: str, x: Tensor, normalized_shape, weight: Tensor | None, bias: Tensor | None, eps: float | None,
          buffer: Tensor | None) -> Tensor:
    """layer_norm / rms_norm (``op``): the public op's checks and the buffer's, then the
    backend's per-example variant (its plain op without a buffer)."""
    is_rms = op == "rms_norm"
    shape, eps = _F._check_norm_args(op, x, normalized_shape, weight, bias, eps, is_rms=is_rms)
    args = (x, shape, weight, eps) if is_rms else (x, shape, weight, bias, eps)
    if buffer is None:
        return getattr(backend_ops(x), op)(*args)
    _check_per_example(op, buffer, x, shape, weight)
    return getattr(backend_ops(x), op + "_per_example")(*args, buffer)


def _add_norm(op: str, x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None,
              eps: float | None, buffer: Tensor | None, dropout_p: float, training: bool,
              generator: torch.Generator | None, residual_dtype: torch.dtype | None,
              normalized_shape) -> tuple[Tensor, Tensor]:
    """add_layer_norm / add_rms_norm (``op``), as ``_norm``."""
    is_rms = op == "add_rms_norm"
    shape, eps = _F._check_add_args(op, x, residual, weight, bias, eps, dropout_p, generator, residual_dtype,
                                    normalized_shape, is_rms=is_rms, training=training)
    args = (x, residual, weight, eps) if is_rms else (x, residual, weight, bias, eps)
    kw = dict(dropout_p=float(dropout_p), training=bool(training), generator=generator,
              residual_dtype=residual_dtype, normalized_shape=shape)
    # (the public op's choice: a float64 residual stream runs the torch path under auto
    # and is refused under a forced triton backend, whose kernels add in float32)
    ops = _F._add_ops(op, x, residual, residual_dtype)
    if buffer is None:
        return getattr(ops, op)(*args, **kw)
    _check_per_example(op, buffer, x, shape, weight)
    return getattr(ops, op + "_per_example")(*args, buffer, **kw)


def layer_norm(x: Tensor, normalized_shape, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5, *, per_example_grad_sq: Tensor | None) -> Tensor:
    """``normlab.functional.layer_norm`` that also writes per-example squared gradient norms.

    ``per_example_grad_sq``: a caller-allocated float32 tensor of shape [2, x.shape[0]] on
    x's device. The backward overwrites it with, for each example b along dim 0 of x,
    ||dL_b/dweight||^2 (row 0) and ||dL_b/dbias||^2 (row 1; zeros without a bias), L_b
    being the loss through example b's positions (Gray et al. 2024). Untouched if no
    backward runs; needs weight and a dim in front of the normalized dims."""
    return _norm("layer_norm", x, normalized_shape, weight, bias, eps, per_example_grad_sq)


def rms_norm(x: Tensor, normalized_shape, weight: Tensor | None = None, eps: float | None = None, *,
             per_example_grad_sq: Tensor | None) -> Tensor:
    """``normlab.functional.rms_norm`` that also writes per-example squared gradient norms
    (as ``layer_norm`` here; row 1, the bias row, is zeros)."""
    return _norm("rms_norm", x, normalized_shape, weight, None, eps, per_example_grad_sq)


def add_layer_norm(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None,
                   eps: float = 1e-5, *, per_example_grad_sq: Tensor | None, dropout_p: float = 0.0,
                   training: bool = False, generator: torch.Generator | None = None,
                   residual_dtype: torch.dtype | None = None,
                   normalized_shape: int | Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """``normlab.functional.add_layer_norm`` that also writes per-example squared gradient
    norms of this norm's weight and bias (as ``layer_norm`` here)."""
    return _add_norm("add_layer_norm", x, residual, weight, bias, eps, per_example_grad_sq, dropout_p, training,
                     generator, residual_dtype, normalized_shape)


def add_rms_norm(x: Tensor, residual: Tensor | None, weight: Tensor | None, eps: float | None = None, *,
                 per_example_grad_sq: Tensor | None, dropout_p: float = 0.0, training: bool = False,
                 generator: torch.Generator | None = None, residual_dtype: torch.dtype | None = None,
                 normalized_shape: int | Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """``normlab.functional.add_rms_norm`` that also writes per-example squared gradient
    norms of this norm's weight (row 1 zeros)."""
    return _add_norm("add_rms_norm", x, residual, weight, None, eps, per_example_grad_sq, dropout_p, training,
                     generator, residual_dtype, normalized_shape)


class _Call:
    """One forward call of a norm whose backward has not run yet."""

    done = False


def _check_example_dim(name: str, module: nn.Module, x: Tensor) -> None:
    shape = tuple(module.normalized_shape)
    if x.dim() <= len(shape):
        raise RuntimeError(
            f"per_example_grad_norms: norm '{name}' got input of size {list(x.shape)}; "
            f"expected [B, ..., {', '.join(map(str, shape))}] with the example along dim 0"
        )


def _trained(module: nn.Module) -> tuple[str, ...]:
    """The norm's parameters that take a gradient, of weight and bias: a frozen one has no
    per-example gradient (and no batch gradient) to record."""
    return tuple(k for k in ("weight", "bias")
                 if getattr(module, k, None) is not None and getattr(module, k).requires_grad)


def _supported(module: nn.Module) -> bool:
    """torch's LayerNorm/RMSNorm and normlab's norms, with a weight. A subclass with a
    forward of its own is left out (Hugging Face's ConvNext and SqueezeBERT norms move
    the channels to the last dim inside it): the hooks rebuild x_hat from the module's
    input over its last dims, which such a forward does not normalize."""
    if not isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or getattr(module, "weight", None) is None:
        return False
    return (hasattr(module, "collect_per_example_grad_sq")
            or type(module).forward in (nn.LayerNorm.forward, nn.RMSNorm.forward))


def _from_backward(module: nn.Module) -> bool:
    """normlab norms compute per-example norms inside their own backward, except those
    whose options the fused backward does not take (a weight offset, a casting mode, a
    per-head weight): those are recorded by hooks, as torch's own norms."""
    return hasattr(module, "collect_per_example_grad_sq") and getattr(module, "per_example_in_backward", True)


def _frozen(names: list[str]) -> str:
    """Why nothing is recorded for the norms ``names``: their parameters are frozen."""
    what = "its weight and bias are" if len(names) == 1 else "their weights and biases are"
    return (f"nothing recorded for {', '.join(repr(n) for n in names)}: {what} frozen (requires_grad=False), "
            f"so there is no gradient, per-example or batch, to record; unfreeze them to record them")


class PerExampleGradNorms:
    """The recorder behind :func:`per_example_grad_norms`; a read-only mapping name -> dict."""

    def __init__(self, model: nn.Module) -> None:
        check_model("per_example_grad_norms", model)
        self.model = model
        self._modules = {name: m for name, m in model.named_modules() if _supported(m)}
        self._handles: list = []
        self._pending: dict[str, weakref.ref] = {}
        self._results: dict[str, dict[str, Tensor]] = {}
        self._batch_sq: dict[str, Tensor] = {}
        self._collect_was: dict[str, bool] = {}
        self._backward_seen = False  # a gradient reached a recorded norm since the last new round
        # a norm's latest call made inside a backward (reentrant checkpointing records its
        # forward there): the backward's graph task, and the norms called twice in one
        self._backward_calls: dict[str, int] = {}
        self._repeated: set[str] = set()
        # the graph task (backward pass) each entry came from: a later backward of the same
        # forward replaces the round's numbers, not only those of the norms it reaches.
        # Reentrant checkpointing runs each segment's backward as a task of its own inside
        # the step's: after a forward inside a backward, entries are not dropped
        self._tasks: dict[tuple[str, str], int] = {}
        self._last_task: int | None = None
        self._nested_backward = False

    # ------------------------------------------------------------------ lifecycle
    def attach(self) -> PerExampleGradNorms:
        if self._handles:
            return self
        self._check_examples_along_dim0()
        self._check_unparametrized()
        self._check_unshared()
        for name, mod in self._modules.items():
            if _from_backward(mod):
                self._collect_was[name] = mod.collect_per_example_grad_sq
                mod.collect_per_example_grad_sq = True
                mod.per_example_grad_sq = None
            self._handles.append(mod.register_forward_pre_hook(self._pre_hook(name), with_kwargs=True))
            self._handles.append(mod.register_forward_hook(self._forward_hook(name), with_kwargs=True))
            for pname, p in mod.named_parameters(recurse=False):
                if p.requires_grad:
                    self._handles.append(p.register_hook(self._param_hook(f"{name}.{pname}")))
        return self

    def _check_unparametrized(self) -> None:
        """A parametrized weight (``torch.nn.utils.parametrize``: weight = f(original)) is
        computed at each access: the hooks would record gradients with respect to that
        computed tensor, not the trained parameter (``parametrizations.weight.original``)."""
        from torch.nn.utils import parametrize

        for name, mod in self._modules.items():
            for pname in ("weight", "bias"):
                if parametrize.is_parametrized(mod, pname):
                    raise NormArgumentError(
                        f"per_example_grad_norms: norm '{name}' has a parametrized {pname} "
                        f"(torch.nn.utils.parametrize: {pname} = f(original)); expected a plain "
                        f"parameter: the per-example gradients recorded would be those of the computed "
                        f"{pname}, not of the trained parametrizations.{pname}.original. Remove the "
                        f"parametrization (parametrize.remove_parametrizations) to record it"
                    )

    def _check_unshared(self) -> None:
        """A recorded norm's parameter must belong to that norm alone: the per-example
        gradient of a parameter shared between modules (n2.weight = n1.weight) sums the
        modules' per-example gradient vectors before squaring, which the per-example
        squared norms of each module do not give."""
        owners: dict[int, list[str]] = {}
        for path, mod in self.model.named_modules():  # a module registered twice counts once
            for pname, p in mod.named_parameters(recurse=False):
                owners.setdefault(id(p), []).append(f"{path}.{pname}" if path else pname)
        for mod in self._modules.values():
            for pname in _trained(mod):
                # (a parametrized weight is computed at each access: no module owns that tensor)
                where = owners.get(id(getattr(mod, pname)), ())
                if len(where) > 1:
                    raise NormArgumentError(
                        f"per_example_grad_norms: parameter '{where[0]}' is shared with "
                        f"{', '.join(repr(w) for w in where[1:])} (one tensor in several modules); "
                        f"expected each recorded norm's weight and bias to belong to that norm alone: "
                        f"the per-example gradient of a shared parameter is the sum of the modules' "
                        f"per-example gradients, which per-module squared norms do not give. Untie "
                        f"them, or freeze the shared parameter (requires_grad=False)"
                    )

    def _check_examples_along_dim0(self) -> None:
        """torch's transformer layers built with batch_first=False take [T, B, D]: their
        norms (and the final norm of their nn.TransformerEncoder/Decoder) would see time
        along dim 0 and report one entry per time step as if it were an example."""
        recorded = {id(m) for m in self._modules.values()}
        layers = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
        for path, mod in self.model.named_modules():
            if isinstance(mod, layers):
                time_first = not mod.self_attn.batch_first
                norms = [n for n, sub in mod.named_modules() if id(sub) in recorded]
            elif isinstance(mod, (nn.TransformerEncoder, nn.TransformerDecoder)):
                time_first = any(isinstance(la, layers) and not la.self_attn.batch_first for la in mod.layers)
                norms = ["norm"] if mod.norm is not None and id(mod.norm) in recorded else []
            else:
                continue
            if time_first and norms:
                where = ", ".join(repr(f"{path}.{n}" if path else n) for n in norms)
                raise NormArgumentError(
                    f"per_example_grad_norms: {repr(path) if path else 'the model'} is a "
                    f"{type(mod).__name__} with batch_first=False, so its norms ({where}) see "
                    f"[T, B, D] with time along dim 0; expected the example along dim 0: build it "
                    f"with batch_first=True and feed [B, T, D]"
                )

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for name, was in self._collect_was.items():
            self._modules[name].collect_per_example_grad_sq = was
        self._collect_was.clear()

    def __enter__(self) -> PerExampleGradNorms:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    # ----------------------------------------------------------------------- hooks
    def _new_round(self, module, args) -> None:
        """The first forward in grad mode (not inside a backward) after a backward starts a
        new round: the numbers of the last one go, for every norm, including those that do
        not run this time, and calls whose gradient never came are forgotten. A pass under
        no_grad keeps them (an evaluation pass; also reentrant activation checkpointing's
        first forward, so with every norm inside such checkpoints a norm that sits out a
        step keeps its entry: use use_reentrant=False)."""
        if not self._backward_seen or not torch.is_grad_enabled() or _in_backward():
            return
        self._backward_seen = False
        self._results.clear()
        self._batch_sq.clear()
        self._pending.clear()
        self._backward_calls.clear()
        self._repeated.clear()
        self._tasks.clear()
        self._last_task = None
        self._nested_backward = False
        for name, mod in self._modules.items():
            if name in self._collect_was:
                mod.per_example_grad_sq = None

    def _pre_hook(self, name: str):
        def hook(module, args, kwargs):
            self._new_round(module, args)
            x = args[0] if args else kwargs.get("input", kwargs.get("x"))
            if isinstance(x, Tensor) and torch.is_grad_enabled() and _trained(module):
                _check_example_dim(name, module, x)  # before a fused op's own check, which cannot name the norm
        return hook

    def _forward_hook(self, name: str):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs.get("input", kwargs.get("x"))
            out = output
            residual = args[1] if len(args) > 1 else kwargs.get("residual")
            if residual is not None and isinstance(output, tuple):
                out, x = output  # normlab norm(x, residual): normalizes residual + x
            if not isinstance(out, Tensor) or not out.requires_grad:
                return
            prev = self._pending.get(name)
            live = prev is not None and prev() is not None
            in_backward = _in_backward()
            if in_backward:
                # a forward inside a backward (checkpointing's recomputation; a reentrant
                # one runs a backward of its own after it): backward passes are not told
                # apart by their graph tasks for the rest of the round
                self._nested_backward = True
            if live and in_backward:
                # activation checkpointing (non-reentrant) running the forward again inside
                # the backward, to recompute what it needs (under hooks of its own or nested
                # checkpoints too), or a forward a backward hook runs: the numbers are the
                # first call's. (A norm called inside a reentrant checkpoint and again after
                # it is not told apart here: the module's own buffer refuses it.)
                return
            if in_backward:
                # a forward recorded inside a backward: reentrant checkpointing recomputes
                # each segment there, in the outer backward's graph task, then runs the
                # segment's backward. One norm in two segments (a module shared between
                # layers) is two calls of one step, each with part of the gradient: refused
                task = torch._C._current_graph_task_id()
                if self._backward_calls.get(name) == task:
                    self._repeated.add(name)
                else:
                    self._backward_calls[name] = task
                    self._repeated.discard(name)  # (a new backward: its own calls count)
            if live and not prev().done:
                raise RuntimeError(
                    f"per_example_grad_norms: norm '{name}' was called more than once before "
                    f"backward; its parameters are shared between the calls, so per-example "
                    f"gradients of one call are not defined. Call each norm once per forward "
                    f"inside the context (or record outside it). (Or an earlier forward's graph "
                    f"is still held without a backward, such as an evaluation pass under grad "
                    f"mode whose output is kept: run such passes under torch.no_grad().)"
                )
            self._results.pop(name, None)  # a new forward: the previous backward's numbers go
            call = _Call()  # lives as long as the graph holding grad_hook
            self._pending[name] = weakref.ref(call)
            shape = tuple(module.normalized_shape)
            buffer = module.per_example_grad_sq if _from_backward(module) else None
            # the input, for the hooks to rebuild x_hat in the backward (its example dim
            # checked by the pre-hook); a fused norm's backward fills the buffer and needs
            # none of it (held, the input would live as long as the graph)
            xd = x.detach() if buffer is None else None
            version = None if xd is None else xd._version

            trained = _trained(module)  # the parameters that take a gradient: weight, bias

            def grad_hook(grad_out: Tensor) -> None:
                call.done = True
                self._backward_seen = True
                self._enter_backward(("norm", name))
                if not trained:
                    return
                if buffer is not None:
                    # views of the buffer that the op's backward (running next) fills in place
                    self._check_batch(name, buffer.shape[1])
                    self._results[name] = {k: buffer[0 if k == "weight" else 1] for k in trained}
                    return
                if xd._version != version:
                    # (torch's own backward raises for a modified saved input; a half-precision
                    # RMSNorm saves an upcast copy, so only this read would see the change)
                    raise RuntimeError(
                        f"per_example_grad_norms: the input of norm '{name}' was modified in place "
                        f"after the norm read it (version {version}, now {xd._version}), so its "
                        f"per-example gradients cannot be rebuilt from it; update the tensor out of "
                        f"place (h = h + ...) inside the context"
                    )
                with torch.no_grad():  # (a create_graph backward: the numbers hold no graph)
                    xc = xd.to(reference.compute_dtype(xd.dtype))
                    if isinstance(module, nn.LayerNorm):
                        x_hat = reference.layer_norm(xc, shape, eps=module.eps)
                    else:
                        x_hat = reference.rms_norm(xc, shape, eps=module.eps)
                    # dL/dweight = sum of grad_out * x_hat whatever the offset (y = x_hat * (offset + w));
                    # a per-head weight (weight_shape) keeps its head dims in the sum
                    w_sq, b_sq = reference.per_example_param_grad_sq(grad_out.detach(), x_hat,
                                                                     tuple(module.weight.shape))
                self._check_batch(name, w_sq.shape[0])
                self._results[name] = {k: w_sq if k == "weight" else b_sq for k in trained}

            out.register_hook(grad_hook)
        return hook

    def _param_hook(self, key: str):
        def hook(grad: Tensor) -> None:
            self._enter_backward(("batch", key))
            self._batch_sq[key] = grad.detach().float().square().sum()
        return hook

    def _enter_backward(self, key: tuple[str, str]) -> None:
        """An entry (a norm's, or a parameter's batch gradient) about to be written by the
        current backward: the entries an earlier backward of the same forward wrote go
        (a loss backwarded after another, reaching fewer norms), so that every number
        read is one backward's."""
        task = torch._C._current_graph_task_id()
        if task != self._last_task:  # (the first entry of a backward: the others take the fast path)
            if not self._nested_backward:
                for k in [k for k, t in self._tasks.items() if t != task]:
                    (self._results if k[0] == "norm" else self._batch_sq).pop(k[1], None)
                    del self._tasks[k]
            self._last_task = task
        self._tasks[key] = task

    def _check_batch(self, name: str, b: int) -> None:
        for other, rec in self._results.items():
            seen = next(iter(rec.values())).shape[0]
            if other != name and seen != b:
                raise RuntimeError(
                    f"per_example_grad_norms: norm '{name}' saw a batch of {b} examples (dim 0 of "
                    f"its input) but '{other}' saw {seen}; every norm must see "
                    f"the examples along dim 0 (for batch_first=False modules, dim 0 is time; a model "
                    f"that flattens [B, T, D] to [B*T, D] before a norm, as OPT's layers do, has no "
                    f"example dim there, so its per-example norms cannot be recorded)"
                )
            break

    # --------------------------------------------------------------------- results
    def __getitem__(self, name: str) -> dict[str, Tensor]:
        if name not in self._results:
            if name not in self._modules:
                mod = dict(self.model.named_modules()).get(name)
                own = (isinstance(mod, (nn.LayerNorm, nn.RMSNorm)) and getattr(mod, "weight", None) is not None
                       and not _supported(mod))
                raise KeyError(
                    f"per_example_grad_norms: '{name}' is not a LayerNorm/RMSNorm with a weight in "
                    f"the model" + (f" ({type(mod).__name__} has a forward of its own, which may "
                                    f"normalize other dims than its input's last: not recorded)" if own else "")
                    + f"; recorded norms: {sorted(self._modules)}"
                )
            if not _trained(self._modules[name]):
                raise KeyError(f"per_example_grad_norms: {_frozen([name])}")
            raise KeyError(
                f"per_example_grad_norms: nothing recorded for '{name}': run the forward and the "
                f"backward inside `with per_example_grad_norms(model)` (the forward keeps the "
                f"norm's input); a forward after the backward, under grad, drops that backward's "
                f"numbers (run evaluation passes under torch.no_grad())"
            )
        self._check_single_calls([name])
        # a copy: a normlab norm's entries are views of the buffer its backward fills, which
        # a second backward through the same graph (retain_graph) would change under the
        # caller; torch's norms' entries are fresh tensors each backward, and so is this
        return {k: t.clone() for k, t in self._results[name].items()}

    def __contains__(self, name: object) -> bool:
        return name in self._results

    def __iter__(self) -> Iterator[str]:
        return iter(self._results)

    def __len__(self) -> int:
        return len(self._results)

    def keys(self):
        return self._results.keys()

    def items(self):
        return [(name, self[name]) for name in self._results]

    def _check_recorded(self) -> None:
        """Something recorded to read; else why not (no covered norm, every one frozen, no
        backward inside the context)."""
        if self._results:
            return
        if not self._modules:
            raise RuntimeError(
                "per_example_grad_norms: the model has no norm this covers (torch's or normlab's "
                "LayerNorm/RMSNorm with a weight); a Hugging Face model's own norms "
                "(LlamaRMSNorm, ...) are covered once swapped: normlab.integrations.hf.apply_normlab(model)"
            )
        if not any(_trained(m) for m in self._modules.values()):
            raise RuntimeError(f"per_example_grad_norms: {_frozen(list(self._modules))}")
        raise RuntimeError(
            "per_example_grad_norms: nothing recorded; run the forward and the backward "
            "inside the context"
        )

    def _check_single_calls(self, names) -> None:
        """A read is refused where a norm ran more than once in the step: twice inside one
        backward (``_repeated``: in two reentrant checkpoint segments), or, by a normlab
        norm's own record of its calls, inside a reentrant checkpoint and again after it,
        which the forward hook cannot tell from a recomputation."""
        for name in names:
            if name in self._repeated:
                raise RuntimeError(
                    f"per_example_grad_norms: norm '{name}' ran more than once in one backward "
                    f"(one module in several reentrant activation-checkpoint segments, as a layer "
                    f"shared between depths, or a forward a backward hook ran): its parameters are "
                    f"shared between the calls, so per-example gradients of one call are not defined. "
                    f"Use checkpoint(..., use_reentrant=False), or call each norm once per step"
                )
            mod = self._modules.get(name)
            if mod is not None and _from_backward(mod):
                mod.per_example_grad_sq  # noqa: B018 (raises RuntimeError for several calls)

    def total(self) -> Tensor:
        """Sum over all recorded norm layers and their parameters: float32 [B]."""
        self._check_recorded()
        self._check_single_calls(self._results)
        tensors = [t for rec in self._results.values() for t in rec.values()]
        sizes = {t.shape[0] for t in tensors}
        if len(sizes) != 1:
            raise RuntimeError(f"per_example_grad_norms: norms saw different batch sizes {sorted(sizes)}")
        return torch.stack(tensors).sum(0)

    def batch_grad_sq(self) -> float:
        """||g||^2 of the gradient of the latest backward over the recorded norm parameters
        (the sum of the examples' contributions, before accumulation into ``.grad``).
        Nothing recorded raises, as ``total()`` does (a 0 would read as a noise-free gradient)."""
        self._check_recorded()
        self._check_single_calls(self._results)
        keys = [f"{n}.{k}" for n, rec in self._results.items() for k in rec]
        missing = [k for k in keys if k not in self._batch_sq]
        if missing:
            raise RuntimeError(f"per_example_grad_norms: no batch gradient seen for {missing}")
        return float(sum(self._batch_sq[k] for k in keys))


def per_example_grad_norms(model: nn.Module) -> PerExampleGradNorms:
    """Context manager recording per-example squared gradient norms of every
    ``nn.LayerNorm``/``nn.RMSNorm`` (normlab's included) with a weight in ``model``.

    Run the forward and the backward inside the context; then ``rec[name]`` (name as in
    ``model.named_modules()``) is {"weight": float32 [B], "bias": float32 [B]} ("bias"
    only when the norm has one; a frozen weight or bias, requires_grad=False, is left
    out): the squared L2 norm of each example's contribution to that parameter's
    gradient in the latest backward (a norm that did not take part in it has no entry).
    ``rec.total()`` is their sum. Dim 0 of each norm's input is the example. A norm
    called twice before backward (shared parameters) raises; so do norms that disagree
    on the batch size. Entering the context raises NormArgumentError for a norm whose
    trained weight or bias is shared with another module (n2.weight = n1.weight: its
    per-example gradient sums both modules' before squaring), and for a norm inside a
    torch TransformerEncoderLayer/DecoderLayer built with batch_first=False (or the
    final norm of their TransformerEncoder/Decoder), whose dim 0 is time. Activation
    checkpointing (torch.utils.checkpoint) is taken: a forward recomputed inside the
    backward is not a second call (with reentrant checkpointing around every norm, a
    norm that sits out a step keeps its last entry)."""
    return PerExampleGradNorms(model)
