"""The torch backend: what runs on CPU tensors (and on CUDA with backend "torch").

Each op is the fastest exact torch formulation measured so far; where nothing beats it
the reference itself runs: the backend "torch" of ``normlab.ops``.

* layer_norm: ``torch.nn.functional.layer_norm`` (one fused pass on every device)
  where torch's kernels take the parameters' dtypes and sum the parameter gradients in
  float32; otherwise torch's op in the compute dtype (``layer_norm_upcast``: x already in
  it, or compiled) or ``LayerNormFunction`` (half-precision x: torch's kernels, normlab's
  float32 sums).
* rms_norm: ``_RMSNormEager``, one fused reduction (``vector_norm``) for the
  statistics and a hand-written backward with few passes; torch's own rms_norm is a
  chain of pointwise ops on CPU and its autograd saves every intermediate. Small CPU
  inputs, compiled calls, and torch.func transforms / forward-mode AD run torch's op
  (``rms_norm_upcast`` for the latter: its decomposition differentiates to any order).
* add_*_norm: the residual add (with dropout, one ``addcmul``) in a single pass, then
  the norm above.

Parameters of any floating-point dtype: out keeps x's dtype, and dweight/dbias are
summed in float32 (float64 for float64 x or parameters), then rounded to each
parameter's dtype.

Per-example gradient norms are a variant of each op (``layer_norm_per_example``, ...,
entered through ``normlab.diagnostics.per_example``, at the end of this file): a subclass
of the op's autograd.Function takes the buffer, and its backward also writes
``reference.per_example_param_grad_sq`` into it; the ops themselves carry none of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._prims_common import suggest_memory_format as _suggest_memory_format

from normlab.backend import forward_ad_active
from normlab.ops import reference

# ----------------------------------------------------------------------- layer norm


_HALF = (torch.float16, torch.bfloat16)


def bias_alone_refused(x: Tensor, weight: object, bias: object) -> bool:
    """A bias without a weight, of another dtype than x: torch's layer_norm forward takes
    a float32 one with half-precision x, its backward fails on the pair."""
    return weight is None and bias is not None and getattr(bias, "dtype", None) is not x.dtype


def _params_native(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """torch's layer_norm kernels take these parameters with x: all of one dtype, x's,
    or float32 for half-precision x (a weight with it: ``bias_alone_refused``)."""
    dt = weight.dtype if weight is not None else bias.dtype if bias is not None else x.dtype
    return ((bias is None or bias.dtype is dt) and (dt is x.dtype or (
        dt is torch.float32 and x.dtype in _HALF and not bias_alone_refused(x, weight, bias))))


def layer_norm_native_ok(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """torch's own layer_norm gives normlab's result, gradients included: parameters it
    pairs with x, and no parameter gradient from half-precision x off CUDA (torch's CPU
    backward sums dweight and dbias in x's dtype: a bfloat16 sum of ones stops growing
    at 256)."""
    if not _params_native(x, weight, bias):
        return False
    return (x.dtype not in _HALF or x.is_cuda or not torch.is_grad_enabled()
            or not ((weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad)))


def _layer_norm_dtype(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> torch.dtype:
    """The compute dtype: float32, or float64 where x or a parameter is float64."""
    if (weight is not None and weight.dtype is torch.float64) or (bias is not None and bias.dtype is torch.float64):
        return torch.float64
    return reference.compute_dtype(x.dtype)


def _layer_norm_operands(x: Tensor, weight: Tensor | None,
                         bias: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(x, weight, bias) for torch's kernels, run in the compute dtype: parameters cast to
    float32 (float64 where x or a parameter is float64), and x too for a float64
    parameter. Half-precision x stays: torch's kernels pair it with float32 parameters
    (and give the same output bits as with half-precision ones, with float32 statistics)."""
    ct = _layer_norm_dtype(x, weight, bias)
    return (x if ct is torch.float32 or x.dtype is ct else x.to(ct),
            None if weight is None else weight.to(ct), None if bias is None else bias.to(ct))


def _layer_norm_forward(x: Tensor, normalized_shape: Sequence[int], weight: Tensor | None,
                        bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(out, mean, rstd): torch's kernel on ``_layer_norm_operands`` (the same output bits
    as torch's op wherever torch takes the call), out rounded to x's dtype."""
    xa, wa, ba = _layer_norm_operands(x, weight, bias)
    out, mean, rstd = torch.native_layer_norm(xa, normalized_shape, wa, ba, eps)
    return (out if out.dtype is x.dtype else out.to(x.dtype)), mean, rstd


# Half-precision x is converted to float32 for torch's backward kernel (whose CPU
# version sums dweight/dbias in its input's dtype) this many elements at a time, and each
# chunk's dx is rounded into place: the converted rows stay in cache, so the conversions
# cost little more than the bf16 kernel's own reads. The backward alone, bf16, one EPYC
# thread, inputs out of cache, ms (torch's bf16 op / in chunks of 2^18 / 2^16 elements /
# 2^16 with the chunks' dx concatenated, as before): 4096 x 1024 2.99 / 3.01 / 3.91 /
# 5.00; 2048 x 4096 6.06 / 6.36 / 6.59 / 8.75; 8192 x 768 4.46 / 4.76 / 5.75 / 7.55.
# Smaller chunks pay the per-chunk host time (2^13: 12 ms at 4096 x 1024), larger ones
# leave the cache.
LN_BACKWARD_CHUNK = 1 << 18


def _batched(t: Tensor) -> bool:
    """t is batched by a vmap: functorch's, or the legacy one under which autograd.grad's
    is_grads_batched runs a backward (tensors look plain there, the mode is on; its
    dispatch key has no Python name, so it is read from the thread's key set)."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t) or "VmapMode" in str(
        torch._C._dispatch_tls_local_include_set())


def _layer_norm_backward(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, rstd: Tensor,
                         dout: Tensor, normalized_shape: Sequence[int],
                         needs: Sequence[bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dx, dweight, dbias) from torch's backward kernel run in the compute dtype (x and
    dout converted first, ``LN_BACKWARD_CHUNK`` elements at a time: its CPU kernel sums
    dweight/dbias in its input's dtype), the chunks' dweight/dbias added in that dtype,
    each result rounded to its tensor's dtype; ``needs``: the input-gradient flags of
    (x, weight, bias)."""
    ct = mean.dtype  # the compute dtype: float32, or float64
    wa = None if weight is None else weight.to(ct)
    # the backward kernel reads no value of the bias (the gradients do not depend on it),
    # only that there is one, of the compute dtype: the weight stands in, saving a conversion
    ba = None if bias is None else wa if wa is not None else bias.to(ct)
    mask = [needs[0], weight is not None and needs[1], bias is not None and needs[2]]
    k, hidden = len(normalized_shape), max(1, math.prod(normalized_shape))
    step, rows = max(64, LN_BACKWARD_CHUNK // hidden), x.numel() // hidden
    # (x is converted to the compute dtype as it is read: whole when float64 is the compute
    # dtype, as ``_layer_norm_operands`` converts it)
    # (whole, too, for a gradient that is not a plain tensor: a DTensor, or batched under a
    # torch.func transform such as autograd.grad's is_grads_batched, which the chunks'
    # in-place writes into a plain buffer cannot take)
    if rows <= step or ((x.dtype is ct or ct is torch.float64) and dout.dtype is ct) \
            or type(dout) is not Tensor or type(x) is not Tensor or _batched(dout) or _batched(x):
        dx, dw, db = torch.ops.aten.native_layer_norm_backward(
            dout.to(ct), x.to(ct), normalized_shape, mean, rstd, wa, ba, mask)
    else:
        x2, d2 = x.reshape(-1, *normalized_shape), dout.reshape(-1, *normalized_shape)
        m2, r2 = mean.reshape(-1, *[1] * k), rstd.reshape(-1, *[1] * k)
        dx = torch.empty(x2.shape, dtype=x.dtype, device=x.device) if mask[0] else None
        dw = db = None
        for s in range(0, rows, step):
            gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
                d2[s:s + step].to(ct), x2[s:s + step].to(ct), normalized_shape, m2[s:s + step], r2[s:s + step],
                wa, ba, mask)
            if gx is not None:
                dx[s:s + step].copy_(gx)  # rounded per chunk into place (no list to concatenate)
            dw = gw if dw is None else dw.add_(gw)
            db = gb if db is None else db.add_(gb)
        dx = None if dx is None else dx.reshape(x.shape)
    return (None if dx is None else dx.to(x.dtype), None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype))


def c_apply(cls: type) -> object:
    """``cls.apply`` without ``torch.autograd.Function.apply``'s Python layer: the C apply
    of ``torch._C._FunctionBase``, bound to ``cls``. That layer is functorch bookkeeping
    (about 2 us a call on a CPU); a caller outside torch.func transforms passes the
    tensors through ``unwrap_if_dead`` itself, the one thing the layer does there (a
    tensor that escaped a transform is unwrapped, as torch's own ops unwrap it)."""
    return super(torch.autograd.Function, cls).apply


unwrap_if_dead = torch._C._functorch.unwrap_if_dead


def unwrapped(t: Tensor | None) -> Tensor | None:
    """``unwrap_if_dead`` of an optional tensor (``c_apply``'s callers)."""
    return t if t is None else unwrap_if_dead(t)


class _NoSecondDerivative(torch.autograd.Function):
    """The gradients a backward computed, as outputs of a node whose backward raises."""

    @staticmethod
    def forward(ctx, message, count, *tensors):
        ctx.message = message
        return tuple(t.clone() for t in tensors[:count])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def refuse_second_derivative(grads: tuple, came_from: Sequence[Tensor | None], message: str) -> tuple:
    """For a backward run with create_graph=True whose formula has no derivative (a
    kernel's, an approximation's): ``grads`` (computed without a graph) as outputs of a
    node that raises ``message`` when a second derivative reaches it. The node's inputs
    are ``came_from`` too (the incoming gradients, the saved inputs): it sits on every path
    from the gradients back to what they depend on, so ``torch.autograd.grad`` raises as
    ``.backward()`` does. (torch's ``once_differentiable`` hangs its error node on
    detached copies: ``autograd.grad`` of the inputs never reaches it and silently drops
    the second-order terms.)"""
    at = [i for i, g in enumerate(grads) if isinstance(g, Tensor)]
    anchors = [t for t in came_from if isinstance(t, Tensor) and t.requires_grad]
    if not at or not anchors:
        return grads  # nothing to differentiate through
    outs = _NoSecondDerivative.apply(message, len(at), *[grads[i] for i in at], *anchors)
    result = list(grads)
    for i, o in zip(at, outs, strict=True):
        result[i] = o
    return tuple(result)


def _x_weight_bias(needs_input_grad: tuple[bool, ...]) -> tuple[bool, bool, bool]:
    """The input-gradient flags of (x, weight, bias) among the op's inputs."""
    return needs_input_grad[0], needs_input_grad[2], needs_input_grad[3]


class LayerNormFunction(torch.autograd.Function):
    """torch's fused layer norm with parameters of any dtype, dweight and dbias summed in
    float32 (float64 for float64 x or parameters) and rounded once to each parameter's
    dtype (``_layer_norm_forward``, ``_layer_norm_backward``). (forward + setup_context,
    so torch.func transforms such as vmap(grad) and torch.compile pass through; mean and
    rstd are non-differentiable outputs kept for the backward.)"""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, normalized_shape, weight, bias, eps):
        return _layer_norm_forward(x, normalized_shape, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, normalized_shape, weight, bias, _eps = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.normalized_shape = normalized_shape

    @staticmethod
    def backward(ctx, dout, _dmean, _drstd):
        return _layer_norm_grads(ctx, dout)


def _layer_norm_grads(ctx, dout: Tensor, saved: tuple | None = None) -> tuple:
    """The gradients of (x, normalized_shape, weight, bias, eps) from the saved state
    (``saved``: ``ctx.saved_tensors`` already unpacked: activation checkpointing refuses a
    second unpack in one backward)."""
    x, weight, bias, mean, rstd = ctx.saved_tensors if saved is None else saved
    dx, dw, db = _layer_norm_backward(x, weight, bias, mean, rstd, dout, ctx.normalized_shape,
                                      _x_weight_bias(ctx.needs_input_grad))
    return dx, None, dw, db, None


class _LayerNormEager(torch.autograd.Function):
    """The same op for plain eager calls, in the ctx-in-forward form (about 50 us cheaper
    per call on a CPU, as ``_RMSNormEager``)."""

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps):
        out, mean, rstd = _layer_norm_forward(x, normalized_shape, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.normalized_shape = normalized_shape
        return out

    @staticmethod
    def backward(ctx, dout):
        return _layer_norm_grads(ctx, dout)


def layer_norm_upcast(x: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, bias: Tensor | None,
                      eps: float) -> Tensor:
    """torch's layer_norm on x and the parameters converted to the compute dtype, rounded
    to x's dtype; autograd's own nodes round each gradient once from its float32 (float64)
    sums, as ``LayerNormFunction``. For x already in the compute dtype (float32 x, float16
    weight, ...) the same bits as that Function, for less host time; under torch.compile
    it decomposes into ops inductor fuses, and under torch.func it has every rule (jvp
    too). For half-precision x in eager it is not used: torch's float32 kernel on
    converted x can differ from its half-precision kernel by an ulp."""
    ct = _layer_norm_dtype(x, weight, bias)
    return F.layer_norm(x.to(ct), normalized_shape, None if weight is None else weight.to(ct),
                        None if bias is None else bias.to(ct), eps).to(x.dtype)


def one_dtype(x: Tensor, weight: object, bias: object) -> bool:
    """The parameters (those given) have x's dtype."""
    dt = x.dtype
    return getattr(weight, "dtype", dt) is dt and getattr(bias, "dtype", dt) is dt


def layer_norm_scaled(x: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, bias: Tensor | None,
                      eps: float, offset: float) -> Tensor:
    """layer_norm with the scale (offset + weight; the offset alone without a weight) and
    the bias formed in the compute dtype (float32, float64 for float64 x): ``layer_norm``
    below, whose float32 (float64) statistics and parameter-gradient sums give y rounded
    once to x's dtype. Float32 x calls torch's op itself (its parameters are then x's
    dtype: nothing for ``layer_norm`` to choose)."""
    # (.float() / .double(): the casts of .to(dtype), at a third of its host time)
    f64 = x.dtype is torch.float64
    if weight is None:
        scale = None if offset == 0.0 else torch.full(
            normalized_shape, offset, dtype=torch.float64 if f64 else torch.float32, device=x.device)
    else:
        scale = (weight.double() if f64 else weight.float()) + offset
    if bias is not None:
        bias = bias.double() if f64 else bias.float()
    if x.dtype is torch.float32:
        return torch.layer_norm(x, normalized_shape, scale, bias, eps)
    return layer_norm(x, normalized_shape, scale, bias, eps)


def layer_norm(x, normalized_shape, weight, bias, eps):
    if layer_norm_native_ok(x, weight, bias) and (
            not torch._C._are_functorch_transforms_active() or one_dtype(x, weight, bias)):
        # torch's native op is already one fused pass on every device (under torch.func
        # with mixed dtypes it decomposes and promotes, batched parameters, so not there:
        # normlab's output keeps x's dtype)
        return F.layer_norm(x, normalized_shape, weight, bias, eps)
    if not _plain_eager():  # (before the test below: under forward-mode AD nothing requires grad)
        return layer_norm_upcast(x, normalized_shape, weight, bias, eps)
    if not _differentiable(x, weight, bias):
        return _layer_norm_forward(x, normalized_shape, weight, bias, eps)[0]  # nothing to differentiate
    if x.dtype is _layer_norm_dtype(x, weight, bias):
        return layer_norm_upcast(x, normalized_shape, weight, bias, eps)
    # half-precision x in eager: torch's kernel on x itself, so the output has torch's op's
    # bits (torch's float32 kernel on converted x differs by an ulp at some sizes, hidden
    # 1, 1000, 4097, ...), and the backward converts x a chunk of rows at a time
    return _LN_EAGER_APPLY(unwrap_if_dead(x), list(normalized_shape), unwrapped(weight), unwrapped(bias), eps)


_LN_EAGER_APPLY = c_apply(_LayerNormEager)  # (layer_norm runs it in plain eager calls only)


# ----------------------------------------------------------------------- rms norm


# torch's fused CPU forward (y and rstd in one kernel); private, so looked up once and optional
_FUSED_RMS_FORWARD = getattr(torch.ops.aten, "_fused_rms_norm", None)
# up to this many elements it beats the vector_norm path below on a CPU (fixed cost:
# 14 vs 45 us at 8 x 64); past it, its single pass is slower (0.97 vs 0.25 ms at
# 1024 x 512 fp32). Measured in benchmarks/results/rms-forward-cpu.md.
FUSED_RMS_MAX_NUMEL = 1 << 17


def _rows(x: Tensor, normalized_shape: Sequence[int]) -> int:
    """The number of normalized rows (the leading dims' product: right for a zero-size
    normalized dim too, where ``reshape(-1, 0)`` cannot infer it)."""
    return math.prod(x.shape[:x.dim() - len(normalized_shape)])


def torch_format(t: Tensor) -> torch.memory_format | None:
    """The channels_last(_3d) layout torch's ops give their output for ``t`` (its
    ``suggest_memory_format``; torch's rms_norm keeps it, and ``residual + x`` takes the
    residual's), where normlab's kernels write contiguous rows; None for the rest (a 4-D
    or 5-D tensor that is not contiguous is the only case looked at: the others cost one
    test)."""
    if t.dim() < 4 or t.is_contiguous():
        return None
    fmt = _suggest_memory_format(t)
    return fmt if fmt is torch.channels_last or fmt is torch.channels_last_3d else None


def in_layout_of(t: Tensor, like: Tensor) -> Tensor:
    """``t`` (row-major) in ``like``'s channels_last(_3d) layout, where ``like`` has one
    (``torch_format``). Made by permuting to channels-last order and back, which torch.func's
    vmap takes (its clone refuses a channels_last memory_format, and inside it a layout
    query may be refused: then ``t`` is kept as it is)."""
    try:
        fmt = torch_format(like)
    except RuntimeError:  # (vmap: "querying is_contiguous inside of vmap ... is not supported")
        return t
    if fmt is torch.channels_last:
        return t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    if fmt is torch.channels_last_3d:
        return t.permute(0, 2, 3, 4, 1).contiguous().permute(0, 4, 1, 2, 3)
    return t


def _rms_forward(x: Tensor, normalized_shape: Sequence[int], weight: Tensor | None,
                 eps: float, fused_ok: bool = False) -> tuple[Tensor, Tensor]:
    """y = x * rstd * weight and rstd [rows, 1], rstd = 1 / sqrt(mean(x^2) + eps), in
    float32 (float64); y in x's dtype, rounded once.

    Small CPU inputs (``fused_ok``, weight in x's dtype): torch's fused forward, which
    gives the same bits. Otherwise one fused reduction (``vector_norm``) for rstd, then y
    in place."""
    if (fused_ok and _FUSED_RMS_FORWARD is not None and x.device.type == "cpu"
            and x.numel() <= FUSED_RMS_MAX_NUMEL and (weight is None or weight.dtype == x.dtype)):
        y, rstd = _FUSED_RMS_FORWARD(x, list(normalized_shape), weight, eps)
        return y, rstd.reshape(-1, 1)
    hidden = math.prod(normalized_shape)
    ct = reference.compute_dtype(x.dtype)
    x2 = x.reshape(_rows(x, normalized_shape), hidden)
    if not x2.is_contiguous():  # rows read in order, and a row-major y, as torch returns
        x2 = x2.contiguous()
    if x2.dtype == ct:  # no conversion: y = x * rstd is the first pass that writes
        rstd = torch.linalg.vector_norm(x2, dim=1, keepdim=True)
        rstd = rstd.square_().div_(hidden).add_(eps).rsqrt_()
        y = x2 * rstd
    else:
        y = x2.to(ct)
        rstd = torch.linalg.vector_norm(y, dim=1, keepdim=True)
        rstd = rstd.square_().div_(hidden).add_(eps).rsqrt_()
        y.mul_(rstd)
    if weight is not None:
        # in place where it can be; out of place for a float64 weight (promotes) and under
        # torch.func, where the weight may be batched and y not (model ensembling)
        inplace = (weight.dtype != torch.float64 or ct == weight.dtype) and _plain_eager()
        y = y.mul_(weight.reshape(-1)) if inplace else y * weight.reshape(-1)
    y = in_layout_of(y.to(x.dtype).reshape(x.shape), x)  # as torch's rms_norm keeps it
    return y, rstd


def _rms_backward(x: Tensor, weight: Tensor | None, rstd: Tensor, dout: Tensor, normalized_shape: tuple,
                  eps: float, needs_x: bool, needs_weight: bool) -> tuple[Tensor | None, Tensor | None]:
    """With P = dy * x, c = (P @ weight) * rstd^3 / N (a matrix-vector product):
    dx = (dy * weight) * rstd - x * c and dweight = P^T @ rstd, so dy and x are each read
    twice and no [rows, hidden] intermediate is kept."""
    ct = rstd.dtype
    hidden = math.prod(normalized_shape)
    rows = _rows(x, normalized_shape)
    x2 = x.reshape(rows, hidden)
    if torch.is_grad_enabled():
        # create_graph (double backward): out-of-place ops, and rstd recomputed from x
        # so the second derivative flows through it too
        rstd = torch.rsqrt(x2.to(ct).square().mean(1, keepdim=True) + eps)
        dyf = dout.reshape(rows, hidden).to(ct)
    else:
        dyf = dout.reshape(rows, hidden).to(ct, copy=True)  # scratch, updated in place below
    p = dyf * x2
    dx = dw = None
    if weight is not None and needs_weight:
        # in the weight's dtype (a float64 weight with float32 input gets a float64 gradient)
        wt = torch.promote_types(ct, weight.dtype)
        dw = torch.mv(p.t().to(wt), rstd.squeeze(1).to(wt)).to(weight.dtype).reshape(weight.shape)
    if needs_x:
        w = weight.reshape(-1).to(ct) if weight is not None else None
        c = (torch.mv(p, w) if w is not None else p.sum(1)).unsqueeze(1) * rstd.pow(3) / hidden
        if torch.is_grad_enabled():
            g = dyf * w if w is not None else dyf
            dx = g * rstd - x2 * c
        else:
            g = dyf.mul_(w) if w is not None else dyf
            dx = g.mul_(rstd).addcmul_(x2, c, value=-1)
        dx = in_layout_of(dx.to(x.dtype).reshape(x.shape), dout)  # as torch's backward: in dy's layout
    return dx, dw


def _rms_jvp(x: Tensor, weight: Tensor | None, rstd: Tensor, normalized_shape: tuple,
             dx: Tensor | None, dweight: Tensor | None, eps: float) -> Tensor:
    """Forward-mode derivative of y = x * rstd * w:
    dy = dx * rstd * w - x * rstd^3 * mean(x * dx) * w + x * rstd * dw, with rstd
    recomputed from x (the saved one is a constant to autograd: a derivative of this
    tangent would miss rstd's dependence on x), row-major as the primal output."""
    ct = rstd.dtype
    hidden = math.prod(normalized_shape)
    rows = _rows(x, normalized_shape)
    x2 = x.reshape(rows, hidden).to(ct)
    rstd = torch.rsqrt(x2.square().mean(1, keepdim=True) + eps)
    out = torch.zeros_like(x2)
    if dx is not None:
        d2 = dx.reshape(rows, hidden).to(ct)
        out = d2 * rstd - x2 * rstd.pow(3) * (x2 * d2).mean(1, keepdim=True)
        if weight is not None:
            out = out * weight.reshape(-1).to(ct)
    if dweight is not None:
        out = out + x2 * rstd * dweight.reshape(-1).to(ct)
    return in_layout_of(out.to(x.dtype).contiguous().reshape(x.shape), x)


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm with the hand-written backward of ``_rms_backward`` and forward-mode AD,
    in the forward + setup_context form that torch.func transforms (vmap, grad, jvp) and
    torch.compile need; rstd is a non-differentiable output kept for the backward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, normalized_shape, weight, eps):
        return _rms_forward(x, normalized_shape, weight, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, normalized_shape, weight, eps = inputs
        _, rstd = output
        ctx.mark_non_differentiable(rstd)
        ctx.save_for_backward(x, weight, rstd)
        ctx.saved_for_jvp = (x, weight, rstd)
        ctx.eps = eps
        ctx.normalized_shape = tuple(normalized_shape)

    @staticmethod
    def backward(ctx, dout, _drstd):
        return _rms_grads(ctx, dout)

    @staticmethod
    def jvp(ctx, dx, _dshape, dweight, *_rest):
        x, weight, rstd = ctx.saved_for_jvp
        return _rms_jvp(x, weight, rstd, ctx.normalized_shape, dx, dweight, ctx.eps), None


def _rms_grads(ctx, dout: Tensor, saved: tuple | None = None) -> tuple:
    """The gradients of (x, normalized_shape, weight, eps) from the saved state (``saved``:
    as ``_layer_norm_grads``)."""
    x, weight, rstd = ctx.saved_tensors if saved is None else saved
    dx, dw = _rms_backward(x, weight, rstd, dout, ctx.normalized_shape, ctx.eps, ctx.needs_input_grad[0],
                           ctx.needs_input_grad[2])
    return dx, None, dw, None


class _RMSNormEager(torch.autograd.Function):
    """The same op for plain eager calls: the ctx-in-forward form of autograd.Function
    costs about 45 us less per call than the setup_context form (measured on CPU), which
    at small shapes is most of the op."""

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, eps):
        y, rstd = _rms_forward(x, normalized_shape, weight, eps, fused_ok=True)
        ctx.save_for_backward(x, weight, rstd)
        ctx.eps, ctx.normalized_shape = eps, tuple(normalized_shape)
        return y

    @staticmethod
    def backward(ctx, dout):
        return _rms_grads(ctx, dout)


_RMS_EAGER_APPLY = c_apply(_RMSNormEager)  # (rms_norm runs it in plain eager calls only)


def _differentiable(*tensors: Tensor | None) -> bool:
    """Grad mode is on and one of ``tensors`` requires a gradient: the call needs autograd."""
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                return True
    return False


def _plain_eager() -> bool:
    """No torch.func transform, no forward-mode AD (dual tensors) and no compilation: the
    cheap autograd.Function form (no jvp) works."""
    return (not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()
            and not forward_ad_active())


# Up to this many elements torch's own rms_norm (its fused CPU forward and its autograd)
# is faster than normlab's forward + backward on a CPU: the Python autograd.Function
# costs more than the work (at 8 x 64 fp32: forward 21 vs 46 us, forward + backward
# 110-180 vs 290 us); from 131072 elements normlab's backward wins (0.64 vs 1.5 ms at
# 1024 x 128). See docs/kernels.md, "Which implementation runs".
NATIVE_RMS_MAX_NUMEL = 1 << 16


def native_rms_ok(x: Tensor, weight: Tensor | None) -> bool:
    """torch.rms_norm gives normlab's result (same bits forward) and is the faster path."""
    return (x.device.type == "cpu" and x.numel() <= NATIVE_RMS_MAX_NUMEL
            and (weight is None or weight.dtype == x.dtype))


def rms_norm(x, normalized_shape, weight, eps):
    if eps is None:
        eps = reference.default_rms_eps(x.dtype)
    if torch.compiler.is_compiling():
        # torch's own op decomposes into primitives that inductor fuses with the
        # neighbouring ops, forward and backward; one rounding to x's dtype, as normlab's
        return torch.rms_norm(x, normalized_shape, weight, eps).to(x.dtype)
    if native_rms_ok(x, weight):
        return torch.rms_norm(x, normalized_shape, weight, eps)
    if _plain_eager():
        if not _differentiable(x, weight):
            return _rms_forward(x, normalized_shape, weight, eps, fused_ok=True)[0]  # nothing to differentiate
        return _RMS_EAGER_APPLY(unwrap_if_dead(x), tuple(normalized_shape), unwrapped(weight), eps)
    # torch.func transforms and forward-mode AD: torch's op in the compute dtype, whose
    # decomposition differentiates to any order (a jvp from the forward's saved rstd, a
    # constant to a second derivative, gave wrong reverse-over-forward derivatives and
    # failed forward-over-forward), in every layout
    return rms_norm_upcast(x, normalized_shape, weight, eps)


def rms_norm_upcast(x: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, eps: float) -> Tensor:
    """``_rms_forward``'s ops out of place (``vector_norm`` for rstd, in the compute dtype,
    times the weight, rounded once to x's dtype): the eager path's bits (above
    ``FUSED_RMS_MAX_NUMEL``, where eager does not take torch's fused forward), with torch
    ops autograd differentiates to any order, under every transform."""
    ct = reference.compute_dtype(x.dtype)
    dims = tuple(range(-len(normalized_shape), 0))
    h = x.to(ct).contiguous()  # (rows read in order, as _rms_forward: the same sums)
    rstd = torch.linalg.vector_norm(h, dim=dims, keepdim=True).square().div(math.prod(normalized_shape))
    y = h * rstd.add(eps).rsqrt()
    if weight is not None:
        y = y * weight
    return in_layout_of(y.to(x.dtype), x)  # (as the eager path: x's layout)


def rms_norm_cast(x: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, eps: float | None,
                  offset: float, casting_mode: str) -> Tensor:
    """``reference.rms_norm_cast`` in fewer dispatches, the same bits forward and backward
    (tested): torch's rms_norm without a weight is, on a CPU, the reference's chain (pow,
    mean, add, rsqrt, mul) in one call; the scale (offset + weight) is formed and
    multiplied as the reference does (a product of its own: torch's op's weight product
    differentiates slower). Hugging Face's GemmaRMSNorm and LlamaRMSNorm are the same
    chain op by op, so at small shapes this costs their host time, where the reference
    costs about 1.3x it. Arguments as checked by ``functional.rms_norm``, except what
    torch's op checks itself (x's trailing dims, the devices). torch's op returns a
    contiguous tensor where the reference keeps x's strides."""
    # (.float() / .double() / .type_as: the casts of .to(dtype), at a third of its host time)
    f64 = x.dtype is torch.float64
    h = torch.rms_norm(x.double() if f64 else x.float(), normalized_shape, None,
                       reference.default_rms_eps(x.dtype) if eps is None else eps)
    if casting_mode == "llama":
        h = h.type_as(x)
        if weight is None:
            return h if offset == 0.0 else h * offset
        return (weight if offset == 0.0 else ((weight.double() if f64 else weight.float()) + offset).type_as(weight)) * h
    if weight is not None:
        return (h * ((weight.double() if f64 else weight.float()) + offset)).type_as(x)
    return (h if offset == 0.0 else h * offset).type_as(x)


# ----------------------------------------------------------------------- residual add


def dropout_add(x, residual, *, dropout_p=0.0, training=False, generator=None,
                residual_dtype=None):
    """residual + dropout(x), formed in float32 and rounded once to residual_dtype.

    The mask keeps an element when a uniform draw from ``generator`` is >= dropout_p
    (the Triton kernels' rule); one ``torch.rand`` is half the cost of ``bernoulli_``,
    and the scaled sum is one ``addcmul``."""
    if x.dtype == torch.float64 or (residual is not None and residual.dtype == torch.float64):
        return reference.dropout_add(x, residual, dropout_p=dropout_p, training=training,
                                     generator=generator, residual_dtype=residual_dtype)
    out_dtype = residual_dtype or x.dtype
    if not (training and dropout_p > 0.0):
        if residual is None:
            return x if out_dtype == x.dtype else x.to(out_dtype)
        if torch.promote_types(residual.dtype, x.dtype) == out_dtype:
            return residual + x  # torch forms half-precision sums in float32, rounds once
        return (residual.float() + x).to(out_dtype)
    # (generator=None passed explicitly fails under torch.compile once the shape is symbolic)
    keep_scaled = (torch.rand(x.shape, device=x.device) if generator is None
                   else torch.rand(x.shape, generator=generator, device=x.device))
    keep_scaled.ge_(dropout_p).mul_(1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0)
    if residual is None:
        return torch.mul(x, keep_scaled).to(out_dtype)
    return torch.addcmul(residual, x, keep_scaled).to(out_dtype)


def _plain_add(x, residual, dropout_p, training, residual_dtype):
    """residual + x when that is the whole dropout_add (no dropout, one dtype), else None."""
    if residual is not None and not (training and dropout_p > 0.0) and residual.dtype == x.dtype \
            and residual_dtype in (None, x.dtype) and x.dtype != torch.float64:
        return residual + x
    return None


def add_layer_norm(x, residual, weight, bias, eps, *, dropout_p=0.0, training=False,
                   generator=None, residual_dtype=None, normalized_shape=None):
    new_residual = _plain_add(x, residual, dropout_p, training, residual_dtype)
    if new_residual is not None:
        # the common call, in two torch ops: layer_norm keeps new_residual's dtype, x's
        return layer_norm(new_residual, normalized_shape, weight, bias, eps), new_residual
    new_residual = dropout_add(x, residual, dropout_p=dropout_p, training=training,
                               generator=generator, residual_dtype=residual_dtype)
    return layer_norm(new_residual, normalized_shape, weight, bias, eps).to(x.dtype), new_residual


def add_rms_norm(x, residual, weight, eps, *, dropout_p=0.0, training=False, generator=None,
                 residual_dtype=None, normalized_shape=None):
    new_residual = _plain_add(x, residual, dropout_p, training, residual_dtype)
    if new_residual is not None:
        out = rms_norm(new_residual, normalized_shape, weight, eps)
        return out, new_residual  # rms_norm keeps new_residual's dtype, which is x's
    new_residual = dropout_add(x, residual, dropout_p=dropout_p, training=training,
                               generator=generator, residual_dtype=residual_dtype)
    return rms_norm(new_residual, normalized_shape, weight, eps).to(x.dtype), new_residual


# ----------------------------------------------------------------------- per-example variants
# The ops above with a float32 [2, B] buffer that each backward overwrites with every
# example's squared weight and bias gradient norms (``reference.per_example_param_grad_sq``;
# checked and entered through ``normlab.diagnostics.per_example``). Each runs a subclass of
# the op's Function that takes the buffer last and holds it on ctx, outside the saved
# tensors: written, never read, so no version check fires when a retained graph runs
# backward again.


def _write_per_example(buffer: Tensor, grad_out: Tensor, x_hat: Tensor,
                       normalized_shape: Sequence[int], has_bias: bool) -> None:
    """buffer [2, B] = each example's squared weight and bias gradient norms (B: dim 0 of
    the input; ``grad_out`` and ``x_hat`` in the compute dtype)."""
    n, hidden = buffer.shape[1], math.prod(normalized_shape)
    # the rows per example explicit: -1 is ambiguous for an empty batch or hidden size 0
    g = grad_out.reshape(n, grad_out.numel() // (n * hidden) if n * hidden else 1, *normalized_shape)
    with torch.no_grad():  # (a create_graph backward: the buffer joins no graph)
        sq_w, sq_b = reference.per_example_param_grad_sq(g.detach(), x_hat.detach().reshape(g.shape),
                                                         normalized_shape)
        buffer[0].copy_(sq_w)
        buffer[1].copy_(sq_b if has_bias else torch.zeros_like(sq_b))


def _layer_norm_per_example(ctx, dout: Tensor, saved: tuple) -> None:
    x, _weight, bias, mean, rstd = saved
    ct = mean.dtype
    _write_per_example(ctx.per_example_grad_sq, dout.to(ct), (x.to(ct) - mean) * rstd, ctx.normalized_shape,
                       bias is not None)


def _rms_per_example(ctx, dout: Tensor, saved: tuple) -> None:
    x, _weight, rstd = saved
    shape = (_rows(x, ctx.normalized_shape), math.prod(ctx.normalized_shape))
    _write_per_example(ctx.per_example_grad_sq, dout.reshape(shape).to(rstd.dtype),
                       x.reshape(shape) * rstd, ctx.normalized_shape, False)


class LayerNormPerExampleFunction(LayerNormFunction):
    """``LayerNormFunction`` that also writes the per-example buffer (its last input)."""

    @staticmethod
    def forward(x, normalized_shape, weight, bias, eps, per_example_grad_sq):
        return _layer_norm_forward(x, normalized_shape, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        LayerNormFunction.setup_context(ctx, inputs[:5], output)
        ctx.per_example_grad_sq = inputs[5]

    @staticmethod
    def backward(ctx, dout, _dmean, _drstd):
        saved = ctx.saved_tensors  # (once: activation checkpointing refuses a second unpack)
        _layer_norm_per_example(ctx, dout, saved)
        return *_layer_norm_grads(ctx, dout, saved), None


class _LayerNormPerExampleEager(_LayerNormEager):
    """The ctx-in-forward form of ``LayerNormPerExampleFunction``, for plain eager calls."""

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps, per_example_grad_sq):
        ctx.per_example_grad_sq = per_example_grad_sq
        return _LayerNormEager.forward(ctx, x, normalized_shape, weight, bias, eps)

    @staticmethod
    def backward(ctx, dout):
        saved = ctx.saved_tensors  # (once: activation checkpointing refuses a second unpack)
        _layer_norm_per_example(ctx, dout, saved)
        return *_layer_norm_grads(ctx, dout, saved), None


class RMSNormPerExampleFunction(RMSNormFunction):
    """``RMSNormFunction`` that also writes the per-example buffer (its last input). No
    forward-mode AD (a buffer of backward results has no tangent), which lets
    torch.compile trace it: dynamo refuses Functions with a custom jvp."""

    jvp = torch.autograd.Function.jvp

    @staticmethod
    def forward(x, normalized_shape, weight, eps, per_example_grad_sq):
        return _rms_forward(x, normalized_shape, weight, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        RMSNormFunction.setup_context(ctx, inputs[:4], output)
        ctx.per_example_grad_sq = inputs[4]

    @staticmethod
    def backward(ctx, dout, _drstd):
        saved = ctx.saved_tensors  # (once: activation checkpointing refuses a second unpack)
        _rms_per_example(ctx, dout, saved)
        return *_rms_grads(ctx, dout, saved), None


class _RMSNormPerExampleEager(_RMSNormEager):
    """The ctx-in-forward form of ``RMSNormPerExampleFunction``, for plain eager calls."""

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, eps, per_example_grad_sq):
        ctx.per_example_grad_sq = per_example_grad_sq
        return _RMSNormEager.forward(ctx, x, normalized_shape, weight, eps)

    @staticmethod
    def backward(ctx, dout):
        saved = ctx.saved_tensors  # (once: activation checkpointing refuses a second unpack)
        _rms_per_example(ctx, dout, saved)
        return *_rms_grads(ctx, dout, saved), None


def layer_norm_per_example(x, normalized_shape, weight, bias, eps, per_example_grad_sq):
    if _plain_eager():
        return _LayerNormPerExampleEager.apply(x, list(normalized_shape), weight, bias, eps, per_example_grad_sq)
    return LayerNormPerExampleFunction.apply(x, list(normalized_shape), weight, bias, eps, per_example_grad_sq)[0]


def rms_norm_per_example(x, normalized_shape, weight, eps, per_example_grad_sq):
    if eps is None:
        eps = reference.default_rms_eps(x.dtype)
    if _plain_eager():
        if not _differentiable(x, weight):
            return _rms_forward(x, normalized_shape, weight, eps, fused_ok=True)[0]  # nothing to differentiate
        return _RMSNormPerExampleEager.apply(x, tuple(normalized_shape), weight, eps, per_example_grad_sq)
    return RMSNormPerExampleFunction.apply(x, tuple(normalized_shape), weight, eps, per_example_grad_sq)[0]


def add_layer_norm_per_example(x, residual, weight, bias, eps, per_example_grad_sq, *, normalized_shape, **kw):
    new_residual = dropout_add(x, residual, **kw)
    out = layer_norm_per_example(new_residual, normalized_shape, weight, bias, eps, per_example_grad_sq)
    return out.to(x.dtype), new_residual


def add_rms_norm_per_example(x, residual, weight, eps, per_example_grad_sq, *, normalized_shape, **kw):
    new_residual = dropout_add(x, residual, **kw)
    out = rms_norm_per_example(new_residual, normalized_shape, weight, eps, per_example_grad_sq)
    return out.to(x.dtype), new_residual


# ----------------------------------------------------------------------- adaln


def _adaln_stats(xf: Tensor, eps: float, is_rms: bool) -> tuple[Tensor | None, Tensor]:
    """(mean, rstd) over the last dim, keepdim, in xf's dtype (mean None for RMSNorm)."""
    if is_rms:
        return None, torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    var, mean = torch.var_mean(xf, -1, correction=0, keepdim=True)
    return mean, torch.rsqrt(var + eps)


def _adaln_xhat(xf: Tensor, mean: Tensor | None, rstd: Tensor) -> Tensor:
    return xf * rstd if mean is None else (xf - mean) * rstd


def _adaln_affine(xhat: Tensor, weight: Tensor | None, bias: Tensor | None, ct: torch.dtype) -> Tensor:
    """h = xhat * weight + bias in the compute dtype (weight and bias each optional)."""
    if weight is None:
        return xhat if bias is None else xhat + bias.to(ct)
    return xhat * weight.to(ct) if bias is None else torch.addcmul(bias.to(ct), xhat, weight.to(ct))


def _adaln_dtypes(x: Tensor, scale: Tensor, shift: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(compute dtype, output dtype): float32 (float64 when any tensor is float64), and the
    promoted dtype of x, scale and shift, which the unfused expression returns."""
    out = torch.promote_types(torch.promote_types(x.dtype, scale.dtype), shift.dtype)
    return reference.compute_dtype(out), out


def _adaln_normalize(xf: Tensor, eps: float, is_rms: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """(xhat, mean, rstd) of xf over its last dim in one fused pass of torch's kernels
    (``native_layer_norm`` / ``_fused_rms_norm``; mean None for RMSNorm), statistics
    keepdim. (``torch.var_mean`` over the last dim is about 8x slower on a CPU.)"""
    if not is_rms:
        return torch.native_layer_norm(xf, xf.shape[-1:], None, None, eps)
    if _FUSED_RMS_FORWARD is not None:
        xhat, rstd = _FUSED_RMS_FORWARD(xf, [xf.shape[-1]], None, eps)
        return xhat, None, rstd
    mean, rstd = _adaln_stats(xf, eps, True)
    return xf * rstd, None, rstd


def _adaln_forward(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor | None, bias: Tensor | None,
                   eps: float, is_rms: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """(y, mean, rstd): y = h * (1 + scale) + shift in one ``addcmul``, rounded once."""
    ct, out_dtype = _adaln_dtypes(x, scale, shift)
    xhat, mean, rstd = _adaln_normalize(x.to(ct), eps, is_rms)
    h = _adaln_affine_(xhat, weight, bias, ct)
    return torch.addcmul(shift.to(ct), h, scale.to(ct) + 1).to(out_dtype), mean, rstd


def _adaln_affine_(xhat: Tensor, weight: Tensor | None, bias: Tensor | None, ct: torch.dtype) -> Tensor:
    """``_adaln_affine`` in place on a fresh xhat (no autograd)."""
    if weight is not None:
        xhat.mul_(weight.to(ct))
    return xhat if bias is None else xhat.add_(bias.to(ct))


# AdaLN with one scale and shift per example (or one for all the rows) is a LayerNorm
# whose gain and bias are weight * (1 + scale) and bias * (1 + scale) + shift: torch's
# fused kernel runs it, forward and backward, once for all the rows or once per example
# (on a CPU, where a call costs little: at least this many elements per example).
ADALN_BY_EXAMPLE_MIN = 1 << 14


def _adaln_plan(x: Tensor, scale: Tensor, shift: Tensor, is_rms: bool) -> str | None:
    """"shared" (scale and shift the same for every row), "example" (one per example, the
    rest shared; CPU, ``ADALN_BY_EXAMPLE_MIN`` elements per example), or None (the
    general path: per-token modulation, RMSNorm, small examples, CUDA)."""
    if is_rms or x.numel() == 0:
        return None

    def kind(t: Tensor) -> str | None:
        if all(n == 1 for n in t.shape[:-1]):
            return "shared"
        if t.dim() == x.dim() and t.shape[0] == x.shape[0] and all(n == 1 for n in t.shape[1:-1]):
            return "example"
        return None

    kinds = {kind(scale), kind(shift)}
    if kinds == {"shared"}:
        return "shared"
    if None not in kinds and x.is_cpu and x.numel() >= ADALN_BY_EXAMPLE_MIN * x.shape[0]:
        return "example"
    return None


def _adaln_gains(scale: Tensor, shift: Tensor | None, weight: Tensor | None, bias: Tensor | None,
                 ct: torch.dtype) -> tuple[Tensor, Tensor | None, Tensor]:
    """(gain, beta, 1 + scale) as [1 or B, D] rows in the compute dtype: gain = weight *
    (1 + scale), beta = bias * (1 + scale) + shift (None without shift)."""
    d = scale.shape[-1]
    onep = (scale.to(ct) + 1).reshape(-1, d)
    gain = onep if weight is None else onep * weight.to(ct)
    beta = None
    if shift is not None:
        beta = shift.to(ct).reshape(-1, d)
        if bias is not None:
            beta = beta + onep * bias.to(ct)
    return gain, beta, onep


def _adaln_ln_forward(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor | None, bias: Tensor | None,
                      eps: float, plan: str) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd) of a ``_adaln_plan`` call: torch's layer_norm kernel with the gains,
    statistics in the compute dtype, y rounded once to the output dtype (half-precision
    x goes to the kernel as it is, which computes in float32)."""
    ct, out_dtype = _adaln_dtypes(x, scale, shift)
    gain, beta, _ = _adaln_gains(scale, shift, weight, bias, ct)
    xin = x if x.dtype is out_dtype else x.to(ct)
    d = x.shape[-1]
    if plan == "shared":
        y, mean, rstd = torch.native_layer_norm(xin, (d,), gain[0], beta[0], eps)
    else:
        y = torch.empty(x.shape, dtype=xin.dtype, device=x.device)
        mean = torch.empty((*x.shape[:-1], 1), dtype=ct, device=x.device)
        rstd = torch.empty_like(mean)
        for i in range(x.shape[0]):
            torch.ops.aten.native_layer_norm.out(xin[i], (d,), gain[i % len(gain)], beta[i % len(beta)], eps,
                                                 out0=y[i], out1=mean[i], out2=rstd[i])
    return y.to(out_dtype), mean, rstd


def _adaln_forward_any(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor | None, bias: Tensor | None,
                       eps: float, is_rms: bool) -> tuple[Tensor, Tensor | None, Tensor, str | None]:
    """(y, mean, rstd, plan): the layer_norm-kernel forward where ``_adaln_plan`` gives a
    plan, else the general one."""
    plan = _adaln_plan(x, scale, shift, is_rms)
    if plan is None:
        return (*_adaln_forward(x, scale, shift, weight, bias, eps, is_rms), None)
    return (*_adaln_ln_forward(x, scale, shift, weight, bias, eps, plan), plan)


def _adaln_ln_backward(ctx, dy: Tensor, plan: str) -> tuple:
    """The gradients of a ``_adaln_plan`` call: torch's layer_norm backward kernel with the
    gains (``_layer_norm_backward``: float32 sums, half-precision rows converted a chunk
    at a time) gives dx, G = sum of dy * xhat and S = sum of dy per example (or over all
    rows); then dscale = G * weight + S * bias, dshift = S, dweight = sum of G * (1 +
    scale), dbias = sum of S * (1 + scale)."""
    x, mean, rstd, scale, weight, bias = ctx.saved_tensors
    ct, d = ctx.ct, x.shape[-1]
    needs_x, needs_scale, needs_shift, needs_weight, needs_bias = ctx.needs_input_grad[:5]
    gain, _, onep = _adaln_gains(scale, None, weight, bias, ct)
    flags = (needs_x, True, True)
    if plan == "shared":
        dx, big_g, big_s = _layer_norm_backward(x, gain[0], gain[0], mean, rstd, dy, (d,), flags)
        big_g, big_s = big_g[None], big_s[None]
    else:
        dx = torch.empty_like(x) if needs_x else None
        big_g = torch.empty(x.shape[0], d, dtype=ct, device=x.device)
        big_s = torch.empty_like(big_g)
        for i in range(x.shape[0]):
            g_i = gain[i % len(gain)]
            dx_i, big_g[i], big_s[i] = _layer_norm_backward(x[i], g_i, g_i, mean[i], rstd[i], dy[i], (d,), flags)
            if dx is not None:
                dx[i] = dx_i
    dscale = dshift = dweight = dbias = None
    if needs_scale:
        ds = big_g if weight is None else big_g * weight.to(ct)
        if bias is not None:
            ds = ds + big_s * bias.to(ct)
        dscale = ds.sum_to_size(onep.shape).reshape(scale.shape).to(scale.dtype)
    if needs_shift:
        dshift = big_s.sum_to_size(math.prod(ctx.shift_shape[:-1]), d).reshape(ctx.shift_shape).to(ctx.shift_dtype)
    if needs_weight and weight is not None:
        dweight = (big_g * onep).sum(0).reshape(weight.shape).to(weight.dtype)
    if needs_bias and bias is not None:
        dbias = (big_s * onep).sum(0).reshape(bias.shape).to(bias.dtype)
    return dx, dscale, dshift, dweight, dbias, None, None


class _AdaLNModulate(torch.autograd.Function):
    """y = (Norm(x) * weight + bias) * (1 + scale) + shift in one expression (``addcmul``),
    statistics in float32 (float64), rounded once. Saves (x, mean, rstd, scale, weight,
    bias); the backward forms dshift = sum of dy and dscale = sum of dy * h (h = xhat *
    weight + bias) over the broadcast dims, dweight = sum of dn * xhat and dbias = sum of
    dn over the rows (dn = dy * (1 + scale), h's gradient), each in the compute dtype and
    rounded once to its tensor's dtype, and dx as the norm's backward with the per-row
    gain g = dn * weight:

        LayerNorm  dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
        RMSNorm    dx = rstd * (g - xhat * mean(g * xhat))

    With ``create_graph`` the backward recomputes the statistics from x out of place,
    so second derivatives flow through it."""

    @staticmethod
    def forward(ctx, x, scale, shift, weight, bias, eps, is_rms):
        y, mean, rstd, plan = _adaln_forward_any(x, scale, shift, weight, bias, eps, is_rms)
        ctx.save_for_backward(x, mean, rstd, scale, weight, bias)
        ctx.eps, ctx.is_rms, ctx.ct, ctx.plan = eps, is_rms, reference.compute_dtype(y.dtype), plan
        ctx.shift_shape, ctx.shift_dtype = shift.shape, shift.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        if not torch.is_grad_enabled():
            if ctx.plan is not None:
                return _adaln_ln_backward(ctx, dy, ctx.plan)
            return _adaln_backward_fused(ctx, dy)
        x, mean, rstd, scale, weight, bias = ctx.saved_tensors
        ct = ctx.ct
        xf = x.to(ct)
        mean, rstd = _adaln_stats(xf, ctx.eps, ctx.is_rms)  # create_graph: statistics as functions of x
        dyf = dy.to(ct)
        xhat = _adaln_xhat(xf, mean, rstd)
        needs_x, needs_scale, needs_shift, needs_weight, needs_bias = ctx.needs_input_grad[:5]
        dx = dscale = dshift = dweight = dbias = None
        if needs_shift:
            dshift = dyf.sum_to_size(ctx.shift_shape).to(ctx.shift_dtype)
        if needs_scale:
            dscale = (dyf * _adaln_affine(xhat, weight, bias, ct)).sum_to_size(scale.shape).to(scale.dtype)
        if needs_x or needs_weight or needs_bias:
            dn = dyf * (scale.to(ct) + 1)
            if needs_weight:
                dweight = (dn * xhat).sum_to_size(weight.shape).to(weight.dtype)
            if needs_bias:
                dbias = dn.sum_to_size(bias.shape).to(bias.dtype)
            if needs_x:
                g = dn if weight is None else dn * weight.to(ct)
                c1 = (g * xhat).mean(-1, keepdim=True)
                dx = g - xhat * c1 if mean is None else g - g.mean(-1, keepdim=True) - xhat * c1
                dx = (dx * rstd).to(x.dtype)
        return dx, dscale, dshift, dweight, dbias, None, None


def _adaln_backward_fused(ctx, dy: Tensor) -> tuple:
    """``_AdaLNModulate``'s backward without create_graph: dshift and dscale as there
    (xhat rebuilt in place from the saved statistics), and dx, dweight (and dbias) from
    torch's fused norm backward kernels run on dn = dy * (1 + scale) in the compute dtype
    (``native_layer_norm_backward``; RMSNorm: ``_rms_backward``)."""
    x, mean, rstd, scale, weight, bias = ctx.saved_tensors
    ct = ctx.ct
    xf, dyf = x.to(ct), dy.to(ct)
    needs_x, needs_scale, needs_shift, needs_weight, needs_bias = ctx.needs_input_grad[:5]
    dx = dscale = dshift = dweight = dbias = None
    if needs_shift:
        dshift = dyf.sum_to_size(ctx.shift_shape).to(ctx.shift_dtype)
    if needs_scale:
        xhat = xf * rstd if mean is None else torch.sub(xf, mean).mul_(rstd)
        h = _adaln_affine_(xhat, weight, bias, ct)
        dscale = h.mul_(dyf).sum_to_size(scale.shape).to(scale.dtype)
    if needs_x or needs_weight or needs_bias:
        dn = dyf * (scale.to(ct) + 1)
        if needs_bias:
            dbias = dn.sum_to_size(bias.shape).to(bias.dtype)
        needs_weight = needs_weight and weight is not None
        if needs_x or needs_weight:
            hidden = x.shape[-1]
            if mean is None:
                dx, dweight = _rms_backward(xf, weight, rstd.reshape(-1, 1), dn, (hidden,), ctx.eps, needs_x,
                                            needs_weight)
            else:
                dx, dweight, _ = torch.ops.aten.native_layer_norm_backward(
                    dn, xf, (hidden,), mean, rstd, None if weight is None else weight.to(ct), None,
                    [needs_x, needs_weight, False])
                dweight = None if dweight is None else dweight.to(weight.dtype)
            dx = None if dx is None else dx.to(x.dtype)
    return dx, dscale, dshift, dweight, dbias, None, None


# Up to this many elements an AdaLN call runs as torch ops whose autograd is torch's own
# (adaln_native), with or without grad: the Python autograd.Function's fixed cost is more
# than the work at such sizes.
ADALN_NATIVE_MAX_NUMEL = 1 << 16


def adaln_native(x: Tensor, scale: Tensor, shift: Tensor, eps: float, weight: Tensor | None = None,
                 bias: Tensor | None = None, is_rms: bool = False) -> Tensor:
    """AdaLN as three torch ops in the compute dtype (torch's norm with the affine, then one
    ``addcmul``), rounded once to the output dtype; autograd's own nodes sum the
    modulation and parameter gradients in the compute dtype and round each once."""
    dt = x.dtype
    if dt is torch.float32 and scale.dtype is dt and shift.dtype is dt:
        ct = out_dtype = dt  # the common call, without the dtype rules' host time
    else:
        ct, out_dtype = _adaln_dtypes(x, scale, shift)
    d = x.shape[-1:]
    xf = x if dt is ct else x.to(ct)
    w = None if weight is None else weight.to(ct)
    h = (torch.rms_norm(xf, d, w, eps) if is_rms
         else torch.layer_norm(xf, d, w, None if bias is None else bias.to(ct), eps))
    y = torch.addcmul(shift if shift.dtype is ct else shift.to(ct), h,
                      (scale if scale.dtype is ct else scale.to(ct)) + 1)
    return y if y.dtype is out_dtype else y.to(out_dtype)


def adaln_modulate(x, scale, shift, eps, *, weight=None, bias=None, is_rms=False):
    """(Norm(x) * weight + bias) * (1 + scale) + shift over the last dim
    (``reference.adaln_modulate``)."""
    if torch.compiler.is_compiling():
        # torch's norm op, then one addcmul: inductor's own decomposition of the norm and its
        # backward (fp32 [8, 1024, 1024] forward + backward, one EPYC thread, against
        # torch.compile of the unfused expression: 0.98x, where the reference's ops gave 0.94x)
        return adaln_native(x, scale, shift, eps, weight, bias, is_rms)
    if not _plain_eager():
        # torch.func transforms: torch ops that autograd sees, each with its rules
        return reference.adaln_modulate(x, x.shape[-1:], scale, shift, eps, weight, bias,
                                        norm="rmsnorm" if is_rms else "layernorm")
    if x.numel() <= ADALN_NATIVE_MAX_NUMEL:  # by size alone: the same bits with and without grad
        return adaln_native(x, scale, shift, eps, weight, bias, is_rms)
    if _differentiable(x, scale, shift, weight, bias):
        return _AdaLNModulate.apply(x, scale, shift, weight, bias, eps, is_rms)
    return _adaln_forward_any(x, scale, shift, weight, bias, eps, is_rms)[0]  # nothing to differentiate
