"""serving.worker without Ray Serve: a model that goes quiet hands its freed memory back, and a
model kept busy never pays for it; media decodes are bounded per lane (the request path is tested
over HTTP in test_serving.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import numpy as np
import pytest
from skimage import data

from serving import worker
from serving.jobs import EncodeJob, Reply
from serving.worker import TokenizerWorker
from tests.helpers import worker_in_this_process
from tokenizers_svc import media
from tokenizers_svc.abandon import WorkToken
from tokenizers_svc.pipeline import EncodeOptions


@pytest.fixture(autouse=True)
def _leave_this_process_as_it_was(monkeypatch):
    with worker_in_this_process(monkeypatch):
        yield


def test_idle_model_trims_once_and_a_busy_one_never(monkeypatch):
    trims: list[int] = []
    monkeypatch.setattr(worker, "release_free_heap", lambda: trims.append(1) or True)

    async def scenario() -> None:
        served = TokenizerWorker({"name": "tiny", "model": "sd-vae-tiny"}, {})
        for _ in range(5):  # model calls back to back: each cancels the trim the last one set
            await served._timed(1, WorkToken(), "small", sum, [1, 2])
        assert trims == [] and served.trim_timer is not None
        await asyncio.sleep(worker.IDLE_TRIM_S + 1.0)  # quiet past the window: one trim
        assert trims == [1] and served.trim_timer is None
        await asyncio.sleep(worker.IDLE_TRIM_S + 0.2)  # still quiet: nothing more to hand back
        assert trims == [1]

    asyncio.run(scenario())


def test_media_decodes_wait_for_a_slot_of_their_own_lane(monkeypatch):
    """A replica with one CPU decodes at most two media at a time per lane (one beside the model
    call), and a large request's decode, however long, never holds a small one's."""
    photo = media.encode_image(np.asarray(data.astronaut()[:64, :64]).copy(), "png")
    large_body = bytes(bytearray(photo))  # equal bytes, another object: the large request's
    held = threading.Event()
    active: Counter = Counter()
    peak: Counter = Counter()
    lock = threading.Lock()
    real_load_media = worker.load_media

    def counted_load_media(body: bytes, limits, options):
        lane = "large" if body is large_body else "small"
        with lock:
            active[lane] += 1
            peak[lane] = max(peak[lane], active[lane])
        try:
            if lane == "large":
                assert held.wait(60)  # decoding until every small request is answered
            else:
                time.sleep(0.05)  # long enough that decodes overlap when nothing bounds them
            return real_load_media(body, limits, options)
        finally:
            with lock:
                active[lane] -= 1

    monkeypatch.setattr(worker, "load_media", counted_load_media)
    options = EncodeOptions()

    async def scenario() -> None:
        served = TokenizerWorker({"name": "tiny", "model": "sd-vae-tiny", "num_cpus": 1}, {})
        large = asyncio.create_task(served.encode(EncodeJob(options, data=large_body, lane="large")))
        small = [served.encode(EncodeJob(options, data=photo, lane="small")) for _ in range(6)]
        replies = await asyncio.wait_for(asyncio.gather(*small), 120)
        assert all(isinstance(reply, Reply) for reply in replies), replies
        assert not large.done() and peak["small"] == 2
        held.set()
        assert isinstance(await asyncio.wait_for(large, 120), Reply)

    asyncio.run(scenario())
