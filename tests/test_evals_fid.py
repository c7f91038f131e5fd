"""FID/KID: Fréchet methods, the standard Inception and its TF1 preprocessing, behaviour on real photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evals import fid
from evals.image_metrics import psnr
from tests.helpers import frechet_distance_sqrtm, load_dataset, noise
from tokenizers_svc.errors import ConfigError, ShapeMismatchError


@pytest.fixture(scope="module")
def inception() -> fid.Inception:
    return fid.load_inception()


@pytest.fixture(scope="module")
def val_photos(shared_data) -> torch.Tensor:
    """8 real val photos, center 64x64 crops, uint8 (8, 3, 64, 64)."""
    return load_dataset(shared_data / "images" / "val", 64, "center", 8).pixels


@pytest.fixture(scope="module")
def val_features(inception, val_photos) -> np.ndarray:
    return inception.features(val_photos)  # (8, 2048) float64


@pytest.fixture(scope="module")
def val_stats(val_features) -> fid.FeatureStats:
    return fid.FeatureStats.from_features(val_features)


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = int(3 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    t = images.float().reshape(-1, 1, *images.shape[-2:])
    t = F.conv2d(F.pad(t, (radius, radius, 0, 0), mode="reflect"), g.reshape(1, 1, 1, -1))
    t = F.conv2d(F.pad(t, (0, 0, radius, radius), mode="reflect"), g.reshape(1, 1, -1, 1))
    return t.reshape(images.shape).round().clamp(0, 255).to(torch.uint8)


def test_frechet_methods_agree_to_1e6_relative():
    rng = np.random.default_rng(0)
    d = 96
    a = rng.normal(size=(600, d)) @ rng.normal(size=(d, d)) / np.sqrt(d)
    b = rng.normal(size=(600, d)) @ rng.normal(size=(d, d)) / np.sqrt(d) + 0.3
    sa, sb = fid.FeatureStats.from_features(a), fid.FeatureStats.from_features(b)
    eig, ref = fid.frechet_distance(sa, sb), frechet_distance_sqrtm(sa, sb)
    assert ref > 1.0
    assert abs(eig - ref) / ref < 1e-6


@pytest.mark.slow  # Inception features of the val photos
def test_fid_zero_on_itself_and_symmetric(inception, val_photos, val_stats):
    noisy = inception.features(noise(val_photos, 24.0))  # (8, 2048): rank-deficient covariance
    s, t = val_stats, fid.FeatureStats.from_features(noisy)
    assert noisy.shape == (8, fid.FEATURE_DIM) and noisy.dtype == np.float64
    assert abs(fid.frechet_distance(s, s)) < 1e-6 * np.trace(s.sigma)
    forward, backward = fid.frechet_distance(s, t), fid.frechet_distance(t, s)
    assert forward > 1.0
    assert abs(forward - backward) / forward < 1e-6


def test_small_n_frechet_matches_cross_gram_singular_values(inception, val_photos, val_features, val_stats):
    """Rank-deficient case (N=8 < D=2048), where sqrtm is unreliable: with S = A^T A (A = centered
    features / sqrt(N-1)), tr((S_a^{1/2} S_b S_a^{1/2})^{1/2}) is the nuclear norm of A B^T."""
    feats_a = val_features
    feats_b = inception.features(_gaussian_blur(val_photos, 1.5))
    a = (feats_a - feats_a.mean(0)) / np.sqrt(len(feats_a) - 1)
    b = (feats_b - feats_b.mean(0)) / np.sqrt(len(feats_b) - 1)
    nuclear = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    diff = feats_a.mean(0) - feats_b.mean(0)
    expected = diff @ diff + (a * a).sum() + (b * b).sum() - 2 * nuclear
    got = fid.frechet_distance(val_stats, fid.FeatureStats.from_features(feats_b))
    assert expected > 1.0
    assert abs(got - expected) / expected < 1e-6


def test_tf1_legacy_bilinear_mapping():
    x = torch.tensor([0.0, 1.0, 2.0, 3.0]).reshape(1, 1, 1, 4)
    up = fid.tf1_bilinear_resize(x, 1, 8)  # src = dst * 4/8, no half-pixel shift, edge clamped
    assert up.flatten().tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.0]
    image = torch.rand(2, 3, 20, 30) * 255
    down = fid.tf1_bilinear_resize(image, 10, 15)  # factor 2 picks even pixels exactly
    assert torch.equal(down, image[:, :, ::2, ::2])
    half_pixel = F.interpolate(image, size=(10, 15), mode="bilinear", align_corners=False)
    assert not torch.allclose(down, half_pixel)  # the legacy mapping is really a different resize


def test_features_invariant_to_resize_mode_at_299(inception, val_photos):
    """At 299x299 input every resize is the identity, so features depend only on the pixels."""
    images = load_size_299(val_photos[:2])
    x = images.float()
    for mode in ("bilinear", "bicubic"):
        assert torch.equal(F.interpolate(x, size=(299, 299), mode=mode, align_corners=False), x)
    assert torch.equal(fid.tf1_bilinear_resize(x, 299, 299), x)
    ours = inception.features(images)
    direct = inception.module((x - 128) / 128).double().numpy()
    np.testing.assert_array_equal(ours, direct)


def load_size_299(images: torch.Tensor) -> torch.Tensor:
    x = F.interpolate(images.float(), size=(299, 299), mode="bicubic", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


@pytest.mark.slow
def test_fid_and_psnr_track_blur_and_noise_on_real_photos(inception, val_photos, val_stats):
    ref = val_stats
    for degrade, levels in ((_gaussian_blur, (0.6, 1.2, 2.4)), (noise, (8.0, 24.0, 64.0))):
        fids, psnrs = [], []
        for level in levels:
            degraded = degrade(val_photos, level)
            fids.append(
                fid.frechet_distance(ref, fid.FeatureStats.from_features(inception.features(degraded)))
            )
            psnrs.append(float(psnr(val_photos, degraded).mean()))
        assert fids == sorted(fids) and fids[0] < fids[-1], (degrade.__name__, fids)
        assert psnrs == sorted(psnrs, reverse=True), (degrade.__name__, psnrs)


def test_kid_unbiased_near_zero_for_same_distribution_and_grows_with_shift():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(300, 32)), rng.normal(size=(300, 32))
    same, _ = fid.kernel_inception_distance(a, b, num_subsets=20, subset_size=200)
    shifted, _ = fid.kernel_inception_distance(a, b + 0.5, num_subsets=20, subset_size=200)
    assert abs(same) < 0.02 * shifted
    assert shifted > 0
    with pytest.raises(ShapeMismatchError, match="equal d"):
        fid.kernel_inception_distance(a, b[:, :16])


def test_inception_checksum_mismatch_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "default_1.pt"
    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(fake))
    monkeypatch.setattr(fid, "default_inception_path", lambda: fake)
    with pytest.raises(ConfigError, match="expected a16e4d89"):
        fid.load_inception()
    other = fid.load_inception(fake)  # an explicit --inception file is accepted, flagged non-standard
    assert not other.standard


def test_features_refuse_float_images(inception):
    with pytest.raises(ShapeMismatchError, match="uint8"):
        inception.features(torch.zeros(1, 3, 32, 32))


def test_small_n_label():
    assert "not comparable" in fid.sample_size_label(14)
    assert fid.sample_size_label(5000) == "N=5000"
