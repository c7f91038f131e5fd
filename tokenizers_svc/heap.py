"""Keep a long-running process's resident memory at what it holds.

glibc serves an allocation above the *mmap threshold* with its own mapping, returned to the system on
free, and one below it from the heap, which keeps freed pages. The threshold is dynamic: each free of a
mapped block raises it to that block's size (up to 32 MiB on 64-bit), so after the first batch a
model's activation tensors come from the heap and every later batch leaves freed, still-resident pages
between long-lived small blocks. A streaming evaluation measured this as resident memory growing with
the item count although the live data did not (+400 MB from 500 to 2000 items; flat with the
threshold pinned: docs/benchmarks.md, "Streaming evaluation"). Pinning the threshold, which also
turns the dynamic adjustment off, keeps large tensors in mappings that go back on free.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
DEFAULT_THRESHOLD = 128 * 1024  # glibc's initial value


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") else None


def pin_mmap_threshold(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Serve allocations of ``threshold`` bytes or more with their own mappings from now on, in this
    process; -> False where the C library is not glibc (nothing changes there)."""
    libc = _libc()
    return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, threshold) == 1)
