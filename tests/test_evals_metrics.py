"""PSNR/SSIM cross-checked with scikit-image; video metrics; LPIPS availability reporting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from evals import image_metrics, video_metrics
from tokenizers_svc.errors import ShapeMismatchError
from tokenizers_svc.media import read_video


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """Two real photos (astronaut, chelsea) at 64x64, uint8 (2, 3, 64, 64)."""
    a = data.astronaut()[::8, ::8]  # (64, 64, 3)
    c = data.chelsea()[::4, ::4][:64, :64]
    return torch.from_numpy(np.stack([a, c])).permute(0, 3, 1, 2).contiguous()


def _noisy(x: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (x.float() + torch.randn(x.shape, generator=gen) * std).round().clamp(0, 255).to(torch.uint8)


def test_psnr_and_ssim_match_scikit_image(photos):
    recon = _noisy(photos, 12.0)
    ours_psnr, ours_ssim = image_metrics.psnr(photos, recon), image_metrics.ssim(photos, recon)
    for i in range(len(photos)):
        a = photos[i].permute(1, 2, 0).numpy()
        b = recon[i].permute(1, 2, 0).numpy()
        ref_ssim = structural_similarity(
            a,
            b,
            channel_axis=2,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=255,
        )
        assert ours_ssim[i] == pytest.approx(ref_ssim, rel=1e-9)
        assert ours_psnr[i] == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), rel=1e-9)


def test_identical_images_score_perfectly(photos):
    assert np.all(image_metrics.psnr(photos, photos) == image_metrics.PSNR_CAP)
    np.testing.assert_allclose(image_metrics.ssim(photos, photos), 1.0, rtol=1e-12)


def test_metrics_refuse_mismatched_inputs(photos):
    with pytest.raises(ShapeMismatchError, match="shapes differ"):
        image_metrics.psnr(photos, photos[:, :, :32])
    with pytest.raises(ShapeMismatchError, match="uint8"):
        image_metrics.ssim(photos, photos.float())


def test_lpips_is_reported_unavailable_not_replaced():
    lpips = image_metrics.Lpips.load()
    if lpips.available:
        pytest.skip("lpips and its backbone are installed here")
    assert lpips.reason.startswith("unavailable:")


@pytest.fixture(scope="module")
def clip(shared_data) -> torch.Tensor:
    """6 real frames from a clip, 64x64 crop, uint8 (1, 3, 6, 64, 64)."""
    frames = read_video(shared_data / "videos" / "bikes.mp4", max_frames=6).frames[:, :64, :64]
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).unsqueeze(0)


def test_temporal_difference_psnr_separates_static_error_from_flicker(clip):
    """Same per-frame error energy, different motion fidelity: a fixed error pattern leaves frame
    differences intact; independent per-frame errors (flicker) corrupt them."""
    gen = torch.Generator().manual_seed(0)
    pattern = torch.randn(1, 3, 1, 64, 64, generator=gen) * 6
    static = (clip.float() + pattern).round().clamp(0, 255).to(torch.uint8)
    flicker = (
        (clip.float() + torch.randn(clip.shape, generator=gen) * 6).round().clamp(0, 255).to(torch.uint8)
    )
    psnr_static, psnr_flicker = (
        video_metrics.per_frame_psnr(clip, static),
        video_metrics.per_frame_psnr(clip, flicker),
    )
    assert abs(psnr_static[0] - psnr_flicker[0]) < 1.0
    tdiff_static = video_metrics.temporal_difference_psnr(clip, static)[0]
    tdiff_flicker = video_metrics.temporal_difference_psnr(clip, flicker)[0]
    assert tdiff_static > tdiff_flicker + 10
    per_frame = image_metrics.psnr(video_metrics.frames(clip), video_metrics.frames(flicker))
    assert psnr_flicker[0] == pytest.approx(per_frame.mean())
