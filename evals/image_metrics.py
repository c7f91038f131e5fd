"""Per-image fidelity metrics on uint8 pixels: PSNR and SSIM (from :mod:`tokenizers_svc.metrics`,
which training validates with too), their float32 on-device twins for streaming evaluation, and
optional LPIPS.

Inputs are uint8 (N, 3, H, W) [0, 255]; every function returns one float64 value per image so that
reports can average per image (the convention papers use) and write per-item CSV rows.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tokenizers_svc.errors import ShapeMismatchError
from tokenizers_svc.metrics import (
    PEAK,
    PSNR_CAP,
    SSIM_K1,
    SSIM_K2,
    SSIM_WINDOW,
    check_pair,
    gaussian_window,
    psnr,
    psnr_float,
    ssim,
)

__all__ = [
    "PEAK",
    "PSNR_CAP",
    "Lpips",
    "check_pair",
    "psnr",
    "psnr_device",
    "psnr_float",
    "ssim",
    "ssim_device",
]


def psnr_device(original: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Fast :func:`psnr` for streaming: uint8 (N, C, H, W) pair -> (N,) float32 on the inputs' device.
    Differences are exact integers and their squares exact in float32; only the mean rounds."""
    check_pair(original, reconstruction)
    diff = original.to(torch.int16) - reconstruction.to(torch.int16)  # exact in [-255, 255]
    mse = diff.float().square().flatten(1).mean(1)
    return (10 * torch.log10(PEAK**2 / mse)).clamp(max=PSNR_CAP)


def ssim_device(original: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Fast :func:`ssim` for streaming: the same definition in float32 on the inputs' device -> (N,).
    Pixels are centred on 128 before the second moments so that blur(x*x) - mu^2 cancels less."""
    check_pair(original, reconstruction)
    if min(original.shape[-2:]) < SSIM_WINDOW:
        raise ShapeMismatchError(
            f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {tuple(original.shape[-2:])}",
            param="pixels",
        )
    n, c, h, w = original.shape
    x = original.float().reshape(n * c, h, w) - 128  # (P, H, W) planes in [-128, 127]
    y = reconstruction.float().reshape(n * c, h, w) - 128
    planes = torch.cat([x, y, x * x, y * y, x * y]).unsqueeze(0)  # (1, 5P, H, W): one depthwise blur
    g = gaussian_window().float().to(original.device)
    channels = planes.shape[1]
    # depthwise (groups = channels) separable valid filtering: ~20x faster on CPU than (5P, 1, H, W) batches
    blurred = F.conv2d(planes, g.reshape(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)
    blurred = F.conv2d(blurred, g.reshape(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    mu_x, mu_y, xx, yy, xy = blurred[0].reshape(5, n * c, h - SSIM_WINDOW + 1, w - SSIM_WINDOW + 1)
    var_x = xx - mu_x**2  # centred second moments; the luminance term needs the uncentred means
    var_y = yy - mu_y**2
    cov = xy - mu_x * mu_y
    mean_x, mean_y = mu_x + 128, mu_y + 128
    c1, c2 = (SSIM_K1 * PEAK) ** 2, (SSIM_K2 * PEAK) ** 2
    s = ((2 * mean_x * mean_y + c1) * (2 * cov + c2)) / ((mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1).reshape(n, c).mean(1)


@dataclass
class Lpips:
    """LPIPS (AlexNet) when the ``lpips`` package and its backbone weights are on disk; never downloaded."""

    model: torch.nn.Module | None
    reason: str  # why it is unavailable, or the variant used

    @classmethod
    def load(cls) -> Lpips:
        if importlib.util.find_spec("lpips") is None:
            return cls(None, "unavailable: the `lpips` package is not installed")
        if not _torchvision_alexnet_cached():
            return cls(
                None, "unavailable: torchvision AlexNet backbone weights are not in the local torch cache"
            )
        import lpips

        return cls(lpips.LPIPS(net="alex", verbose=False).eval(), "lpips alex v0.1")

    @property
    def available(self) -> bool:
        return self.model is not None

    @torch.no_grad()
    def __call__(self, original: torch.Tensor, reconstruction: torch.Tensor) -> np.ndarray:
        """uint8 (N, 3, H, W) pair -> (N,) LPIPS distances (inputs scaled to [-1, 1])."""
        check_pair(original, reconstruction)
        a = original.float() / 127.5 - 1
        b = reconstruction.float() / 127.5 - 1
        return self.model(a, b).flatten().double().numpy()


def _torchvision_alexnet_cached() -> bool:
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    return any(checkpoints.glob("alexnet-*.pth")) if checkpoints.is_dir() else False
