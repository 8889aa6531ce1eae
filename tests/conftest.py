"""Test-wide setup: Triton kernels run under the Triton interpreter on CPU-only machines
(set before triton is imported); tests marked ``gpu`` are skipped without CUDA."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_backend():
    """Each test starts from the backend the session started with, whatever an earlier
    test in the same worker process left behind."""
    from normlab import backend
    saved = backend._current
    yield
    backend._current = saved
