"""The threads a serving process runs its work in, and how many torch threads each one computes with.

Model calls get the CPUs the process's models asked for (``num_cpus``, summed for the models an
ingress serves itself); everything else (media decoding, writing replies, loading) runs with one
torch thread, the process default this module sets.

Why not one process-wide ``torch.set_num_threads(n)``: torch computes on OpenMP, and OpenMP gives
every thread that has run a parallel region a team of ``n - 1`` workers of its own, kept for as long
as that thread lives. Once a process holds more of those threads than it has CPUs, libgomp stops
spinning between parallel regions (its throttled spin count) and each of a model call's thousands of
small regions waits for sleeping workers to wake. Measured (the image default at 256², 2 torch
threads, one process, medians of 20 calls): 48-52 ms a call in the main thread alone, 57-61 ms in a
thread beside another thread that had its own team, and ~60 ms for both with
``OMP_WAIT_POLICY=passive``. A replica with ``num_cpus: 2`` served 0.78-0.81x the same work
in-process, its model call 66-72 ms against 54 (``serve_bench.py --threads 2``, docs/benchmarks.md).

So a process has one team: the small lane's calls of every model it serves run in one thread that
lives as long as the process; a large call runs in a thread of its own that ends with the call,
taking its team with it; media and reply threads compute with one torch thread. With ``n = 1`` no
thread has a team, and this is only the threads' layout.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from serving.admission import Lane

Result = TypeVar("Result")


def _set_torch_threads(count: int) -> None:
    """This thread's torch thread count. torch sets a thread's count from the process default at
    its first parallel op, once; that happens here first, so it cannot undo the count later."""
    torch.get_num_threads()
    torch.set_num_threads(count)


def _executor(workers: int, name: str, torch_threads: int) -> ThreadPoolExecutor:
    """Threads that set their own torch thread count when they start."""
    return ThreadPoolExecutor(
        workers, thread_name_prefix=name, initializer=_set_torch_threads, initargs=(torch_threads,)
    )


class ServingThreads:
    """Model threads with ``model_threads`` torch threads each, media threads with one (module
    docstring). One per process: an ingress shares it among the models it serves itself."""

    def __init__(self, model_threads: int) -> None:
        self.model_threads = max(1, model_threads)
        self.small = _executor(1, "model-small", self.model_threads)
        # started now, so that the count it sets is in place before the next line: torch's setter
        # also sets the default of threads that have not computed yet, which goes back to one
        self.small.submit(int).result()
        torch.set_num_threads(1)
        self.media = _executor(min(32, (os.cpu_count() or 1) + 4), "media", 1)  # asyncio's default size

    async def model_call(self, lane: Lane, call: Callable[[], Result]) -> Result:
        """``call()`` in the lane's model thread, with the caller's context (its abandon scope). The
        small lane's calls queue for its one thread, in the order they come; a large call gets a
        thread of its own, which ends with it."""
        run = contextvars.copy_context().run
        loop = asyncio.get_running_loop()
        if lane == "small":
            return await loop.run_in_executor(self.small, run, call)
        large = _executor(1, "model-large", self.model_threads)
        try:
            return await loop.run_in_executor(large, run, call)
        finally:
            large.shutdown(wait=False)  # the thread ends when the call does, even if nobody waits

    async def media_call(self, fn: Callable[..., Result], *args) -> Result:
        """``fn(*args)`` in a media thread, with the caller's context (as ``asyncio.to_thread``)."""
        run = contextvars.copy_context().run
        return await asyncio.get_running_loop().run_in_executor(self.media, run, fn, *args)
