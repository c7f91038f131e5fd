"""The multi-scale crop protocol: reconstruction quality as users' photos see it.

One center crop per photo (the old protocol) measures one scale of a few images and did not predict
quality on unseen photos. Here every photo is cut at several scales (``tokenizers_svc.crops``:
``multiscale_crops`` / ``load_multiscale``, shared with the trainer's latent statistics). Results are a mean with a 95% confidence interval and a per-scale table, next to
bicubic down/up-sampling that keeps the same number of floats per crop as the tokenizer's latent.

Tensors: crops are uint8 ``(N, 3, size, size)`` in [0, 255].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from evals.image_metrics import psnr
from evals.stats import MetricSums
from tokenizers_svc.crops import MultiscaleCrops, bicubic_round_trip


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
