"""Video reconstruction metrics on uint8 clips (N, 3, T, H, W) [0, 255].

Per-frame PSNR/SSIM (averaged over frames, one value per clip), a temporal-difference PSNR that
scores motion fidelity (flicker and frozen motion show up here even when per-frame PSNR is high),
frame-level features for FID, and rFVD when an I3D TorchScript is supplied.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from evals.fid import sha1_file
from evals.image_metrics import PEAK, check_pair, psnr, psnr_float, ssim
from tokenizers_svc.errors import ConfigError, ShapeMismatchError

I3D_SIZE = 224


def frames(clips: torch.Tensor) -> torch.Tensor:
    """(N, C, T, H, W) -> (N*T, C, H, W), clip-major."""
    n, c, t, h, w = clips.shape
    return clips.transpose(1, 2).reshape(n * t, c, h, w)


def _check_clips(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.ndim != 5:
        raise ShapeMismatchError(
            f"expected clips (N, C, T, H, W), got shape {tuple(a.shape)}", param="pixels"
        )
    check_pair(frames(a), frames(b))


def per_frame_psnr(original: torch.Tensor, reconstruction: torch.Tensor) -> np.ndarray:
    """uint8 clip pair -> (N,) mean over frames of per-frame PSNR (dB, peak 255)."""
    _check_clips(original, reconstruction)
    n, t = original.shape[0], original.shape[2]
    return psnr(frames(original), frames(reconstruction)).reshape(n, t).mean(1)


def per_frame_ssim(original: torch.Tensor, reconstruction: torch.Tensor) -> np.ndarray:
    """uint8 clip pair -> (N,) mean over frames of per-frame SSIM."""
    _check_clips(original, reconstruction)
    n, t = original.shape[0], original.shape[2]
    return ssim(frames(original), frames(reconstruction)).reshape(n, t).mean(1)


def temporal_difference_psnr(original: torch.Tensor, reconstruction: torch.Tensor) -> np.ndarray:
    """uint8 clip pair -> (N,) PSNR between frame differences x[t+1] - x[t] of original and reconstruction.

    Differences live in [-255, 255]; the peak stays 255 so values are on the same scale as PSNR.
    Clips of one frame have no motion and give NaN.
    """
    _check_clips(original, reconstruction)
    if original.shape[2] < 2:
        return np.full(original.shape[0], np.nan)
    da = original.double().diff(dim=2)  # (N, C, T-1, H, W)
    db = reconstruction.double().diff(dim=2)
    return psnr_float(da, db, PEAK)


@dataclass
class I3D:
    """A user-supplied I3D TorchScript for rFVD: (N, 3, T, 224, 224) float [-1, 1] -> (N, D) features."""

    module: torch.jit.ScriptModule
    path: Path
    sha1: str

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> I3D:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"I3D TorchScript not found: expected a file at {file}", param="i3d")
        try:
            module = torch.jit.load(str(file), map_location=device)
        except RuntimeError as exc:
            raise ConfigError(f"{file} is not a loadable TorchScript file: {exc}", param="i3d") from None
        return cls(module.eval(), file, sha1_file(file))

    @torch.no_grad()
    def features(self, clips: torch.Tensor) -> np.ndarray:
        """uint8 (N, 3, T, H, W) -> (N, D) float64 features (frames resized to 224x224 bilinear)."""
        n, c, t, h, w = clips.shape
        x = frames(clips).float()
        if (h, w) != (I3D_SIZE, I3D_SIZE):
            x = F.interpolate(x, size=(I3D_SIZE, I3D_SIZE), mode="bilinear", align_corners=False)
        x = x.reshape(n, t, c, I3D_SIZE, I3D_SIZE).transpose(1, 2) / 127.5 - 1  # (N, 3, T, 224, 224)
        device = next(iter(self.module.parameters()), torch.empty(0)).device
        feats = self.module(x.to(device))
        return feats.reshape(n, -1).double().cpu().numpy()
