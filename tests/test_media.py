"""Media I/O on real photos and clips: formats, EXIF, modes, limits, truncated and garbage files."""

from __future__ import annotations

import io
import math
import struct
import sys
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from tokenizers_svc import media
from tokenizers_svc.errors import (
    DTypeMismatchError,
    InvalidMediaError,
    InvalidRequestError,
    LimitExceededError,
    ShapeMismatchError,
    TokenizerError,
    UnsupportedMediaTypeError,
)
from tokenizers_svc.limits import Limits
from tokenizers_svc.pipeline import DecodeOptions
from tokenizers_svc.pixels import resize_model_input


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def save(image: Image.Image, format: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **kwargs)
    return buffer.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bilevel_png(width: int, height: int) -> bytes:
    """A complete, valid all-black 1-bit PNG, compressed row by row (never held as pixels)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height RGB but which carries no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A real photo crop (40, 56, 3) uint8 (scikit-image's chelsea)."""
    return np.ascontiguousarray(skdata.chelsea()[60:220:4, 100:324:4])


@pytest.fixture(scope="module")
def panning_frames() -> np.ndarray:
    """A clip any user has: a window panning across a real photo, (12, 63, 85, 3) uint8 (odd size)."""
    astronaut = skdata.astronaut()
    return np.stack([astronaut[100 + 3 * t : 163 + 3 * t, 150 + 4 * t : 235 + 4 * t] for t in range(12)])


@pytest.fixture(scope="module")
def clip_bytes(shared_data) -> bytes:
    """A real H.264 clip: 176x144, 120 frames at 29.97 fps."""
    return (shared_data / "videos" / "carphone_pristine.mp4").read_bytes()


@pytest.fixture(scope="module")
def clip_frames(clip_bytes) -> media.Video:
    return media.decode_video(clip_bytes)


# ---------------------------------------------------------------------------------------------- images


def test_png_round_trip_is_exact(photo):
    data = media.encode_image(photo, "png")
    assert media.sniff_media(data) == "image"
    np.testing.assert_array_equal(media.decode_image(data), photo)


@pytest.mark.parametrize("fmt", ["jpeg", "jpg", "webp"])
def test_lossy_round_trip(photo, fmt):
    data = media.encode_image(photo, fmt, quality=95)
    decoded = media.decode_image(data)
    assert decoded.shape == photo.shape and decoded.dtype == np.uint8
    assert psnr(decoded, photo) > 30


def test_real_jpeg_from_shared_data(shared_data):
    decoded = media.read_image(shared_data / "images" / "val" / "plant.jpg")
    assert decoded.shape == (333, 500, 3) and decoded.dtype == np.uint8


def test_exif_orientation_is_applied(photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise for display
    data = save(Image.fromarray(photo), "JPEG", quality=95, exif=exif)
    decoded = media.decode_image(data)
    clockwise = np.rot90(photo, k=-1)
    assert decoded.shape == clockwise.shape == (photo.shape[1], photo.shape[0], 3)
    assert psnr(decoded, clockwise) > 30
    assert psnr(decoded, np.rot90(photo, k=1)) < 20


def test_rgba_composites_over_white():
    rgba = np.zeros((8, 6, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[4:, :, 3] = 255  # bottom half opaque red, top half fully transparent
    rgba[2, :, 3] = 128
    decoded = media.decode_image(save(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert decoded.shape == (8, 6, 3)
    np.testing.assert_array_equal(decoded[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(decoded[7, 0], [200, 0, 0])
    assert 200 < decoded[2, 0, 0] < 255 and 120 < decoded[2, 0, 1] < 135  # half-transparent blend


@pytest.mark.parametrize("mode", ["L", "LA", "P", "1", "CMYK"])
def test_modes_become_rgb(photo, mode):
    source = Image.fromarray(photo).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    decoded = media.decode_image(save(source, fmt, **({"quality": 95} if fmt == "JPEG" else {})))
    expected = np.asarray(source.convert("RGB"))
    assert decoded.shape == photo.shape and decoded.dtype == np.uint8
    if fmt == "PNG":
        np.testing.assert_array_equal(decoded, expected)
    else:
        assert psnr(decoded, expected) > 30


def test_palette_with_transparency():
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0, 0, 0] * 254)
    palette.putpixel((0, 0), 0)
    decoded = media.decode_image(save(palette, "PNG", transparency=0))
    np.testing.assert_array_equal(decoded[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(decoded[3, 3], [10, 20, 30])


def _images_of_every_kind(photo: np.ndarray) -> dict[str, bytes]:
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    rgba = np.dstack(
        [photo, np.linspace(0, 255, photo.shape[1], dtype=np.uint8)[None].repeat(photo.shape[0], 0)]
    )
    palette = Image.fromarray(photo).convert("P")
    # over Pillow's 16 MiB block at 4 bytes a pixel: rows in several blocks, no single view to export
    ramp = np.linspace(0, 255, 2100, dtype=np.uint8)
    large = np.dstack(
        [np.tile(ramp, (2100, 1)), np.tile(ramp[:, None], (1, 2100)), np.full((2100, 2100), 7, np.uint8)]
    )
    return {
        "png": media.encode_image(photo, "png"),
        "jpeg-rotated": save(Image.fromarray(photo), "JPEG", quality=90, exif=exif),
        "rgba": save(Image.fromarray(rgba, "RGBA"), "PNG"),
        "gray": save(Image.fromarray(photo).convert("L"), "PNG"),
        "palette-transparent": save(palette, "PNG", transparency=0),
        "cmyk": save(Image.fromarray(photo).convert("CMYK"), "JPEG", quality=90),
        "16-bit": save(Image.fromarray(np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 21), "PNG"),
        "large": media.encode_image(large, "png"),
    }


@pytest.fixture(params=[0, 1], ids=["pillow-blocks", "images-whole"])
def pillow_allocator(request):
    """Pillow's default chain of 16 MiB blocks (a large image takes numpy's way to the tensor), or
    one block per image (tokenizers_svc.memory.allocate_images_whole: exported as a view), restored
    after the test."""
    before = Image.core.get_use_block_allocator()
    Image.core.set_use_block_allocator(request.param)
    yield request.param
    Image.core.set_use_block_allocator(before)


def test_decode_to_tensor_gives_the_same_pixels_in_memory_of_its_own(photo, pillow_allocator):
    """The runner's path (Pillow's memory exported to torch, or numpy's way for a large image in
    Pillow's default blocks) gives exactly decode_image's pixels, as a contiguous (1, 3, H, W) uint8
    tensor that owns just its own bytes (no view into Pillow's 4-byte pixels), also when threads
    decode at once."""
    for name, data in _images_of_every_kind(photo).items():
        expected = media.image_to_tensor(media.decode_image(data))
        tensor = media.decode_image_tensor(data)
        assert tensor.dtype == torch.uint8 and tensor.is_contiguous(), name
        assert tensor.untyped_storage().nbytes() == tensor.numel(), name
        assert torch.equal(tensor, expected), name
    data = media.encode_image(photo, "png")
    with ThreadPoolExecutor(4) as pool:
        decoded = list(pool.map(media.decode_image_tensor, [data] * 16))
    assert all(torch.equal(tensor, decoded[0]) for tensor in decoded)
    assert torch.equal(decoded[0], media.image_to_tensor(photo))


def test_decode_to_tensor_resizes_from_the_decoders_memory_as_the_tensor_would_be(photo, pillow_allocator):
    """A resize made while decoding (straight from Pillow's 4-byte pixels where they export as one
    view, else from the gathered tensor) gives exactly resize_model_input's pixels of the decoded
    tensor, in memory of its own; ``resize_to`` sees the upright size, and its refusal stops the
    decode before any resize."""
    for name, data in _images_of_every_kind(photo).items():
        full = media.decode_image_tensor(data)
        seen: list[tuple[int, int]] = []
        resized = media.decode_image_tensor(data, resize_to=_odd_factors(seen))
        assert seen == [tuple(full.shape[-2:])], name
        assert resized.is_contiguous() and resized.untyped_storage().nbytes() == resized.numel(), name
        assert torch.equal(resized, resize_model_input(full, _odd_factors([])(*full.shape[-2:]))), name
        assert torch.equal(media.decode_image_tensor(data, resize_to=lambda h, w: (h, w)), full), name

    with pytest.raises(LimitExceededError, match="too large"):
        media.decode_image_tensor(media.encode_image(photo, "png"), resize_to=_refuse)


def _odd_factors(seen: list[tuple[int, int]]):
    """A ``resize_to`` that records the sizes it is asked about and shrinks each axis by its own odd
    factor."""

    def resize_to(height: int, width: int) -> tuple[int, int]:
        seen.append((height, width))
        return max(1, height // 2 + 1), max(1, width // 3)

    return resize_to


def _refuse(height: int, width: int) -> tuple[int, int]:
    """A ``resize_to`` that refuses every resize."""
    raise LimitExceededError("too large", param="resolution")


def test_decode_to_tensor_refuses_what_decode_image_refuses(photo):
    data = media.encode_image(photo, "png")
    with pytest.raises(InvalidMediaError, match="truncated or corrupt"):
        media.decode_image_tensor(data[: len(data) // 2])
    with pytest.raises(LimitExceededError, match="limit"):
        media.decode_image_tensor(data, Limits(max_pixels=100))


def test_16bit_grayscale_is_scaled_not_clipped():
    values = np.array([[0, 257, 257 * 128, 65535]], dtype=np.uint16)
    decoded = media.decode_image(save(Image.fromarray(values), "PNG"))
    np.testing.assert_array_equal(decoded[0, :, 0], [0, 1, 128, 255])
    np.testing.assert_array_equal(decoded[..., 0], decoded[..., 2])


def test_truncated_png(photo):
    data = media.encode_image(photo, "png")
    with pytest.raises(InvalidMediaError, match="truncated"):
        media.decode_image(data[: len(data) // 2])


@pytest.mark.parametrize("blob", [b"not an image at all" * 4, bytes(range(256)), b""])
def test_garbage_bytes(blob):
    with pytest.raises(InvalidMediaError, match="expected"):
        media.decode_image(blob)
    with pytest.raises(InvalidMediaError):
        media.sniff_media(blob)


def test_unsupported_format_is_415_type(photo):
    gif = save(Image.fromarray(photo), "GIF")
    with pytest.raises(UnsupportedMediaTypeError, match="GIF"):
        media.sniff_media(gif)
    with pytest.raises(UnsupportedMediaTypeError, match="GIF"):
        media.decode_image(gif)
    with pytest.raises(UnsupportedMediaTypeError, match="HEIC/AVIF"):
        media.sniff_media(b"\x00\x00\x00\x1cftypheic\x00\x00\x00\x00")


def test_pixel_cap_checked_from_header_before_decoding():
    # 10000 x 10000 claimed with no pixel data: decoding would fail as truncated, so a
    # LimitExceededError proves the cap is checked from the header first.
    bomb = png_header_only(10_000, 10_000)
    with pytest.raises(LimitExceededError, match="100,000,000 pixels; the limit is 64,000,000"):
        media.decode_image(bomb)
    with pytest.raises(InvalidMediaError):
        media.decode_image(bomb, Limits(max_pixels=150_000_000))


def test_decoders_in_threads_leave_the_warning_filters_alone_and_pillow_quiet():
    """The server decodes in several threads at once. ``warnings.catch_warnings`` in a decoder is not
    thread-safe: two threads inside it can leave the process's filter list changed. The decoders
    must not touch the list, and Pillow's warning for images over its own threshold (~89 MP: more
    than any cap here, so the caller is refused anyway) stays silent."""
    over_pillows_threshold = png_header_only(10_000, 10_000)  # 100 MP: Pillow warns, the cap refuses

    def decode_many() -> None:
        for _ in range(300):
            assert media.probe_dimensions(over_pillows_threshold) == (None, 10_000, 10_000)
            with pytest.raises(LimitExceededError):
                media.decode_image(over_pillows_threshold)

    switch_interval = sys.getswitchinterval()
    with warnings.catch_warnings(record=True) as caught:  # records what any thread shows
        media.probe_dimensions(over_pillows_threshold)  # the first decode may add its one filter
        filters = list(warnings.filters)
        sys.setswitchinterval(1e-6)  # the GIL changes hands as often as it can
        try:
            with ThreadPoolExecutor(4) as pool:
                for decoding in [pool.submit(decode_many) for _ in range(4)]:
                    decoding.result()  # a thread's failure fails the test
        finally:
            sys.setswitchinterval(switch_interval)
        assert warnings.filters == filters
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_pillow_bomb_error_maps_to_limit_exceeded():
    # 20000 x 20000 bilevel PNG: a ~50 KB file that would decode to 400 MP.
    bomb = bilevel_png(20_000, 20_000)
    assert len(bomb) < 200_000
    assert Image.open(io.BytesIO(bilevel_png(20, 10))).size == (20, 10)  # the generator writes real PNGs
    with pytest.raises(LimitExceededError, match="limit"):
        media.decode_image(bomb)
    small_cap = Limits(max_pixels=100)
    with pytest.raises(LimitExceededError, match="the limit is 100 pixels"):
        media.decode_image(bilevel_png(11, 10), small_cap)
    np.testing.assert_array_equal(media.decode_image(bilevel_png(10, 10), small_cap), np.zeros((10, 10, 3)))


def test_encode_image_validates_input(photo):
    with pytest.raises(DTypeMismatchError, match="uint8"):
        media.encode_image(photo.astype(np.float32), "png")
    with pytest.raises(ShapeMismatchError, match=r"\(H, W, 3\)"):
        media.encode_image(photo[..., 0], "png")
    with pytest.raises(UnsupportedMediaTypeError, match="bmp"):
        media.encode_image(photo, "bmp")


def test_tensor_conversions(photo):
    tensor = media.image_to_tensor(photo)
    assert tensor.shape == (1, 3, *photo.shape[:2]) and tensor.dtype == torch.uint8
    np.testing.assert_array_equal(media.tensor_to_image(tensor), photo)
    as_float = tensor.float() / 127.5 - 1  # [-1, 1]
    np.testing.assert_array_equal(media.tensor_to_image(as_float[0]), photo)
    frames = np.stack([photo, photo[::-1]])
    video = media.video_to_tensor(frames)
    assert video.shape == (1, 3, 2, *photo.shape[:2])
    np.testing.assert_array_equal(media.tensor_to_video(video), frames)
    with pytest.raises(ShapeMismatchError):
        media.tensor_to_image(video)


# ---------------------------------------------------------------------------------------------- video


def test_decode_real_clip(clip_frames):
    assert clip_frames.frames.shape == (120, 144, 176, 3)
    assert clip_frames.frames.dtype == np.uint8
    assert clip_frames.fps == pytest.approx(30000 / 1001)
    assert clip_frames.start_time == 0.0


def test_time_range_and_stride(clip_bytes, clip_frames):
    part = media.decode_video(clip_bytes, start=1.0, end=2.0, stride=2)
    # frames 30..59 have timestamps in [1.0, 2.0); every 2nd of them
    np.testing.assert_array_equal(part.frames, clip_frames.frames[30:60:2])
    assert part.fps == pytest.approx(clip_frames.fps / 2)
    assert part.start_time == pytest.approx(30 / clip_frames.fps)


def test_frame_cap(clip_bytes, clip_frames):
    with pytest.raises(LimitExceededError, match="limit is 50 frames"):
        media.decode_video(clip_bytes, Limits(max_frames=50))
    first = media.decode_video(clip_bytes, Limits(max_frames=50), max_frames=5)
    np.testing.assert_array_equal(first.frames, clip_frames.frames[:5])
    with pytest.raises(LimitExceededError, match="max_frames=60 exceeds"):
        media.decode_video(clip_bytes, Limits(max_frames=50), max_frames=60)
    strided = media.decode_video(clip_bytes, Limits(max_frames=60), stride=2)
    assert strided.num_frames == 60


def test_duration_and_total_pixel_caps(clip_bytes):
    with pytest.raises(LimitExceededError, match="limit is 2 s"):
        media.decode_video(clip_bytes, Limits(max_duration_s=2.0))
    assert media.decode_video(clip_bytes, Limits(max_duration_s=2.0), end=1.5).num_frames == 45
    with pytest.raises(LimitExceededError, match="in total"):
        media.decode_video(clip_bytes, Limits(max_total_pixels=176 * 144 * 10))
    with pytest.raises(LimitExceededError, match="video frame is 176x144"):
        media.decode_video(clip_bytes, Limits(max_pixels=176 * 143))


def test_bad_range_options(clip_bytes):
    with pytest.raises(InvalidRequestError, match="stride"):
        media.decode_video(clip_bytes, stride=0)
    with pytest.raises(InvalidRequestError, match="end must be after start"):
        media.decode_video(clip_bytes, start=2.0, end=1.0)
    with pytest.raises(InvalidRequestError, match=r"no frames in \[100, end\) s; the clip is 4 s long"):
        media.decode_video(clip_bytes, start=100.0)


@pytest.mark.parametrize(
    ("options", "param", "message"),
    [
        ({"start": 1e15}, "start", r"no frames in \[1e\+15, end\)"),  # was OverflowError: a 500
        ({"start": 4.5, "end": 9.0}, "start", r"no frames in \[4.5, 9\)"),
        ({"end": 0.001}, "end", r"no frames in \[0, 0.001\)"),
        ({"start": math.nan}, "start", "finite"),
        ({"end": math.inf}, "end", "end must be"),
        ({"stride": 10**9}, "stride", "frames per second"),  # would record an unreadable fps
        ({"max_frames": 0}, "max_frames", ">= 1"),
    ],
)
def test_time_options_out_of_range_are_422_naming_the_option(clip_bytes, options, param, message):
    with pytest.raises(InvalidRequestError, match=message) as caught:
        media.decode_video(clip_bytes, **options)
    assert caught.value.param == param and caught.value.http_status == 422


def test_truncated_real_mp4(clip_bytes):
    with pytest.raises(InvalidMediaError, match="truncated"):
        media.decode_video(clip_bytes[: len(clip_bytes) // 2])


def test_encode_video_round_trip(panning_frames):
    data = media.encode_video(panning_frames, 30000 / 1001)  # odd 63x85: padded to 64x86 for yuv420p
    assert media.sniff_media(data) == "video"
    back = media.decode_video(data)
    assert back.frames.shape == (12, 64, 86, 3)
    assert back.fps == pytest.approx(30000 / 1001, abs=1e-6)
    quality = psnr(back.frames[:, :63, :85], panning_frames)
    assert quality > 30, quality


def test_encode_real_clip_round_trip(clip_frames):
    source = clip_frames.frames[:12]
    back = media.decode_video(media.encode_video(source, clip_frames.fps))
    assert back.frames.shape == source.shape
    assert psnr(back.frames, source) > 30


def _phone_clip(path, source: np.ndarray) -> None:
    """``source`` (T, H, W, 3), stored as H.264 with display rotation metadata, as phones record:
    players show the stored frames turned 90 degrees counterclockwise."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = source.shape[2], source.shape[1], "yuv420p"
        stream.options = {"crf": "12"}
        stream.set_display_rotation(90)
        for rgb in source:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_video_rotation_metadata_is_applied(tmp_path, panning_frames):
    path = tmp_path / "phone.mp4"
    source = panning_frames[:3, :62, :84]
    _phone_clip(path, source)
    upright = media.read_video(path).frames
    assert upright.shape == (3, 84, 62, 3)
    assert psnr(upright, np.rot90(source, 1, axes=(1, 2))) > 30
    assert psnr(upright, np.rot90(source, -1, axes=(1, 2))) < 20


def test_decode_video_to_tensor_gives_the_same_frames_channels_first(tmp_path, clip_bytes, panning_frames):
    """The runner's way in (frames written channels first as they decode) gives exactly decode_video's
    frames in the models' layout, for a whole clip (its buffer partly unused), a range with a stride,
    a frame cap and a phone's rotated clip, as a contiguous (1, 3, T, H, W) uint8 tensor of its own."""
    path = tmp_path / "phone.mp4"
    _phone_clip(path, panning_frames[:3, :62, :84])
    cases = {
        "whole": (clip_bytes, {}),
        "range-stride": (clip_bytes, {"start": 1.0, "end": 2.0, "stride": 2}),
        "first-frames": (clip_bytes, {"max_frames": 5}),
        "rotated": (path, {}),
    }
    for name, (source, options) in cases.items():
        expected = media.decode_video(source, **options)
        video = media.decode_video_tensor(source, **options)
        assert video.pixels.dtype == torch.uint8 and video.pixels.is_contiguous(), name
        assert video.pixels.untyped_storage().nbytes() == video.pixels.numel(), name
        assert torch.equal(video.pixels, media.video_to_tensor(expected.frames)), name
        assert (video.fps, video.start_time) == (expected.fps, expected.start_time), name
        # resized as each frame is decoded: the pixels of resizing the whole clip afterwards
        seen: list[tuple[int, int]] = []
        resized = media.decode_video_tensor(source, **options, resize_to=_odd_factors(seen))
        assert seen == [tuple(video.pixels.shape[-2:])], name  # the upright size, asked once
        size = _odd_factors([])(*video.pixels.shape[-2:])
        assert (
            resized.pixels.is_contiguous()
            and resized.pixels.untyped_storage().nbytes() == resized.pixels.numel()
        )
        assert torch.equal(resized.pixels, resize_model_input(video.pixels, size)), name
    with pytest.raises(LimitExceededError, match="too large"):
        media.decode_video_tensor(clip_bytes, resize_to=_refuse)


@pytest.mark.parametrize("channels_first", [False, True])
@pytest.mark.parametrize("estimate", [2, 5, 6, 12], ids=["undercount", "exact", "over", "mostly-unused"])
def test_frame_buffer_keeps_every_frame_whatever_the_estimate(channels_first, estimate, panning_frames):
    """A header's frame estimate may be short (the buffer doubles), exact, a little over (channels
    first compacts in place) or far over (copied out): every frame is kept, in order, contiguous."""
    buffer = media._FrameBuffer(estimate, max_total_pixels=10**9, channels_first=channels_first)
    for frame in panning_frames[:5]:
        buffer.append(frame)
    frames = buffer.frames()
    assert frames.flags.c_contiguous
    np.testing.assert_array_equal(
        frames, panning_frames[:5].transpose(3, 0, 1, 2) if channels_first else panning_frames[:5]
    )


def test_truncated_faststart_mp4(panning_frames):
    data = media.encode_video(panning_frames, 25.0)  # moov atom first
    with pytest.raises(InvalidMediaError, match="truncated"):
        media.decode_video(data[: len(data) // 2])


def test_garbage_video_bytes():
    fake = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8  # MP4 magic, garbage body
    assert media.sniff_media(fake) == "video"
    with pytest.raises(InvalidMediaError, match="truncated, corrupt or not a video"):
        media.decode_video(fake)
    with pytest.raises(InvalidMediaError, match="expected a video, got an image"):
        media.decode_video(png_header_only(4, 4))


def test_encode_video_validates_input(clip_frames):
    for fps in (0, 1e-300, math.inf, 1e9):  # 1e-300 was written at 24 fps without a word
        with pytest.raises(InvalidRequestError, match=r"fps must be a frame rate in \[0.001, 1000\]"):
            media.encode_video(clip_frames.frames[:2], fps)
    with pytest.raises(InvalidRequestError, match="fps must be a frame rate"):
        DecodeOptions(fps=1e-300)  # the HTTP decode's and the CLI's options: refused before work
    with pytest.raises(ShapeMismatchError):
        media.encode_video(clip_frames.frames[0], 25)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp", "mp4"])
def test_corrupted_files_raise_typed_errors_only(photo, panning_frames, fmt):
    """Random byte flips and cuts of valid files: each either decodes or raises a TokenizerError."""
    if fmt == "mp4":
        original, decode = media.encode_video(panning_frames, 25.0), media.decode_video
    else:
        original, decode = media.encode_image(photo, fmt), media.decode_image
    rng = np.random.default_rng(0)
    outcomes = {"decoded": 0, "refused": 0}
    for _ in range(40):
        corrupt = bytearray(original)
        for index in rng.integers(0, len(corrupt), size=rng.integers(1, 40)):
            corrupt[index] = int(rng.integers(0, 256))
        if rng.random() < 0.3:
            corrupt = corrupt[: int(rng.integers(1, len(corrupt)))]
        try:
            decode(bytes(corrupt))
            outcomes["decoded"] += 1
        except TokenizerError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0, outcomes
