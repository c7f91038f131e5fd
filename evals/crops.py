"""Deterministic inputs for evaluation: media listing, square crops, and the bicubic baseline at equal
floats. A leaf of evals (no other evals imports) shared by the loaders and the protocols.

Tensors: uint8 (..., C, H, W) in [0, 255].
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from tokenizers_svc.errors import InvalidRequestError
from tokenizers_svc.formats import EVAL_IMAGE_SUFFIXES, VIDEO_SUFFIXES
from tokenizers_svc.pixels import resize_shorter_side, to_uint8_pixels

SQUARE_CROPS = ("center", "grid")


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
    if crop == "center" or min(h, w) < resolution:
        image = resize_shorter_side(image, resolution)
        h, w = image.shape[-2:]
    if crop == "center":
        top, left = (h - resolution) // 2, (w - resolution) // 2
        return [("", image[..., top : top + resolution, left : left + resolution])]
    return grid_tiles(image, resolution)


def grid_tiles(image: torch.Tensor, size: int) -> list[tuple[str, torch.Tensor]]:
    """uint8 (..., H, W) -> [("#rIcJ", (..., size, size))]: non-overlapping tiles, row-major."""
    h, w = image.shape[-2:]
    return [
        (f"#r{i}c{j}", image[..., i * size : (i + 1) * size, j * size : (j + 1) * size])
        for i in range(h // size)
        for j in range(w // size)
    ]


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
