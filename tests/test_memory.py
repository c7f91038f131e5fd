"""tokenizers_svc.memory: resident memory, and the peak a block adds."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np

from tokenizers_svc.memory import PeakRss, rss_bytes


def test_the_peak_sees_memory_the_block_held_and_gave_back():
    with PeakRss() as peak:
        block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, touched
        waited = time.monotonic()
        while peak.growth < 60 * 2**20 and time.monotonic() - waited < 10:  # the sampler's thread runs
            time.sleep(0.01)
        del block
    assert peak.growth >= 60 * 2**20
    assert rss_bytes() < peak.peak  # it was given back: only the sampler saw it


def test_another_process_is_watched_until_it_ends():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
    with PeakRss(child.pid, interval_s=0.01) as peak:
        child.wait()
    assert peak.peak > 4 * 2**20 and peak.peak >= peak.base  # a Python interpreter's resident set
