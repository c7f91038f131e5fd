"""tokenizers_svc.pixels: the uint8 <-> float mapping, resize policies, crops, buckets and padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tokenizers_svc.errors import DTypeMismatchError, InvalidRequestError
from tokenizers_svc.pixels import (
    bucket_sizes,
    center_crop,
    nearest_bucket,
    pad_spatial,
    policy_size,
    resize_crop,
    resize_pixels,
    resize_uint8,
    to_float_pixels,
    to_uint8_pixels,
)


def test_uint8_round_trips_and_float_rounds_half_up():
    every = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_float_pixels(every), every.float() / 127.5 - 1)  # level / 127.5 - 1, in float32
    assert torch.equal(to_uint8_pixels(to_float_pixels(every)), every)
    assert to_uint8_pixels(torch.tensor([0.0])).tolist() == [128]  # 127.5 grey levels: half up
    assert to_uint8_pixels(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]  # clamped


@pytest.mark.parametrize(
    "pixels, error",
    [
        (torch.zeros(2, dtype=torch.int16), DTypeMismatchError),
        (torch.tensor([0.0, float("nan")]), InvalidRequestError),
        (torch.tensor([0.0, 1.5]), InvalidRequestError),
    ],
)
def test_other_dtypes_and_ranges_are_refused(pixels, error):
    with pytest.raises(error):
        to_float_pixels(pixels)


def test_resize_policies_set_the_shorter_or_the_longer_side():
    assert policy_size(480, 640, "shorter-side", 240) == (240, 320)
    assert policy_size(480, 640, "fit", 320) == (240, 320)
    x = torch.zeros(1, 3, 480, 640)
    assert resize_pixels(x, "none", None) is x
    assert resize_pixels(x, "fit", 320).shape == (1, 3, 240, 320)
    with pytest.raises(InvalidRequestError, match="resolution"):
        resize_pixels(x, "fit", None)


def _pillow_bicubic(image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, h, w) uint8 by Pillow's antialiased bicubic ``Image.resize``."""
    resized = Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(resized)).permute(2, 0, 1)[None]


@pytest.mark.parametrize("policy, resolution", [("shorter-side", 100), ("fit", 317), ("fit", 700)])
def test_uint8_model_inputs_are_resized_in_uint8_as_pillow_resizes(photo_uint8, policy, resolution):
    photo = torch.from_numpy(photo_uint8[:, :480]).permute(2, 0, 1)[None].contiguous()  # (1, 3, 512, 480)
    resized = resize_pixels(photo, policy, resolution)  # down, down to odd sides, up
    size = policy_size(512, 480, policy, resolution)
    assert resized.dtype == torch.uint8 and resized.shape == (1, 3, *size) and resized.is_contiguous()
    assert (resized.int() - _pillow_bicubic(photo_uint8[:, :480], size).int()).abs().max() <= 2
    # the same kernel as the float resize, only rounded and saturated per pass: far from a hard edge
    # the two agree to the level (the astronaut's flag and suit have edges that overshoot)
    exact = resize_uint8(photo, size)
    assert (resized.int() - exact.int()).abs().float().mean() < 0.25


@pytest.mark.parametrize("height, width", [(3, 7), (2, 1), (1, 500), (1, 1), (40, 40)])
def test_uint8_images_and_clips_resize_to_a_single_pixel(photo_uint8, height, width):
    """``resize=fit`` to 1 is a legal request: every shape gets its one pixel, as Pillow's (torch's
    channels-first kernel fails an assert for this one output size)."""
    image = np.ascontiguousarray(photo_uint8[200 : 200 + height, 200 : 200 + width])
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()  # (1, 3, H, W)
    dot = resize_pixels(pixels, "fit", 1)
    assert dot.shape == (1, 3, 1, 1)
    assert (dot.int() - _pillow_bicubic(image, (1, 1)).int()).abs().max() <= 2
    clip = torch.stack([pixels[0], pixels[0].flip(0)], dim=1)[None]  # (1, 3, 2, H, W)
    assert torch.equal(resize_pixels(clip, "fit", 1)[:, :, 0], dot)


def test_uint8_clips_are_resized_frame_by_frame_and_floats_stay_float(photo_uint8):
    frames = torch.from_numpy(photo_uint8[:256, :320]).permute(2, 0, 1)  # (3, 256, 320)
    clip = torch.stack([frames, frames.flip(-1), frames.roll(17, -2)], dim=1)[None]  # (1, 3, 3, 256, 320)
    resized = resize_pixels(clip, "shorter-side", 64)
    assert resized.shape == (1, 3, 3, 64, 80) and resized.is_contiguous()
    for t in range(3):
        assert torch.equal(resized[:, :, t], resize_pixels(clip[:, :, t].contiguous(), "shorter-side", 64))
    window = resize_crop(clip, (64, 80), (48, 48), 8, 20)
    assert torch.equal(window, resized[..., 8:56, 20:68])
    floats = to_float_pixels(clip)
    resized_floats = resize_pixels(floats, "shorter-side", 64)
    assert resized_floats.dtype == torch.float32 and resized_floats.abs().max() <= 1
    assert torch.equal(resize_crop(floats, (64, 80), (48, 48), 8, 20), resized_floats[..., 8:56, 20:68])


def test_center_crop_takes_the_middle_square_after_resizing():
    image = torch.zeros(3, 40, 80, dtype=torch.uint8)
    image[:, :, 40:] = 255  # black left half, white right half
    crop = center_crop(image, 20)  # 40x80 -> 20x40 -> columns 10:30: half black, half white
    assert crop.shape == (3, 20, 20)
    assert crop[..., :8].float().mean() < 10 and crop[..., 12:].float().mean() > 245


def test_buckets_are_multiples_and_the_nearest_follows_the_aspect():
    buckets = bucket_sizes(256, 32)
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in buckets)
    assert (256, 256) in buckets
    landscape = nearest_bucket(1080, 1920, buckets)
    assert landscape[1] > landscape[0] and nearest_bucket(1920, 1080, buckets) == landscape[::-1]


def test_padding_replicates_the_last_row_and_column_of_images_and_clips():
    image = torch.arange(6.0).reshape(1, 1, 2, 3)
    padded = pad_spatial(image, 1, 2)
    assert padded.shape == (1, 1, 3, 5)
    assert torch.equal(padded[0, 0, 2], torch.tensor([3.0, 4, 5, 5, 5]))
    clip = torch.rand(1, 3, 4, 5, 6)
    padded = pad_spatial(clip, 3, 2)
    assert padded.shape == (1, 3, 4, 8, 8) and torch.equal(padded[..., :5, :6], clip)
