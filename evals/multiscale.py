"""The multi-scale crop protocol: reconstruction quality as users' photos see it.

One center crop per photo (the old protocol) measures one scale of a few images and did not predict
quality on unseen photos. Here every photo is resized so that its shorter side is each of ``scales``
(antialiased bicubic), cut into non-overlapping ``size`` x ``size`` crops (row-major grid), and crops
whose pixel standard deviation is below ``min_std`` grey levels (flat sky, blank walls: nothing to
measure) are dropped. Results are a mean with a 95% confidence interval and a per-scale table, next to
bicubic down/up-sampling that keeps the same number of floats per crop as the tokenizer's latent.

Tensors: crops are uint8 ``(N, 3, size, size)`` in [0, 255].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from evals.crops import bicubic_round_trip, grid_tiles, list_media
from evals.image_metrics import psnr
from evals.stats import MetricSums
from tokenizers_svc.media import read_image
from tokenizers_svc.pixels import resize_shorter_side

DEFAULT_SCALES = (256, 384, 512, 768)
CROP_SIZE = 256
MIN_STD = 4.0  # grey levels; crops flatter than this carry no measurable detail


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


def mean_ci(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """(mean, half width of the 95% confidence interval of the mean; normal approximation)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(1.96 * values.std(ddof=1) / math.sqrt(len(values)))


def compare(
    crops: MultiscaleCrops,
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    floats_per_item: int,
    batch_size: int = 16,
) -> dict:
    """PSNR of ``reconstruct`` (uint8 batch -> uint8 batch) and of bicubic at equal floats on every crop,
    summarized by :func:`psnr_comparison`."""
    model, bicubic = [], []
    for batch in crops.pixels.split(batch_size):
        model.append(psnr(batch, reconstruct(batch).cpu()))
        bicubic.append(psnr(batch, bicubic_round_trip(batch, floats_per_item)))
    comparison = psnr_comparison(np.concatenate(model), np.concatenate(bicubic), crops.scales)
    return {**comparison, "floats_per_item": floats_per_item}


def psnr_comparison(model_psnr: np.ndarray, bicubic_psnr: np.ndarray, scales: Sequence[int]) -> dict:
    """Per-crop PSNR of a model and of bicubic at equal floats on the same crops -> :func:`comparison_from_sums`."""
    groups = [str(s) for s in scales]
    model, bicubic = MetricSums(), MetricSums()
    model.add("psnr", model_psnr, groups)
    model.add("gain_db", np.asarray(model_psnr) - np.asarray(bicubic_psnr), groups)
    bicubic.add("psnr", bicubic_psnr, groups)
    return comparison_from_sums(model, bicubic)


def comparison_from_sums(model: MetricSums, bicubic: MetricSums) -> dict:
    """A model's per-item "psnr" and paired "gain_db" sums and its bicubic baseline's "psnr" sums -> overall
    mean with 95% CI, the paired gain with its CI, and the same per scale under "per_scale"."""

    def summary(group: str) -> dict:
        n, m, m_ci = model.mean_ci("psnr", group)
        _, b, b_ci = bicubic.mean_ci("psnr", group)
        _, d, d_ci = model.mean_ci("gain_db", group)
        return {
            "n": n,
            "psnr": m,
            "psnr_ci95": m_ci,
            "bicubic_psnr": b,
            "bicubic_psnr_ci95": b_ci,
            "gain_db": d,
            "gain_ci95": d_ci,
        }

    scales = sorted((g for g in model.groups("psnr") if g != "all"), key=int)
    return {**summary("all"), "per_scale": {scale: summary(scale) for scale in scales}}
