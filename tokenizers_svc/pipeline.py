"""The runner every entry point shares: media bytes -> Latents and Latents -> media bytes.

The CLI, the HTTP server and the Ray Data batch job differ only in where bytes come from and go
to; they all call :func:`load_media`, :func:`encode_media` and :func:`decode_to_media`, so limits,
hashing, fps bookkeeping and format checks behave the same everywhere.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from tokenizers_svc import media
from tokenizers_svc.errors import InvalidRequestError, UnsupportedMediaTypeError
from tokenizers_svc.latents import Latents
from tokenizers_svc.media import MediaLimits
from tokenizers_svc.tiling import TilingOptions

if TYPE_CHECKING:
    from tokenizers_svc.api import ResizePolicy, Tokenizer

OutputFormat = Literal["png", "jpeg", "webp", "mp4"]
OUTPUT_FORMATS: dict[str, str] = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "jpg": "image/jpeg",
    "webp": "image/webp",
    "mp4": "video/mp4",
}


@dataclass(frozen=True)
class EncodeOptions:
    """How to turn media into latents; the same fields are CLI flags, HTTP form fields and job options.

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


@dataclass
class MediaInput:
    """Decoded media ready for ``Tokenizer.encode``.

    ``pixels``: uint8 [0, 255], (1, 3, H, W) for an image or (1, 3, T, H, W) for a video.
    ``sha256``: hex digest of the source bytes (recorded in the latents as ``source_sha256``).
    ``original_size``: (H, W) as decoded (after EXIF orientation).
    """

    pixels: torch.Tensor
    kind: Literal["image", "video"]
    fps: float | None
    sha256: str
    original_size: tuple[int, int]

    @property
    def num_frames(self) -> int | None:
        return int(self.pixels.shape[2]) if self.kind == "video" else None


def load_media(
    data: bytes, limits: MediaLimits = MediaLimits(), options: EncodeOptions = EncodeOptions()
) -> MediaInput:
    """Image or video bytes (kind from magic bytes) -> :class:`MediaInput`, under ``limits``."""
    kind = media.sniff_media(data)
    digest = hashlib.sha256(data).hexdigest()
    if kind == "image":
        pixels = media.decode_image(data, limits)  # (H, W, 3) uint8
        return MediaInput(
            pixels=media.image_to_tensor(pixels),
            kind="image",
            fps=None,
            sha256=digest,
            original_size=(pixels.shape[0], pixels.shape[1]),
        )
    video = media.decode_video(
        data,
        limits,
        max_frames=options.max_frames,
        start=options.start,
        end=options.end,
        stride=options.stride,
    )
    return MediaInput(
        pixels=media.video_to_tensor(video.frames),
        kind="video",
        fps=video.fps,
        sha256=digest,
        original_size=(video.frames.shape[1], video.frames.shape[2]),
    )


def encode_media(
    tokenizer: Tokenizer, media_input: MediaInput, options: EncodeOptions = EncodeOptions()
) -> Latents:
    """:class:`MediaInput` -> :class:`Latents` with fps and the source hash recorded.

    An image-only tokenizer refuses videos (InvalidRequestError); video tokenizers take images as
    one-frame clips.
    """
    spec = tokenizer.spec
    if media_input.kind == "video" and spec.modality == "image":
        raise InvalidRequestError(
            f"{spec.name} encodes images only; got a video of {media_input.num_frames} frames "
            "(use a video or 'both' tokenizer)",
            param="model",
        )
    generator = None
    if options.sample and options.seed is not None:
        generator = torch.Generator().manual_seed(options.seed)
    return tokenizer.encode(
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
    )


def output_media_type(format: str) -> str:
    """'png' / 'jpeg' / 'jpg' / 'webp' / 'mp4' (any case, optional dot) -> media type."""
    key = format.lower().lstrip(".")
    if key not in OUTPUT_FORMATS:
        raise UnsupportedMediaTypeError(
            f"output format must be one of {sorted(OUTPUT_FORMATS)}, got {format!r}", param="format"
        )
    return OUTPUT_FORMATS[key]


def decode_to_media(
    tokenizer: Tokenizer,
    latents: Latents,
    format: OutputFormat = "png",
    fps: float | None = None,
    *,
    tiling: TilingOptions | None = None,
    quality: int = 95,
) -> tuple[bytes, str]:
    """One item of :class:`Latents` -> (encoded bytes, media type), cropped to the original size.

    Image latents (NCHW) decode to PNG/JPEG/WebP; video latents (NCTHW) to MP4 at ``fps`` (default:
    the fps recorded at encode time). A video latent holding a single frame may also be written as
    an image; anything else across kinds is an InvalidRequestError.
    """
    media_type = output_media_type(format)
    n = latents.latents.shape[0]
    if n != 1:
        raise InvalidRequestError(
            f"decode_to_media writes one item, got a batch of {n}; pick one with Latents.select(i)",
            param="latents",
        )
    is_video = latents.layout == "NCTHW"
    frames = latents.original_frames
    if media_type == "video/mp4" and not is_video:
        raise InvalidRequestError(
            "these latents hold an image (NCHW); expected an image output format (png, jpeg, webp), got mp4",
            param="format",
        )
    if media_type != "video/mp4" and is_video and frames != 1:
        raise InvalidRequestError(
            f"these latents hold a video ({frames if frames is not None else 'unknown'} frames); expected "
            f"output format mp4, got {format!r}",
            param="format",
        )
    if media_type == "video/mp4":
        rate = fps if fps is not None else latents.fps
        if rate is None:
            raise InvalidRequestError(
                "these video latents record no fps; pass fps to write an mp4", param="fps"
            )
        pixels = tokenizer.decode(latents, tiling=tiling, output_dtype=torch.uint8)  # (1, 3, T, H, W)
        return media.encode_video(media.tensor_to_video(pixels), rate), media_type
    pixels = tokenizer.decode(latents, tiling=tiling, output_dtype=torch.uint8)  # (1, 3, [1,] H, W)
    if pixels.ndim == 5:
        pixels = pixels[:, :, 0]
    return media.encode_image(media.tensor_to_image(pixels), format, quality=quality), media_type
