"""serving.worker without Ray Serve: a model that goes quiet hands its freed memory back, and a
model kept busy never pays for it (the request path is tested over HTTP in test_serving.py)."""

from __future__ import annotations

import asyncio

from serving import worker
from serving.worker import TokenizerWorker
from tokenizers_svc.abandon import WorkToken


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
