"""training.latent_stats: per-channel statistics written into an export and used by the backend."""

from __future__ import annotations

import shutil

import pytest
import torch

from tokenizers_svc.crops import load_multiscale, segment_clips
from tokenizers_svc.loading import build_module, load_tokenizer
from tokenizers_svc.registry import get_preset
from training.latent_stats import fit_export


def test_fitted_statistics_centre_the_latents_of_the_fitted_photos(shared_data, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sorted((shared_data / "images" / "train").glob("*.jpg"))[:3]:
        shutil.copy(path, photos / path.name)
    export = tmp_path / "export"
    build_module(get_preset("dc-ae-f32c32-tiny")).save_pretrained(str(export))
    raw_before = load_tokenizer(export).spec.normalization
    assert raw_before.mean is None  # released convention: scaling factor only

    stats = fit_export(export, [photos], with_skimage=False)

    tokenizer = load_tokenizer(export)
    norm = tokenizer.spec.normalization
    assert norm.mean == tuple(stats["mean"]) and norm.std == tuple(stats["std"]) and norm.scale == 1.0
    crops = load_multiscale(photos).pixels  # exactly the fitted crops (fewer than MAX_CROPS)
    with torch.no_grad():
        z = torch.cat([tokenizer.encode(batch).latents for batch in crops.split(8)])
    per_channel = z.double().transpose(0, 1).flatten(1)
    assert per_channel.mean(1).abs().max() < 1e-3
    assert (per_channel.std(1, correction=0) - 1).abs().max() < 1e-3
    config = (export / "config.json").read_text()
    assert "latents_mean" in config and "shift_factor" in config  # the scalar fallback is written too


def test_video_statistics_come_from_clips_of_the_training_segment(shared_data, tmp_path):
    """A video model's statistics are fitted on clips (LTX-Video keeps them as buffers): its normalized
    latents of those clips are centred, with unit std, per channel."""
    export = tmp_path / "video"
    build_module(get_preset("video-vae-tiny")).save_pretrained(str(export))
    clips = segment_clips([shared_data / "videos" / "bikes.mp4"], (0.0, 0.8), 2, frames=5, resolution=64)[0]

    stats = fit_export(export, [], clips=clips)

    tokenizer = load_tokenizer(export)
    norm = tokenizer.spec.normalization
    assert stats["items"] == 2 and len(norm.mean) == 16 and norm.scale == 1.0
    assert norm.mean == pytest.approx(stats["mean"], rel=1e-6)  # float32 buffers
    assert norm.std == pytest.approx(stats["std"], rel=1e-6)
    with torch.no_grad():
        z = tokenizer.encode(clips).latents  # (2, 16, 2, 4, 4) normalized
    per_channel = z.double().transpose(0, 1).flatten(1)
    assert per_channel.mean(1).abs().max() < 1e-3
    assert (per_channel.std(1, correction=0) - 1).abs().max() < 1e-3
