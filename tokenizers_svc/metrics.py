"""Per-image fidelity metrics on uint8 pixels: PSNR (peak 255) and SSIM (Wang et al.).

In the library because training validates with them and the eval reports score with them: one
definition, so a checkpoint's validation PSNR and the report's PSNR are the same number. Inputs are
uint8 (N, 3, H, W) [0, 255]; every function returns one float64 value per image so that reports can
average per image (the convention papers use) and write per-item CSV rows.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from tokenizers_svc.errors import ShapeMismatchError

PEAK = 255.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
PSNR_CAP = 100.0  # identical images have infinite PSNR; a finite cap keeps means and JSON well-defined


def check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    """Both uint8 with equal shape (N, C, H, W)."""
    if a.shape != b.shape:
        raise ShapeMismatchError(
            f"original and reconstruction shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}", param="pixels"
        )
    if a.dtype != torch.uint8 or b.dtype != torch.uint8:
        raise ShapeMismatchError(
            f"metrics need uint8 [0, 255] pixels, got {a.dtype} and {b.dtype}", param="pixels"
        )
    if a.ndim != 4:
        raise ShapeMismatchError(f"expected (N, C, H, W), got shape {tuple(a.shape)}", param="pixels")


def psnr(original: torch.Tensor, reconstruction: torch.Tensor) -> np.ndarray:
    """uint8 (N, C, H, W) pair -> (N,) PSNR in dB with peak 255 (capped at PSNR_CAP for exact copies)."""
    check_pair(original, reconstruction)
    return psnr_float(original.double(), reconstruction.double())


def psnr_float(a: torch.Tensor, b: torch.Tensor, peak: float = PEAK) -> np.ndarray:
    """float64 (N, ...) pair on a [0, peak]-scaled axis -> (N,) PSNR in dB."""
    mse = ((a - b) ** 2).flatten(1).mean(1).numpy()
    with np.errstate(divide="ignore"):
        values = 10 * np.log10(peak**2 / mse)
    return np.minimum(values, PSNR_CAP)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalized 1-D Gaussian taps (size,), float64."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def ssim(original: torch.Tensor, reconstruction: torch.Tensor) -> np.ndarray:
    """uint8 (N, 3, H, W) pair -> (N,) SSIM: Gaussian window 11, sigma 1.5, data range 255, population
    (co)variances, 'valid' region only (no border padding), mean over pixels then over channels."""
    check_pair(original, reconstruction)
    if min(original.shape[-2:]) < SSIM_WINDOW:
        raise ShapeMismatchError(
            f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {tuple(original.shape[-2:])}",
            param="pixels",
        )
    n, c = original.shape[:2]
    x = original.double().reshape(n * c, 1, *original.shape[-2:])  # (N*C, 1, H, W), channels independent
    y = reconstruction.double().reshape(n * c, 1, *original.shape[-2:])
    g = gaussian_window()

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable valid filtering: (B, 1, H-10, W-10)
        t = F.conv2d(t, g.reshape(1, 1, -1, 1))
        return F.conv2d(t, g.reshape(1, 1, 1, -1))

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * PEAK) ** 2, (SSIM_K2 * PEAK) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1).reshape(n, c).mean(1).numpy()
