"""Each training run reports its own peak memory, also in a process that ran something larger before."""

import sys

import pytest

from simvq.training.run import _peak_memory_mb, _reset_peak_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_peak_window_forgets_an_earlier_larger_allocation():
    import numpy as np

    big = np.ones(300 * 2**20 // 8)  # 300 MiB touched: the process's lifetime peak is at least that high
    before = _peak_memory_mb("cpu")
    del big
    _reset_peak_memory()
    after = _peak_memory_mb("cpu")
    assert before - after > 250  # the new window starts at today's resident set, 300 MiB lower
    small = np.ones(100 * 2**20 // 8)
    with open("/proc/self/status") as f:
        rss_now = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
    assert _peak_memory_mb("cpu") >= rss_now - 1  # and the window covers what the process holds now
    del small
