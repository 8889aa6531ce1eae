"""The diagnostics tests run small models, where a second intra-op thread costs more than
it gives (and on a busy machine, much more): one thread for these tests, restored after."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
