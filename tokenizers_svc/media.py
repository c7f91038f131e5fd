"""Image and video bytes <-> uint8 pixel arrays (images also straight to tensors, the runner's way in),
with limits checked before the expensive work.

Images go through Pillow (PNG, JPEG, WebP): EXIF orientation is applied, every mode (RGBA, LA,
P, L, 1, CMYK, 16-bit grayscale) becomes RGB uint8, and the pixel cap is checked from the header
before any pixel data is decoded. Videos go through PyAV: decode to (T, H, W, 3) uint8 with fps,
an optional [start, end) time range and stride, under frame/duration/pixel caps; encode to H.264
MP4 (yuv420p). Every failure is a typed error from :mod:`tokenizers_svc.errors`, never a crash.
"""

from __future__ import annotations

import ctypes
import io
import math
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import av

from tokenizers_svc.errors import (
    DTypeMismatchError,
    InvalidMediaError,
    InvalidRequestError,
    LimitExceededError,
    ShapeMismatchError,
    TokenizerError,
    UnsupportedMediaTypeError,
)
from tokenizers_svc.formats import IMAGE_MEDIA_TYPES, MIN_FPS, check_fps, image_format
from tokenizers_svc.limits import FILE_LIMITS, Limits
from tokenizers_svc.pixels import as_uint8_pixels, resize_model_input

MediaKind = Literal["image", "video"]
ImageFormat = Literal["png", "jpeg", "webp"]
TRANSPARENT_BACKGROUND = (255, 255, 255)  # alpha is composited over white, as image viewers show it

# The decoders check ``limits.Limits`` while they read (max_pixels from the header, before any pixel
# data; max_frames and max_duration_s of the decoded range; max_total_pixels as frames arrive), so
# oversized inputs become LimitExceededError before they use memory. Pillow's own bomb check
# (process-wide Image.MAX_IMAGE_PIXELS) is left in place as a backstop, its DecompressionBombError
# mapped to LimitExceededError too. Without ``limits``: FILE_LIMITS (local files the caller owns).


def _quiet_pillow_bomb_warning() -> None:
    """Ignore Pillow's DecompressionBombWarning, process-wide, unless a filter for it is already set.

    Pillow warns when an image is over its MAX_IMAGE_PIXELS (~89 MP): more than any cap here
    (FILE_LIMITS: 64 MP), so the warning only comes before the LimitExceededError the caller gets.
    Process-wide, the narrowest filter there is (Pillow's one warning class), because
    ``warnings.catch_warnings`` swaps the process's filter list and is not thread-safe: the server
    decodes in several threads at once, and two of them inside it can leave the list changed.
    Checked at every decode, not set once at import: a ``catch_warnings`` block open at the time
    (pytest's collection, a caller's) would take the filter away when it ends. A filter the caller
    set for this warning class is theirs to keep."""
    if not any(category is Image.DecompressionBombWarning for _, _, category, _, _ in warnings.filters):
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass
class Video:
    """Decoded frames (T, H, W, 3) uint8 RGB; ``fps`` of the returned frames (source fps / stride);
    ``start_time`` in seconds of the first returned frame."""

    frames: np.ndarray
    fps: float
    start_time: float = 0.0

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps if self.fps else 0.0


@dataclass
class VideoTensor:
    """Decoded frames in the layout models take, ``pixels`` (1, 3, T, H, W) uint8 RGB; ``fps`` and
    ``start_time`` as :class:`Video`'s."""

    pixels: torch.Tensor
    fps: float
    start_time: float = 0.0


# ---------------------------------------------------------------------------------------------- sniffing

_IMAGE_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
)
_UNSUPPORTED_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%PDF", "PDF"),
)
_ISOBMFF_IMAGE_BRANDS = {b"heic", b"heix", b"hevc", b"mif1", b"msf1", b"avif", b"avis"}  # ftyp brands
SUPPORTED_DESCRIPTION = "PNG, JPEG or WebP images; MP4/MOV, AVI, MKV/WebM videos"


def sniff_media(data: bytes) -> MediaKind:
    """'image' or 'video' from the leading magic bytes (never from a file name or client header).

    Raises InvalidMediaError for empty/unrecognized bytes and UnsupportedMediaTypeError for known
    formats this service does not read (GIF, BMP, TIFF, PDF).
    """
    if not data:
        raise InvalidMediaError(f"empty input; expected {SUPPORTED_DESCRIPTION}", param="file")
    head = bytes(data[:16])
    for magic, _ in _IMAGE_MAGIC:
        if head.startswith(magic):
            return "image"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image"
    if head[4:8] == b"ftyp" and head[8:12] in _ISOBMFF_IMAGE_BRANDS:
        raise UnsupportedMediaTypeError(
            f"HEIC/AVIF images are not supported; expected {SUPPORTED_DESCRIPTION}", param="file"
        )
    if (
        head[4:8] == b"ftyp"
        or (head[:4] == b"RIFF" and head[8:12] == b"AVI ")
        or head[:4] == b"\x1a\x45\xdf\xa3"
    ):
        return "video"
    for magic, name in _UNSUPPORTED_MAGIC:
        if head.startswith(magic):
            raise UnsupportedMediaTypeError(
                f"{name} files are not supported; expected {SUPPORTED_DESCRIPTION}", param="file"
            )
    raise InvalidMediaError(
        f"not a recognized image or video (first bytes {head[:8].hex()}); expected {SUPPORTED_DESCRIPTION}",
        param="file",
    )


# ---------------------------------------------------------------------------------------------- images


def _check_pixels(width: int, height: int, limits: Limits, what: str) -> None:
    if width * height > limits.max_pixels:
        raise LimitExceededError(
            f"{what} is {width}x{height} = {width * height:,} pixels; the limit is {limits.max_pixels:,} pixels",
            param="file",
        )


def _to_rgb(image: Image.Image) -> Image.Image | np.ndarray:
    """Any Pillow mode -> an RGB image, or for 16-bit grayscale (scaled to 8 bits) the (H, W, 3)
    uint8 array itself. Alpha is composited over white."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        wide = np.asarray(image).astype(np.float64)  # 16-bit grayscale PNGs open as I;16 / I
        gray = np.clip(np.floor(wide / 257.0 + 0.5), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*TRANSPARENT_BACKGROUND, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def _rgb_to_tensor(rgb: Image.Image | np.ndarray, size: tuple[int, int] | None = None) -> torch.Tensor:
    """RGB Pillow image (or an (H, W, 3) uint8 array) -> (1, 3, H, W) uint8, in one copy that torch
    makes without the GIL; resized to ``size`` (h, w) when given, by ``pixels.resize_model_input``.

    Why not ``np.array(image)``: numpy reads Pillow's pixels through ``tobytes``, which packs them in
    64 KiB pieces from Python and joins them, holding the GIL, before numpy copies them once more; in
    the batch job's driver, whose threads share one GIL, that was a fifth of the GIL's busy time on
    the decode-bound case (docs/benchmarks.md, "Batch", session 26). Pillow keeps RGB as 4 bytes a
    pixel (RGBX) and exports them through the Arrow C data interface as a view where the rows lie in
    one block (up to Pillow's block size, 16 MiB by default: ~4 MP); pyarrow hands that view to torch
    over DLPack, and torch gathers the three channels. Rows spread over several blocks take numpy's way.

    A resize reads the view itself, as a (1, 4, H, W) channels-last image, whose layout torch's
    uint8 kernel resizes fastest, and gathers only the resized pixels: the same pixels as resizing
    the gathered tensor, 5-6 times faster (docs/benchmarks.md, "Batch", session 27)."""
    slots = _rgbx_view(rgb) if isinstance(rgb, Image.Image) else None  # (1, 4, H, W) view of Pillow's memory
    if slots is None:
        pixels = image_to_tensor(rgb if isinstance(rgb, np.ndarray) else np.array(rgb, dtype=np.uint8))
        return pixels if size is None else resize_model_input(pixels, size)
    if size is not None:
        slots = resize_model_input(slots, size)  # (1, 4, h, w), its own memory, channels last
    return slots[:, :3].contiguous()  # (1, 3, H, W) uint8, its own memory


def _rgbx_view(image: Image.Image) -> torch.Tensor | None:
    """An RGB image's pixels as Pillow holds them, (1, 4, H, W) uint8 channels last (RGBX), without
    a copy; None where its rows are not in one block."""
    import pyarrow as pa  # the Arrow C data interface's reader (~70 ms to import, once)

    try:
        rgbx = pa.array(image)  # H * W pixels, each a fixed-size list of 4 uint8: Pillow's memory
    except ValueError:  # "Image rows are not contiguous in memory"
        return None
    flat = torch.from_dlpack(rgbx.values)  # (H * W * 4,) uint8 view
    return flat.view(1, image.height, image.width, rgbx.type.list_size).permute(0, 3, 1, 2)


def decode_image(
    data: bytes, limits: Limits = FILE_LIMITS, extra_formats: tuple[str, ...] = ()
) -> np.ndarray:
    """PNG/JPEG/WebP bytes -> (H, W, 3) uint8 RGB, EXIF orientation applied (size is the displayed one).

    The pixel cap is checked from the header before decoding. Animated files give their first frame.
    ``extra_formats``: Pillow format names also accepted (the evaluation reads BMP and TIFF).
    """
    rgb = _decode_rgb(data, limits, extra_formats)
    return rgb if isinstance(rgb, np.ndarray) else np.array(rgb, dtype=np.uint8)


def decode_image_tensor(
    data: bytes,
    limits: Limits = FILE_LIMITS,
    extra_formats: tuple[str, ...] = (),
    *,
    resize_to: Callable[[int, int], tuple[int, int]] | None = None,
) -> torch.Tensor:
    """As :func:`decode_image`, straight to (1, 3, H, W) uint8 NCHW, the layout models take: one copy
    fewer, and less of it under the GIL (:func:`_rgb_to_tensor`). The shared runner's way in.

    ``resize_to(height, width)``: given the decoded (upright) size, the (h, w) to resize to
    (antialiased bicubic in uint8, ``pixels.resize_model_input``), straight from Pillow's memory; it
    may raise to refuse the resize before it is made."""
    rgb = _decode_rgb(data, limits, extra_formats)
    height, width = (rgb.shape[0], rgb.shape[1]) if isinstance(rgb, np.ndarray) else (rgb.height, rgb.width)
    size = resize_to(height, width) if resize_to is not None else None
    return _rgb_to_tensor(rgb, None if size == (height, width) else size)


def _decode_rgb(data: bytes, limits: Limits, extra_formats: tuple[str, ...]) -> Image.Image | np.ndarray:
    """Checked, decoded, EXIF-oriented RGB (:func:`_to_rgb`); every failure a typed error."""
    if not data:
        raise InvalidMediaError(f"empty input; expected {SUPPORTED_DESCRIPTION}", param="file")
    expected = ", ".join(["PNG", "JPEG", "WebP", *extra_formats])
    _quiet_pillow_bomb_warning()
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise LimitExceededError(
            f"image exceeds the decoder's pixel limit ({exc}); the limit is {limits.max_pixels:,} pixels",
            param="file",
        ) from None
    except UnidentifiedImageError:
        if not extra_formats:
            sniff_media(data)  # names GIF/BMP/... or garbage precisely
        raise InvalidMediaError(
            f"cannot identify an image in {len(data)} bytes; expected {expected}", param="file"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidMediaError(
            f"image header is corrupt ({exc}); expected a complete {expected} file", param="file"
        ) from None
    if image.format not in IMAGE_MEDIA_TYPES and image.format not in extra_formats:
        raise UnsupportedMediaTypeError(
            f"{image.format} images are not supported; expected {expected}", param="file"
        )
    _check_pixels(image.width, image.height, limits, f"{image.format} image")
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of an upright image
        return _to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise LimitExceededError(f"image exceeds the decoder's pixel limit ({exc})", param="file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidMediaError(
            f"{image.format} image is truncated or corrupt ({exc}); expected a complete file", param="file"
        ) from None


def encode_image(pixels: np.ndarray, format: ImageFormat = "png", quality: int = 95) -> bytes:
    """(H, W, 3) uint8 RGB -> PNG (lossless), JPEG or WebP (lossy, ``quality`` 1-100) bytes."""
    fmt = image_format(format)
    _check_frames_array(pixels, ndim=3, what="image")
    if not 1 <= quality <= 100:
        raise InvalidRequestError(f"quality must be in [1, 100], got {quality}", param="quality")
    out = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")
    if fmt == "PNG":
        image.save(out, format=fmt)
    else:
        image.save(out, format=fmt, quality=quality)
    return out.getvalue()


def read_image(path: str | Path, limits: Limits = FILE_LIMITS) -> np.ndarray:
    """File -> (H, W, 3) uint8 RGB (see :func:`decode_image`)."""
    return decode_image(Path(path).read_bytes(), limits)


def _check_frames_array(pixels: np.ndarray, ndim: int, what: str) -> None:
    layout = "(H, W, 3)" if ndim == 3 else "(T, H, W, 3)"
    if not isinstance(pixels, np.ndarray):
        raise ShapeMismatchError(f"{what} must be a numpy array {layout}, got {type(pixels).__name__}")
    if pixels.ndim != ndim or pixels.shape[-1] != 3 or 0 in pixels.shape:
        raise ShapeMismatchError(f"{what} must be {layout} RGB, got shape {pixels.shape}", param="pixels")
    if pixels.dtype != np.uint8:
        raise DTypeMismatchError(f"{what} must be uint8 [0, 255], got {pixels.dtype}", param="pixels")


# ---------------------------------------------------------------------------------------------- video


def _pyav():
    """PyAV, imported at the first video: a process that only handles images (an image model's
    replica) never loads FFmpeg's libraries (~15 MB resident). A declared dependency; a bare box
    without it still reads and writes images."""
    try:
        import av
    except ImportError:
        raise InvalidMediaError("reading or writing video needs PyAV: pip install av", param="file") from None
    return av


def _ffmpeg_reason(exc: av.error.FFmpegError | UnicodeDecodeError) -> str:
    reason = getattr(exc, "strerror", None)  # UnicodeDecodeError: garbage in container metadata
    return f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__


def _open_container(data: bytes | str | Path) -> av.container.InputContainer:
    """Open bytes or a path whose magic bytes say video (FFmpeg would also open images and text)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        head, source = bytes(data[:16]), io.BytesIO(data)
    else:
        try:
            with open(data, "rb") as file:
                head, source = file.read(16), str(data)
        except OSError as exc:
            raise InvalidMediaError(f"cannot read video file {Path(data).name!r}: {exc.strerror}") from None
    kind = sniff_media(head)
    if kind != "video":
        raise InvalidMediaError(
            f"expected a video, got an {kind}; expected {SUPPORTED_DESCRIPTION}", param="file"
        )
    av = _pyav()
    try:
        return av.open(source, mode="r")
    except (av.error.FFmpegError, UnicodeDecodeError) as exc:
        raise InvalidMediaError(
            f"cannot open video ({_ffmpeg_reason(exc)}); the file is "
            f"truncated, corrupt or not a video; expected {SUPPORTED_DESCRIPTION}",
            param="file",
        ) from None


def _frame_rate(stream: av.video.stream.VideoStream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and float(rate) > 0:
            return float(rate)
    raise InvalidMediaError("video stream declares no frame rate", param="file")


def _stream_duration(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream
) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000
    return None


def probe_dimensions(data: bytes) -> tuple[int | None, int, int] | None:
    """(frames, height, width) from the header alone (frames None for an image, the header's
    estimate for a video), so a server can price a request before decoding it; None when the header
    cannot be read (decoding then reports why)."""
    try:
        if sniff_media(data) == "image":
            _quiet_pillow_bomb_warning()
            with Image.open(io.BytesIO(data)) as image:
                return None, image.height, image.width
        with _open_container(data) as container:
            stream = container.streams.video[0]
            duration = _stream_duration(container, stream)
            frames = stream.frames or (round(duration * _frame_rate(stream)) if duration else 1)
            return max(1, frames), stream.codec_context.height, stream.codec_context.width
    except (TokenizerError, Image.DecompressionBombError, OSError, SyntaxError, ValueError, IndexError):
        return None


def probe_video(path: str | Path) -> tuple[float, float]:
    """(duration in seconds, frames per second) of a video file's first video stream, from its
    header (no frame is decoded); duration 0.0 when the container declares none."""
    with _open_container(path) as container:
        if not container.streams.video:
            raise InvalidMediaError("the file has no video stream", param="file")
        stream = container.streams.video[0]
        return _stream_duration(container, stream) or 0.0, _frame_rate(stream)


def _validate_range(start: float | None, end: float | None, stride: int, max_frames: int | None) -> None:
    if not isinstance(stride, int) or stride < 1:
        raise InvalidRequestError(f"stride must be an integer >= 1, got {stride!r}", param="stride")
    if start is not None and not (math.isfinite(start) and start >= 0):
        raise InvalidRequestError(f"start must be a finite time >= 0 s, got {start}", param="start")
    if end is not None and not (math.isfinite(end) and end > (start or 0.0)):
        raise InvalidRequestError(f"end must be after start ({start or 0.0} s), got {end}", param="end")
    if max_frames is not None and max_frames < 1:
        raise InvalidRequestError(f"max_frames must be >= 1, got {max_frames}", param="max_frames")


def decode_video(
    data: bytes | str | Path,
    limits: Limits = FILE_LIMITS,
    max_frames: int | None = None,
    start: float | None = None,
    end: float | None = None,
    stride: int = 1,
) -> Video:
    """Video bytes or path -> :class:`Video` with frames (T, H, W, 3) uint8 RGB.

    Frames whose timestamps fall in [start, end) seconds (counted from the stream's first timestamp)
    are kept, every ``stride``-th of them.
    ``max_frames`` stops after that many frames (an explicit truncation); without it, a video with
    more than ``limits.max_frames`` frames raises LimitExceededError instead of being cut silently.
    Rotation metadata (phones) is applied, so frames come out upright as players show them. A file
    that ends well before its header's duration (truncated download) is InvalidMediaError.
    """
    return Video(*_decode_video(data, limits, max_frames, start, end, stride, channels_first=False))


def decode_video_tensor(
    data: bytes | str | Path,
    limits: Limits = FILE_LIMITS,
    max_frames: int | None = None,
    start: float | None = None,
    end: float | None = None,
    stride: int = 1,
    *,
    resize_to: Callable[[int, int], tuple[int, int]] | None = None,
) -> VideoTensor:
    """As :func:`decode_video`, the frames written channels first as they are decoded: (1, 3, T, H, W)
    uint8, the layout models take, without transposing the whole clip afterwards (which took longer
    than decoding a 720p clip: docs/benchmarks.md, "Batch", session 26). The shared runner's way in.

    ``resize_to(height, width)``: given the upright frame size, the (h, w) to resize every frame to
    (``pixels.resize_model_input``), as each is decoded, so the clip is never held at full size; it
    may raise to refuse the resize before the first frame is kept. The limits count decoded frames."""
    frames, fps, start_time = _decode_video(
        data, limits, max_frames, start, end, stride, channels_first=True, resize_to=resize_to
    )
    return VideoTensor(torch.from_numpy(frames).unsqueeze(0), fps, start_time)


def _decode_video(
    data: bytes | str | Path,
    limits: Limits,
    max_frames: int | None,
    start: float | None,
    end: float | None,
    stride: int,
    *,
    channels_first: bool,
    resize_to: Callable[[int, int], tuple[int, int]] | None = None,
) -> tuple[np.ndarray, float, float]:
    """(frames (T, H, W, 3) or channels first (3, T, H, W), fps, start time): :func:`decode_video`,
    every frame resized as it is decoded when ``resize_to`` says so (:func:`decode_video_tensor`)."""
    _validate_range(start, end, stride, max_frames)
    if max_frames is not None and max_frames > limits.max_frames:
        raise LimitExceededError(
            f"max_frames={max_frames} exceeds the limit of {limits.max_frames} frames", param="max_frames"
        )
    container = _open_container(data)
    try:
        return _decode_stream(container, limits, max_frames, start, end, stride, channels_first, resize_to)
    except (_pyav().error.FFmpegError, UnicodeDecodeError) as exc:
        raise InvalidMediaError(
            f"video is truncated or corrupt ({_ffmpeg_reason(exc)})",
            param="file",
        ) from None
    finally:
        container.close()


class _FrameBuffer:
    """Frames written into one preallocated array as they are decoded, (T, H, W, 3), or channels
    first (3, T, H, W) for models: sized from the header's estimate, doubled if exceeded, so peak
    memory is about the clip itself rather than a list plus a stack, and channels first needs no
    transposition of the whole clip, only of each frame as it is written (measured on a 132-frame
    720p clip: +0.8 ms a frame against 4 ms a frame for the whole clip's transposition)."""

    def __init__(self, capacity: int, max_total_pixels: int, channels_first: bool = False) -> None:
        self.capacity = max(1, capacity)
        self.max_total_pixels = max_total_pixels
        self.channels_first = channels_first
        self.count = 0
        self._data: np.ndarray | None = None

    def _empty(self, frames: int, height: int, width: int) -> np.ndarray:
        shape = (3, frames, height, width) if self.channels_first else (frames, height, width, 3)
        return np.empty(shape, dtype=np.uint8)

    def append(self, frame: np.ndarray) -> None:
        """``frame``: (H, W, 3) uint8 RGB."""
        height, width = frame.shape[:2]
        if self._data is None:
            fit = max(1, self.max_total_pixels // (height * width))  # never above the cap
            self._data = self._empty(min(self.capacity, fit), height, width)
        elif self.count == self._data.shape[1 if self.channels_first else 0]:  # full: the time axis
            grown = self._empty(2 * self.count, height, width)
            if self.channels_first:
                grown[:, : self.count] = self._data
            else:
                grown[: self.count] = self._data
            self._data = grown
        if self.channels_first:
            self._data[:, self.count] = frame.transpose(2, 0, 1)  # (3, H, W)
        else:
            self._data[self.count] = frame
        self.count += 1

    def frames(self) -> np.ndarray:
        """The filled part, contiguous, copied out when most of the buffer went unused (to free it).
        Channels first, the filled part of each channel is moved down in place to follow the one
        before (the buffer is left unusable): a copy into fresh memory page-faults the whole clip in
        again (2.4 s for a 795-frame 576x768 clip, against 1.4 s to decode it)."""
        if not self.channels_first:
            view = self._data[: self.count]
            return view.copy() if 2 * self.count < len(self._data) else view
        channels, capacity, height, width = self._data.shape
        if self.count == capacity:
            return self._data
        if 2 * self.count < capacity:
            return np.ascontiguousarray(self._data[:, : self.count])
        plane, stride = self.count * height * width, capacity * height * width  # bytes: uint8
        start = self._data.ctypes.data
        for channel in range(1, channels):
            ctypes.memmove(start + channel * plane, start + channel * stride, plane)  # may overlap
        return self._data.reshape(-1)[: channels * plane].reshape(channels, self.count, height, width)


def _video_stream(container: av.container.InputContainer, limits: Limits, stride: int):
    """The first video stream, checked (a decoder, the frame size, the frame rate after ``stride``),
    and its frame rate."""
    if not container.streams.video:
        raise InvalidMediaError("file has no video stream", param="file")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        raise InvalidMediaError(
            "no decoder for this video's codec; the file is corrupt or exotic", param="file"
        )
    stream.thread_type = "AUTO"
    width, height = stream.codec_context.width, stream.codec_context.height
    if width and height:
        _check_pixels(width, height, limits, "video frame")
    fps = _frame_rate(stream)
    if fps / stride < MIN_FPS:
        raise InvalidRequestError(
            f"stride {stride} at {fps:g} fps keeps {fps / stride:.3g} frames per second; the least a latent "
            f"file records is {MIN_FPS:g}",
            param="stride",
        )
    return stream, fps


def _expected_frames(
    duration: float | None,
    fps: float,
    limits: Limits,
    max_frames: int | None,
    start: float | None,
    end: float | None,
    stride: int,
) -> int | None:
    """Frames the header says [start, end) holds after ``stride`` (None: unknown); a range over the
    duration or frame limit is refused before any decoding (unless ``max_frames`` bounds the work)."""
    span_start = start or 0.0
    span_end = min(end, duration) if end is not None and duration is not None else (end or duration)
    expected = None  # frame count estimate from the header, sizes the output buffer
    if span_end is not None:
        expected = math.ceil((span_end - span_start) * fps / stride - 1e-6)
    if max_frames is None and span_end is not None:
        span = span_end - span_start
        if span > limits.max_duration_s:
            raise LimitExceededError(
                f"video range spans {span:.1f} s; the limit is {limits.max_duration_s:g} s "
                "(pass start/end or max_frames to decode a part)",
                param="file",
            )
        if expected > limits.max_frames:
            raise LimitExceededError(
                f"video range has about {expected} frames at {fps:g} fps / stride {stride}; the limit is "
                f"{limits.max_frames} frames (pass max_frames, start/end or stride)",
                param="file",
            )
    return expected


def _seek(container: av.container.InputContainer, stream, seconds: float) -> None:
    """To the keyframe at or before ``seconds`` (stream time); an unseekable file decodes from the start."""
    try:
        target = int(seconds / stream.time_base)
        container.seek(target, stream=stream, backward=True, any_frame=False)
    except (_pyav().error.FFmpegError, OverflowError):  # OverflowError: past int64 time-base units
        container.seek(0)  # unseekable (no index): decode from the start and skip


def _decode_stream(
    container: av.container.InputContainer,
    limits: Limits,
    max_frames: int | None,
    start: float | None,
    end: float | None,
    stride: int,
    channels_first: bool,
    resize_to: Callable[[int, int], tuple[int, int]] | None = None,
) -> tuple[np.ndarray, float, float]:
    stream, fps = _video_stream(container, limits, stride)
    duration = _stream_duration(container, stream)
    if start is not None and duration is not None and start >= duration:
        raise _no_frames(start, end, duration)
    expected = _expected_frames(duration, fps, limits, max_frames, start, end, stride)
    span_start = start or 0.0
    cap = max_frames if max_frames is not None else limits.max_frames
    # times are relative to the stream's first timestamp, so start/end mean "seconds into the video"
    origin = float(stream.start_time * stream.time_base) if stream.start_time and stream.time_base else 0.0
    if start:
        _seek(container, stream, start + origin)
    capacity = min(cap, expected + 2 if expected is not None else 64)
    buffer = _FrameBuffer(capacity, limits.max_total_pixels, channels_first)
    first_time: float | None = None
    quarter_turns = 0
    size: tuple[int, int] | None = None  # what every frame is resized to, if anything
    selected = 0  # frames inside [start, end), before stride
    seen = 0  # every decoded frame
    t = 0.0
    eps = 0.5 / fps
    for frame in container.decode(stream):
        seen += 1
        t = frame.time - origin if frame.time is not None else (seen - 1) / fps
        if start is not None and t < start - eps:
            continue
        if end is not None and t >= end - eps:
            break
        if max_frames is None and (t - span_start) > limits.max_duration_s:
            raise LimitExceededError(
                f"video is longer than the limit of {limits.max_duration_s:g} s", param="file"
            )
        selected += 1
        if (selected - 1) % stride:
            continue
        if buffer.count >= cap:
            if max_frames is not None:
                break
            raise LimitExceededError(
                f"video has more than {limits.max_frames} frames (after range/stride); pass max_frames, "
                "start/end or stride",
                param="file",
            )
        if first_time is None:
            first_time = t
            quarter_turns = round((frame.rotation or 0) / 90) % 4  # display matrix, counterclockwise
            width, height = frame.width, frame.height
            _check_pixels(width, height, limits, "video frame")
            upright = (width, height) if quarter_turns % 2 else (height, width)
            wanted = resize_to(*upright) if resize_to is not None else upright
            size = None if wanted == upright else wanted
        if (buffer.count + 1) * width * height > limits.max_total_pixels:
            raise LimitExceededError(
                f"decoded video would exceed {limits.max_total_pixels:,} pixels in total "
                f"({buffer.count + 1} frames of {width}x{height}); pass max_frames, start/end or stride",
                param="file",
            )
        rgb = frame.reformat(width=width, height=height, format="rgb24").to_ndarray()  # one size for the clip
        rgb = np.rot90(rgb, quarter_turns) if quarter_turns else rgb  # (H, W, 3), upright
        buffer.append(rgb if size is None else _resized_frame(rgb, size))
    else:
        last = t if seen else 0.0
        if end is None and duration is not None and last + 1 / fps < duration - max(2 / fps, 0.02 * duration):
            raise InvalidMediaError(
                f"video is truncated: its header declares {duration:.2f} s but frames stop at {last:.2f} s",
                param="file",
            )
    if not buffer.count:
        if start is not None or end is not None:
            raise _no_frames(start, end, duration)
        raise InvalidMediaError("no video frames could be decoded", param="file")
    return buffer.frames(), fps / stride, float(first_time or 0.0)


def _resized_frame(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8 by ``pixels.resize_model_input``: the frame as decoded is a
    channels-last (1, 3, H, W) image, the layout torch's uint8 kernel resizes fastest, and gives the
    same pixels as resizing it channels first."""
    image = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W) view
    return resize_model_input(image, size)[0].permute(1, 2, 0).numpy()  # (h, w, 3)


def _no_frames(start: float | None, end: float | None, duration: float | None) -> InvalidRequestError:
    """The [start, end) range selects no frame: a 422 naming the option that put it there."""
    length = f"; the clip is {duration:.3g} s long" if duration is not None else ""
    span = f"[{start or 0.0:g}, {'end' if end is None else format(end, 'g')})"
    return InvalidRequestError(
        f"no frames in {span} s{length}", param="start" if start is not None and start > 0 else "end"
    )


def read_video(
    path: str | Path,
    limits: Limits = FILE_LIMITS,
    max_frames: int | None = None,
    start: float | None = None,
    end: float | None = None,
    stride: int = 1,
) -> Video:
    """File -> :class:`Video` (see :func:`decode_video`)."""
    return decode_video(Path(path), limits, max_frames=max_frames, start=start, end=end, stride=stride)


def encode_video(frames: np.ndarray, fps: float, *, crf: int = 18, preset: str = "veryfast") -> bytes:
    """(T, H, W, 3) uint8 RGB -> H.264 MP4 (yuv420p, faststart) bytes.

    yuv420p needs even sizes: an odd height/width is padded by repeating the last row/column, so
    the file is at most one pixel taller/wider than the input. ``crf`` 18 is visually lossless-ish.
    """
    _check_frames_array(frames, ndim=4, what="video")
    fps = check_fps(fps)
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    _, height, width, _ = frames.shape
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "out.mp4"  # faststart rewrites the file, which needs a real path
        _write_mp4(path, frames, fps, crf, preset, width, height)
        return path.read_bytes()


def _write_mp4(
    path: Path, frames: np.ndarray, fps: float, crf: int, preset: str, width: int, height: int
) -> None:
    av = _pyav()
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), "preset": preset}
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# ---------------------------------------------------------------------------------------------- tensors


def image_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) uint8 NCHW."""
    _check_frames_array(pixels, ndim=3, what="image")
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).unsqueeze(0).contiguous()


def video_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (1, 3, T, H, W) uint8 NCTHW."""
    _check_frames_array(frames, ndim=4, what="video")
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).unsqueeze(0).contiguous()


def tensor_to_image(pixels: torch.Tensor) -> np.ndarray:
    """(3, H, W) or (1, 3, H, W), uint8 [0, 255] or float [-1, 1] -> (H, W, 3) uint8."""
    if pixels.ndim == 4 and pixels.shape[0] == 1:
        pixels = pixels[0]
    if pixels.ndim != 3 or pixels.shape[0] != 3:
        raise ShapeMismatchError(
            f"expected one image as (3, H, W) or (1, 3, H, W), got shape {tuple(pixels.shape)}",
            param="pixels",
        )
    return as_uint8_pixels(pixels.detach().cpu()).permute(1, 2, 0).contiguous().numpy()


def tensor_to_video(pixels: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) or (1, 3, T, H, W), uint8 [0, 255] or float [-1, 1] -> (T, H, W, 3) uint8."""
    if pixels.ndim == 5 and pixels.shape[0] == 1:
        pixels = pixels[0]
    if pixels.ndim != 4 or pixels.shape[0] != 3:
        raise ShapeMismatchError(
            f"expected one video as (3, T, H, W) or (1, 3, T, H, W), got shape {tuple(pixels.shape)}",
            param="pixels",
        )
    return as_uint8_pixels(pixels.detach().cpu()).permute(1, 2, 3, 0).contiguous().numpy()
