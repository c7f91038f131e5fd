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

So a process has one team: a small-lane call that runs alone computes on all ``n`` threads in the
lane's first thread, which lives as long as the process; calls that queue run side by side on one
torch thread each (:class:`SmallLane`); a large call runs in a thread of its own that ends with the
call, taking its team with it; media and reply threads compute with one torch thread. With ``n = 1``
no thread has a team, and this is only the threads' layout.

The process's heap is the threads' too: once no model call of the process has run for
``IDLE_TRIM_S``, the memory the calls freed goes back to the OS (:meth:`ServingThreads.model_call`).
Per process, not per model, because the trim is process-wide: an ingress that serves several models
must not hand back the heap of one that is busy because another went quiet.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import TypeVar

import torch

from serving.admission import Lane
from tokenizers_svc.memory import model_process_environment, release_free_heap

Result = TypeVar("Result")

# A process whose models have been idle this long hands their freed activations back. Long enough
# that a client's pause between requests does not make its next request fault them in again (with 1 s
# here, a 256² encode after a 3.5 s pause took 16-68 ms longer: docs/benchmarks.md, session 20);
# short enough that a quiet replica soon holds only what its libraries need (jemalloc's default
# decay of unused pages is 10 s too).
IDLE_TRIM_S = 10.0


# How long libgomp's idle team worker spins before it sleeps, in its spin rounds: ~10 ms on this
# machine (its default, 300,000, is ~4-5 ms). A served request at concurrency 1 spends ~7-8 ms outside
# the model call (HTTP, decoding, the reply), longer than the default spin, so the next call's first
# parallel region waited for a sleeping worker on a core that had gone idle; with the longer spin
# the worker is still there. The cost is the spin itself: at most ~10 ms of one core after a call
# that no other call follows. Measured in docs/benchmarks.md ("Serving", session 28).
OPENMP_SPIN_ROUNDS = "700000"


def openmp_environment() -> dict[str, str]:
    """libgomp's settings for a process that serves model calls (its environment at start: libgomp
    reads it when it loads): the longer idle spin above, unless the operator chose a wait policy or
    a spin count, which is passed on instead."""
    chosen = {name: os.environ[name] for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY") if name in os.environ}
    return chosen or {"GOMP_SPINCOUNT": OPENMP_SPIN_ROUNDS}


def serving_actor_options() -> dict:
    """Ray actor options for a process that serves models (a model's replica, an ingress that serves
    models itself): glibc's heap settings (``tokenizers_svc.memory.model_process_environment``) and
    libgomp's (:func:`openmp_environment`) in its ``runtime_env``; Ray merges them into the job's."""
    return {"runtime_env": {"env_vars": {**model_process_environment(), **openmp_environment()}}}


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


def _timed(run: Callable[[Callable[[], Result]], Result], call: Callable[[], Result]) -> tuple[Result, float]:
    """(``run(call)``, the seconds it took)."""
    started = time.perf_counter()
    result = run(call)
    return result, time.perf_counter() - started


class SmallLane:
    """The small lane's model calls of a process, on ``width`` threads (its models' CPUs): a call that
    runs alone computes on all ``width`` torch threads in the first thread, the process's one OpenMP
    team; calls that queue run side by side, one torch thread each, up to ``width`` at a time. A
    call handed over while others run starts the moment a thread is free, without the event loop.

    A call's future resolves to (its result, its *lane seconds*: its wall time divided among the
    calls that ran beside it, moment by moment). Lane seconds add up to the time the lane was busy,
    so they say how fast its queue drains: two calls side by side take ~115 ms each and drain one per
    ~57 ms. Admission prices the queue with them (serving/admission.py); a call's own wall time says
    how long a call started now runs (the worker's too-late check).

    Why side by side: a call on two torch threads waits at every parallel region for the thread that
    the server's HTTP and media work pushed off its core, and calls side by side do not wait for each
    other. With ``serve_bench.py --threads 2`` (image default, 256²), one two-thread call at a time
    served 0.90 / 0.91x in-process at concurrency 4 / 16, and a prototype that always ran two
    one-thread calls side by side 0.99 / 1.01x; alone, a two-thread call takes 50-55 ms against ~92
    ms on one thread, so a lone request keeps all of them."""

    def __init__(self, width: int) -> None:
        self.width = max(1, width)
        self.pending: deque[tuple[Callable[[], object], Future]] = deque()
        self.wide = False  # a call computes on all the threads
        self.narrow = 0  # calls computing on one thread each
        self.changed = threading.Condition()
        self.clock = 0.0  # lane seconds so far: wall time over the calls running, while any runs
        self.clock_read_at = time.perf_counter()
        # started now, so that the count the first thread sets is in place before the caller puts
        # the process default back (ServingThreads); daemons: a process that exits does not wait
        started = threading.Barrier(self.width + 1)
        for index in range(self.width):
            threading.Thread(
                target=self._serve, args=(index == 0, started), name=f"model-small_{index}", daemon=True
            ).start()
        started.wait()

    def idle(self) -> bool:
        """Whether no call runs or waits."""
        with self.changed:
            return not self.pending and not self.wide and not self.narrow

    def submit(self, call: Callable[[], Result]) -> Future:
        future: Future = Future()
        with self.changed:
            self.pending.append((call, future))
            self.changed.notify_all()
        return future

    def _can_take(self, first: bool) -> bool:
        if not self.pending or self.wide:
            return False
        # the other threads only run calls side by side: with one running, or two waiting
        return first or self.narrow > 0 or len(self.pending) > 1

    def _tick(self) -> float:
        """The lane clock now (under ``changed``, before the running calls change)."""
        now = time.perf_counter()
        running = self.narrow + int(self.wide)
        if running:
            self.clock += (now - self.clock_read_at) / running
        self.clock_read_at = now
        return self.clock

    def _serve(self, first: bool, started: threading.Barrier) -> None:
        threads = self.width if first else 1
        _set_torch_threads(threads)
        started.wait()
        while True:
            with self.changed:
                self.changed.wait_for(lambda: self._can_take(first))
                call, future = self.pending.popleft()
                wide = first and not self.narrow and not self.pending
                began = self._tick()
                if wide:
                    self.wide = True
                else:
                    self.narrow += 1
            if first and threads != (self.width if wide else 1):
                threads = self.width if wide else 1
                torch.set_num_threads(threads)
            outcome: tuple[object, BaseException | None] = (None, None)
            if future.set_running_or_notify_cancel():  # False: its caller left before it started
                try:
                    outcome = (call(), None)
                except BaseException as error:
                    outcome = (None, error)
            with self.changed:
                lane_s = self._tick() - began
                if wide:
                    self.wide = False
                else:
                    self.narrow -= 1
                self.changed.notify_all()
            if future.running():  # the lane's counts are already back: the next call may start first
                result, error = outcome
                if error is None:
                    future.set_result((result, lane_s))
                else:
                    future.set_exception(error)


class ServingThreads:
    """Model threads with ``model_threads`` torch threads each, media threads with one (module
    docstring). One per process: an ingress shares it among the models it serves itself."""

    def __init__(self, model_threads: int) -> None:
        self.small = SmallLane(model_threads)
        # torch's setter also sets the default of threads that have not computed yet: back to one
        torch.set_num_threads(1)
        self.media = _executor(min(32, (os.cpu_count() or 1) + 4), "media", 1)  # asyncio's default size
        self.calls = 0  # model calls handed over and not yet back, over every model of the process
        self.trim_timer: asyncio.TimerHandle | None = None

    @property
    def model_threads(self) -> int:
        """Torch threads a model call computes with when it runs alone (at least one)."""
        return self.small.width

    async def model_call(self, lane: Lane, call: Callable[[], Result]) -> tuple[Result, float]:
        """``call()`` in a model thread of the lane, with the caller's context (its abandon scope):
        (its result, its lane seconds, :class:`SmallLane`). The small lane's calls start in the
        order they come; a large call gets a thread of its own, which ends with it, and runs alone
        in its lane (the worker's semaphore): its lane seconds are its wall time. A call puts off
        the idle trim (module docstring) until ``IDLE_TRIM_S`` after the process's last call ends:
        a process under load, even at one request at a time, never pays for it."""
        if self.trim_timer is not None:
            self.trim_timer.cancel()
            self.trim_timer = None
        self.calls += 1
        run = contextvars.copy_context().run
        try:
            if lane == "small":
                return await asyncio.wrap_future(self.small.submit(partial(run, call)))
            large = _executor(1, "model-large", self.model_threads)
            try:
                return await asyncio.get_running_loop().run_in_executor(large, _timed, run, call)
            finally:
                large.shutdown(wait=False)  # the thread ends when the call does, even if nobody waits
        finally:
            self.calls -= 1
            if not self.calls:
                self.trim_timer = asyncio.get_running_loop().call_later(IDLE_TRIM_S, self._trim)

    def _trim(self) -> None:
        """Hand the freed heap back (glibc's ``malloc_trim``, ~5 ms) in a media thread, so that a
        request arriving meanwhile is not held by it."""
        self.trim_timer = None
        self.media.submit(release_free_heap)

    async def media_call(self, fn: Callable[..., Result], *args) -> Result:
        """``fn(*args)`` in a media thread, with the caller's context (as ``asyncio.to_thread``)."""
        run = contextvars.copy_context().run
        return await asyncio.get_running_loop().run_in_executor(self.media, run, fn, *args)
