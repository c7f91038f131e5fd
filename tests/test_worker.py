"""serving.worker without Ray Serve: media decodes are bounded per lane, small calls are handed over
ahead, and late work is refused (the request path is tested over HTTP in test_serving.py)."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections import Counter

import numpy as np
import pytest
import torch
from skimage import data

from serving import worker
from serving.jobs import EncodeJob, ErrorReply, Reply
from serving.worker import TokenizerWorker
from tests.helpers import worker_in_this_process
from tokenizers_svc import media
from tokenizers_svc.abandon import WorkToken
from tokenizers_svc.latents import latents_from_bytes
from tokenizers_svc.pipeline import EncodeOptions, load_media


@pytest.fixture(autouse=True)
def _leave_this_process_as_it_was(monkeypatch):
    with worker_in_this_process(monkeypatch):
        yield


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


def test_calls_handed_to_a_lane_run_one_at_a_time_and_are_checked_when_they_start():
    """Two calls are handed to a one-CPU lane's model thread at once (small_depth): the next starts the
    moment the last ends, never beside it, and a third waits for a slot. Whether a call can still
    finish in time is judged when it starts, behind the calls before it: one whose deadline the
    lane's recent rate says it would miss gets 503 instead of running."""

    async def scenario() -> None:
        served = TokenizerWorker({"name": "tiny", "model": "sd-vae-tiny"}, {})
        running: list[int] = []
        queued_at_end: list[int] = []  # calls waiting in the model thread's queue as each one ends

        def call(seconds: float):
            def timed() -> tuple[str, int]:
                running.append(1)
                assert len(running) == 1  # alone in the model thread
                time.sleep(seconds)
                queued_at_end.append(len(served.threads.small.pending))
                running.pop()
                return "done", 1

            return timed

        calls = [asyncio.create_task(served._in_lane("small", call(0.2))) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert served.threads.calls == 2 and served.lanes["small"]._value == 0  # two handed over, one waits
        outcomes = await asyncio.gather(*calls)
        assert [result for result, _ in outcomes] == ["done"] * 3
        assert queued_at_end[0] == 1  # the second was at hand in the thread when the first ended
        for _, model_time in outcomes:  # one at a time: each call's lane seconds are its own time
            assert model_time.compute_s >= 0.2 and abs(model_time.lane_s - model_time.compute_s) < 0.01

        # recent rate 0.2 s per unit: a request due in 0.3 s, behind a 0.2 s call, is refused
        first = asyncio.create_task(served._in_lane("small", call(0.2)))
        await asyncio.sleep(0.02)
        due = WorkToken(deadline=time.time() + 0.3)
        with pytest.raises(worker.OverloadedError):
            await served._run_alone(lambda: "ran", token=due, size=1)
        await first

    asyncio.run(scenario())


def test_photos_of_any_size_that_resize_to_one_shape_share_a_model_call():
    """The options' resize is applied where media is decoded (``pipeline.load_media``), and where a
    bare pixel tensor is prepared, so requests whose photos differ in size but resize to one shape
    stack into one model call; each latent file records its own source size and equals the
    library's encode of its photo. A float tensor out of range is refused before it is resized (a
    resize would have clamped it into range)."""
    photo = np.asarray(data.astronaut())
    crops = [photo[:96, :128], photo[100:220, 40:200], photo[300:372, 200:296]]  # all 3:4 -> 48x64
    bodies = [media.encode_image(np.ascontiguousarray(crop), "png") for crop in crops]
    tensor = media.image_to_tensor(np.ascontiguousarray(photo[200:272, 0:96]))  # (1, 3, 72, 96) uint8
    options = EncodeOptions(resize="shorter-side", resolution=48)

    async def scenario() -> tuple[TokenizerWorker, list[Reply | ErrorReply]]:
        # a long batching window: the first prepared request waits for the others (Batcher)
        config = {"name": "tiny", "model": "sd-vae-tiny", "num_cpus": 1, "batch_wait_timeout_s": 30}
        served = TokenizerWorker(config, {})
        jobs = [EncodeJob(options, data=body) for body in bodies] + [EncodeJob(options, tensor=tensor)]
        jobs.append(EncodeJob(options, tensor=tensor.float()))  # [0, 255] sent as float: out of range
        replies = await asyncio.wait_for(asyncio.gather(*(served.encode(job) for job in jobs)), 120)
        return served, replies

    served, replies = asyncio.run(scenario())
    *encoded, refused = replies
    error = refused.to_error()
    assert error.http_status == 422 and "[-1, 1]" in error.message, refused
    assert [reply.batch_size for reply in encoded] == [4, 4, 4, 4], replies
    full_size = [load_media(body).pixels for body in bodies] + [tensor]  # as decoded, or as sent
    for pixels, reply in zip(full_size, encoded, strict=True):
        served_latents = latents_from_bytes(reply.body)
        assert served_latents.resized_from == tuple(pixels.shape[-2:])
        assert served_latents.original_size == (48, 64)
        local = served.tokenizer.encode(pixels, resize="shorter-side", resolution=48)
        assert local.resized_from == tuple(pixels.shape[-2:])
        torch.testing.assert_close(served_latents.latents, local.latents, rtol=0, atol=1e-5)


def test_a_request_that_finds_the_replica_idle_is_decoded_and_encoded_in_one_hand_over(monkeypatch):
    """A lone request is decoded in the model thread and encoded there in the same hand-over (no
    media thread's round trip first); it equals the library's encode, reports its decode and model
    time apart, and a corrupt image or an out-of-range tensor there is a 422 after which the replica
    still serves. A larger body, and a request that others reach the replica beside, are decoded in
    a media thread (the latter batch: the test above)."""
    photo = np.ascontiguousarray(np.asarray(data.astronaut())[:64, :96])
    body = media.encode_image(photo, "png")
    decoded_in: list[str] = []
    real_load_media = worker.load_media

    def recorded_load_media(*args, **kwargs):
        decoded_in.append(threading.current_thread().name)
        return real_load_media(*args, **kwargs)

    monkeypatch.setattr(worker, "load_media", recorded_load_media)
    options = EncodeOptions()

    async def scenario() -> tuple[TokenizerWorker, list[Reply | ErrorReply]]:
        served = TokenizerWorker({"name": "tiny", "model": "sd-vae-tiny", "num_cpus": 1}, {})
        replies = [await served.encode(EncodeJob(options, data=data)) for data in (body, body[:200], body)]
        # [0, 255] sent as float: the model call refuses it
        out_of_range = media.image_to_tensor(photo).float()
        replies.append(await served.encode(EncodeJob(options, tensor=out_of_range)))
        sampled = EncodeOptions(sample=True, seed=7)  # runs alone (its own noise), after decoding here
        replies.append(await served.encode(EncodeJob(sampled, data=body)))
        monkeypatch.setattr(worker, "IDLE_PATH_MAX_BYTES", len(body) - 1)  # a longer decode: a media thread's
        replies.append(await served.encode(EncodeJob(options, data=body)))
        return served, replies

    served, (first, corrupt, again, refused, sampled, larger) = asyncio.run(scenario())
    assert decoded_in[:4] == ["model-small_0"] * 4 and decoded_in[4].startswith("media"), decoded_in
    assert refused.to_error().http_status == 422 and "[-1, 1]" in refused.to_error().message, refused
    larger_latents, first_latents = latents_from_bytes(larger.body), latents_from_bytes(first.body)
    assert larger_latents.metadata() == first_latents.metadata()
    torch.testing.assert_close(larger_latents.latents, first_latents.latents, rtol=0, atol=0)
    assert corrupt.to_error().http_status == 422, corrupt
    local = served.tokenizer.encode(media.image_to_tensor(photo))
    for reply in (first, again):
        assert reply.batch_size == 1 and reply.media_s > 0 and reply.model_time.compute_s > 0
        assert reply.replica_s >= reply.media_s + reply.model_time.compute_s
        encoded = latents_from_bytes(reply.body)
        assert encoded.source_sha256 == hashlib.sha256(body).hexdigest()
        torch.testing.assert_close(encoded.latents, local.latents, rtol=0, atol=1e-5)
    seeded = served.tokenizer.encode(
        media.image_to_tensor(photo), sample=True, generator=torch.Generator().manual_seed(7)
    )
    torch.testing.assert_close(latents_from_bytes(sampled.body).latents, seeded.latents, rtol=0, atol=1e-5)
