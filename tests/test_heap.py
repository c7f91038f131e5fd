"""tokenizers_svc.heap: with the mmap threshold pinned, a large block is its own mapping (returned to
the system on free) even after glibc would have raised its dynamic threshold."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tokenizers_svc.heap import _libc

# Free an 8 MiB block (glibc then raises its dynamic threshold to 8 MiB), then allocate 2 MiB and
# print how many new mappings (mallinfo2's hblks) that took: 1 = a mapping, 0 = a heap block.
NEW_MAPPINGS = """
import ctypes, sys
from tokenizers_svc.heap import _libc, pin_mmap_threshold
libc = _libc()
class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"
    )]
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "pin":
    assert pin_mmap_threshold()
libc.free(libc.malloc(8 << 20))
before = libc.mallinfo2().hblks
block = libc.malloc(2 << 20)
print(libc.mallinfo2().hblks - before)
libc.free(block)
"""


def _new_mappings(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", NEW_MAPPINGS, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_libc() is None or not hasattr(_libc(), "mallinfo2"), reason="glibc >= 2.33 only")
def test_pinned_threshold_keeps_large_blocks_in_mappings():
    assert _new_mappings("default") == 0  # glibc's own behaviour: the block comes from the heap
    assert _new_mappings("pin") == 1
