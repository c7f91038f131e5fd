"""Per-image fidelity metrics on uint8 pixels: PSNR and SSIM (from :mod:`tokenizers_svc.metrics`,
which training validates with too), their float32 on-device twins for streaming evaluation, and
optional LPIPS (loaded by :func:`tokenizers_svc.metrics.load_lpips`, as training's loss is).

Inputs are uint8 (N, 3, H, W) [0, 255]; every function returns one float64 value per image so that
reports can average per image (the convention papers use) and write per-item CSV rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tokenizers_svc.metrics import (
    PEAK,
    PSNR_CAP,
    check_pair,
    load_lpips,
    lpips_missing,
    psnr,
    psnr_float,
    ssim,
    ssim_per_image,
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
    """Fast :func:`ssim` for streaming: the same definition in float32 on the inputs' device -> (N,)."""
    check_pair(original, reconstruction)
    return ssim_per_image(original.float(), reconstruction.float())


@dataclass
class Lpips:
    """LPIPS (AlexNet) when the ``lpips`` package and its backbone weights are on disk; never downloaded."""

    model: torch.nn.Module | None
    reason: str  # why it is unavailable, or the variant used

    @classmethod
    def load(cls) -> Lpips:
        missing = lpips_missing("alex")
        if missing is not None:
            return cls(None, f"unavailable: needs {missing}")
        return cls(load_lpips("alex"), "lpips alex v0.1")

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
