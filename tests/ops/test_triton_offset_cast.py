"""The Triton kernels' weight offset (scale = offset + weight, formed in float32) and
RMSNorm's casting modes, interpreted on CPU or real on CUDA, against ops/reference.py:
``rms_norm_cast`` for RMSNorm; for LayerNorm the torch path, ``reference.layer_norm``
with that scale. A fused op's out is compared with the reference norm of the kernel's
own new_residual (itself compared with ``reference.dropout_add``).

Forward outputs of RMSNorm are compared in ulps of a dtype at the expected value's
binade; the kernels' float32 statistics differ from torch's in their last bits (another
summation order, 1 / sqrt against rsqrt), so bit-for-bit equality holds for most
elements, not all:

* float16: at most 1 ulp, and at least 99% of the elements bit for bit;
* bfloat16 ("torch" and "gemma" orders): at most 1 ulp; the Triton interpreter converts
  float32 to bfloat16 by truncation, where compiled kernels and torch round to nearest;
* float32: at most 8 ulps;
* "llama" in half precision: at most 4 ulps of x's dtype (x_hat and the product are
  each rounded, and each rounding may land one ulp apart).

LayerNorm's outputs at ``BACKEND_OUTPUT`` (x - mean cancels: near the row's mean the
result's relative error is not a few ulps).

Gradients: vs autograd through the same reference in the same dtypes (``GRAD``), and vs
autograd through the reference in float64 (``GRAD`` for dx and dresidual,
``PARAM_GRAD_SUM`` for the weight and bias, whose sums are float32). The forward's
roundings pass gradients through unchanged (as autograd's ``.to()`` does), so the float64
reference of every mode is the torch order; llama's with its scale rounded to the
weight's dtype, and its dweight, which sums the rounded x_hat, in
``test_llama_weight_gradient_uses_the_rounded_x_hat``."""

from __future__ import annotations

import pytest
import torch

import normlab
from normlab import functional as F
from normlab.ops import reference
from tests._tolerances import BACKEND_OUTPUT, GRAD, PARAM_GRAD_SUM, Tolerance, assert_close
from tests.ops.helpers import DEVICE, make_inputs, needs_kernels

pytestmark = needs_kernels

FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16
# (mode, offset) of RMSNorm, without the plain op ("torch", 0: tests/ops/test_triton_norm.py)
RMS_CASTS = [(m, o) for m in ("torch", "llama", "gemma") for o in (0.0, 1.0, 0.5) if (m, o) != ("torch", 0.0)]
# (x dtype, weight dtype): one dtype, and float32 weights with bfloat16 activations
DTYPE_PAIRS = [(FP32, FP32), (BF16, BF16), (FP16, FP16), (BF16, FP32)]
_MANTISSA = {FP32: 23, BF16: 7, FP16: 10}

# A parameter's gradient is summed in float32 and rounded once to its dtype:
# PARAM_GRAD_SUM, whose rtol is half an ulp; the interpreter's conversion to bfloat16
# truncates, one ulp (at most 2^-7 of the value)
SUM = PARAM_GRAD_SUM if DEVICE == "cuda" else Tolerance(
    per_dtype={**PARAM_GRAD_SUM.per_dtype, BF16: (8e-3, 1e-5)}, atol_floor=PARAM_GRAD_SUM.atol_floor)


def _ids(pair):
    return f"{pair[0]}-w{pair[1]}".replace("torch.", "")


@pytest.fixture(autouse=True)
def _triton():
    with normlab.set_backend("triton"):
        yield


def _ulps(actual, expected, dtype):
    """Largest |actual - expected| in ulps of ``dtype`` at each expected value's binade."""
    a, e = actual.double(), expected.double()
    ulp = torch.exp2(torch.floor(torch.log2(e.abs().clamp_min(torch.finfo(dtype).tiny))) - _MANTISSA[dtype])
    return ((a - e).abs() / ulp).max().item() if e.numel() else 0.0


def _assert_forward(got, want, x_dtype, mode):
    """``mode``: a casting mode (RMSNorm's bounds in ulps) or "layer_norm" (see the module
    docstring)."""
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype)
    if mode == "layer_norm":
        assert_close(got, want, x_dtype, BACKEND_OUTPUT)
    elif mode == "llama" and x_dtype == BF16:
        # the interpreter truncates to bfloat16 where the reference rounds to nearest, and
        # llama rounds twice (x_hat, then the product)
        assert _ulps(got, want, x_dtype) <= 4
    elif mode == "llama" and x_dtype == FP16:
        # float16 rounds to nearest under the interpreter too: llama's roundings of x_hat
        # and of the scale show here (dropping either one leaves ~25% of elements off)
        assert _ulps(got, want, want.dtype) <= 1
        assert (got == want).double().mean().item() >= 0.99
    else:
        bound = {FP32: 8, BF16: 1, FP16: 1}[want.dtype]
        assert _ulps(got, want, want.dtype) <= bound
        if want.dtype == FP16:
            assert (got == want).double().mean().item() >= 0.99


def _call(op, t, offset, mode, **kw):
    """normlab.functional's op on the tensors of ``t``, with ``offset`` (and ``mode``)."""
    n = t["x"].shape[-1]
    if op == "rms_norm":
        return (F.rms_norm(t["x"], n, t.get("weight"), 1e-6, offset=offset, casting_mode=mode),)
    if op == "add_rms_norm":
        return F.add_rms_norm(t["x"], t["residual"], t.get("weight"), 1e-6, offset=offset,
                              casting_mode=mode, **kw)
    if op == "layer_norm":
        return (F.layer_norm(t["x"], n, t.get("weight"), t.get("bias"), 1e-5, offset=offset),)
    return F.add_layer_norm(t["x"], t["residual"], t.get("weight"), t.get("bias"), 1e-5,
                            normalized_shape=n, offset=offset, **kw)


def _reference(op, t, offset, mode, **kw):
    """ops.reference: rms_norm_cast, or layer_norm with the scale offset + weight (the
    torch path); after dropout_add for the fused ops, out rounded to x's dtype."""
    n = t["x"].shape[-1]
    if "layer" in op:
        with normlab.set_backend("torch"):
            return _call(op, t, offset, mode, **kw)
    if op == "rms_norm":
        return (reference.rms_norm_cast(t["x"], (n,), t.get("weight"), 1e-6, offset=offset,
                                        casting_mode=mode),)
    h = reference.dropout_add(t["x"], t["residual"], **kw)
    out = reference.rms_norm_cast(h, (n,), t.get("weight"), 1e-6, offset=offset, casting_mode=mode)
    return out.to(t["x"].dtype), h


def _leaves(a, names, dtype=None):
    return {n: a[n].detach().to(dtype or a[n].dtype).requires_grad_() for n in names}


def _cotangents(outs, seed=1):
    """Fixed random cotangents in the kernel outputs' dtypes: every comparison (the
    float64 one too) takes the gradient of the same values."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g).to(o.dtype).to(o.device) for o in outs]


def _grads(outs, cots, inputs):
    return torch.autograd.grad(outs, inputs, [c.to(o.dtype) for o, c in zip(outs, cots, strict=True)],
                               retain_graph=True)


def _check_grads(got, want, leaves, want_leaves, tol_of, what=""):
    """Gradients of sum(out_i * cot_i) w.r.t. ``leaves`` and ``want_leaves``;
    ``tol_of(name)``: (dtype, tolerance)."""
    cots = _cotangents(got)
    for n, g, w in zip(leaves, _grads(got, cots, list(leaves.values())),
                       _grads(want, cots, list(want_leaves.values())), strict=True):
        assert g.dtype == leaves[n].dtype and g.shape == leaves[n].shape, (n, g.dtype)
        assert_close(g, w, *tol_of(n), what=f"d{n}{what}")


def _sum_dtype(dtype):
    # a parameter's gradient: a float32 sum, rounded once to its dtype
    return dtype if dtype in (BF16, FP16) else FP32


def _check_op(op, a, offset, mode="torch", **kw):
    """``op`` with ``offset`` / ``mode`` on the inputs ``a`` vs the reference: outputs,
    then gradients in the same dtypes and in float64 (the module docstring)."""
    x_dtype = a["x"].dtype
    names = [n for n in ("x", "residual", "weight", "bias") if a.get(n) is not None]
    ours, same = _leaves(a, names), _leaves(a, names)
    got, want = _call(op, ours, offset, mode, **kw), _reference(op, same, offset, mode, **kw)
    fwd_mode = "layer_norm" if "layer" in op else mode
    if op.startswith("add"):
        _assert_forward(got[1], want[1], got[1].dtype, "layer_norm" if "layer" in op else "torch")
        norm = "layer_norm" if "layer" in op else "rms_norm"
        _assert_forward(got[0], _reference(norm, {**a, "x": got[1].detach()}, offset, mode)[0].to(x_dtype),
                        x_dtype, fwd_mode)
        assert_close(got[0], want[0], x_dtype, BACKEND_OUTPUT)
    else:
        _assert_forward(got[0], want[0], x_dtype, fwd_mode)

    # same dtypes: x's tolerance for the parameters too where x_hat is rounded to it
    # (llama), or where the norm reads a new_residual rounded to it, which the
    # interpreter truncates (the float64 comparison reads the kernel's own)
    coarse = x_dtype != FP32 and (mode == "llama" or op.startswith("add"))
    _check_grads(got, want, ours, same, lambda n: (
        (x_dtype if coarse else _sum_dtype(a[n].dtype)) if n in ("weight", "bias") else x_dtype, GRAD))

    # float64: the fused ops' reference adds x = the stored new_residual and a zero
    # residual (the gradient of each is new_residual's)
    wide = _leaves(a, names, torch.float64)
    if op.startswith("add"):
        wide["x"] = got[1].detach().double().requires_grad_()
        wide["residual"] = torch.zeros_like(wide["x"]).requires_grad_()
    wide_in, wide_offset = wide, offset
    if mode == "llama" and a.get("weight") is not None:
        # llama's scale, rounded to the weight's dtype: the reference's output for a row
        # of ones (x_hat = 1 exactly with eps 0), passed as the weight, gradients unchanged
        ones = torch.ones(1, a["weight"].shape[-1], dtype=a["weight"].dtype, device=DEVICE)
        scale = reference.rms_norm_cast(ones, ones.shape[-1:], a["weight"], 0.0, offset=offset,
                                        casting_mode="llama")[0].double()
        wide_in = {**wide, "weight": wide["weight"] + (scale - wide["weight"]).detach()}
        wide_offset = 0.0
        if x_dtype != FP32:  # dweight sums the rounded x_hat: its own test
            del ours["weight"], wide["weight"]
    wide_want = _reference(op, wide_in, wide_offset, "torch" if mode == "llama" else mode)
    # dx and dresidual at their own dtype's tolerance; llama's at x's: the interpreter
    # truncates its scale to a bfloat16 weight's dtype, where the reference rounds
    _check_grads(got, wide_want, ours, wide, lambda n: (
        (_sum_dtype(a[n].dtype), SUM) if n in ("weight", "bias")
        else (x_dtype if mode == "llama" else a[n].dtype, GRAD)), " vs float64")


@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm"])
@pytest.mark.parametrize("mode,offset", RMS_CASTS)
@pytest.mark.parametrize("dtypes", [*DTYPE_PAIRS, (FP32, None), (BF16, None), (FP16, None)], ids=_ids)
def test_rms_norm_casting_modes_match_the_reference(op, mode, offset, dtypes):
    x_dtype, w_dtype = dtypes
    a = make_inputs(op, (4, 6, 96), (96,), x_dtype, weight_dtype=w_dtype, weight=w_dtype is not None,
                    seed=int(offset * 4) + 7 * len(mode))
    if w_dtype is not None:
        a["weight"] = a["weight"] - offset  # a gain of about 1 with the offset
    _check_op(op, a, offset, mode)


@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm"])
@pytest.mark.parametrize("dtypes", [(FP16, FP32), (FP16, FP16), (BF16, FP32), (BF16, BF16)], ids=_ids)
def test_llama_weight_gradient_uses_the_rounded_x_hat(op, dtypes):
    # dweight = sum over rows of dout * x_hat, x_hat rounded to the normalized tensor's
    # dtype as in the forward (the reference's x_hat: its llama output without weight),
    # summed in float32. float32 weights with float16 x tell the rounded x_hat from the
    # float32 one (2^-12 apart per element, beyond PARAM_GRAD_SUM's float32 rtol). The
    # interpreter truncates x_hat to bfloat16 where the reference rounds it to nearest:
    # there bfloat16 is checked at GRAD's tolerance only.
    x_dtype, w_dtype = dtypes
    a = make_inputs(op, (16, 64), (64,), x_dtype, weight_dtype=w_dtype, seed=3)
    w = a["weight"].clone().requires_grad_()
    outs = _call(op, {**a, "weight": w}, 0.5, "llama")
    dy = _cotangents(outs[:1])[0]
    (dw,) = torch.autograd.grad(outs[0], w, dy)
    h = outs[1] if op == "add_rms_norm" else a["x"]
    x_hat = reference.rms_norm_cast(h, (64,), None, 1e-6, casting_mode="llama")
    assert x_hat.dtype == x_dtype and dw.dtype == w_dtype
    want = (dy.double() * x_hat.double()).sum(0)
    if x_dtype == BF16 and DEVICE == "cpu":
        assert_close(dw, want, x_dtype, GRAD, what="dweight")
    else:
        assert_close(dw, want, _sum_dtype(w_dtype), SUM, what="dweight")


@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm"])
@pytest.mark.parametrize("offset", [1.0, 0.5])
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=_ids)
@pytest.mark.parametrize("affine", ["weight_bias", "weight", "bias"])
def test_layer_norm_offset_matches_the_torch_path(op, offset, dtypes, affine):
    # "bias": no weight, the offset alone scales
    x_dtype, w_dtype = dtypes
    a = make_inputs(op, (4, 6, 80), (80,), x_dtype, weight_dtype=w_dtype, seed=int(offset * 2))
    a["weight"] = None if affine == "bias" else a["weight"] - offset
    if affine == "weight":
        a["bias"] = None
    _check_op(op, a, offset)


# ------------------------------------------------------------------ the other kernels

CASES = [("rms_norm", 1.0, "gemma"), ("add_rms_norm", 0.5, "llama"), ("rms_norm", 0.0, "llama"),
         ("layer_norm", 1.0, "torch"), ("add_layer_norm", 0.5, "torch")]


@pytest.mark.parametrize("op,offset,mode", CASES)
@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_looped_kernels(op, offset, mode, dtype):
    from normlab.ops.triton import force_looped, launch
    a = make_inputs(op, (5, 300), (300,), dtype, weight_dtype=FP32, seed=11)
    with force_looped(128):
        assert launch.block_config(300).looped
        _check_op(op, a, offset, mode)


@pytest.mark.parametrize("op,offset,mode", CASES)
def test_column_split_backward(op, offset, mode):
    from normlab.ops.triton import launch
    a = make_inputs(op, (9, 40), (40,), BF16, seed=13)
    with launch.tuning(bwd_split=2):
        assert launch.block_config(40).bwd_split == 2
        _check_op(op, a, offset, mode)


@pytest.mark.parametrize("op,offset,mode", [("add_rms_norm", 1.0, "gemma"), ("add_rms_norm", 0.5, "llama"),
                                            ("add_layer_norm", 1.0, "torch")])
def test_float32_residual_stream(op, offset, mode):
    # new_residual in float32 with bfloat16 x: the norm reads the float32 tensor (llama
    # rounds x_hat to it), and out is rounded to x's dtype (through new_residual's dtype
    # where llama's product is formed in it)
    a = make_inputs(op, (6, 48), (48,), BF16, weight_dtype=BF16, residual_in_dtype=FP32, seed=17)
    _check_op(op, a, offset, mode, residual_dtype=FP32)


@pytest.mark.parametrize("op,offset,mode", [("add_rms_norm", 0.5, "llama"), ("add_rms_norm", 1.0, "gemma"),
                                            ("add_layer_norm", 1.0, "torch")])
def test_dropout_and_residual(op, offset, mode):
    # the mask is the kernel's (Philox): read it from new_residual, then compare out and
    # every gradient with the reference on the same mask
    p = 0.3
    a = make_inputs(op, (16, 64), (64,), FP32, seed=19)
    a["x"] = a["x"].abs() + 0.1  # nonzero: a dropped element shows in new_residual
    names = [n for n in ("x", "residual", "weight", "bias") if a.get(n) is not None]
    ours, same = _leaves(a, names), _leaves(a, names)
    gen = torch.Generator(device=DEVICE).manual_seed(23)
    got = _call(op, ours, offset, mode, dropout_p=p, training=True, generator=gen)
    kept = (got[1] - a["residual"]).abs() > 0.05
    assert 0.55 < kept.double().mean().item() < 0.85
    h = same["residual"] + torch.where(kept, same["x"] * (1.0 / (1.0 - p)), 0.0)
    torch.testing.assert_close(got[1], h, rtol=1e-6, atol=1e-6)
    norm = "layer_norm" if "layer" in op else "rms_norm"
    (out,) = _reference(norm, {**same, "x": h}, offset, mode)
    _assert_forward(got[0], out, FP32, "layer_norm" if "layer" in op else mode)
    _check_grads(got, (out, h), ours, same, lambda n: (FP32, GRAD))


# ------------------------------------------------------------------ modules, ops, compile


def test_gemma_module_runs_the_kernels_and_matches_gemma_rms_norm(monkeypatch):
    from normlab.ops.triton import norm

    launched = []
    fwd = norm._fwd_kernel

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return fwd[grid]
    monkeypatch.setattr(norm, "_fwd_kernel", Spy())
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    theirs = transformers.models.gemma.modeling_gemma.GemmaRMSNorm(64, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(64, generator=torch.Generator().manual_seed(0)) * 0.1)
    ours = normlab.RMSNorm(64, eps=1e-6, offset=1.0, casting_mode="gemma").to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    for dtype in (torch.float32, torch.float16):
        x = (torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1)) * 3 + 1).to(dtype).to(DEVICE)
        t, o = theirs.to(dtype), ours.to(dtype)
        xt, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        want, got = t(xt), o(xo)
        assert "FusedNorm" in type(got.grad_fn).__name__
        _assert_forward(got, want, dtype, "gemma")
        dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEVICE)
        gx, gw = torch.autograd.grad(got, (xo, o.weight), dy)
        wx, ww = torch.autograd.grad(want, (xt, t.weight), dy)
        assert_close(gx, wx, dtype, GRAD, what="dx")
        assert_close(gw, ww, dtype, GRAD, what="dweight")
        # the fused add: out is the module's norm of new_residual
        r = torch.randn_like(x)
        out, new_res = o(x, r)
        assert "FusedNorm" in type(out.grad_fn).__name__
        _assert_forward(out, theirs(new_res), dtype, "gemma")
    assert launched
    assert not ours.per_example_in_backward  # the per-example buffer is still refused


def _op_args(is_rms, offset, mode, *, residual=False, dropout=False, x_dtype=torch.float32,
             w_dtype=torch.float32, out_dtype=None):
    g = torch.Generator().manual_seed(0)

    def t(*s, dt=x_dtype):
        return torch.randn(*s, generator=g).to(dt).to(DEVICE).requires_grad_()
    x = t(3, 5, 16)
    res = t(3, 5, 16) if residual else None
    b = None if is_rms else t(16, dt=w_dtype)
    seed = torch.tensor(99) if dropout else None
    return (x, res, t(16, dt=w_dtype), b, seed, 1e-5, 16, is_rms, 0.25 if dropout else 0.0,
            None, residual or dropout, offset, mode, out_dtype)


@pytest.mark.parametrize("args", [
    _op_args(True, 1.0, "gemma"),
    _op_args(True, 0.5, "llama", residual=True, dropout=True),
    _op_args(True, 0.0, "llama", x_dtype=torch.bfloat16, out_dtype=torch.float32),
    _op_args(False, 1.0, "torch", residual=True),
], ids=["rms_gemma", "add_rms_llama_dropout", "rms_llama_bf16_fp32_out", "add_ln_offset"])
def test_opcheck_with_offset_and_casting_mode(args):
    torch.library.opcheck(torch.ops.normlab.fused_norm.default, args)
    out, new_res, mean, rstd = torch.ops.normlab.fused_norm(*args)
    assert out.dtype == (args[-1] or args[0].dtype)
    x, res, w, b, seed = args[:5]
    bwd = (torch.randn_like(out), torch.randn_like(new_res) if args[10] else None,
           new_res.detach() if args[10] else x.detach(), w.detach(), mean, rstd, seed, 16, args[7],
           args[8], x.dtype, res.dtype if res is not None else None, b.dtype if b is not None else None,
           args[11], args[12])
    torch.library.opcheck(torch.ops.normlab.fused_norm_backward.default, bwd)


def test_compile_fullgraph_and_export_with_offset_and_casting_mode():
    from torch._dynamo.testing import CompileCounterWithBackend

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gemma = normlab.RMSNorm(32, offset=1.0, casting_mode="gemma")
            self.ln1p = normlab.LayerNorm(32, offset=1.0)

        def forward(self, x, residual):
            out, new_residual = self.ln1p(x, residual)
            return self.gemma(out) + new_residual

    torch.manual_seed(0)
    m = Block().to(DEVICE)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x, r = torch.randn(2, 3, 32, device=DEVICE), torch.randn(2, 3, 32, device=DEVICE)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    eager = m(x, r)
    eager_grads = torch.autograd.grad(eager.square().sum(), list(m.parameters()))
    got = torch.compile(m, backend=counter, fullgraph=True)(x, r)
    got_grads = torch.autograd.grad(got.square().sum(), list(m.parameters()))
    assert counter.frame_count == 1
    ops = [n.target for g in counter.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert sum("fused_norm" in str(t) for t in ops) == 2, ops
    torch.testing.assert_close(got, eager)
    for p, q in zip(got_grads, eager_grads, strict=True):
        torch.testing.assert_close(p, q)
    ep = torch.export.export(m, (x, r))
    assert str(ep.graph).count("normlab.fused_norm") == 2
    torch.testing.assert_close(ep.module()(x, r), eager)


def test_llama_with_a_float64_weight_stays_on_torch_ops():
    # its product is float64 (Hugging Face's output dtype), which the kernels do not form
    x = torch.randn(4, 16, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(16, device=DEVICE, dtype=torch.float64)
    y = F.rms_norm(x, 16, w, 1e-6, offset=0.5, casting_mode="llama")
    assert y.dtype == torch.float64
    assert torch.equal(y, reference.rms_norm_cast(x, (16,), w, 1e-6, offset=0.5, casting_mode="llama"))


def test_per_head_weight_and_cpu_defaults_stay_on_torch_ops():
    # a per-head weight (Cohere's q/k norm) is torch ops under every backend
    m = normlab.LayerNorm(8, bias=False, offset=1.0, weight_shape=(3, 8)).to(DEVICE)
    x = torch.randn(2, 3, 8, device=DEVICE, requires_grad=True)
    assert "FusedNorm" not in type(m(x).grad_fn).__name__
    if DEVICE == "cpu":  # CPU tensors under auto (the default) and torch: the torch ops, as before
        w = torch.randn(8, requires_grad=True)
        for name in ("auto", "torch"):
            with normlab.set_backend(name):
                y = F.rms_norm(x, 8, w, 1e-6, offset=1.0, casting_mode="gemma")
                z = F.layer_norm(x, 8, w, None, offset=1.0)
            assert "FusedNorm" not in type(y.grad_fn).__name__ + type(z.grad_fn).__name__
            assert torch.equal(y, reference.rms_norm_cast(x, (8,), w, 1e-6, offset=1.0, casting_mode="gemma"))


def test_llama_rounds_x_hat_to_the_float32_residual_stream_in_the_fused_op():
    # add_rms_norm with residual_dtype float32: x_hat is rounded to new_residual's dtype
    # (float32), not x's, then the product to x's dtype: bit for bit the reference's
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(16, 64, generator=g).half(), torch.randn(16, 64, generator=g).half()
    w = (torch.randn(64, generator=g) * 0.3 + 0.5).half()
    y = F.rms_norm(x, 64, w, 1e-6, offset=0.5, casting_mode="llama")
    out, h = F.add_rms_norm(x, r, w, 1e-6, offset=0.5, casting_mode="llama", residual_dtype=torch.float32)
    assert h.dtype == torch.float32 and out.dtype == torch.float16
    ref = reference.rms_norm_cast(x, (64,), w, 1e-6, offset=0.5, casting_mode="llama")
    ref_out = reference.rms_norm_cast(h, (64,), w, 1e-6, offset=0.5, casting_mode="llama").to(torch.float16)
    assert (y == ref).double().mean().item() >= 0.99 and _ulps(y, ref, FP16) <= 1
    assert (out == ref_out).double().mean().item() >= 0.99 and _ulps(out, ref_out, FP16) <= 1


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_strided_and_expanded_parameters(offset):
    # the kernels read the weight and bias as contiguous rows: a strided slice or an
    # expanded (stride 0) parameter is made contiguous first, gradients mapped back
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 16, generator=g)
    wbig = torch.randn(32, generator=g).requires_grad_()
    b0 = torch.full((1,), 0.25).requires_grad_()
    for op in ("rms_norm", "layer_norm"):
        def run(backend, op=op):
            with normlab.set_backend(backend):
                w, b = wbig[::2], b0.expand(16)
                if op == "rms_norm":
                    y = F.rms_norm(x, 16, w, 1e-6, offset=offset, casting_mode="gemma" if offset else "torch")
                else:
                    y = F.layer_norm(x, 16, w, b, 1e-5, offset=offset)
                return (y, *torch.autograd.grad(y.square().sum(), [wbig, b0], allow_unused=True))
        got, want = run("triton"), run("torch")
        assert_close(got[0], want[0], FP32, BACKEND_OUTPUT, what=f"{op} out")
        for a, e in zip(got[1:], want[1:]):
            if e is not None:
                assert_close(a, e, FP32, PARAM_GRAD_SUM, what=f"{op} parameter gradient")


def test_torch_func_transforms_run_the_torch_path():
    # the kernels' custom ops have no functorch rules: under torch.func.grad (and vmap) a
    # forced triton backend runs the torch path, with its gradients
    x, w = torch.randn(4, 16), torch.randn(16)
    for kw in ({}, {"offset": 1.0}):
        def loss(a, kw=kw):
            return F.layer_norm(a, 16, w, None, **kw).square().sum()
        got = torch.func.grad(loss)(x)
        with normlab.set_backend("torch"):
            want = torch.func.grad(loss)(x)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    got = torch.vmap(lambda a: F.rms_norm(a, 16, w, 1e-6, offset=1.0, casting_mode="gemma"))(x[:, None])
    torch.testing.assert_close(got[:, 0], reference.rms_norm_cast(x, (16,), w, 1e-6, offset=1.0,
                                                                  casting_mode="gemma"))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("op", ["add_rms_norm", "add_layer_norm"])
@pytest.mark.parametrize("bad,match", [
    (dict(residual=torch.ones(2, 8, dtype=torch.int64)), "expected residual to have a floating-point dtype"),
    (dict(residual=None, residual_dtype=torch.int32), "expected residual_dtype to be float16"),
    (dict(residual=None, residual_dtype="float32"), "expected residual_dtype to be float16"),
], ids=["int-residual", "int-residual-dtype", "string-residual-dtype"])
def test_a_bad_residual_with_an_offset_is_named_as_without_one(backend, op, bad, match):
    # with an offset the triton backend's residual-stream check ran first, and told the
    # user to switch backend for an integer residual or a string residual_dtype
    x, w = torch.randn(2, 8, device=DEVICE), torch.randn(8, device=DEVICE)
    bad = dict(bad)
    residual = bad.pop("residual")
    residual = residual if residual is None else residual.to(DEVICE)
    fn = getattr(F, op)
    args = (x, residual, w) if op == "add_rms_norm" else (x, residual, w, None)
    with normlab.set_backend(backend):
        for kw in ({}, {"offset": 1.0}):
            with pytest.raises(normlab.NormArgumentError, match=match):
                fn(*args, **bad, **kw)
