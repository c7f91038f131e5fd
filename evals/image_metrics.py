"""Per-image fidelity metrics on uint8 pixels: PSNR and SSIM (from :mod:`tokenizers_svc.metrics`,
which training validates with too) and optional LPIPS.

Inputs are uint8 (N, 3, H, W) [0, 255]; every function returns one float64 value per image so that
reports can average per image (the convention papers use) and write per-item CSV rows.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tokenizers_svc.metrics import PEAK, PSNR_CAP, check_pair, psnr, psnr_float, ssim

__all__ = ["PEAK", "PSNR_CAP", "Lpips", "check_pair", "psnr", "psnr_float", "ssim"]


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
