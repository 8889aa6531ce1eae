"""From a review against torch's own samples: add_layer_norm under vmap with parameters
of another dtype, a module's remembered signature given parameters of another dtype or
device, pickling modules that ran the triton backend or collected per-example norms,
and channels_last layouts on the triton backend (and the torch path's RMS backward)."""

import io
import math
import pickle
import subprocess
import sys

import pytest
import torch
from torch.func import functional_call, vmap

import normlab
import normlab.functional as NF
from normlab.errors import NormArgumentError, NormDtypeError


@pytest.mark.parametrize("x_dtype,p_dtype", [(torch.float32, torch.float64), (torch.bfloat16, torch.float32)])
def test_add_layer_norm_under_vmap_keeps_x_dtype(x_dtype, p_dtype):
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(4, 8, generator=g).to(x_dtype), torch.randn(4, 8, generator=g).to(x_dtype)
    ws, b = torch.randn(3, 8, generator=g).to(p_dtype), torch.randn(8, generator=g).to(p_dtype)
    out, h = vmap(lambda w: NF.add_layer_norm(x, r, w, b))(ws)
    loop = torch.stack([NF.add_layer_norm(x, r, w, b)[0] for w in ws])
    assert out.dtype is x_dtype and h.dtype is x_dtype
    torch.testing.assert_close(out, loop, atol=0, rtol=0)


def _warm(module, x):
    with normlab.set_backend("triton"):
        module(x)  # the signature is remembered


@pytest.mark.parametrize("cls", [normlab.LayerNorm, normlab.RMSNorm])
def test_a_remembered_signature_still_refuses_an_integer_weight(cls):
    m, x = cls(8), torch.randn(4, 8)
    _warm(m, x)
    params = {"weight": torch.ones(8, dtype=torch.int32)}
    if cls is normlab.LayerNorm:
        params["bias"] = torch.zeros(8)
    with normlab.set_backend("triton"), pytest.raises(NormDtypeError, match="weight"):
        functional_call(m, params, (x,))


def test_a_remembered_signature_still_refuses_a_weight_on_another_device():
    m, x = normlab.LayerNorm(8), torch.randn(4, 8)
    _warm(m, x)
    with normlab.set_backend("triton"), pytest.raises(NormArgumentError, match="expected weight on cpu"):
        functional_call(m, {"weight": torch.ones(8, device="meta"), "bias": torch.zeros(8)}, (x,))


def test_a_remembered_signature_takes_a_float64_weight_swap_through_the_checked_path():
    m, x = normlab.LayerNorm(8), torch.randn(4, 8)
    _warm(m, x)
    w = torch.randn(8, dtype=torch.float64)
    with normlab.set_backend("triton"):
        got = functional_call(m, {"weight": w, "bias": torch.zeros(8)}, (x,))
    want = torch.nn.functional.layer_norm(x.double(), (8,), w, None, 1e-5).float()
    assert got.dtype is torch.float32
    torch.testing.assert_close(got, want)


def test_a_module_that_ran_the_triton_backend_unpickles_without_triton():
    m = normlab.LayerNorm(8)
    _warm(m, torch.randn(4, 8))
    blob = pickle.dumps(m)
    code = (
        "import sys, pickle\n"
        "sys.modules['triton'] = None  # as where the triton extra is not installed\n"
        f"m = pickle.loads({blob!r})\n"
        "import torch\n"
        "print(m(torch.ones(2, 8)).shape)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "torch.Size([2, 8])" in r.stdout


@pytest.mark.parametrize("cls", [normlab.LayerNorm, normlab.RMSNorm])
def test_a_module_that_collected_per_example_norms_saves_and_keeps_them(cls):
    m = cls(8)
    m.collect_per_example_grad_sq = True
    m(torch.randn(4, 8, generator=torch.Generator().manual_seed(0))).pow(2).sum().backward()
    want = m.per_example_grad_sq.clone()
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    torch.testing.assert_close(back.per_example_grad_sq, want, atol=0, rtol=0)
    # the copy collects anew: one more call and its backward
    back(torch.randn(4, 8)).sum().backward()
    assert back.per_example_grad_sq.shape == want.shape
    # a call still waiting for its gradient (it replaced the finished one) is not pickled
    m(torch.randn(4, 8))
    assert pickle.loads(pickle.dumps(m)).per_example_grad_sq is None


def _channels_last(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(memory_format=torch.channels_last)


def _layout(kind, seed):
    """x or residual of shape [2, 8, 5, 4] ([2, 8, 3, 5, 4] for cl3d) in a named layout."""
    g = torch.Generator().manual_seed(seed)
    if kind == "contig":
        return torch.randn(2, 8, 5, 4, generator=g)
    if kind == "cl":
        return torch.randn(2, 8, 5, 4, generator=g).to(memory_format=torch.channels_last)
    if kind == "cl_slice":  # a channel slice of a channels_last tensor: not dense, still channels_last
        return torch.randn(2, 16, 5, 4, generator=g).to(memory_format=torch.channels_last)[:, :8]
    if kind == "cl3d":
        return torch.randn(2, 8, 3, 5, 4, generator=g).to(memory_format=torch.channels_last_3d)
    raise ValueError(kind)


LAYOUTS = [("cl", "cl"), ("contig", "cl"), ("cl", "contig"), ("cl3d", "cl3d"), ("cl_slice", "cl"), ("cl", None)]


@pytest.mark.parametrize("x_kind,r_kind", LAYOUTS)
@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm", "add_layer_norm", "layer_norm"])
def test_the_triton_backend_gives_torchs_layouts(op, x_kind, r_kind):
    x = _layout(x_kind, 0)
    r = None if r_kind is None else _layout(r_kind, 1)
    if r is not None and r.shape != x.shape:
        pytest.skip("shapes differ")
    H = x.shape[-1]
    w, b = torch.randn(H), torch.randn(H)
    h = x if r is None else r + x
    torch_ops = {"rms_norm": lambda: (torch.rms_norm(x, (H,), w),),
                 "layer_norm": lambda: (torch.layer_norm(x, (H,), w, b),),
                 "add_rms_norm": lambda: (torch.rms_norm(h, (H,), w), h),
                 "add_layer_norm": lambda: (torch.layer_norm(h, (H,), w, b), h)}
    ours = {"rms_norm": lambda: (NF.rms_norm(x, (H,), w),), "layer_norm": lambda: (NF.layer_norm(x, (H,), w, b),),
            "add_rms_norm": lambda: NF.add_rms_norm(x, r, w), "add_layer_norm": lambda: NF.add_layer_norm(x, r, w, b)}
    want = torch_ops[op]()
    with normlab.set_backend("triton"):
        got = ours[op]()
    for g, t in zip(got, want, strict=True):
        assert g.stride() == t.stride(), (g.stride(), t.stride())
        torch.testing.assert_close(g, t, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("x_kind,r_kind", [("cl", None), ("cl", "cl"), ("contig", "cl")])
def test_the_per_example_variant_gives_torchs_layouts_too(x_kind, r_kind):
    x = _layout(x_kind, 0)
    r = None if r_kind is None else _layout(r_kind, 1)
    m = normlab.RMSNorm(4)
    m.collect_per_example_grad_sq = True
    want = torch.nn.RMSNorm(4)
    with normlab.set_backend("triton"):
        got = m(x) if r is None else m(x, r)
    ref = (want(x),) if r is None else (want(r + x), r + x)
    for g, t in zip(got if isinstance(got, tuple) else (got,), ref, strict=True):
        assert g.stride() == t.stride(), (g.stride(), t.stride())


def test_a_module_pickled_with_an_earlier_signature_format_runs():
    m, x = normlab.LayerNorm(8), torch.randn(4, 8)
    _warm(m, x)
    # an earlier version kept (impl, weight shape, bias shape) per signature
    m.__dict__["_impls"] = {k: v[:3] for k, v in m.__dict__["_impls"].items()}
    state = m.__dict__.copy()  # what pickle wrote then (no __getstate__ dropped the cache)
    back = normlab.LayerNorm.__new__(normlab.LayerNorm)
    back.__setstate__(state)
    with normlab.set_backend("triton"):
        torch.testing.assert_close(back(x), torch.nn.functional.layer_norm(x, (8,), m.weight, m.bias))


@pytest.mark.parametrize("shape", [(2, 8, 5, 4), (2, 64, 5, 300)])  # the fused forward's size, and above it
def test_the_torch_paths_rms_backward_gives_torchs_layout_for_channels_last(shape):
    x = _channels_last(shape, 0).requires_grad_()
    H = shape[-1]
    w = torch.randn(H, requires_grad=True)
    y = x * 1.0  # a non-leaf: its gradient keeps the layout the op gave it (a leaf's is x's)
    dy = torch.randn(shape)
    (ours,) = torch.autograd.grad(NF.rms_norm(y, (H,), w), y, dy)
    (want,) = torch.autograd.grad(torch.rms_norm(y, (H,), w), y, dy)
    assert ours.stride() == want.stride()
    torch.testing.assert_close(ours, want)


@pytest.mark.parametrize("op", ["add_rms_norm", "add_layer_norm"])
@pytest.mark.parametrize("bad", [{"casting_mode": "gema"}, {"offset": math.inf}, {"eps": "x", "offset": 1.0},
                                 {"weight": torch.ones(8, dtype=torch.long), "offset": 1.0}])
def test_a_refused_add_norm_with_an_offset_names_its_op_and_draws_no_mask(op, bad):
    if op == "add_layer_norm" and "casting_mode" in bad:
        pytest.skip("add_layer_norm takes no casting_mode")
    x, r = torch.randn(2, 8), torch.randn(2, 8)
    kw = {"weight": torch.ones(8), "offset": 0.0, **bad}
    w = kw.pop("weight")
    g = torch.Generator().manual_seed(0)
    before = g.get_state()
    fn = getattr(NF, op)
    args = (x, r, w) if op == "add_rms_norm" else (x, r, w, None)
    with pytest.raises((NormArgumentError, NormDtypeError, TypeError), match=f"^{op}: "):
        fn(*args, dropout_p=0.5, training=True, generator=g, **kw)
    assert torch.equal(g.get_state(), before)


@pytest.mark.parametrize("numel", [24, 2 * 300 * 128])  # the short path, and the checked one
def test_adaln_modulate_refuses_float8_at_every_size(numel):
    f8 = getattr(torch, "float8_e4m3fn", None)
    if f8 is None:
        pytest.skip("no float8 in this torch")
    x = torch.randn(2, numel // 8, 4).to(f8)
    with pytest.raises(NormDtypeError, match="adaln_modulate: expected input"):
        NF.adaln_modulate(x, x[:, :1], x[:, :1])


@pytest.mark.parametrize("op", ["add_rms_norm", "add_layer_norm"])
@pytest.mark.parametrize("kw", [{"residual_dtype": torch.bfloat16}, {"dropout_p": 0.5, "training": True}])
def test_a_stored_new_residual_without_a_residual_keeps_xs_layout(op, kw):
    x = _layout("cl", 0)
    w = torch.ones(4)
    args = (x, None, w) if op == "add_rms_norm" else (x, None, w, None)
    with normlab.set_backend("torch"):
        want = getattr(NF, op)(*args, generator=torch.Generator().manual_seed(0), **kw)
    with normlab.set_backend("triton"):
        got = getattr(NF, op)(*args, generator=torch.Generator().manual_seed(0), **kw)
    for g, t in zip(got, want, strict=True):
        assert g.stride() == t.stride(), (g.stride(), t.stride())
