"""The tokenizer deployment: one model per replica, dynamic batching of stackable requests.

The ingress sends an :class:`~serving.jobs.EncodeJob` or :class:`~serving.jobs.DecodeJob`; the
replica decodes media with the shared runner (``tokenizers_svc.pipeline``), then queues in a
:class:`~serving.batcher.Batcher` (continuous batching: what queued while the model was busy runs
as its next call; a lone request does not wait) so that concurrent requests with the same shape,
dtype and options run as one model call (``pipeline.run_in_groups``: a failing group is retried item
by item, as in the batch job). Batches are sized in pixels (summed H*W*T), not only in requests.
Requests over ``max_batch_pixels`` run alone in a second lane (``serving/admission.py``), so a small
request never waits behind a large one. Model calls and media run in the threads of
:mod:`serving.threads`, each with its own torch thread count. Decoded pixels become media
through ``pipeline.pixels_to_media``, as in the CLI. Library errors come back as
:class:`~serving.jobs.ErrorReply` values, so the ingress maps them to HTTP statuses without
depending on exception pickling.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch
from ray.serve.exceptions import BackPressureError

from serving.admission import Lane, lane_for
from serving.batcher import Batcher
from serving.jobs import DecodeJob, EncodeJob, ErrorReply, ModelTime, Reply
from serving.schemas import LimitsConfig, ModelConfig
from serving.threads import ServingThreads
from tokenizers_svc import abandon
from tokenizers_svc.abandon import WorkToken
from tokenizers_svc.errors import InvalidRequestError, OverloadedError, RequestTimeoutError, TokenizerError
from tokenizers_svc.latents import Latents, validate_for, validate_tensor_for
from tokenizers_svc.limits import Limits
from tokenizers_svc.loading import load_tokenizer, resolved_dtype
from tokenizers_svc.memory import tune_for_model_calls
from tokenizers_svc.pipeline import (
    EncodeOptions,
    MediaInput,
    check_decode_cost,
    check_encode_cost,
    check_output_format,
    encode_media,
    encode_stacked,
    load_media,
    pixels_to_media,
    run_in_groups,
)
from tokenizers_svc.pixels import checked_and_resized, to_uint8_pixels
from tokenizers_svc.tiling import TilingOptions
from tokenizers_svc.tokens import TokenIds
from tokenizers_svc.wire import ID_DTYPES, LATENT_FILE_TYPE, TENSOR_TYPE, tensor_headers, tensor_to_bytes

RECENT_RATES = 8  # model times a replica judges "can this still finish in time" by
# The largest body a request that finds the replica idle is decoded in the model thread for
# (TokenizerWorker._prepare_and_encode): a request arriving meanwhile waits for that decode, which for
# 1 MiB of PNG or JPEG is ~10-20 ms here; a larger body is decoded in a media thread as under load.
IDLE_PATH_MAX_BYTES = 1 << 20
LATE_RETRY_AFTER_S = 1


@dataclass
class _Item:
    """One request waiting in a batch queue; ``key`` says which others it can be stacked with."""

    key: tuple
    tensor: torch.Tensor  # (1, C, [T,] H, W): pixels for encode, raw latents for decode
    size: int  # batch-size units: max(pixels, max_batch_pixels // max_batch_size)
    token: WorkToken
    options: EncodeOptions | None = None
    latents: Latents | None = None  # decode: crop metadata of a latent file
    tiling: TilingOptions | None = None


def _item_key(item: _Item) -> tuple:
    return item.key


def _item_size(item: _Item) -> int:
    return item.size


def _encode_item(media_input: MediaInput, options: EncodeOptions, size: int, token: WorkToken) -> _Item:
    """An encode request's item: stackable with those of the same kind, shape, dtype and options."""
    pixels = media_input.pixels
    key = (media_input.kind, tuple(pixels.shape), pixels.dtype, options)
    return _Item(key=key, tensor=pixels, size=size, token=token, options=options)


def tensor_reply(tensor: torch.Tensor, extra: dict[str, str], batch_size: int) -> Reply:
    return Reply(tensor_to_bytes(tensor), TENSOR_TYPE, {**tensor_headers(tensor), **extra}, batch_size)


def _pixel_count(tensor: torch.Tensor) -> int:
    return math.prod(tensor.shape[2:])


class TokenizerWorker:
    """Ray Serve deployment class; ``build_app`` wraps it with ``serve.deployment`` per model."""

    def __init__(self, config: dict, limits: dict, threads: ServingThreads | None = None) -> None:
        self.config = ModelConfig.model_validate(config)
        self.limits = LimitsConfig.model_validate(limits).work()
        # Two lanes (serving/admission.py): small requests (what batches, up to max_batch_pixels)
        # and large ones, so a small request never waits behind a large one. One large piece of work
        # computes at a time; batches one at a time on all the replica's CPUs, or side by side on
        # one each when they queue (serving/threads.py), and the batch handed over behind them holds
        # only its inputs. The service time the ingress measures per pixel is the time a lane's queue
        # takes to drain.
        # Model calls run with the replica's CPUs as torch threads, media and replies with one
        # (serving/threads.py); an ingress passes the threads its models share. Set up before the
        # model loads, so that loading computes with one thread too.
        self.threads = threads or ServingThreads(int(self.config.num_cpus))
        # small calls handed to the lane at once: as many as run side by side, and the next
        self.small_depth = self.threads.small.width + 1
        self.lanes: dict[Lane, asyncio.Semaphore] = {
            "small": asyncio.Semaphore(self.small_depth),
            "large": asyncio.Semaphore(1),  # each large call gets a thread of its own (serving/threads.py)
        }
        self.recent_rates: dict[Lane, deque[float]] = {  # model seconds per batch unit
            lane: deque(maxlen=RECENT_RATES) for lane in self.lanes
        }
        tune_for_model_calls()  # activations kept for the next call (idle trim: serving/threads.py); images whole
        self.tokenizer = load_tokenizer(
            self.config.source,
            device=self.config.device,
            dtype=getattr(torch, resolved_dtype(self.config.dtype, self.config.device)),
            allow_random_init=self.config.allow_random_init,
        )
        # Media decodes at a time, per lane: one per CPU of the replica and one more that decodes
        # while the model runs. The model is the bottleneck; decoding further ahead only takes its
        # cores (docs/benchmarks.md, "Serving"). Per lane, so a large video's decode never holds a
        # small image's.
        slots = max(1, int(self.config.num_cpus)) + 1
        self.decode_slots: dict[Lane, asyncio.Semaphore] = {
            lane: asyncio.Semaphore(slots) for lane in self.lanes
        }
        self.quantum = max(1, self.config.max_batch_pixels // self.config.max_batch_size)
        batching = (_item_size, self.config.max_batch_pixels, self.config.batch_wait_timeout_s)
        self.encoder = Batcher(
            partial(self._run_batch, run_bucket=self._encode_bucket), *batching, self.small_depth
        )
        self.decoder = Batcher(
            partial(self._run_batch, run_bucket=self._decode_bucket), *batching, self.small_depth
        )

    def describe(self) -> dict:
        info = self.tokenizer.describe()
        info["served_name"] = self.config.name
        info["scaling_constants"] = self.tokenizer.spec.normalization.constants()
        info["max_batch_size"] = self.config.max_batch_size
        info["max_batch_pixels"] = self.config.max_batch_pixels
        return info

    def ready(self) -> bool:
        return True

    # ---- encode ----

    async def encode(self, job: EncodeJob) -> Reply | ErrorReply:
        started = time.perf_counter()
        # media bytes or a bare tensor, made ready (and resized) before the model call
        prepare, source = (load_media, job.data) if job.data is not None else (self._tensor_media, job.tensor)
        try:
            with abandon.scope(WorkToken(job.deadline)) as token:
                with self.encoder.preparing():
                    if self._runs_at_once(job):
                        media_input, media_s, encoded = await self._prepare_and_encode(
                            partial(prepare, source, self.limits, job.options), job.options, token
                        )
                    else:
                        async with self.decode_slots[job.lane]:
                            media_input = await self.threads.media_call(
                                prepare, source, self.limits, job.options
                            )
                        media_s, encoded = time.perf_counter() - started, None
                latents, batch, model_time = encoded or await self._encode_one(
                    media_input, job.options, token
                )
            reply = self._encode_reply(latents, job, batch, model_time)
            return replace(reply, media_s=media_s, replica_s=time.perf_counter() - started)
        except TokenizerError as error:
            return ErrorReply.of(error)

    def _runs_at_once(self, job: EncodeJob) -> bool:
        """Whether the request takes the idle path (:meth:`_prepare_and_encode`): a small one whose
        decode is short, on a replica where nothing else is being prepared, queued or computed."""
        body_bytes = len(job.data) if job.data is not None else job.tensor.nbytes
        return (
            job.lane == "small"
            and body_bytes <= IDLE_PATH_MAX_BYTES
            and self.encoder.quiet()
            and self.threads.small.idle()
        )

    async def _prepare_and_encode(
        self, prepare: Callable[[], MediaInput], options: EncodeOptions, token: WorkToken
    ) -> tuple[MediaInput, float, tuple[Latents, int, ModelTime] | None]:
        """A request that finds the replica idle: its media prepared and encoded in one hand-over to
        the small lane's model thread, not a media thread's round trip through the event loop first
        (a thread waking on a core that had gone idle, ~0.4 ms a request at concurrency 1 here,
        docs/benchmarks.md, "Serving", session 28). (its media, the seconds preparing it took, and
        what ``_encode_one`` returns) -- or None in place of the latter when the request does not run
        alone after all: it is over the batch cap or sampled (``_encode_one`` runs it alone), or
        others reached the replica while it decoded, so that it batches with them as it would have.
        Its lane seconds, and the rate the too-late check reads, include the decode: the lane was
        busy for it."""
        prepared: list[tuple[MediaInput, float]] = []

        def call() -> tuple[Latents | None, int]:
            began = time.perf_counter()
            media_input = prepare()
            prepared.append((media_input, time.perf_counter() - began))
            size = self._batch_units(media_input.pixels, options)
            if self._needs_a_call_of_its_own(options, size) or not self.encoder.quiet():
                return None, 0
            if self._too_late(token, size, "small"):
                raise self._late()
            # as one group of a batch: a model failure comes back typed, abandoned work stops first
            ((latents, _),) = run_in_groups(
                [_encode_item(media_input, options, size, token)], _item_key, self._encode_bucket
            )
            if isinstance(latents, TokenizerError):
                raise latents
            return latents, 0 if token.abandoned else size

        latents, model_time = await self._in_lane("small", call)
        media_input, media_s = prepared[0]
        if latents is None:
            return media_input, media_s, None
        # the call's own time less its decode, as Server-Timing's model part of a batched request
        model_time = ModelTime(model_time.compute_s - media_s, model_time.lane_s)
        return media_input, media_s, (self._stamped(latents, media_input), 1, model_time)

    @staticmethod
    def _tensor_media(tensor: torch.Tensor, limits: Limits, options: EncodeOptions) -> MediaInput:
        """Bare pixel tensor -> MediaInput, as ``load_media`` makes one of media bytes (in a media
        thread, or the model thread on the idle path: hashing and resizing a large tensor would hold
        the event loop): checked, the options' resize applied (float pixels validated first, so that
        none is clamped into range); the hash is of its bytes, so identical inputs match. Without a
        resize the Tokenizer validates it in the model call, where a bad item fails its group alone
        (``run_in_groups``)."""
        if tensor.ndim not in (4, 5) or tensor.shape[0] != 1:
            raise InvalidRequestError(
                f"pixel tensors must be one item, (1, 3, H, W) or (1, 3, T, H, W); got shape {tuple(tensor.shape)}",
                param="shape",
            )
        check_encode_cost(tuple(tensor.shape), options, limits)
        resized = options.resize != "none"
        return MediaInput(
            pixels=checked_and_resized(tensor, options.resize, options.resolution) if resized else tensor,
            kind="image" if tensor.ndim == 4 else "video",
            fps=None,
            sha256=hashlib.sha256(tensor_to_bytes(tensor)).hexdigest(),
            original_size=(int(tensor.shape[-2]), int(tensor.shape[-1])),
        )

    async def _encode_one(
        self, media_input: MediaInput, options: EncodeOptions, token: WorkToken
    ) -> tuple[Latents, int, ModelTime]:
        pixels = media_input.pixels
        size = self._batch_units(pixels, options)
        if self._needs_a_call_of_its_own(options, size):
            latents, model_time = await self._run_alone(
                encode_media, self.tokenizer, media_input, options, token=token, size=size
            )
            return latents, 1, model_time
        result, batch, model_time = await self.encoder.submit(_encode_item(media_input, options, size, token))
        if isinstance(result, TokenizerError):
            raise result
        return self._stamped(result, media_input), batch, model_time

    def _needs_a_call_of_its_own(self, options: EncodeOptions, size: int) -> bool:
        """Whether an encode of ``size`` batch units runs alone, never batched: a sampled one draws
        its own noise (and seed); an oversized one would not fit a batch."""
        return options.sample or size > self.config.max_batch_pixels

    def _batch_units(self, pixels: torch.Tensor, options: EncodeOptions) -> int:
        """Pixels (1, 3, [T,] H, W) as batch units: priced as the ingress priced them (after any
        resize), so that both put the request in the same lane."""
        return max(check_encode_cost(tuple(pixels.shape), options, self.limits).total_pixels, self.quantum)

    @staticmethod
    def _stamped(latents: Latents, media_input: MediaInput) -> Latents:
        """The latents with what only the media knows: its frame rate, source hash and decoded size."""
        return replace(
            latents,
            fps=media_input.fps,
            source_sha256=media_input.sha256,
            resized_from=media_input.resized_from,
        )

    async def _run_alone(self, fn: Callable, *args, token: WorkToken, size: int) -> tuple:
        """``fn(*args)`` in its lane's model thread once the calls before it are done: (result,
        its model time); refused with 503 instead when, by then, it could no longer finish in time."""
        lane = lane_for(size, self.config.max_batch_pixels)

        def checked() -> tuple[object, int]:  # in the model thread, when the call before is done
            if self._too_late(token, size, lane):
                raise self._late()
            result = fn(*args)
            return result, 0 if token.abandoned else size

        return await self._in_lane(lane, checked)

    async def _run_batch(
        self, items: list[_Item], run_bucket: Callable[[list[_Item]], list]
    ) -> list[tuple[object, int, ModelTime]]:
        """A batch (:class:`~serving.batcher.Batcher`), checked in the model thread when the call
        before it is done: items nobody waits for any more are dropped, those that could no longer
        finish in time get 503; the rest run grouped (``run_in_groups``) until every one of them is
        abandoned. Per item: (result or error, size of its model call, its share of the batch's
        model time, by batch units)."""
        gone = RequestTimeoutError("the request was abandoned before its batch ran", param="model")
        refused: dict[int, TokenizerError] = {}  # abandoned, or too late to finish
        live: list[_Item] = []

        def checked() -> tuple[list, int]:
            for item in items:
                if item.token.abandoned:
                    refused[id(item)] = gone
                elif self._too_late(item.token, item.size, "small"):
                    refused[id(item)] = self._late()
                else:
                    live.append(item)
            if not live:
                return [], 0
            with abandon.scope(WorkToken(parts=tuple(item.token for item in live))) as token:
                outcomes = run_in_groups(live, _item_key, run_bucket)
            return outcomes, 0 if token.abandoned else sum(item.size for item in live)

        outcomes, model_time = await self._in_lane("small", checked)  # at most max_batch_pixels
        total = sum(item.size for item in live)
        results = {
            id(item): (result, size, model_time.share(item.size / total))
            for item, (result, size) in zip(live, outcomes, strict=True)
        }
        return [results.get(id(item), (refused.get(id(item)), 1, ModelTime())) for item in items]

    async def _in_lane(self, lane: Lane, call: Callable[[], tuple[object, int]]) -> tuple[object, ModelTime]:
        """``call()`` in the lane's model thread, with this request's context (its abandon scope):
        (its result, its model time: the seconds it ran and its lane seconds). ``call`` returns
        (result, batch units it ran), units 0 when the work was abandoned part way (its time says
        nothing about the rate); the seconds per unit join the lane's recent ones, which say how
        long a call started now would run (:meth:`_too_late`). Small calls are handed over ahead
        (``small_depth``: as many as run side by side, and the next): the next one starts the moment
        a thread is free, not when the event loop, busy with other requests, gets round to it. Large
        calls go one at a time."""
        ran: list[float] = []

        def timed() -> object:
            started = time.perf_counter()
            try:
                result, units = call()
            finally:
                ran.append(time.perf_counter() - started)
            if units:
                self.recent_rates[lane].append(ran[0] / units)
            return result

        async with self.lanes[lane]:
            result, lane_s = await self.threads.model_call(lane, timed)
        return result, ModelTime(ran[0] if ran else 0.0, lane_s)

    def _too_late(self, token: WorkToken, size: int, lane: Lane) -> bool:
        """Whether work of ``size`` units, started now, would end after the request's deadline at
        the lane's slowest recent rate: the replica's own check behind the ingress's admission,
        whose estimate a burst's contention can beat."""
        rates = self.recent_rates[lane]
        if token.deadline is None or not rates:
            return False
        return time.time() + size * max(rates) > token.deadline

    def _late(self) -> OverloadedError:
        return OverloadedError(
            f"{self.config.name} could not start this request in time to finish it; retry after "
            f"{LATE_RETRY_AFTER_S} s",
            param="model",
            retry_after=LATE_RETRY_AFTER_S,
        )

    def _encode_bucket(self, bucket: list[_Item]) -> list[Latents]:
        stacked = torch.cat([item.tensor for item in bucket])  # (B, 3, [T,] H, W)
        return encode_stacked(self.tokenizer, stacked, bucket[0].options)

    def _encode_reply(
        self, latents: Latents | TokenIds, job: EncodeJob, batch: int, model_time: ModelTime
    ) -> Reply:
        if isinstance(latents, TokenIds):  # int32 ids: the token file, or the bare tensor
            if job.output == "tensor":
                headers = {"vocabulary-size": str(latents.vocabulary_size)}
                reply = Reply(
                    tensor_to_bytes(latents.ids, ID_DTYPES),
                    TENSOR_TYPE,
                    {**tensor_headers(latents.ids), **headers},
                    batch,
                )
            else:
                reply = Reply(latents.to_bytes(), LATENT_FILE_TYPE, {"content": "token-ids"}, batch)
            return replace(reply, model_time=model_time)
        if latents.mean is not None and latents.mean.data_ptr() == latents.latents.data_ptr():
            # raw mode latents *are* the posterior mean; safetensors refuses to save shared memory
            latents = replace(latents, mean=latents.mean.clone())
        if job.scaling is not None:
            latents = replace(latents.with_normalized(False), latents=job.scaling.apply(latents.raw()))
        if job.output == "tensor":
            normalized = job.scaling is not None or latents.normalized
            reply = tensor_reply(latents.latents, {"normalized": str(normalized).lower()}, batch)
        else:
            reply = Reply(
                latents.to_bytes(),
                LATENT_FILE_TYPE,
                {"normalized": str(latents.normalized).lower()},
                batch,
            )
        return replace(reply, model_time=model_time)

    # ---- decode ----

    async def decode(self, job: DecodeJob) -> Reply | ErrorReply:
        started = time.perf_counter()
        try:
            if job.tokens is not None:  # ids -> the latents they stand for, with their crop metadata
                job.latents = self.tokenizer.latents_from_tokens(job.tokens)
            spec = self.tokenizer.spec
            cost = check_decode_cost(
                self._latent_shape(job), spec.spatial_compression, spec.frame_rule, self.limits
            )
            with abandon.scope(WorkToken(job.deadline)) as token:
                raw, latents = self._raw_latents(job)
                if job.format is not None:
                    self._check_media_output(raw, latents, job.format)
                pixels, batch, model_time = await self._decode_one(
                    raw, latents, job.options.tiling, token, cost.total_pixels
                )
                written = time.perf_counter()
                reply = await self.threads.media_call(self._decode_reply, pixels, latents, job, batch)
            done = time.perf_counter()
            return replace(reply, model_time=model_time, media_s=done - written, replica_s=done - started)
        except TokenizerError as error:
            return ErrorReply.of(error)

    @staticmethod
    def _latent_shape(job: DecodeJob) -> tuple[int, ...]:
        return tuple((job.latents.latents if job.latents is not None else job.tensor).shape)

    def _raw_latents(self, job: DecodeJob) -> tuple[torch.Tensor, Latents | None]:
        """Raw latents (N, C, [t,] h, w) float, plus the file's metadata when there is one."""
        spec = self.tokenizer.spec
        if job.latents is not None:
            validate_for(job.latents, spec, weights_hash=self.tokenizer.weights_hash)
            return job.latents.raw(), job.latents
        tensor = job.tensor
        validate_tensor_for(tensor, spec)
        if job.scaling is not None:
            return job.scaling.invert(tensor), None
        return (spec.normalization.invert(tensor) if job.normalized else tensor), None

    def _check_media_output(self, raw: torch.Tensor, latents: Latents | None, format: str) -> None:
        """Before decoding: media output holds one item of a kind the format can write."""
        is_video = raw.ndim == 5
        frames = latents.original_frames if latents is not None else (raw.shape[2] if is_video else None)
        check_output_format(format, is_video=is_video, frames=frames)
        if raw.shape[0] != 1:
            raise InvalidRequestError(
                f"{format} output holds one item, got a batch of {raw.shape[0]}; request a tensor "
                "(Accept: tensor/binary) or send one item",
                param="format",
            )

    async def _decode_one(
        self,
        raw: torch.Tensor,
        latents: Latents | None,
        tiling: TilingOptions | None,
        token: WorkToken,
        pixels_out: int,
    ) -> tuple[torch.Tensor, int, ModelTime]:
        """``pixels_out``: what the decode writes (``limits.decode_cost``), its size in batch units."""
        crop = None if latents is None else (latents.original_size, latents.original_frames, latents.padding)
        size = max(pixels_out, self.quantum)
        if raw.shape[0] > 1 or tiling is not None or size > self.config.max_batch_pixels:
            pixels, model_time = await self._run_alone(
                self._decode_direct, raw, latents, tiling, token=token, size=size
            )
            return pixels, 1, model_time
        key = (tuple(raw.shape), raw.dtype, crop)
        item = _Item(key=key, tensor=raw, size=size, token=token, latents=latents)
        result, batch, model_time = await self.decoder.submit(item)
        if isinstance(result, TokenizerError):
            raise result
        return result, batch, model_time

    def _decode_direct(
        self, raw: torch.Tensor, latents: Latents | None, tiling: TilingOptions | None
    ) -> torch.Tensor:
        if latents is not None:
            return self.tokenizer.decode(replace(latents, latents=raw, normalized=False), tiling=tiling)
        return self.tokenizer.decode(raw, normalized=False, tiling=tiling)

    def _decode_bucket(self, bucket: list[_Item]) -> list[torch.Tensor]:
        stacked = torch.cat([item.tensor for item in bucket])  # (B, C, [t,] h, w) raw
        pixels = self._decode_direct(stacked, bucket[0].latents, None)  # (B, 3, [T,] H, W) float [-1, 1]
        return [pixels[i : i + 1] for i in range(len(bucket))]

    def _decode_reply(
        self, pixels: torch.Tensor, latents: Latents | None, job: DecodeJob, batch: int
    ) -> Reply:
        """pixels: (N, 3, [T,] H, W) float [-1, 1], cropped when the latent file says how."""
        if job.format is not None:
            fps = job.options.fps or (latents.fps if latents is not None else None)
            body, media_type = pixels_to_media(pixels, job.format, fps, job.options.quality)
            return Reply(body, media_type, {}, batch)
        out = job.tensor_output
        if out.range == "uint8":
            tensor = to_uint8_pixels(pixels)
        elif out.range == "unit":
            tensor = ((pixels + 1) / 2).clamp(0, 1).to(getattr(torch, out.dtype))
        else:
            tensor = pixels.to(getattr(torch, out.dtype))
        if out.channels_last:
            tensor = tensor.movedim(1, -1).contiguous()
        return tensor_reply(tensor, {}, batch)


class InProcessModel:
    """A model served inside the ingress's own process (``ModelConfig.in_ingress``): called like a
    deployment handle (``model.encode.remote(job)`` -> an awaitable the caller may cancel), without
    the actor hop and without a process of its own. As behind Serve's handle, at most
    ``max_ongoing_requests + max_queued_requests`` requests are in; more are refused with
    BackPressureError (503 at the ingress)."""

    def __init__(self, config: dict, limits: dict, threads: ServingThreads) -> None:
        self.worker = TokenizerWorker(config, limits, threads)
        self.capacity = self.worker.config.ongoing + self.worker.config.max_queued_requests
        self.in_flight = 0

    def __getattr__(self, method: str) -> _InProcessMethod:
        return _InProcessMethod(self, getattr(self.worker, method))


@dataclass
class _InProcessMethod:
    model: InProcessModel
    fn: Callable

    def remote(self, *args) -> asyncio.Future:
        if self.model.in_flight >= self.model.capacity:
            refused = asyncio.get_running_loop().create_future()
            refused.set_exception(BackPressureError(self.model.in_flight, self.model.capacity))
            return refused
        self.model.in_flight += 1
        return asyncio.ensure_future(self._call(*args))

    async def _call(self, *args):
        try:
            result = self.fn(*args)
            return await result if asyncio.iscoroutine(result) else result
        finally:
            self.model.in_flight -= 1
