"""The tokenizer deployment: one model per replica, dynamic batching of stackable requests.

The ingress sends an :class:`EncodeJob` or :class:`DecodeJob`; the replica decodes media with the
shared runner (``tokenizers_svc.pipeline``), then waits briefly in a ``@serve.batch`` queue so that
concurrent requests with the same shape, dtype and options run as one model call. Batches are sized
in pixels (summed H*W*T), not only in requests. Library errors come back as :class:`ErrorReply`
values, so the ingress maps them to HTTP statuses without depending on exception pickling.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from ray import serve

from serving.schemas import LimitsConfig, ModelConfig
from tokenizers_svc import media
from tokenizers_svc.errors import InvalidRequestError, LimitExceededError, TokenizerError
from tokenizers_svc.latents import Latents, validate_for, validate_tensor_for
from tokenizers_svc.loading import load_tokenizer
from tokenizers_svc.pipeline import EncodeOptions, MediaInput, encode_media, load_media, output_media_type
from tokenizers_svc.tiling import TilingOptions

# Diffusers remote-VAE protocol: normalized = (raw - shift) * scale, instead of the model's own.
Scaling = tuple[float, float]


@dataclass
class EncodeJob:
    """``data``: image/video file bytes, or ``tensor``: pixels (N, 3, H, W) / (N, 3, T, H, W),
    uint8 [0, 255] or float [-1, 1]. ``output``: the latent file, or the bare latent tensor."""

    options: EncodeOptions
    data: bytes | None = None
    tensor: torch.Tensor | None = None
    output: Literal["file", "tensor"] = "file"
    scaling: Scaling | None = None


@dataclass(frozen=True)
class TensorOutput:
    """How decoded pixels are returned as a bare tensor.

    ``range``: "signed" float [-1, 1], "unit" float [0, 1], or "uint8" [0, 255];
    ``channels_last``: (N, H, W, C) / (N, T, H, W, C) instead of channels-first.
    """

    dtype: str = "float32"
    range: Literal["signed", "unit", "uint8"] = "signed"
    channels_last: bool = False


@dataclass
class DecodeJob:
    """``latents`` (from a latent file, metadata included) or a bare ``tensor`` (N, C, h, w) /
    (N, C, t, h, w) float, normalized by the model's constants (``normalized``) or by ``scaling``.
    ``format``: png | jpeg | webp | mp4 for media, or None with ``tensor_output`` for a tensor."""

    latents: Latents | None = None
    tensor: torch.Tensor | None = None
    normalized: bool = True
    scaling: Scaling | None = None
    format: str | None = "png"
    tensor_output: TensorOutput = field(default_factory=TensorOutput)
    fps: float | None = None
    tiling: TilingOptions | None = None
    quality: int = 95


@dataclass
class Reply:
    body: bytes
    media_type: str
    headers: dict[str, str]
    batch_size: int


@dataclass
class ErrorReply:
    error: dict
    status: int


@dataclass
class _Item:
    """One request waiting in a batch queue; ``key`` says which others it can be stacked with."""

    key: tuple
    tensor: torch.Tensor  # (1, C, [T,] H, W): pixels for encode, raw latents for decode
    size: int  # batch-size units: max(pixels, max_batch_pixels // max_batch_size)
    options: EncodeOptions | None = None
    latents: Latents | None = None  # decode: crop metadata of a latent file
    tiling: TilingOptions | None = None


def _batch_units(items: list[_Item]) -> int:
    return sum(item.size for item in items)


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    """Little-endian C-order bytes of any dtype (bfloat16 via a same-width integer view)."""
    flat = tensor.detach().contiguous().cpu()
    if flat.dtype == torch.bfloat16:
        flat = flat.view(torch.int16)
    return flat.numpy().tobytes()


def tensor_reply(tensor: torch.Tensor, extra: dict[str, str], batch_size: int) -> Reply:
    headers = {
        "shape": json.dumps(list(tensor.shape)),
        "dtype": str(tensor.dtype).removeprefix("torch."),
        **extra,
    }
    return Reply(_tensor_bytes(tensor), "tensor/binary", headers, batch_size)


def _pixel_count(tensor: torch.Tensor) -> int:
    return math.prod(tensor.shape[2:])


class TokenizerWorker:
    """Ray Serve deployment class; ``build_app`` wraps it with ``serve.deployment`` per model."""

    def __init__(self, config: dict, limits: dict) -> None:
        self.config = ModelConfig.model_validate(config)
        self.limits = LimitsConfig.model_validate(limits)
        torch.set_num_threads(max(1, int(self.config.num_cpus)))
        self.tokenizer = load_tokenizer(
            self.config.source,
            device=self.config.device,
            dtype=getattr(torch, self.config.dtype),
            allow_random_init=self.config.allow_random_init,
        )
        self.quantum = max(1, self.config.max_batch_pixels // self.config.max_batch_size)
        for batched in (self._encode_batched, self._decode_batched):
            batched.set_max_batch_size(self.config.max_batch_pixels)
            batched.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)

    def describe(self) -> dict:
        info = self.tokenizer.describe()
        info["served_name"] = self.config.name
        info["max_batch_size"] = self.config.max_batch_size
        info["max_batch_pixels"] = self.config.max_batch_pixels
        return info

    def ready(self) -> bool:
        return True

    # ---- encode ----

    async def encode(self, job: EncodeJob) -> Reply | ErrorReply:
        try:
            if job.data is not None:
                media_input = await asyncio.to_thread(load_media, job.data, self.limits.media(), job.options)
            else:
                media_input = self._tensor_media(job.tensor)
            latents, batch = await self._encode_one(media_input, job.options)
            return self._encode_reply(latents, job, batch)
        except TokenizerError as error:
            return ErrorReply(error.to_dict(), error.http_status)

    def _tensor_media(self, tensor: torch.Tensor) -> MediaInput:
        """Bare pixel tensor -> MediaInput; the hash is of its bytes, so identical inputs match."""
        if tensor.ndim not in (4, 5) or tensor.shape[0] != 1:
            raise InvalidRequestError(
                f"pixel tensors must be one item, (1, 3, H, W) or (1, 3, T, H, W); got shape {tuple(tensor.shape)}",
                param="shape",
            )
        return MediaInput(
            pixels=tensor,
            kind="image" if tensor.ndim == 4 else "video",
            fps=None,
            sha256=hashlib.sha256(_tensor_bytes(tensor)).hexdigest(),
            original_size=(int(tensor.shape[-2]), int(tensor.shape[-1])),
        )

    async def _encode_one(self, media_input: MediaInput, options: EncodeOptions) -> tuple[Latents, int]:
        pixels = media_input.pixels
        size = max(_pixel_count(pixels), self.quantum)
        # Sampled encodes draw per-request noise (and seeds); oversized ones would not fit a batch.
        if options.sample or size > self.config.max_batch_pixels:
            latents = await asyncio.to_thread(encode_media, self.tokenizer, media_input, options)
            return latents, 1
        key = (media_input.kind, tuple(pixels.shape), pixels.dtype, options)
        result, batch = await self._encode_batched(_Item(key=key, tensor=pixels, size=size, options=options))
        if isinstance(result, TokenizerError):
            raise result
        return replace(result, fps=media_input.fps, source_sha256=media_input.sha256), batch

    @serve.batch(max_batch_size=1, batch_size_fn=_batch_units)
    async def _encode_batched(self, items: list[_Item]) -> list[tuple[Latents | TokenizerError, int]]:
        return await asyncio.to_thread(self._run_buckets, items, self._encode_bucket)

    def _encode_bucket(self, bucket: list[_Item]) -> list[Latents]:
        first = bucket[0]
        stacked = torch.cat([item.tensor for item in bucket])  # (B, 3, [T,] H, W)
        kind = first.key[0]
        batch = MediaInput(stacked, kind, None, "", (int(stacked.shape[-2]), int(stacked.shape[-1])))
        latents = encode_media(self.tokenizer, batch, first.options)
        return [latents.select(i) for i in range(len(bucket))]

    @staticmethod
    def _run_buckets(items: list[_Item], run) -> list[tuple[object, int]]:
        """Group by key and run each group as one call. When a group fails, its items are retried
        one by one, so one bad request (e.g. NaN pixels) cannot fail the requests batched with it."""
        buckets: dict[tuple, list[int]] = {}
        for index, item in enumerate(items):
            buckets.setdefault(item.key, []).append(index)
        results: list[tuple[object, int]] = [(None, 0)] * len(items)
        for indices in buckets.values():
            try:
                outputs = run([items[i] for i in indices])
                sizes = [len(indices)] * len(indices)
            except TokenizerError as error:
                if len(indices) == 1:
                    outputs, sizes = [error], [1]
                else:
                    outputs, sizes = [], [1] * len(indices)
                    for i in indices:
                        try:
                            outputs += run([items[i]])
                        except TokenizerError as item_error:
                            outputs.append(item_error)
            for i, output, size in zip(indices, outputs, sizes, strict=True):
                results[i] = (output, size)
        return results

    def _encode_reply(self, latents: Latents, job: EncodeJob, batch: int) -> Reply:
        if latents.mean is not None and latents.mean.data_ptr() == latents.latents.data_ptr():
            # raw mode latents *are* the posterior mean; safetensors refuses to save shared memory
            latents = replace(latents, mean=latents.mean.clone())
        if job.scaling is not None:
            scale, shift = job.scaling
            latents = replace(latents.with_normalized(False), latents=(latents.raw() - shift) * scale)
        if job.output == "tensor":
            normalized = job.scaling is not None or latents.normalized
            return tensor_reply(latents.latents, {"normalized": str(normalized).lower()}, batch)
        return Reply(
            latents.to_bytes(),
            "application/x-safetensors",
            {"normalized": str(latents.normalized).lower()},
            batch,
        )

    # ---- decode ----

    async def decode(self, job: DecodeJob) -> Reply | ErrorReply:
        try:
            raw, latents = self._raw_latents(job)
            n_elements = raw.numel()
            if n_elements > self.limits.max_latent_elements:
                raise LimitExceededError(
                    f"latents must have at most {self.limits.max_latent_elements} elements, got {n_elements}",
                    param="latents",
                )
            if job.format is not None:
                self._check_format(raw, latents, job.format)
            pixels, batch = await self._decode_one(raw, latents, job.tiling)
            return await asyncio.to_thread(self._decode_reply, pixels, latents, job, batch)
        except TokenizerError as error:
            return ErrorReply(error.to_dict(), error.http_status)

    def _raw_latents(self, job: DecodeJob) -> tuple[torch.Tensor, Latents | None]:
        """Raw latents (N, C, [t,] h, w) float, plus the file's metadata when there is one."""
        spec = self.tokenizer.spec
        if job.latents is not None:
            validate_for(job.latents, spec, weights_hash=self.tokenizer.weights_hash)
            return job.latents.raw(), job.latents
        tensor = job.tensor
        validate_tensor_for(tensor, spec)
        if job.scaling is not None:
            scale, shift = job.scaling
            return (tensor.float() / scale + shift).to(tensor.dtype), None
        return (spec.normalization.invert(tensor) if job.normalized else tensor), None

    def _check_format(self, raw: torch.Tensor, latents: Latents | None, format: str) -> None:
        media_type = output_media_type(format)
        is_video = raw.ndim == 5
        frames = latents.original_frames if latents is not None else None
        if media_type == "video/mp4" and not is_video:
            raise InvalidRequestError(
                "these latents hold an image (NCHW); expected an image format (png, jpeg, webp), got mp4",
                param="format",
            )
        if media_type != "video/mp4" and is_video and raw.shape[2] != 1 and frames != 1:
            raise InvalidRequestError(
                f"these latents hold a video ({raw.shape[2]} latent frames); expected format mp4, got {format!r}",
                param="format",
            )

    async def _decode_one(
        self, raw: torch.Tensor, latents: Latents | None, tiling: TilingOptions | None
    ) -> tuple[torch.Tensor, int]:
        crop = None if latents is None else (latents.original_size, latents.original_frames, latents.padding)
        if raw.shape[0] > 1 or tiling is not None:
            return await asyncio.to_thread(self._decode_direct, raw, latents, tiling), 1
        spec = self.tokenizer.spec
        pixel_size = (
            _pixel_count(raw)
            * spec.spatial_compression**2
            * (spec.temporal_compression if raw.ndim == 5 else 1)
        )
        size = max(pixel_size, self.quantum)
        if size > self.config.max_batch_pixels:
            return await asyncio.to_thread(self._decode_direct, raw, latents, tiling), 1
        key = (tuple(raw.shape), raw.dtype, crop)
        result, batch = await self._decode_batched(_Item(key=key, tensor=raw, size=size, latents=latents))
        if isinstance(result, TokenizerError):
            raise result
        return result, batch

    def _decode_direct(
        self, raw: torch.Tensor, latents: Latents | None, tiling: TilingOptions | None
    ) -> torch.Tensor:
        if latents is not None:
            return self.tokenizer.decode(replace(latents, latents=raw, normalized=False), tiling=tiling)
        return self.tokenizer.decode(raw, normalized=False, tiling=tiling)

    @serve.batch(max_batch_size=1, batch_size_fn=_batch_units)
    async def _decode_batched(self, items: list[_Item]) -> list[tuple[torch.Tensor | TokenizerError, int]]:
        return await asyncio.to_thread(self._run_buckets, items, self._decode_bucket)

    def _decode_bucket(self, bucket: list[_Item]) -> list[torch.Tensor]:
        stacked = torch.cat([item.tensor for item in bucket])  # (B, C, [t,] h, w) raw
        pixels = self._decode_direct(stacked, bucket[0].latents, None)  # (B, 3, [T,] H, W) float [-1, 1]
        return [pixels[i : i + 1] for i in range(len(bucket))]

    def _decode_reply(
        self, pixels: torch.Tensor, latents: Latents | None, job: DecodeJob, batch: int
    ) -> Reply:
        """pixels: (N, 3, [T,] H, W) float [-1, 1], cropped when the latent file says how."""
        if job.format is None:
            out = job.tensor_output
            if out.range == "uint8":
                tensor = ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
            elif out.range == "unit":
                tensor = ((pixels + 1) / 2).clamp(0, 1).to(getattr(torch, out.dtype))
            else:
                tensor = pixels.to(getattr(torch, out.dtype))
            if out.channels_last:
                tensor = tensor.movedim(1, -1).contiguous()
            return tensor_reply(tensor, {}, batch)
        media_type = output_media_type(job.format)
        if pixels.shape[0] != 1:
            raise InvalidRequestError(
                f"{job.format} output holds one item, got a batch of {pixels.shape[0]}; request a tensor "
                "(Accept: tensor/binary) or send one item",
                param="format",
            )
        if media_type == "video/mp4":
            fps = job.fps or (latents.fps if latents is not None else None)
            if fps is None:
                raise InvalidRequestError(
                    "these video latents record no fps; pass fps to write an mp4", param="fps"
                )
            return Reply(media.encode_video(media.tensor_to_video(pixels), fps), media_type, {}, batch)
        if pixels.ndim == 5:
            pixels = pixels[:, :, 0]
        image = media.encode_image(
            media.tensor_to_image(pixels), job.format.replace("jpg", "jpeg"), job.quality
        )
        return Reply(image, media_type, {}, batch)
