"""Quality of the shipped defaults, measured the way users' data looks (issue 11).

Images: the multi-scale crop protocol (evals.multiscale) on the validation photos, against bicubic
at the same number of floats. Video: clips from the held-out last 20% of the real clips (never
trained on), against bicubic in space and in space and time, with the colour cast checked per channel.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evals import heldout_video
from evals.classical import bits_per_item, thumbnail_round_trip
from evals.heldout_video import compare_tokenizer, group_clips, tokenizer_round_trip
from evals.multiscale import compare, psnr_comparison
from tokenizers_svc.crops import MultiscaleCrops, load_multiscale
from tokenizers_svc.defaults import DEFAULT_MODELS, DEFAULT_TOKEN_MODELS
from tokenizers_svc.loading import load_tokenizer
from tokenizers_svc.metrics import codebook_health, id_counts, psnr
from training.latent_stats import skimage_photo_crops

# Issue 11's bar: >= 1.5 dB over bicubic at equal floats on the multi-scale val crops
# (measured +2.56 ± 0.27 dB on all 256 crops, on the H200 and on this CPU, see the card). The test
# scores every 8th crop (32, eight of each of the four scales) to keep a CPU round trip of ~1 s per
# crop affordable beside the rest of the suite. Batches of two: on one CPU thread this model costs
# less per item at batch 2 than at 8 or 16 (docs/serving.md, "Batching and backpressure").
IMAGE_GAIN_DB = 1.5
CROP_STRIDE = 8
CPU_BATCH = 2
MAX_COLOUR_CAST = 1.5  # grey levels of mean error per channel (the old video default was green)


@pytest.mark.slow
def test_image_default_beats_bicubic_on_multiscale_val_crops(shared_data):
    tokenizer = load_tokenizer(DEFAULT_MODELS["image"])
    every = load_multiscale(shared_data / "images" / "val")
    crops = MultiscaleCrops(
        every.pixels[::CROP_STRIDE], every.names[::CROP_STRIDE], every.scales[::CROP_STRIDE]
    )
    floats = tokenizer.spec.latent_floats((1, 3, 256, 256))
    result = compare(crops, tokenizer_round_trip(tokenizer), floats, batch_size=CPU_BATCH)
    assert result["n"] == 32 and len(result["per_scale"]) == 4
    assert result["gain_db"] >= IMAGE_GAIN_DB, result
    assert all(scale["gain_db"] > 0 for scale in result["per_scale"].values()), result["per_scale"]


# Issue 24's bars for the discrete default: >= +1.0 dB over an 8-bit bicubic thumbnail holding as
# many bits as its ids (tokens x log2(vocabulary)) on the multi-scale val crops, and >= 90% of its
# codebook used. The test scores the same every-8th subset as the image default's test: 32 crops,
# 32,768 tokens for 1,000 ids (measured +1.15 dB and 93.1% there; +1.41 ± 0.54 dB and 99.2% on all
# 256 crops, the card's evaluation).
TOKENS_GAIN_DB = 1.0
MIN_CODEBOOK_USAGE = 0.9


@pytest.mark.slow
def test_discrete_default_beats_the_equal_bits_thumbnail_on_multiscale_val_crops(shared_data):
    tokenizer = load_tokenizer(DEFAULT_TOKEN_MODELS["image"])
    every = load_multiscale(shared_data / "images" / "val")
    pixels, scales = every.pixels[::CROP_STRIDE], every.scales[::CROP_STRIDE]
    vocabulary = tokenizer.spec.quantizer.vocabulary_size
    counts, model = torch.zeros(vocabulary, dtype=torch.int64), []
    with torch.no_grad():
        for batch in pixels.split(CPU_BATCH):
            tokens = tokenizer.encode(batch, tokens=True)  # ids (N, 32, 32) int32
            counts += id_counts(tokens.ids, vocabulary)
            model.append(psnr(batch, tokenizer.decode(tokens, output_dtype=torch.uint8)))
    bits = bits_per_item(int(tokens.ids[0].numel()), vocabulary)
    thumbnail, _ = thumbnail_round_trip(pixels, bits)
    result = psnr_comparison(np.concatenate(model), psnr(pixels, thumbnail), scales)
    assert result["n"] == 32 and len(result["per_scale"]) == 4
    assert result["gain_db"] >= TOKENS_GAIN_DB, result
    assert codebook_health(counts)["codebook_usage"] >= MIN_CODEBOOK_USAGE, codebook_health(counts)


@pytest.mark.slow  # encodes a few hundred training crops
def test_image_default_latents_are_centred_on_training_photos(shared_data):
    """Normalized latents: per-channel |mean| <= 0.1 and std in [0.8, 1.25] on multi-scale crops of
    the photos the statistics were fitted on, the training folder and scikit-image's colour photos
    (issue 11, item 5; training.latent_stats)."""
    tokenizer = load_tokenizer(DEFAULT_MODELS["image"])
    train = load_multiscale(shared_data / "images" / "train").pixels
    extra = skimage_photo_crops()
    # the same mix as the fit (crop-weighted), subsampled to ~60 crops for a CPU test
    crops = torch.cat([train[::12], extra[::12]])
    with torch.no_grad():
        z = torch.cat([tokenizer.encode(batch).latents for batch in crops.split(CPU_BATCH)])
    per_channel = z.transpose(0, 1).flatten(1)  # (c, elements)
    mean, std = per_channel.mean(1), per_channel.std(1)
    assert mean.abs().max() <= 0.1, mean
    assert bool(((std >= 0.8) & (std <= 1.25)).all()), std


# Issue 23's bar for the video default: >= +1.0 dB over the better bicubic at equal floats in every
# group, measured on the full groups at 256² (stills +2.49, motion +1.33, real +3.26: its card). This
# test scores a quarter of each photo group and two clips per real clip at 128², so its bar is lower.
VIDEO_GROUP_GAIN_DB = 0.5


@pytest.mark.slow
@pytest.mark.parametrize("group", ["stills", "motion", "real"])
def test_video_default_beats_bicubic_in_space_and_time_without_colour_cast(shared_data, group):
    """On clips it never trained on: still shots and camera moves over val photos, the real clips'
    held-out ends."""
    tokenizer = load_tokenizer(DEFAULT_MODELS["video"])
    data = shared_data
    clips, names = group_clips(group, data / "images" / "val", data / "videos", 17, 128, clips_per_video=2)
    if group != "real":  # a quarter of each photo group
        clips, names = clips[::4], names[::4]
    result = compare_tokenizer(clips, names, tokenizer)
    assert result["best_baseline"] == "bicubic_spatiotemporal"  # the stronger one on these clips
    assert result["gain_db"] >= VIDEO_GROUP_GAIN_DB, result  # paired, over the better baseline
    assert max(abs(v) for v in result["mean_error_rgb"]) <= MAX_COLOUR_CAST, result["mean_error_rgb"]


def test_heldout_video_command_reports_every_group_against_both_baselines(shared_data, tmp_path, capsys):
    """`python -m evals.heldout_video` (the video card's command) on short, small clips: one row per
    group (stills and motion from the val photos, the real clips' held-out ends), each with the model,
    both baselines and the paired gains, which are the model's PSNR minus each baseline's."""
    out = tmp_path / "result.json"
    argv = ["--videos", str(shared_data / "videos"), "--photos", str(shared_data / "images" / "val")]
    argv += ["--clips-per-video", "1", "--frames", "5", "--resolution", "64", "--stride", "7"]
    assert heldout_video.main([*argv, "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert all(f"| {group} |" in table for group in ("stills", "motion", "real"))
    groups = json.loads(out.read_text())["groups"]
    assert list(groups) == ["stills", "motion", "real"]
    for result in groups.values():
        assert result["n"] == len(result["clips"]) >= 1
        for baseline, gain in result["gains"].items():
            assert gain["gain_db"] == pytest.approx(
                result["model"]["psnr"] - result[baseline]["psnr"], abs=1e-6
            )
        assert result["floats_per_item"] == 4 * 2 * 8 * 8  # c4, frames 1 + 4k -> 2 latent frames, 64/8
    assert groups["stills"]["n"] == 4 and all("val" not in name for name in groups["stills"]["clips"])
