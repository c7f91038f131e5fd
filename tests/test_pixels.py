"""tokenizers_svc.pixels: the uint8 <-> float mapping, resize policies, crops, buckets and padding."""

from __future__ import annotations

import pytest
import torch

from tokenizers_svc.errors import DTypeMismatchError, InvalidRequestError
from tokenizers_svc.pixels import (
    bucket_sizes,
    center_crop,
    nearest_bucket,
    pad_spatial,
    policy_size,
    resize_pixels,
    to_float_pixels,
    to_uint8_pixels,
)


def test_uint8_round_trips_and_float_rounds_half_up():
    every = torch.arange(256, dtype=torch.uint8)
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
