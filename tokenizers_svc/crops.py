"""Deterministic inputs for evaluation and latent statistics: media listing, square crops, the
multi-scale crop protocol's crops, clip segments, and the bicubic baseline at equal floats.

The evaluation (``evals``) scores on these inputs and the trainer's latent statistics
(``training.latent_stats``) are fitted on them; both applications import them from here.

Multi-scale crops: every photo is resized so that its shorter side is each of ``scales``
(antialiased bicubic), cut into non-overlapping ``size`` x ``size`` crops (row-major grid), and crops
whose pixel standard deviation is below ``min_std`` grey levels (flat sky, blank walls: nothing to
measure) are dropped.

Tensors: uint8 (..., C, H, W) in [0, 255]; clips uint8 (N, 3, T, R, R).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tokenizers_svc.errors import InvalidRequestError
from tokenizers_svc.formats import EVAL_IMAGE_SUFFIXES, VIDEO_SUFFIXES
from tokenizers_svc.media import probe_video, read_image, read_video
from tokenizers_svc.pixels import center_crop, resize_shorter_side, to_uint8_pixels

SQUARE_CROPS = ("center", "grid")
DEFAULT_SCALES = (256, 384, 512, 768)
CROP_SIZE = 256
MIN_STD = 4.0  # grey levels; crops flatter than this carry no measurable detail


def list_media(data: Path, kind: str) -> list[Path]:
    """Files of ``kind`` under ``data`` (recursive), sorted by relative path: the deterministic order.
    Images include BMP and TIFF, which datasets ship and the evaluation decodes."""
    if not data.is_dir():
        raise InvalidRequestError(f"--data must be a directory, got {data}", param="data")
    suffixes = EVAL_IMAGE_SUFFIXES if kind == "image" else VIDEO_SUFFIXES
    return sorted(
        (p for p in data.rglob("*") if p.suffix.lower() in suffixes), key=lambda p: str(p.relative_to(data))
    )


def square_crops(image: torch.Tensor, resolution: int, crop: str) -> list[tuple[str, torch.Tensor]]:
    """uint8 (C, H, W) -> [(suffix, (C, R, R) uint8)]. 'center': shorter side resized to R (antialiased
    bicubic) then the center square; 'grid': non-overlapping R x R tiles at native resolution, row-major
    (images with a side below R are first resized so their shorter side is R)."""
    if crop not in SQUARE_CROPS:
        raise InvalidRequestError(f"crop must be one of {list(SQUARE_CROPS)}, got {crop!r}", param="crop")
    h, w = image.shape[-2:]
    if crop == "center":
        return [("", center_crop(image, resolution))]
    if min(h, w) < resolution:
        image = resize_shorter_side(image, resolution)
    return grid_tiles(image, resolution)


def grid_tiles(image: torch.Tensor, size: int) -> list[tuple[str, torch.Tensor]]:
    """uint8 (..., H, W) -> [("#rIcJ", (..., size, size))]: non-overlapping tiles, row-major."""
    h, w = image.shape[-2:]
    return [
        (f"#r{i}c{j}", image[..., i * size : (i + 1) * size, j * size : (j + 1) * size])
        for i in range(h // size)
        for j in range(w // size)
    ]


@dataclass
class MultiscaleCrops:
    """Crops of a folder of photos at several scales; ``scales[i]`` is crop i's shorter-side scale."""

    pixels: torch.Tensor  # uint8 (N, 3, size, size)
    names: list[str]  # "file@scale#rIcJ"
    scales: list[int]

    def __len__(self) -> int:
        return len(self.names)


def multiscale_crops(
    image: torch.Tensor,
    scales: Sequence[int] = DEFAULT_SCALES,
    size: int = CROP_SIZE,
    min_std: float = MIN_STD,
) -> list[tuple[int, str, torch.Tensor]]:
    """uint8 (3, H, W) -> [(scale, "@scale#rIcJ", uint8 (3, size, size))] for every kept crop."""
    crops = []
    for scale in scales:
        if scale < size:
            raise ValueError(f"every scale must be >= the crop size {size}, got {scale}")
        resized = resize_shorter_side(image, scale)  # (3, H', W'), shorter side == scale
        for suffix, crop in grid_tiles(resized, size):
            if float(crop.float().std()) >= min_std:
                crops.append((scale, f"@{scale}{suffix}", crop.contiguous()))
    return crops


def load_multiscale(
    data: Path,
    scales: Sequence[int] = DEFAULT_SCALES,
    size: int = CROP_SIZE,
    min_std: float = MIN_STD,
    max_items: int | None = None,
) -> MultiscaleCrops:
    """Every photo under ``data`` (sorted, recursive) through :func:`multiscale_crops`."""
    pixels, names, crop_scales = [], [], []
    for path in list_media(Path(data), "image"):
        image = torch.from_numpy(read_image(path)).permute(2, 0, 1)  # (3, H, W) uint8
        for scale, suffix, crop in multiscale_crops(image, scales, size, min_std):
            pixels.append(crop)
            names.append(str(path.relative_to(data)) + suffix)
            crop_scales.append(scale)
            if max_items and len(names) >= max_items:
                return MultiscaleCrops(torch.stack(pixels), names, crop_scales)
    if not pixels:
        raise ValueError(f"no crops of size {size} with std >= {min_std} under {data}")
    return MultiscaleCrops(torch.stack(pixels), names, crop_scales)


def segment_clips(
    videos: Sequence[Path],
    segment: tuple[float, float] = (0.8, 1.0),
    clips_per_video: int = 4,
    frames: int = 17,
    resolution: int = 256,
) -> tuple[torch.Tensor, list[str]]:
    """``clips_per_video`` clips of ``frames`` frames evenly spaced inside ``segment`` (fractions of each
    file's duration; by default the held-out end), shorter side resized to ``resolution``, center
    square: uint8 (N, 3, T, R, R)."""
    clips, names = [], []
    for path in videos:
        duration, _ = probe_video(path)
        first, last = segment[0] * duration, segment[1] * duration
        for k in range(clips_per_video):
            start = first + (last - first) * k / clips_per_video
            video = read_video(path, start=start, max_frames=frames)
            if video.num_frames < frames:
                continue
            x = torch.from_numpy(video.frames).permute(0, 3, 1, 2)  # (T, 3, H, W) uint8
            clips.append(center_crop(x, resolution).permute(1, 0, 2, 3).contiguous())  # (3, T, R, R)
            names.append(f"{path.name}@{start:.2f}s")
    if not clips:
        raise ValueError(f"no held-out clip of {frames} frames in segment {segment} of {list(videos)}")
    return torch.stack(clips), names


def bicubic_size(height: int, width: int, floats: float) -> tuple[tuple[int, int], float]:
    """The (h, w) that keeps ``floats`` values of a 3-channel (height, width) image, and the side factor
    sqrt(3 * H * W / floats) it divides each side by."""
    factor = math.sqrt(3 * height * width / floats)
    return (max(1, round(height / factor)), max(1, round(width / factor))), factor


def bicubic_round_trip(pixels: torch.Tensor, floats_per_image: float) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> uint8 (N, 3, H, W): antialiased bicubic down to ``floats_per_image`` floats,
    bicubic back up, round half up. The classical codec a tokenizer has to beat at equal floats."""
    h, w = pixels.shape[-2:]
    small_size, _ = bicubic_size(h, w, floats_per_image)
    x = pixels.float() / 127.5 - 1  # (N, 3, H, W) float [-1, 1]
    small = F.interpolate(x, size=small_size, mode="bicubic", antialias=True, align_corners=False)
    return to_uint8_pixels(F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False))
