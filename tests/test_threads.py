"""serving.threads: model calls compute with the CPUs they were given, everything else with one torch
thread, and only the small lane's thread keeps an OpenMP team; the process's heap is trimmed once all
its models have gone quiet, never while one computes."""

from __future__ import annotations

import asyncio
import contextvars
import os
import subprocess
import sys
import threading
import time
from functools import partial

import pytest
import torch

import serving.threads
from serving.threads import OPENMP_SPIN_ROUNDS, ServingThreads, SmallLane, openmp_environment

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


def _tasks() -> int:
    """OS threads of this process (Linux)."""
    return len(os.listdir("/proc/self/task"))


def _compute() -> tuple[int, int, str]:
    """A parallel region (an op large enough for torch to split), then what the thread saw."""
    torch.ones(2**22).mul_(2)
    return torch.get_num_threads(), threading.get_ident(), request_id.get()


def _settled(count: int) -> int:
    """This process's thread count once it reaches ``count`` (threads that end do so in the background)
    or after 10 s, whichever comes first."""
    deadline = time.monotonic() + 10
    while _tasks() != count and time.monotonic() < deadline:
        time.sleep(0.05)
    return _tasks()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in Linux's /proc")
def test_model_calls_get_the_cpus_media_one_thread_and_only_the_small_lane_keeps_a_team():
    """In a fresh interpreter: this one's other tests leave threads (Ray's, pools) that would blur
    the count."""
    script = "from tests.test_threads import check_threads_and_teams; check_threads_and_teams()"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def check_threads_and_teams() -> None:
    threads = ServingThreads(2)
    assert torch.get_num_threads() == 1  # the process default: loading and anything not listed here
    counts: dict[str, int] = {"start": _tasks()}

    async def scenario() -> list[tuple[int, int, str]]:
        request_id.set("r1")
        small, _ = await threads.model_call("small", _compute)
        small_again, _ = await threads.model_call("small", _compute)
        counts["small"] = _tasks()
        large, _ = await threads.model_call("large", _compute)
        counts["large"] = _settled(counts["small"])
        media = await threads.media_call(_compute)
        media_again = await threads.media_call(_compute)
        counts["media"] = _tasks()  # one media thread, or two when the second call came first
        return [small, small_again, large, media, media_again]

    small, small_again, large, media, media_again = asyncio.run(scenario())
    assert small[0] == small_again[0] == large[0] == 2 and media[0] == media_again[0] == 1
    assert small[1] == small_again[1] != large[1]  # one thread for every small call
    assert {small[2], large[2], media[2]} == {"r1"}  # the request's context came along
    assert counts["small"] - counts["start"] == 1  # the small lane's thread's OpenMP worker: its team
    assert counts["large"] == counts["small"]  # the large call's thread ended, its worker with it
    media_threads = [thread for thread in threading.enumerate() if thread.name.startswith("media")]
    assert counts["media"] - counts["large"] == len(media_threads)  # no teams: one torch thread


@pytest.fixture()
def lane():
    threads = torch.get_num_threads()  # the lane's threads set torch's default as they start
    yield SmallLane(2)
    torch.set_num_threads(threads)


def _seen() -> tuple[int, int]:
    return torch.get_num_threads(), threading.get_ident()


def _result(future) -> object:
    """A lane call's result, without its lane seconds."""
    return future.result(10)[0]


def test_a_lone_small_call_computes_on_all_the_threads_and_queued_ones_side_by_side(lane):
    alone_threads, first = _result(lane.submit(_seen))
    assert alone_threads == 2

    both_running = threading.Barrier(2, timeout=10)  # broken unless the two calls overlap

    def side_by_side() -> tuple[int, int]:
        both_running.wait()
        return _seen()

    with lane.changed:  # handed over together, so that neither starts alone
        calls = [lane.submit(side_by_side), lane.submit(side_by_side)]
    (threads_a, thread_a), (threads_b, thread_b) = (_result(call) for call in calls)
    assert threads_a == threads_b == 1 and thread_a != thread_b
    assert _result(lane.submit(_seen)) == (2, first)  # alone again: all threads, the first thread


def test_a_small_call_waits_while_one_computes_on_all_the_threads(lane):
    release = threading.Event()
    wide = lane.submit(lambda: release.wait(10) and _seen())
    time.sleep(0.1)
    behind = lane.submit(_seen)
    time.sleep(0.3)
    assert wide.running() and not behind.running() and not behind.done()
    release.set()
    assert _result(wide)[0] == 2 and _result(behind)[0] == 2  # each alone: all the threads


def _walled(call) -> tuple[object, float, float]:
    started = time.perf_counter()
    return call(), started, time.perf_counter()


def test_calls_side_by_side_share_their_lane_seconds_and_a_lone_call_has_its_own(lane):
    """Lane seconds are what admission prices the queue with: they add up to the time the lane was
    busy, so calls that overlap get less than their wall time each, and a lone call all of it."""
    both_running = threading.Barrier(2, timeout=10)
    short_done = threading.Event()

    def short() -> None:  # beside the long call for all of its time
        both_running.wait()
        time.sleep(0.2)
        short_done.set()

    def long() -> None:  # alone for a while after the short call ends
        both_running.wait()
        short_done.wait(10)
        time.sleep(0.2)

    with lane.changed:  # handed over together, so that they start side by side
        calls = [lane.submit(partial(_walled, short)), lane.submit(partial(_walled, long))]
    ((_, short_start, short_end), short_lane_s), ((_, long_start, long_end), long_lane_s) = (
        call.result(10) for call in calls
    )
    short_wall, long_wall = short_end - short_start, long_end - long_start
    busy = max(short_end, long_end) - min(short_start, long_start)
    assert short_lane_s < 0.75 * short_wall  # about half of it: it always had company
    assert short_lane_s < long_lane_s < long_wall  # company for its first part only
    assert abs((short_lane_s + long_lane_s) - busy) < 0.05  # together: the time the lane was busy

    (_, start, end), lone_lane_s = lane.submit(partial(_walled, partial(time.sleep, 0.1))).result(10)
    assert abs(lone_lane_s - (end - start)) < 0.02


@pytest.fixture()
def quiet_window(monkeypatch):
    """ServingThreads in this process with a 0.3 s idle window; the times of the trims it asks for
    (recorded, not run: this process's heap is the test runner's)."""
    threads = torch.get_num_threads()  # ServingThreads sets the process default to one
    trims: list[float] = []
    monkeypatch.setattr(serving.threads, "IDLE_TRIM_S", 0.3)
    monkeypatch.setattr(serving.threads, "release_free_heap", lambda: trims.append(time.monotonic()))
    yield ServingThreads(1), trims
    torch.set_num_threads(threads)


def test_the_heap_is_trimmed_once_after_every_model_of_the_process_went_quiet(quiet_window):
    """The trim (malloc_trim) is process-wide: an ingress serving two models must not hand back the
    heap of one that computes because the other's calls ended, and calls back to back never pay."""
    threads, trims = quiet_window

    async def scenario() -> None:
        for _ in range(5):  # back to back: each call puts the trim off
            await threads.model_call("small", lambda: None)
        assert trims == [] and threads.trim_timer is not None
        # one model's long call, and beside it another model's short one, which ends first
        long_call = asyncio.create_task(threads.model_call("large", partial(time.sleep, 0.8)))
        await asyncio.sleep(0.05)
        await threads.model_call("small", lambda: None)
        await asyncio.sleep(0.5)  # past the window after the short call: the long one still runs
        assert trims == [] and not long_call.done()
        await long_call
        ended = time.monotonic()
        await asyncio.sleep(0.6)
        assert len(trims) == 1 and trims[0] - ended > 0.25  # one trim, a window after the last call
        await asyncio.sleep(0.5)
        assert len(trims) == 1  # still quiet: nothing more to hand back

    asyncio.run(scenario())


def test_a_lane_is_idle_only_while_no_call_runs_or_waits():
    lane = SmallLane(1)
    assert lane.idle()
    release = threading.Event()
    running = lane.submit(release.wait)
    waiting = lane.submit(lambda: None)
    assert not lane.idle()
    release.set()
    running.result(60), waiting.result(60)
    deadline = time.monotonic() + 10  # the counts go back just before a future resolves
    while not lane.idle() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lane.idle()


def test_serving_processes_spin_longer_unless_the_operator_chose(monkeypatch):
    """A process that serves models starts with libgomp's longer idle spin, unless the operator set
    a spin count or a wait policy: theirs is passed on instead (tests/test_serving.py checks that it
    reaches the replicas)."""
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert openmp_environment() == {"GOMP_SPINCOUNT": OPENMP_SPIN_ROUNDS}
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    assert openmp_environment() == {"OMP_WAIT_POLICY": "passive"}
    monkeypatch.setenv("GOMP_SPINCOUNT", "1000")
    assert openmp_environment() == {"GOMP_SPINCOUNT": "1000", "OMP_WAIT_POLICY": "passive"}
