"""training.latent_stats: per-channel statistics written into an export and used by the backend."""

from __future__ import annotations

import shutil

import torch

from evals.multiscale import load_multiscale
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
