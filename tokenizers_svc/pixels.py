"""Pixel conversions and resizing: the one place that says how uint8 and float pixels map onto
each other and how images are resized and cropped.

A leaf module (torch, the errors and the options' names only), imported by the Tokenizer, media, evals and training.
Conventions: uint8 is [0, 255]; float is [-1, 1]; float -> uint8 rounds half up (what the eval
metrics assume); resizing is antialiased, bicubic unless a caller names another kernel.

Two resizes, for two purposes:
- model inputs (:func:`resize_pixels`, :func:`resize_crop`: the ``resize`` option of every entry point,
  the batch job's crops) keep their dtype. uint8 pixels are resized in uint8, by torch's fixed-point
  kernel, the arithmetic of Pillow's ``Image.resize`` (within 2 levels of it, tests/test_pixels.py):
  each pass rounds and saturates, so bicubic overshoot at a hard edge is cut after the first pass.
  It is what decoding pipelines do (Pillow, torchvision, diffusers' image processor), and it is
  several times faster than resizing in float: from a 12 MP photo to a shorter side of 256, 35 ms
  against 125 ms plus 60 ms to convert the photo to float first; for the median shared photo
  (0.86 MP) 0.6 ms against 3.7 (docs/benchmarks.md, "Batch", session 27). Decoded images are
  resized straight from the decoder's memory (``media.decode_image_tensor``), faster still.
- the evaluation and training crops (:func:`resize_uint8` and what builds on it) resize in float and
  round once: the protocol's pixels stay what they were when its numbers were measured.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from tokenizers_svc.errors import DTypeMismatchError, InvalidRequestError
from tokenizers_svc.options import RESIZE_POLICIES

ResizeMode = Literal["bicubic", "bilinear"]
# How model inputs are resized (module docstring), by name: a batch job that resizes or crops pins
# it in its job.json, so that a run resumed by a version whose resize gives other pixels refuses the
# directory instead of mixing two kinds of latents in it. A new name for any change of the pixels.
MODEL_INPUT_RESIZE = "dtype-preserving-bicubic-v1"  # uint8 by torch's fixed-point kernel, float in float
CROP_MODES: tuple[str, ...] = ("none", "center", "random")
# Aspect-ratio buckets (width:height): landscape, square and portrait photos and video frames.
ASPECT_RATIOS: tuple[tuple[int, int], ...] = ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16))
PIXEL_RANGE_TOLERANCE = 1e-3  # float pixels may exceed [-1, 1] by rounding error only


def to_float_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [-1, 1] (any layout) -> float32 [-1, 1]. Refuses other dtypes/ranges."""
    if pixels.dtype == torch.uint8:
        # in place on the one new float tensor: the same values as ``pixels.float() / 127.5 - 1``
        # without two more tensors of its size (a 12 MP photo: 42-44 ms instead of 61)
        return pixels.float().div_(127.5).sub_(1.0)
    if not torch.is_floating_point(pixels):
        raise DTypeMismatchError(
            f"pixels must be uint8 [0, 255] or float [-1, 1], got {str(pixels.dtype).removeprefix('torch.')}",
            param="pixels",
        )
    if not bool(torch.isfinite(pixels).all()):
        raise InvalidRequestError("pixels contain NaN/Inf; expected finite floats in [-1, 1]", param="pixels")
    low, high = float(pixels.min()), float(pixels.max())
    if low < -1 - PIXEL_RANGE_TOLERANCE or high > 1 + PIXEL_RANGE_TOLERANCE:
        raise InvalidRequestError(
            f"float pixels must be in [-1, 1], got range [{low:.3f}, {high:.3f}] "
            "(pass uint8 for [0, 255] data)",
            param="pixels",
        )
    return pixels.float().clamp(-1, 1)


def to_uint8_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], round half up (the convention the eval metrics use)."""
    return torch.floor((pixels.float().clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8)


def as_uint8_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 passes through; float [-1, 1] is rounded (:func:`to_uint8_pixels`); other dtypes are refused."""
    if pixels.dtype == torch.uint8:
        return pixels
    if not torch.is_floating_point(pixels):
        raise DTypeMismatchError(
            f"pixels must be uint8 [0, 255] or float [-1, 1], got {pixels.dtype}", param="pixels"
        )
    return to_uint8_pixels(pixels)


def policy_size(height: int, width: int, policy: str, resolution: int) -> tuple[int, int]:
    """(H, W) after ``policy``: 'shorter-side' -> shorter side == resolution, 'fit' -> longer side."""
    scale = resolution / (min(height, width) if policy == "shorter-side" else max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _interpolate(x: torch.Tensor, size: tuple[int, int], mode: ResizeMode) -> torch.Tensor:
    """float (..., H, W) -> (..., h, w): the leading dims are flattened into one batch of planes."""
    planes = x.reshape(-1, 1, *x.shape[-2:])  # (P, 1, H, W); every plane is resized on its own
    out = F.interpolate(planes, size=size, mode=mode, antialias=True, align_corners=False)
    return out.reshape(*x.shape[:-2], *size)


def _interpolate_uint8(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (N, C, H, W) or (N, C, T, H, W) -> uint8 of spatial ``size``, antialiased bicubic in
    torch's fixed-point kernel (module docstring), contiguous. Images go in as they are: torch's
    kernel is fastest on whole (N, C, H, W) images. A clip goes frame by frame into its output, so
    that only one frame is ever copied: transposing the clip's frames into one batch and back held
    two more copies of it (bigbuckbunny, 132 frames of 720p to 256: 520 ms and 392 MB more at the
    peak, against 371 ms and 44 MB)."""
    if x.ndim == 4:
        return _interpolate_uint8_images(x, size)
    n, c, t, _, _ = x.shape
    out = torch.empty((n, c, t, *size), dtype=x.dtype, device=x.device)  # (N, C, T, h, w)
    for index in range(t):
        out[:, :, index] = _interpolate_uint8_images(x[:, :, index], size)  # (N, C, H, W), a strided view
    return out


def _interpolate_uint8_images(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> (N, C, h, w), torch's fixed-point antialiased bicubic. torch 2.13's
    kernel fails an internal assert for three channels-first channels resized to a single pixel
    (``num_channels == unpacked_output.size(0)``; every other size of 1-6 x 1-6 into 1-4 x 1-4,
    1, 3 or 4 channels, either layout, resizes), so that one case goes in channels last."""
    if tuple(size) == (1, 1):
        x = x.contiguous(memory_format=torch.channels_last)
    return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)


def resize_model_input(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Model input pixels resized to ``size`` in their own dtype: uint8 [0, 255] in uint8, float
    [-1, 1] in float (clamped back into range)."""
    if pixels.dtype == torch.uint8:
        return _interpolate_uint8(pixels, size)
    return _interpolate(pixels, size, "bicubic").clamp(-1, 1)


def check_resize(policy: str, resolution: int | None) -> None:
    """Refuse a resize request that does not say one thing (InvalidRequestError naming the
    parameter): an unknown policy, 'shorter-side' or 'fit' without a positive resolution, or a
    resolution with 'none', which keeps the input's size (a resolution alone used to be ignored, and
    the input was encoded at its own size without a word)."""
    if policy not in RESIZE_POLICIES:
        raise InvalidRequestError(
            f"resize must be one of {list(RESIZE_POLICIES)}, got {policy!r}", param="resize"
        )
    if policy == "none" and resolution is not None:
        raise InvalidRequestError(
            f"resolution={resolution} needs resize='shorter-side' or resize='fit' (resize='none' keeps "
            "the input's size)",
            param="resolution",
        )
    if policy != "none" and (not resolution or resolution < 1):
        raise InvalidRequestError(
            f"resize={policy!r} needs a positive resolution, got {resolution}", param="resolution"
        )


def resized_size(height: int, width: int, policy: str, resolution: int | None) -> tuple[int, int]:
    """(H, W) after the explicit resize ``policy`` (:func:`resize_pixels`), checked
    (:func:`check_resize`)."""
    check_resize(policy, resolution)
    if policy == "none":
        return height, width
    return policy_size(height, width, policy, resolution)


def checked_and_resized(pixels: torch.Tensor, policy: str, resolution: int | None) -> torch.Tensor:
    """Model input pixels as a caller handed them (N, C, [T,] H, W) -> uint8 as they are, float
    validated (:func:`to_float_pixels`: the dtype, finite, in [-1, 1]; float32), then resized by
    ``policy`` in their own dtype (:func:`resize_pixels`). What ``Tokenizer.prepare`` does first, and
    the server before a bare tensor with a resize queues."""
    x = pixels if pixels.dtype == torch.uint8 else to_float_pixels(pixels)
    return resize_pixels(x, policy, resolution)


def resize_pixels(pixels: torch.Tensor, policy: str, resolution: int | None) -> torch.Tensor:
    """Explicit resize of model input pixels (N, C, [T,] H, W), uint8 [0, 255] or float [-1, 1], in
    their own dtype (module docstring): 'shorter-side' -> shorter side == resolution, 'fit' -> longer
    side == resolution; 'none' returns the input untouched. Antialiased bicubic."""
    size = resized_size(*pixels.shape[-2:], policy, resolution)
    if size == tuple(pixels.shape[-2:]):
        return pixels
    return resize_model_input(pixels, size)


def resize_uint8(pixels: torch.Tensor, size: tuple[int, int], mode: ResizeMode = "bicubic") -> torch.Tensor:
    """uint8 (..., H, W) -> uint8 (..., size[0], size[1]), antialiased, resized in float and rounded
    half up once: the evaluation and training crops' resize (module docstring)."""
    if tuple(pixels.shape[-2:]) == tuple(size):
        return pixels
    return to_uint8_pixels(_interpolate(to_float_pixels(pixels), size, mode))


def resize_shorter_side(pixels: torch.Tensor, resolution: int, mode: ResizeMode = "bicubic") -> torch.Tensor:
    """uint8 (..., C, H, W) -> uint8 with the shorter side == resolution (aspect kept)."""
    return resize_uint8(pixels, policy_size(*pixels.shape[-2:], "shorter-side", resolution), mode)


def center_crop(pixels: torch.Tensor, resolution: int, mode: ResizeMode = "bicubic") -> torch.Tensor:
    """uint8 (..., C, H, W) -> uint8 (..., C, R, R): shorter side resized to R, then the center square."""
    pixels = resize_shorter_side(pixels, resolution, mode)
    h, w = pixels.shape[-2:]
    top, left = (h - resolution) // 2, (w - resolution) // 2
    return pixels[..., top : top + resolution, left : left + resolution]


def bucket_sizes(
    resolution: int, multiple: int, ratios: tuple[tuple[int, int], ...] = ASPECT_RATIOS
) -> tuple[tuple[int, int], ...]:
    """(H, W) per aspect ratio (width:height) with about ``resolution**2`` pixels, both sides
    multiples of ``multiple`` (so every bucket is one latent shape), duplicates dropped."""
    sizes: dict[tuple[int, int], None] = {}
    for ratio_w, ratio_h in ratios:
        aspect = math.sqrt(ratio_w / ratio_h)
        height = max(multiple, round(resolution / aspect / multiple) * multiple)
        width = max(multiple, round(resolution * aspect / multiple) * multiple)
        sizes[(height, width)] = None
    return tuple(sizes)


def nearest_bucket(height: int, width: int, buckets: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest to ``width / height`` (in log space; ties: the first)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda size: abs(math.log(size[1] / size[0]) - aspect))


def cover_size(height: int, width: int, size: tuple[int, int]) -> tuple[int, int]:
    """The smallest (H', W') with the aspect ratio of (height, width) that covers ``size``."""
    scale = max(size[0] / height, size[1] / width)
    return max(size[0], round(height * scale)), max(size[1], round(width * scale))


def resize_crop(
    pixels: torch.Tensor, cover: tuple[int, int], size: tuple[int, int], top: int, left: int
) -> torch.Tensor:
    """Model input pixels (N, C, [T,] H, W), uint8 or float -> resized to ``cover`` (antialiased
    bicubic, in their own dtype as :func:`resize_pixels`), then the ``size`` window at (top, left)
    of the resized frame: one crop for every frame of a clip."""
    if tuple(pixels.shape[-2:]) != tuple(cover):
        pixels = resize_model_input(pixels, cover)
    return pixels[..., top : top + size[0], left : left + size[1]]


def pad_spatial(x: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """Replicate-pad the bottom rows and right columns of (N, C, [T,] H, W)."""
    if x.ndim == 5:
        n, c, t, h, w = x.shape
        flat = x.transpose(1, 2).reshape(n * t, c, h, w)
        flat = F.pad(flat, (0, pad_w, 0, pad_h), mode="replicate")
        return flat.reshape(n, t, c, h + pad_h, w + pad_w).transpose(1, 2)
    return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
