"""serving.threads: model calls compute with the CPUs they were given, everything else with one torch
thread, and only the small lane's thread keeps an OpenMP team."""

from __future__ import annotations

import asyncio
import contextvars
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from serving.threads import ServingThreads, SmallLane

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
        small = await threads.model_call("small", _compute)
        small_again = await threads.model_call("small", _compute)
        counts["small"] = _tasks()
        large = await threads.model_call("large", _compute)
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


def test_a_lone_small_call_computes_on_all_the_threads_and_queued_ones_side_by_side(lane):
    alone_threads, first = lane.submit(_seen).result(10)
    assert alone_threads == 2

    both_running = threading.Barrier(2, timeout=10)  # broken unless the two calls overlap

    def side_by_side() -> tuple[int, int]:
        both_running.wait()
        return _seen()

    with lane.changed:  # handed over together, so that neither starts alone
        calls = [lane.submit(side_by_side), lane.submit(side_by_side)]
    (threads_a, thread_a), (threads_b, thread_b) = (call.result(10) for call in calls)
    assert threads_a == threads_b == 1 and thread_a != thread_b
    assert lane.submit(_seen).result(10) == (2, first)  # alone again: all threads, the first thread


def test_a_small_call_waits_while_one_computes_on_all_the_threads(lane):
    release = threading.Event()
    wide = lane.submit(lambda: release.wait(10) and _seen())
    time.sleep(0.1)
    behind = lane.submit(_seen)
    time.sleep(0.3)
    assert wide.running() and not behind.running() and not behind.done()
    release.set()
    assert wide.result(10)[0] == 2 and behind.result(10)[0] == 2  # each alone: all the threads
