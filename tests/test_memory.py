"""tokenizers_svc.memory: resident memory, and the peak a block adds."""

from __future__ import annotations

import subprocess
import sys

from tokenizers_svc.memory import PeakRss

_PEAK_OF_A_BLOCK = """
import time
import numpy as np
from tokenizers_svc.memory import PeakRss, rss_bytes
with PeakRss() as peak:
    block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, touched
    waited = time.monotonic()
    while peak.growth < 60 * 2**20 and time.monotonic() - waited < 10:  # the sampler's thread runs
        time.sleep(0.01)
    del block
print(peak.growth, int(rss_bytes() < peak.peak))
"""


def test_the_peak_sees_memory_the_block_held_and_gave_back():
    """In a fresh interpreter: after hundreds of tests, this process's allocator may hand the block
    pages that are already resident, and then no RSS measure can see it."""
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_OF_A_BLOCK], capture_output=True, text=True, timeout=60, check=True
    )
    growth, given_back = map(int, result.stdout.split())
    assert growth >= 60 * 2**20
    assert given_back  # only the sampler saw it


def test_another_process_is_watched_until_it_ends():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
    with PeakRss(child.pid, interval_s=0.01) as peak:
        child.wait()
    assert peak.peak > 4 * 2**20 and peak.peak >= peak.base  # a Python interpreter's resident set
