"""benchmarks/host_path_stubbed.py: its baselines compute torch's results, its stubs
launch nothing and are put back, and a run writes the table."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from tests.ops.helpers import DEVICE, needs_kernels

# the script runs the triton backend on CPU tensors: under the interpreter only (on a CUDA
# machine the kernels are compiled, and the interpreter is not switched on mid-session)
pytestmark = [needs_kernels, pytest.mark.skipif(DEVICE != "cpu" or os.environ.get("TRITON_INTERPRET") != "1",
                                                reason="needs the Triton interpreter on CPU")]

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "host_path_stubbed.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("host_path_stubbed", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_bare_baselines_compute_torchs_values_and_gradients(script):
    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w, b = (torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    torch.autograd.gradcheck(lambda x, w, b: script.BareLayerNorm.apply(x, [7], w, b, 1e-5), (x, w, b))
    torch.autograd.gradcheck(lambda x, w: script.BareRMSNorm.apply(x, [7], w, 1e-6), (x, w))
    # (the RMSNorm rows' stand-in: one fused op, LayerNorm's values)
    torch.testing.assert_close(script.BareRMSNorm.apply(x, [7], w, 1e-6),
                               torch.nn.functional.layer_norm(x, [7], w, None, 1e-6))
    torch.autograd.gradcheck(lambda x, r, w, b: script.BareAddLayerNorm.apply(x, r, [7], w, b, 1e-5), (x, r, w, b))
    torch.autograd.gradcheck(lambda x, r, w: script.BareAddRMSNorm.apply(x, r, [7], w, 1e-6), (x, r, w))
    out, h = script.BareAddLayerNorm.apply(x, r, [7], w, b, 1e-5)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(x + r, [7], w, b, 1e-5))


def test_stubbed_launches_run_no_kernel_and_are_put_back(script):
    import normlab
    from normlab.ops.triton import launch, norm

    before = norm._fwd_kernel, norm._bwd_kernel, launch._reduce_partials_kernel
    x = torch.randn(4, 8)
    with script.stubbed_launches(), normlab.set_backend("triton"):
        assert all(isinstance(k, script._NoLaunch) for k in (norm._fwd_kernel, norm._fwd_looped_kernel,
                                                            norm._bwd_kernel, norm._bwd_split_kernel,
                                                            norm._bwd_looped_kernel, launch._reduce_partials_kernel))
        assert normlab.functional.layer_norm(x, 8).shape == x.shape  # (its values: whatever memory held)
    assert (norm._fwd_kernel, norm._bwd_kernel, launch._reduce_partials_kernel) == before
    with normlab.set_backend("triton"):
        torch.testing.assert_close(normlab.functional.layer_norm(x, 8), torch.nn.functional.layer_norm(x, [8]))


def test_a_run_writes_every_case_to_the_table(script, tmp_path):
    out = tmp_path / "table.md"
    script.main(["--rounds", "1", "--number", "1", "--shapes", "2x8", "--dtypes", "float32", "--out", str(out)])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "2x8" in line]
    assert len(rows) == 12  # 6 cases, forward and forward + backward
    assert all(float(line.split("|")[-2]) > 0 for line in rows)
