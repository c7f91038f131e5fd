"""Resident memory of a process, and its peak over a block, sampled in a thread.

torch's CPU allocations are invisible to tracemalloc, so the resident set (``/proc/<pid>/statm``) is
the honest measure of what a model call or a whole server holds. The evaluation measures its own
process around each model call; the overload benchmark watches a server replica from outside.

A model call's activations (tens of MB at 256²) are freed into glibc's heap, which keeps them
resident: glibc raises its mmap threshold as large blocks are freed, so later activations come from
the heap, not from mappings that ``free`` unmaps. :func:`release_free_heap` hands those pages back;
the server calls it when a model goes idle. :func:`model_process_environment` makes every thread
of a served model's process allocate from that heap.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import threading


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of process ``pid`` (this one by default), in bytes (Linux /proc)."""
    with open(f"/proc/{pid or 'self'}/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """``with PeakRss(pid, interval_s) as peak: ...``: ``peak.base`` is the RSS at the start,
    ``peak.peak`` the largest sample (at least the start and the end). A process that ends while
    watched stops the sampling; ``peak`` keeps what was seen."""

    def __init__(self, pid: int | None = None, interval_s: float = 0.002) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakRss:
        self.base = self.peak = rss_bytes(self.pid)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except OSError:  # the process ended
                return

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(OSError):
            self.peak = max(self.peak, rss_bytes(self.pid))

    @property
    def growth(self) -> int:
        """Peak above the start, in bytes."""
        return self.peak - self.base


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None  # glibc has it; musl and macOS do not


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4  # blocks glibc may map at once on its own; 0: none, every block from the heap
HEAP_TRIM_THRESHOLD = 512 * 2**20  # free memory at the top of the main heap kept up to this much
HEAP_TUNING_ENV = "TOKENIZERS_SVC_HEAP_TUNING"  # "0" leaves glibc's defaults alone


@functools.cache
def keep_heap_for_model_calls() -> bool:
    """Stop glibc from handing the main heap's top back to the OS after every model call, once per
    process; False where it did nothing (not glibc, or ``TOKENIZERS_SVC_HEAP_TUNING=0``). Served
    models (``serving.worker``) and the benchmarks' in-process baselines call it. It is a choice for
    the process's owner, not a side effect of loading a model: it is process-wide, and it keeps
    resident memory at its peak until something trims.

    Why: a model call frees tens of MB of activations at once. In the main thread they come from the
    main heap (``brk``), whose free top glibc trims back to the OS past a threshold, so the next call
    page-faults the same memory in again; a thread's own arena keeps it. Measured (session 13, one
    torch thread, the default image model, PNG decode + encode + latent file of 256x256 crops in a
    loop, four rounds of 12 alternating in one process): 6.8-8.2 req/s in the main thread against
    8.6-9.2 in a worker thread with glibc's defaults; 8.4-9.0 against 8.0-9.1 with these thresholds.
    So the trim threshold is set high, and large blocks come from the heap too: glibc maps a block
    over its mmap threshold on its own and unmaps it at ``free``, and that threshold goes no higher
    than 32 MiB, which a video clip's or a batch's activations pass (setting the trim threshold
    alone also turns off glibc's dynamic mmap threshold and put every block over 128 KiB on ``mmap``:
    5.3 req/s). With the mmap threshold at 32 MiB, a 17-frame 256x192 clip of the video default took
    1544-1817 ms at one torch thread with 55,000-243,000 page faults per call; with no mmap at all,
    1411-1475 ms and none; batches of 4-8 256² images stopped faulting ~6,000 pages per image
    (docs/benchmarks.md, "Batch", session 22). A thread's arena still maps what its 64 MiB heaps
    cannot hold, so a served model's process puts every thread on the main heap
    (:func:`model_process_environment`). The cost is resident memory that stays at its peak until
    :func:`release_free_heap`, which ignores the threshold (the server calls it when a model goes
    idle): 697-717 MB against 659-672 MB after the loop above."""
    libc = _libc()
    if libc is None or os.environ.get(HEAP_TUNING_ENV) == "0" or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD))


@functools.cache
def allocate_images_whole() -> bool:
    """Have Pillow allocate every image of this process in one block, once per process; False with
    ``TOKENIZERS_SVC_HEAP_TUNING=0``. Processes that decode images at volume call it: a served
    model's replica, the batch job's driver, encoder actors and decode tasks, the benchmarks'
    baselines. Like :func:`keep_heap_for_model_calls`, a choice for the process's owner: it is
    Pillow's global switch (``Image.core.set_use_block_allocator``, which Pillow's Arrow docs name
    for exactly this), not a side effect of decoding.

    Why: :func:`tokenizers_svc.media.decode_image_tensor` hands Pillow's pixels to torch as a view,
    which Arrow can export only from one block; by default Pillow chains 16 MiB blocks, so an image
    over ~4 MP took numpy's way, two more copies, one of them under the GIL. A 12 MP JPEG (4000x3000)
    took 146 ms from bytes to tensor that way against 106 ms whole (decoding alone: 44 ms), and two
    threads decoded 12.9 such photos/s against 19.8 (docs/benchmarks.md, "Batch", session 26). Pillow keeps no freed blocks by default
    (``PILLOW_BLOCKS_MAX`` 0), so nothing is lost: an image is one allocation of its own size instead
    of several."""
    if os.environ.get(HEAP_TUNING_ENV) == "0":
        return False
    from PIL import Image

    Image.core.set_use_block_allocator(1)
    return True


def tune_for_model_calls() -> None:
    """This process's allocators for encoding at volume: glibc keeps its heap
    (:func:`keep_heap_for_model_calls`) and Pillow allocates images whole
    (:func:`allocate_images_whole`)."""
    keep_heap_for_model_calls()
    allocate_images_whole()


ONE_ARENA_ENVIRONMENT = {"MALLOC_ARENA_MAX": "1"}  # glibc reads it at process start


def model_process_environment() -> dict[str, str]:
    """Environment variables for a process Ray starts to run model calls in a thread (a served
    model's replica; a batch job's encoder actor, whose calls Ray Data runs in a thread of its own
    beside the actor's main thread): glibc with one malloc arena, the main heap, for every thread.
    ``{}`` with ``TOKENIZERS_SVC_HEAP_TUNING=0``; a value this process's environment already sets is
    passed on.
    glibc reads them when a process starts, so they go in the actor's ``runtime_env``.

    Why: :func:`keep_heap_for_model_calls` keeps the main heap, but a thread allocates from an arena
    of its own, whose heaps are 64 MiB mappings, and glibc unmaps a heap as soon as all of it is
    free, whatever the trim threshold. A model call whose activations outgrow one heap maps a new
    one and unmaps it at the end, so the next call faults it in again. In a replica (the default
    image model at 256², concurrency 4, three 14 s probes each) that came and went with how the
    arena happened to be laid out: 1,900-13,000 minor page faults per request and 122-136 ms of
    model-thread CPU per request (7.2-7.9 req/s), against 0-86 faults, 110-119 ms and 8.1-8.8 req/s
    with one arena. With one arena all threads share its lock; a model call allocates a few hundred
    blocks, so that costs nothing measurable."""
    if os.environ.get(HEAP_TUNING_ENV) == "0":
        return {}
    return {name: os.environ.get(name, value) for name, value in ONE_ARENA_ENVIRONMENT.items()}


def model_actor_options() -> dict:
    """Ray actor options for such a process: :func:`model_process_environment` as its
    ``runtime_env`` (Ray merges its ``env_vars`` into the job's), or ``{}`` when there is none."""
    environment = model_process_environment()
    return {"runtime_env": {"env_vars": environment}} if environment else {}


def release_free_heap() -> bool:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim(0)``, ~5 ms after a 256² batch);
    False where the C library has no such call. Measured on the default image model, one torch
    thread: resident 537-571 MB after five 256² round trips of two images, 440-441 MB when each was
    followed by a trim, at the same speed; a fixed mmap threshold (``MALLOC_MMAP_THRESHOLD_``)
    held 440 MB too but made the calls ~35% slower (page faults on every activation)."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
