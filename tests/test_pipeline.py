"""The shared runner (load_media -> encode_media -> decode_to_media) on real photos and clips."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
import torch
from skimage import data as skdata

from tokenizers_svc import media
from tokenizers_svc.errors import (
    InvalidMediaError,
    InvalidRequestError,
    LimitExceededError,
    UnsupportedMediaTypeError,
)
from tokenizers_svc.latents import latents_from_bytes
from tokenizers_svc.limits import Limits
from tokenizers_svc.loading import load_tokenizer
from tokenizers_svc.pipeline import EncodeOptions, decode_to_media, encode_media, load_media
from tokenizers_svc.pixels import policy_size
from tokenizers_svc.registry import list_presets

# Tiny random-init presets that take video, in order of preference (registered by the models and
# backends helpers); the video tests use the first one present.
VIDEO_PRESETS = (
    "video-vae-tiny",
    "wan-vae-tiny",
    "cogvideox-vae-tiny",
    "cosmos-vae-tiny",
    "hunyuan-video-vae-tiny",
    "mochi-vae-tiny",
    "vitok-tiny-2x8",
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("sd-vae-tiny")


@pytest.fixture(scope="module")
def video_tokenizer():
    registered = {p.name for p in list_presets()}
    for name in VIDEO_PRESETS:
        if name in registered:
            return load_tokenizer(name)
    pytest.skip(f"no tiny video preset registered yet (looked for {', '.join(VIDEO_PRESETS)})")


@pytest.fixture(scope="module")
def photo_png() -> bytes:
    """A real photo (scikit-image's coffee) cropped to an odd 45x61, as PNG bytes."""
    return media.encode_image(np.ascontiguousarray(skdata.coffee()[100:280:4, 150:394:4]), "png")


@pytest.fixture(scope="module")
def clip_mp4() -> bytes:
    """A 9-frame 48x64 H.264 clip at 24 fps panning across a real photo."""
    astronaut = skdata.astronaut()
    frames = np.stack(
        [astronaut[80 + 4 * t : 176 + 4 * t : 2, 120 + 5 * t : 248 + 5 * t : 2] for t in range(9)]
    )
    return media.encode_video(frames, 24.0)


def test_load_image(photo_png):
    loaded = load_media(photo_png)
    assert loaded.kind == "image" and loaded.fps is None and loaded.num_frames is None
    assert loaded.pixels.shape == (1, 3, 45, 61) and loaded.pixels.dtype == torch.uint8
    assert loaded.original_size == (45, 61)
    assert loaded.sha256 == hashlib.sha256(photo_png).hexdigest()
    np.testing.assert_array_equal(media.tensor_to_image(loaded.pixels), media.decode_image(photo_png))


def test_load_video_with_frame_options(clip_mp4):
    full = load_media(clip_mp4)
    assert full.kind == "video" and full.pixels.shape == (1, 3, 9, 48, 64)
    assert full.fps == pytest.approx(24.0)
    strided = load_media(clip_mp4, options=EncodeOptions(max_frames=3, stride=2))
    assert strided.pixels.shape == (1, 3, 3, 48, 64) and strided.fps == pytest.approx(12.0)
    assert torch.equal(strided.pixels, full.pixels[:, :, 0:6:2])


def test_load_media_limits_and_garbage(photo_png, clip_mp4):
    with pytest.raises(LimitExceededError, match="limit is 1,000 pixels"):
        load_media(photo_png, Limits(max_pixels=1000))
    with pytest.raises(LimitExceededError, match="limit is 4 frames"):
        load_media(clip_mp4, Limits(max_frames=4))
    with pytest.raises(InvalidMediaError):
        load_media(b"\x00" * 100)


@pytest.mark.parametrize("resolution", [20_000, 100_000])
def test_resize_past_the_pixel_cap_is_refused_before_resizing(photo_png, resolution):
    """Issue 13 case 1: a 45x61 photo upscaled to `fit` 20000 would be 14754x20000 = 295 MP."""
    options = EncodeOptions(resize="fit", resolution=resolution)
    with pytest.raises(
        LimitExceededError,
        match=r"resize=fit to \d+ is \d+x\d+ = [\d,]+ pixels per frame; the limit is 16,000,000",
    ) as info:
        load_media(photo_png, options=options)
    assert info.value.param == "resolution" and info.value.http_status == 413
    assert load_media(photo_png, options=EncodeOptions(resize="fit", resolution=256)).original_size == (
        45,
        61,
    )


@pytest.mark.parametrize(
    ("flags", "param", "says"),
    [
        ({"resolution": 64}, "resolution", "resolution=64 needs resize='shorter-side' or resize='fit'"),
        ({"resize": "fit"}, "resolution", "resize='fit' needs a positive resolution"),
        ({"resize": "crop", "resolution": 64}, "resize", "resize must be one of"),
        ({"seed": 3}, "seed", "seed=3 only applies with sample=true"),
    ],
)
def test_options_that_do_not_say_one_thing_are_refused_when_made(flags, param, says):
    """Every entry point builds its options with ``from_flags`` (CLI, HTTP query, batch job), so an
    option that would be ignored (a lone resolution or seed) or is incomplete is refused there,
    before any media is read."""
    with pytest.raises(InvalidRequestError, match=re.escape(says)) as info:
        EncodeOptions.from_flags(flags)
    assert info.value.param == param


@pytest.mark.parametrize("kind", ["image", "video"])
def test_load_media_resizes_and_the_latents_record_the_source_size(
    tokenizer, video_tokenizer, photo_png, clip_mp4, kind
):
    """The options' resize happens once, as the media is loaded; the latents equal the library's
    encode of the decoded pixels with the same resize, and record the size they were resized from."""
    data, model, size = (
        (photo_png, tokenizer, (45, 61)) if kind == "image" else (clip_mp4, video_tokenizer, (48, 64))
    )
    options = EncodeOptions(resize="shorter-side", resolution=32)
    loaded = load_media(data, options=options)
    assert loaded.pixels.dtype == torch.uint8 and loaded.pixels.shape[-2:] == policy_size(
        *size, "shorter-side", 32
    )
    assert loaded.original_size == size and loaded.resized_from == size
    assert load_media(data).resized_from is None
    latents = encode_media(model, loaded, options)
    assert latents.resized_from == size and latents.original_size == tuple(loaded.pixels.shape[-2:])
    library = model.encode(load_media(data).pixels, resize="shorter-side", resolution=32)
    assert library.resized_from == size
    torch.testing.assert_close(latents.latents, library.latents, rtol=0, atol=0)


def test_decode_output_pixels_are_capped(tokenizer, photo_png):
    """Issue 13 case 2: the decode's output pixels (not only latent elements) are counted first."""
    latents = encode_media(tokenizer, load_media(photo_png))  # f2: 23x31 latents -> 46x62 pixels
    with pytest.raises(LimitExceededError, match="46x62 = 2,852 pixels per frame; the limit is 2,000"):
        decode_to_media(tokenizer, latents, "png", limits=Limits(max_pixels=2000))
    with pytest.raises(LimitExceededError, match="2,852 latent elements; the limit is 100"):
        decode_to_media(tokenizer, latents, "png", limits=Limits(max_latent_elements=100))


def test_image_round_trip_through_every_format(tokenizer, photo_png):
    loaded = load_media(photo_png)
    latents = encode_media(tokenizer, loaded, EncodeOptions(normalize=False))
    assert latents.source_sha256 == loaded.sha256 and latents.fps is None
    assert not latents.normalized and latents.original_size == (45, 61)
    latents = latents_from_bytes(latents.to_bytes())  # as a client would receive them
    expected = media.tensor_to_image(tokenizer.decode(latents, output_dtype=torch.uint8))
    for fmt, media_type in (("png", "image/png"), ("jpeg", "image/jpeg"), ("webp", "image/webp")):
        data, kind = decode_to_media(tokenizer, latents, fmt)
        assert kind == media_type
        image = media.decode_image(data)
        assert image.shape == (45, 61, 3)
        if fmt == "png":
            np.testing.assert_array_equal(image, expected)


def test_cross_kind_and_batch_errors(tokenizer, photo_png, clip_mp4):
    latents = encode_media(tokenizer, load_media(photo_png))
    with pytest.raises(InvalidRequestError, match=r"hold an image .* got mp4"):
        decode_to_media(tokenizer, latents, "mp4")
    with pytest.raises(UnsupportedMediaTypeError, match="got 'gif'"):
        decode_to_media(tokenizer, latents, "gif")
    with pytest.raises(InvalidRequestError, match="encodes images only; got a video of 9 frames"):
        encode_media(tokenizer, load_media(clip_mp4))
    pair = tokenizer.encode(torch.cat([load_media(photo_png).pixels] * 2))
    with pytest.raises(InvalidRequestError, match="batch of 2"):
        decode_to_media(tokenizer, pair, "png")


def test_seeded_sampling_is_reproducible(tokenizer, photo_png):
    loaded = load_media(photo_png)
    options = EncodeOptions(sample=True, seed=7, return_posterior=True)
    first, second = encode_media(tokenizer, loaded, options), encode_media(tokenizer, loaded, options)
    assert first.sampled and torch.equal(first.latents, second.latents)
    other = encode_media(tokenizer, loaded, EncodeOptions(sample=True, seed=8))
    assert not torch.equal(first.latents, other.latents)


def test_video_round_trip(video_tokenizer, clip_mp4):
    loaded = load_media(clip_mp4, options=EncodeOptions(max_frames=5))
    latents = encode_media(video_tokenizer, loaded)
    assert latents.layout == "NCTHW" and latents.original_frames == 5
    assert latents.fps == pytest.approx(24.0) and latents.source_sha256 == loaded.sha256
    data, kind = decode_to_media(video_tokenizer, latents, "mp4")
    assert kind == "video/mp4"
    video = media.decode_video(data)
    assert video.frames.shape == (5, 48, 64, 3) and video.fps == pytest.approx(24.0)
    with pytest.raises(InvalidRequestError, match=r"hold a video .* expected output format mp4"):
        decode_to_media(video_tokenizer, latents, "png")
    no_fps = latents_from_bytes(latents.to_bytes())
    no_fps.fps = None
    with pytest.raises(InvalidRequestError, match="pass fps"):
        decode_to_media(video_tokenizer, no_fps, "mp4")
    assert media.decode_video(decode_to_media(video_tokenizer, no_fps, "mp4", fps=10.0)[0]).fps == 10.0


def test_image_through_video_tokenizer(video_tokenizer, photo_png):
    latents = encode_media(video_tokenizer, load_media(photo_png))
    data, kind = decode_to_media(video_tokenizer, latents, "png")
    assert kind == "image/png" and media.decode_image(data).shape == (45, 61, 3)


def test_abandoned_work_stops_between_groups_and_tiles(tokenizer, photo_png):
    """Work under an abandoned token runs nothing more: groups are refused, tiling stops at a tile;
    a batch token is abandoned only when every request in it is."""
    from tokenizers_svc import abandon
    from tokenizers_svc.errors import RequestTimeoutError
    from tokenizers_svc.pipeline import run_in_groups
    from tokenizers_svc.tiling import TilingOptions

    calls = []
    gone, waiting = abandon.WorkToken(deadline=0.0), abandon.WorkToken()
    assert gone.abandoned and not waiting.abandoned and not abandon.WorkToken(parts=(gone, waiting)).abandoned
    with abandon.scope(abandon.WorkToken(parts=(gone,))):
        results = run_in_groups([1, 2, 3], lambda i: i % 2, lambda group: calls.append(group) or group)
        with pytest.raises(RequestTimeoutError):
            tokenizer.encode(load_media(photo_png).pixels, tiling=TilingOptions(enabled=True, tile_size=16))
    assert calls == [] and all(isinstance(result, RequestTimeoutError) for result, _ in results)
    waiting.cancel()
    assert waiting.abandoned


def test_any_model_failure_costs_only_its_own_item():
    """A model that raises something other than a TokenizerError (as GroupNorm does on a 1x1 feature
    map, issue 27) fails its group; the group is retried item by item and only the bad item fails,
    with the exception's kind and message as a typed ModelError. Groups: by parity."""
    from tokenizers_svc.errors import ModelError
    from tokenizers_svc.pipeline import run_in_groups

    calls = []

    def divide(group: list[int]) -> list[float]:
        calls.append(list(group))
        return [12 / item for item in group]

    results = run_in_groups([3, 0, 2, 4, 6], lambda item: item % 2, divide)
    assert calls == [[3], [0, 2, 4, 6], [0], [2], [4], [6]]
    assert [size for _, size in results] == [1, 1, 1, 1, 1]
    assert [result for result, _ in results if not isinstance(result, ModelError)] == [4.0, 6.0, 3.0, 2.0]
    error = results[1][0]
    assert isinstance(error, ModelError) and error.type == "model_error" and error.http_status == 500
    assert error.message == "the model failed on this input: ZeroDivisionError: division by zero"
