"""Per-image fidelity metrics: PSNR (peak 255), SSIM (Wang et al.) and LPIPS loading.

In the library because training validates (and, for SSIM and LPIPS, trains) with them and the eval
reports score with them: one definition, so a checkpoint's validation PSNR and the report's PSNR are
the same number. :func:`ssim_per_image` is the one SSIM: the float64 metric, the evaluation's float32
on-device twin and the differentiable training loss all call it. The uint8 metrics take
(N, 3, H, W) [0, 255] and return one float64 value per image so that reports can average per image
(the convention papers use) and write per-item CSV rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tokenizers_svc.errors import ConfigError, ShapeMismatchError

PEAK = 255.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
PSNR_CAP = 100.0  # identical images have infinite PSNR; a finite cap keeps means and JSON well-defined
LPIPS_BACKBONES = {  # torchvision checkpoint file each lpips net loads from the torch hub cache
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


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


def ssim_per_image(x: torch.Tensor, y: torch.Tensor, peak: float = PEAK) -> torch.Tensor:
    """Float (N, C, H, W) pair on a [0, peak] scale -> (N,) SSIM in the inputs' dtype and device,
    differentiable: Gaussian window 11, sigma 1.5, data range ``peak``, population (co)variances, 'valid'
    region only (no border padding), mean over pixels then over channels.

    Pixels are centred on peak / 2 before the second moments, so that blur(x*x) - mu^2 cancels less
    (float32 stays within 1e-4 of float64), and every plane is blurred by one depthwise convolution
    (~20x faster on CPU than a batch of single-channel ones)."""
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ShapeMismatchError(
            f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {tuple(x.shape[-2:])}",
            param="pixels",
        )
    n, c, h, w = x.shape
    middle = peak / 2
    a = (x - middle).reshape(n * c, h, w)  # (P, H, W) centred planes, channels independent
    b = (y - middle).reshape(n * c, h, w)
    planes = torch.cat([a, b, a * a, b * b, a * b]).unsqueeze(0)  # (1, 5P, H, W): one depthwise blur
    g = gaussian_window().to(device=x.device, dtype=x.dtype)
    k = planes.shape[1]
    blurred = F.conv2d(planes, g.reshape(1, 1, -1, 1).repeat(k, 1, 1, 1), groups=k)  # separable, valid
    blurred = F.conv2d(blurred, g.reshape(1, 1, 1, -1).repeat(k, 1, 1, 1), groups=k)
    mu_a, mu_b, aa, bb, ab = blurred[0].reshape(5, n * c, h - SSIM_WINDOW + 1, w - SSIM_WINDOW + 1)
    var_x = aa - mu_a**2  # centred second moments; the luminance term needs the uncentred means
    var_y = bb - mu_b**2
    cov = ab - mu_a * mu_b
    mean_x, mean_y = mu_a + middle, mu_b + middle
    c1, c2 = (SSIM_K1 * peak) ** 2, (SSIM_K2 * peak) ** 2
    s = ((2 * mean_x * mean_y + c1) * (2 * cov + c2)) / ((mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1).reshape(n, c).mean(1)


def ssim(original: torch.Tensor, reconstruction: torch.Tensor) -> np.ndarray:
    """uint8 (N, 3, H, W) pair -> (N,) float64 SSIM (:func:`ssim_per_image` with data range 255)."""
    check_pair(original, reconstruction)
    return ssim_per_image(original.double(), reconstruction.double()).numpy()


def lpips_missing(net: str = "alex") -> str | None:
    """What LPIPS with backbone ``net`` lacks on this machine, or None when it can be built: the
    ``lpips`` package (which ships the linear heads) and torchvision's backbone checkpoint in the torch
    hub cache. Nothing is ever downloaded."""
    try:
        import lpips  # noqa: F401
    except ModuleNotFoundError:
        return "the `lpips` package (pip install lpips)"
    checkpoint = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONES[net]
    if not checkpoint.is_file():
        return (
            f"torchvision's {net} backbone weights at {checkpoint} (copy {LPIPS_BACKBONES[net]} there from a "
            "machine with network access, or set TORCH_HOME to a folder whose hub/checkpoints has it)"
        )
    return None


def load_lpips(net: str = "alex") -> torch.nn.Module:
    """Frozen, eval-mode LPIPS with backbone ``net`` built from files on disk: float (N, 3, H, W)
    [-1, 1] pair -> (N, 1, 1, 1) distances. A ConfigError says what is missing."""
    missing = lpips_missing(net)
    if missing is not None:
        raise ConfigError(f"LPIPS ({net}) needs {missing}", param="lpips")
    import lpips

    return lpips.LPIPS(net=net, verbose=False).eval().requires_grad_(False)


def codebook_health(counts: torch.Tensor) -> dict[str, float]:
    """How a discrete tokenizer uses its vocabulary, from per-id counts (V,) over a set of tokens:
    ``usage`` = share of the V ids that occur, ``perplexity`` = exp(-sum p log p) of their
    frequencies (V when all are equally likely, 1 when one id is every token)."""
    total = float(counts.sum())
    if total == 0:
        return {"codebook_usage": 0.0, "perplexity": 0.0}
    p = counts.double() / total
    nonzero = p[p > 0]
    return {
        "codebook_usage": float((counts > 0).double().mean()),
        "perplexity": float(torch.exp(-(nonzero * nonzero.log()).sum())),
    }


def id_counts(ids: torch.Tensor, vocabulary_size: int) -> torch.Tensor:
    """Per-id counts (V,) int64 of integer token ids of any shape."""
    return torch.bincount(ids.flatten().to(torch.int64).cpu(), minlength=vocabulary_size)
