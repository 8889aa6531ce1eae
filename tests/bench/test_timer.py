"""The bench's ``Timer``: host time recorded beside the timing; on a GPU, host time hidden
from the timing (or not) as asked."""

from __future__ import annotations

import time

import pytest
import torch

from normlab.bench.common import Timer


def test_cpu_timing_is_the_host_time():
    timer = Timer(torch.device("cpu"), warmup=1, reps=5)
    assert not timer.hide_host  # only a GPU can hide the host
    ms = timer.median_ms(lambda: time.sleep(0.002))
    assert 2.0 <= ms < 50 and timer.last_host_ms == ms
    times = timer.median_ms_interleaved({"short": lambda: None, "long": lambda: time.sleep(0.002)})
    assert times["long"] >= 2.0 > times["short"]
    assert timer.host_ms == times


def test_hold_covers_the_host_time():
    timer = Timer(torch.device("cpu"), warmup=1, reps=1)
    assert timer.hold_ms(0.7) > 0.7 and timer.hold_ms(0.0) > 0


@pytest.mark.gpu
def test_gpu_hides_host_time_when_asked():
    x = torch.ones(1024, device="cuda")

    def slow_host():  # 3 ms of host work, then a tiny kernel
        time.sleep(0.003)
        x.add_(1)
    hidden = Timer(torch.device("cuda"), warmup=2, reps=5)
    shown = Timer(torch.device("cuda"), warmup=2, reps=5, hide_host=False)
    assert hidden.median_ms(slow_host) < 0.5 <= 3.0 <= hidden.last_host_ms
    assert shown.median_ms(slow_host) >= 2.5
