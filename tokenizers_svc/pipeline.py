"""The runner every entry point shares: media bytes -> Latents and Latents -> media bytes.

The CLI, the HTTP server and the Ray Data batch job differ only in where bytes come from and go
to; they all call :func:`load_media`, :func:`encode_media` and :func:`decode_to_media` (or its two
halves, :func:`check_output_format` and :func:`pixels_to_media`, when the server batches the decode
in between), and run groups of items through :func:`run_in_groups`, so limits, hashing, fps
bookkeeping, format checks and per-item error isolation behave the same everywhere.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch

from tokenizers_svc import media
from tokenizers_svc.abandon import checkpoint
from tokenizers_svc.errors import InvalidRequestError, ModelError, TokenizerError
from tokenizers_svc.formats import VIDEO_MEDIA_TYPE, check_fps, output_media_type
from tokenizers_svc.latents import Latents
from tokenizers_svc.limits import Cost, Limits, check_cost, decode_cost, encode_cost
from tokenizers_svc.media import MediaKind
from tokenizers_svc.options import MAX_SEED, ResizePolicy
from tokenizers_svc.pixels import check_resize, resized_size
from tokenizers_svc.tiling import ChunkCallback, TilingOptions, tiling_options
from tokenizers_svc.tokens import TokenIds

if TYPE_CHECKING:
    from tokenizers_svc.api import Tokenizer
    from tokenizers_svc.spec import FrameRule, TokenizerSpec

OutputFormat = Literal["png", "jpeg", "webp", "mp4"]
Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True)
class EncodeOptions:
    """How to turn media into latents; the same fields are CLI flags, HTTP query parameters and
    job options, described once in ``tokenizers_svc.options`` (their defaults are these).

    ``max_frames``/``start``/``end``/``stride`` select video frames (see ``media.decode_video``);
    ``seed`` makes ``sample=True`` reproducible.
    """

    normalize: bool = True
    sample: bool = False
    return_posterior: bool = False
    resize: ResizePolicy = "none"
    resolution: int | None = None
    tiling: TilingOptions | None = None
    max_frames: int | None = None
    start: float | None = None
    end: float | None = None
    stride: int = 1
    seed: int | None = None
    tokens: bool = False  # int32 token ids (TokenIds) instead of latents: quantized tokenizers only

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> EncodeOptions:
        """The one place options are built from user-facing flags (HTTP query, job arguments, CLI):
        the option fields by name, plus ``tiling``/``tile_size``/``tile_overlap``/``chunk_frames``
        folded into TilingOptions. Names that are absent or None keep the defaults above."""
        given = {
            f.name: flags[f.name] for f in fields(cls) if f.name != "tiling" and flags.get(f.name) is not None
        }
        tiling = tiling_options(
            flags.get("tiling"), flags.get("tile_size"), flags.get("tile_overlap"), flags.get("chunk_frames")
        )
        return cls(**given, tiling=tiling)

    def __post_init__(self) -> None:
        check_resize(self.resize, self.resolution)  # before any work, wherever the options come from
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed <= MAX_SEED):
            raise InvalidRequestError(
                f"seed must be an integer in [0, {MAX_SEED}], got {self.seed}", param="seed"
            )
        if self.seed is not None and not self.sample:  # it was ignored: the mode is not drawn
            raise InvalidRequestError(
                f"seed={self.seed} only applies with sample=true (without it the latents are the "
                "posterior's mode, which no seed changes)",
                param="seed",
            )


@dataclass(frozen=True)
class DecodeOptions:
    """How to turn latents into media; the same fields are CLI flags and HTTP query parameters."""

    fps: float | None = None  # mp4 frame rate; None: the fps recorded at encode time
    quality: int = 95  # JPEG/WebP quality: visually lossless at about a tenth of PNG's size
    tiling: TilingOptions | None = None

    def __post_init__(self) -> None:
        if self.fps is not None:
            check_fps(self.fps)


@dataclass
class MediaInput:
    """Decoded media ready for ``Tokenizer.encode``.

    ``pixels``: uint8 [0, 255], (1, 3, H, W) for an image or (1, 3, T, H, W) for a video, after the
    options' resize when :func:`load_media` made it.
    ``sha256``: hex digest of the source bytes (recorded in the latents as ``source_sha256``).
    ``original_size``: (H, W) as decoded (after EXIF orientation), before any resize.
    """

    pixels: torch.Tensor
    kind: MediaKind
    fps: float | None
    sha256: str
    original_size: tuple[int, int]

    @property
    def num_frames(self) -> int | None:
        return int(self.pixels.shape[2]) if self.kind == "video" else None

    @property
    def resized_from(self) -> tuple[int, int] | None:
        """The decoded (H, W) when the pixels were resized since, else None (the latents' field)."""
        size = (int(self.pixels.shape[-2]), int(self.pixels.shape[-1]))
        return None if size == tuple(self.original_size) else tuple(self.original_size)


def load_media(
    data: bytes,
    limits: Limits = Limits(),
    options: EncodeOptions = EncodeOptions(),
    *,
    kind: MediaKind | None = None,
    sha256: str | None = None,
) -> MediaInput:
    """Image or video bytes -> :class:`MediaInput`, under ``limits`` (the decoder's caps while it
    reads, then :func:`check_encode_cost` for the options' resize), with the options' resize applied
    in uint8 (``pixels.resize_model_input``; an image's straight from the decoder's memory,
    ``media.decode_image_tensor``). ``kind`` (from magic bytes) and ``sha256`` are computed here
    unless the caller already did (each once per input).

    Why resize here and not in the model call: whoever decodes, resizes, beside the model rather
    than in its thread (the server's media threads, the batch job's decode tasks), and what waits
    for the model, or travels to it, is the resized pixels, not the photo at full size. Requests
    and rows of any source size that resize to one shape stack into one model call."""
    kind = kind or media.sniff_media(data)
    digest = sha256 or hashlib.sha256(data).hexdigest()
    decoded: list[tuple[int, int]] = []  # the upright (H, W), as the decoder reports it

    def resize_to(height: int, width: int) -> tuple[int, int]:  # refused before it is made
        decoded.append((height, width))
        check_encode_cost((1, 3, height, width), options, limits)
        return resized_size(height, width, options.resize, options.resolution)

    if kind == "image":
        pixels = media.decode_image_tensor(data, limits, resize_to=resize_to)  # (1, 3, H', W') uint8
        return MediaInput(pixels=pixels, kind="image", fps=None, sha256=digest, original_size=decoded[0])
    video = media.decode_video_tensor(
        data,
        limits,
        max_frames=options.max_frames,
        start=options.start,
        end=options.end,
        stride=options.stride,
        resize_to=resize_to,
    )
    check_encode_cost(video.pixels.shape, options, limits)  # every frame: the clip's pixels in all
    return MediaInput(
        pixels=video.pixels,  # (1, 3, T, H', W') uint8
        kind="video",
        fps=video.fps,
        sha256=digest,
        original_size=decoded[0],
    )


def check_encode_cost(pixel_shape: tuple[int, ...], options: EncodeOptions, limits: Limits) -> Cost:
    """The cost of encoding pixels (N, C, [T,] H, W) after the options' resize; refused
    (LimitExceededError naming the number; ``param`` names the resolution when the resize is why)
    when it is over ``limits``."""
    *_, height, width = pixel_shape
    frames = pixel_shape[2] if len(pixel_shape) == 5 else None
    cost = encode_cost(height, width, frames)
    check_cost(cost, limits, what="the input", param="file")
    if options.resize != "none":
        cost = encode_cost(height, width, frames, options.resize, options.resolution)
        check_cost(cost, limits, what=f"resize={options.resize} to {options.resolution}", param="resolution")
    return cost


def encode_media(
    tokenizer: Tokenizer,
    media_input: MediaInput,
    options: EncodeOptions = EncodeOptions(),
    on_chunk: ChunkCallback | None = None,
) -> Latents | TokenIds:
    """:class:`MediaInput` -> :class:`Latents` (or :class:`TokenIds` with ``options.tokens``,
    quantized tokenizers only) with fps and the source hash recorded.

    An image-only tokenizer refuses videos (InvalidRequestError); video tokenizers take images as
    one-frame clips. ``on_chunk(done, total)`` follows the temporal chunks of a long clip.
    """
    check_media_kind(tokenizer.spec.name, tokenizer.spec.modality, media_input.kind, media_input.num_frames)
    generator = None
    if options.sample and options.seed is not None:
        generator = torch.Generator().manual_seed(options.seed)
    encoded = tokenizer.encode(
        media_input.pixels,
        normalize=options.normalize,
        sample=options.sample,
        return_posterior=options.return_posterior,
        resize=options.resize,
        resolution=options.resolution,
        tiling=options.tiling,
        generator=generator,
        fps=media_input.fps,
        source_sha256=media_input.sha256,
        on_chunk=on_chunk,
        tokens=options.tokens,
    )
    if media_input.resized_from is not None:  # load_media resized it; the Tokenizer saw no resize
        encoded = replace(encoded, resized_from=media_input.resized_from)
    return encoded


def check_media_kind(model: str, modality: str, kind: MediaKind, frames: int | None = None) -> None:
    """Refuse (InvalidRequestError, 422) a video for an image-only model; video models take an
    image as a one-frame clip. The server checks this before admission and queueing, from the
    body's magic bytes, so such a request is never told to retry."""
    if kind == "video" and modality == "image":
        got = f"a video of {frames} frames" if frames is not None else "a video"
        raise InvalidRequestError(
            f"{model} encodes images only; got {got} (use a video or 'both' tokenizer)", param="model"
        )


def encode_stacked(
    tokenizer: Tokenizer, pixels: torch.Tensor, options: EncodeOptions
) -> list[Latents | TokenIds]:
    """Same-shape items stacked as (B, 3, H, W) or (B, 3, T, H, W) -> one :class:`Latents` each, from
    one model call (the server's and the batch job's batching). Callers record fps and hashes."""
    kind = "video" if pixels.ndim == 5 else "image"
    batch = MediaInput(pixels, kind, None, "", (int(pixels.shape[-2]), int(pixels.shape[-1])))
    latents = encode_media(tokenizer, batch, options)
    return [latents.select(i) for i in range(pixels.shape[0])]


def check_output_format(format: str, *, is_video: bool, frames: int | None) -> str:
    """The media type ``format`` writes, if it fits latents of this layout: image latents (NCHW)
    write images; video latents (NCTHW) write mp4, or an image when the clip holds one frame
    (``frames``: the original frame count, or the latent frames of a bare tensor)."""
    media_type = output_media_type(format)
    if media_type == VIDEO_MEDIA_TYPE and not is_video:
        raise InvalidRequestError(
            "these latents hold an image (NCHW); expected an image output format (png, jpeg, webp), got mp4",
            param="format",
        )
    if media_type != VIDEO_MEDIA_TYPE and is_video and frames != 1:
        raise InvalidRequestError(
            f"these latents hold a video ({frames if frames is not None else 'unknown'} frames); expected "
            f"output format mp4, got {format!r}",
            param="format",
        )
    return media_type


def pixels_to_media(
    pixels: torch.Tensor, format: str, fps: float | None, quality: int = DecodeOptions.quality
) -> tuple[bytes, str]:
    """One item of decoded pixels, (1, 3, H, W) or (1, 3, T, H, W), uint8 or float [-1, 1] ->
    (encoded bytes, media type). mp4 needs ``fps``; an image format writes a clip's first frame."""
    media_type = output_media_type(format)
    if media_type == VIDEO_MEDIA_TYPE:
        if fps is None:
            raise InvalidRequestError(
                "these video latents record no fps; pass fps to write an mp4", param="fps"
            )
        return media.encode_video(media.tensor_to_video(pixels), fps), media_type
    if pixels.ndim == 5:
        pixels = pixels[:, :, 0]
    return media.encode_image(media.tensor_to_image(pixels), format, quality=quality), media_type


def encoded_latent_shape(encoded: Latents | TokenIds, spec: TokenizerSpec) -> tuple[int, ...]:
    """The latent shape (N, c, [t,] h, w) that latents or token ids decode from (what decode costs)."""
    if isinstance(encoded, TokenIds):
        return (int(encoded.ids.shape[0]), spec.latent_channels, *map(int, encoded.ids.shape[1:]))
    return tuple(encoded.latents.shape)


def decode_to_media(
    tokenizer: Tokenizer,
    latents: Latents | TokenIds,
    format: OutputFormat = "png",
    fps: float | None = None,
    *,
    tiling: TilingOptions | None = None,
    quality: int = DecodeOptions.quality,
    limits: Limits = Limits(),
    on_chunk: ChunkCallback | None = None,
) -> tuple[bytes, str]:
    """One item of :class:`Latents` or :class:`TokenIds` -> (encoded bytes, media type), cropped to
    the original size.

    Image latents (NCHW) decode to PNG/JPEG/WebP; video latents (NCTHW) to MP4 at ``fps`` (default:
    the fps recorded at encode time). A video latent holding a single frame may also be written as
    an image; anything else across kinds is an InvalidRequestError. Decodes over ``limits`` are
    refused before the model runs (:func:`check_decode_cost`).
    """
    spec = tokenizer.spec
    shape = encoded_latent_shape(latents, spec)
    check_decode_cost(shape, spec.spatial_compression, spec.frame_rule, limits)
    n = shape[0]
    output_media_type(format)
    if n != 1:
        raise InvalidRequestError(
            f"decode_to_media writes one item, got a batch of {n}; pick one with Latents.select(i)",
            param="latents",
        )
    check_output_format(format, is_video=len(shape) == 5, frames=latents.original_frames)
    pixels = tokenizer.decode(latents, tiling=tiling, output_dtype=torch.uint8, on_chunk=on_chunk)
    return pixels_to_media(pixels, format, fps if fps is not None else latents.fps, quality)


def check_decode_cost(
    latent_shape: tuple[int, ...], spatial_compression: int, frame_rule: FrameRule, limits: Limits
) -> Cost:
    """The cost of decoding latents of ``latent_shape`` with a model of this compression; refused
    (LimitExceededError) when it writes more pixels, or reads more elements, than ``limits``."""
    cost = decode_cost(latent_shape, spatial_compression, frame_rule)
    check_cost(cost, limits, what=f"decoding latents of shape {list(latent_shape)}", param="latents")
    return cost


def run_in_groups(
    items: list[Item], key: Callable[[Item], Hashable], run: Callable[[list[Item]], list[Result]]
) -> list[tuple[Result | TokenizerError, int]]:
    """Run items that share a ``key`` as one call (``run``: a group -> one result per item).

    When a group's call fails, its items are retried one by one, so one bad item (NaN pixels, an
    image too small for a normalization layer) fails alone and its neighbours still succeed. Any
    exception counts: a TokenizerError is kept, anything else becomes a ModelError with the
    exception's kind and message, so one input never stops a batch job or a server's batch.
    Returns, per item in order, its result or error and the size of the call that produced it.
    """
    groups: dict[Hashable, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(key(item), []).append(index)
    results: list[tuple[Result | TokenizerError, int]] = [None] * len(items)  # type: ignore[list-item]
    for indices in groups.values():
        outputs = _run_guarded([items[i] for i in indices], run)
        if not isinstance(outputs, TokenizerError):
            for i, output in zip(indices, outputs, strict=True):
                results[i] = (output, len(indices))
            continue
        for i in indices:
            alone = _run_guarded([items[i]], run) if len(indices) > 1 else outputs
            results[i] = (alone if isinstance(alone, TokenizerError) else alone[0], 1)
    return results


def _run_guarded(
    group: list[Item], run: Callable[[list[Item]], list[Result]]
) -> list[Result] | TokenizerError:
    """``run(group)`` after a checkpoint (abandoned work stops between groups), or its failure as a
    TokenizerError."""
    try:
        checkpoint()
        return run(group)
    except TokenizerError as error:
        return error
    except Exception as exc:  # the model's own failure on these inputs: theirs alone, typed
        return ModelError.from_exception(exc)
