"""set_backend / NORMLAB_BACKEND select the implementation; bad values fail clearly."""

import pytest
import torch

import normlab
from normlab import backend
from normlab.ops import backend_ops, eager, reference


def test_set_backend_is_a_setter_and_a_context_manager():
    start = normlab.get_backend()
    with normlab.set_backend("torch"):
        assert normlab.get_backend() == "torch"
        with normlab.set_backend("auto"):
            assert normlab.get_backend() == "auto"
        assert normlab.get_backend() == "torch"
    assert normlab.get_backend() == start
    normlab.set_backend("TORCH")
    try:
        assert normlab.get_backend() == "torch"
    finally:
        normlab.set_backend(start)


def test_bad_backend_names():
    with pytest.raises(ValueError, match=r"set_backend\(name\).*'auto', 'torch', 'triton'.*'cuda'"):
        normlab.set_backend("cuda")


def test_environment_variable(monkeypatch):
    monkeypatch.setattr(backend, "_current", None)
    monkeypatch.setenv("NORMLAB_BACKEND", "torch")
    assert normlab.get_backend() == "torch"
    monkeypatch.setattr(backend, "_current", None)
    monkeypatch.setenv("NORMLAB_BACKEND", "fast")
    with pytest.raises(ValueError, match="NORMLAB_BACKEND.*'fast'"):
        normlab.get_backend()
    monkeypatch.setattr(backend, "_current", None)


def test_cpu_tensors_resolve_to_torch_under_auto():
    x = torch.randn(2, 3)
    with normlab.set_backend("auto"):
        assert backend.resolve(x) == "torch"
    assert backend_ops(x) is eager
    assert eager.rms_norm(x, (3,), None, None).shape == (2, 3)
    assert reference.layer_norm is not None


def test_forcing_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    # the kernels are defined first, as the session runs them: triton.jit reads
    # TRITON_INTERPRET when a kernel is defined, and set_backend("triton") imports them,
    # so importing them here with the interpreter off would leave compiled-mode kernels
    # to every later test in this process
    if backend.triton_available():
        import normlab.ops.triton  # noqa: F401
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with normlab.set_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        normlab.functional.layer_norm(torch.randn(2, 3), 3)


def test_auto_on_cuda_chooses_by_size(monkeypatch):
    """The documented rule: kernels from AUTO_TRITON_MIN_ELEMENTS elements per call on
    CUDA, torch's ops below, on the CPU and for float64 (decided without a GPU)."""
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    big = backend.AUTO_TRITON_MIN_ELEMENTS
    assert backend.auto_choice(True, torch.bfloat16, big) == "triton"
    assert backend.auto_choice(True, torch.float32, 4 * big) == "triton"
    assert backend.auto_choice(True, torch.bfloat16, big - 1) == "torch"
    assert backend.auto_choice(True, torch.float64, 4 * big) == "torch"
    assert backend.auto_choice(False, torch.bfloat16, 4 * big) == "torch"
    monkeypatch.setattr(backend, "triton_available", lambda: False)
    assert backend.auto_choice(True, torch.bfloat16, 4 * big) == "torch"
    # the rule is the one the docs state
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[1] / "docs" / "kernels.md").read_text()
    assert f"{backend.AUTO_TRITON_MIN_ELEMENTS:,}" in docs
