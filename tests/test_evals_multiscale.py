"""The multi-scale crop protocol: crop grids per scale on real photos, the flat-crop filter, the confidence
interval, bicubic at equal floats, and `evals.reconstruct --crop multiscale` end to end."""

from __future__ import annotations

import csv
import json
from collections import Counter

import numpy as np
import pytest
import torch

from evals import multiscale
from evals.image_metrics import psnr
from evals.reconstruct import main
from tokenizers_svc.crops import MIN_STD, bicubic_round_trip, bicubic_size, load_multiscale, multiscale_crops
from tokenizers_svc.media import read_image


@pytest.fixture(scope="module")
def garden(shared_data) -> torch.Tensor:
    """A real 1280x800 val photo as uint8 (3, 800, 1280)."""
    return torch.from_numpy(read_image(shared_data / "images" / "val" / "Garden.jpg")).permute(2, 0, 1)


def test_crop_grid_per_scale_on_a_real_photo(garden):
    crops = multiscale_crops(garden, (256, 384, 512, 768), 256, min_std=0)
    per_scale = Counter(scale for scale, _, _ in crops)
    # 800x1280 -> shorter side s: (s, 1.6 s) -> floor(s/256) x floor(1.6 s/256) tiles
    assert per_scale == {256: 1 * 1, 384: 1 * 2, 512: 2 * 3, 768: 3 * 4}
    names = [name for scale, name, _ in crops if scale == 768]
    assert names == [f"@768#r{i}c{j}" for i in range(3) for j in range(4)]
    assert all(tile.shape == (3, 256, 256) and tile.dtype == torch.uint8 for _, _, tile in crops)
    # at scale 256 the photo is resized to 256x410: the one crop is its top-left square
    ((_, _, top_left),) = [c for c in crops if c[0] == 256]
    assert not torch.equal(top_left, garden[:, :256, :256])  # resized, not cut from the original
    with pytest.raises(ValueError, match="crop size"):
        multiscale_crops(garden, (128,), 256)


def test_flat_crops_are_dropped(garden):
    flat = garden.clone()
    flat[:, :, :640] = 117  # left half of the photo becomes one grey level
    kept = {name for _, name, _ in multiscale_crops(flat, (512,), 256)}
    everything = {name for _, name, _ in multiscale_crops(flat, (512,), 256, min_std=0)}
    # at 512x819 the columns 0..255 lie inside the flat half (< 409.6 px); column 1 straddles the edge
    assert everything - kept == {"@512#r0c0", "@512#r1c0"}
    assert all(float(tile.float().std()) >= MIN_STD for _, _, tile in multiscale_crops(flat, (512,), 256))


def test_confidence_interval_covers_and_shrinks():
    rng = np.random.default_rng(0)
    draws = rng.normal(loc=3.0, scale=2.0, size=(2000, 50))
    covered = np.mean([abs(multiscale.mean_ci(row)[0] - 3.0) <= multiscale.mean_ci(row)[1] for row in draws])
    assert 0.93 <= covered <= 0.97
    _, small = multiscale.mean_ci(draws[0, :25])
    _, large = multiscale.mean_ci(draws.reshape(-1)[:2500])
    assert large == pytest.approx(small / 10, rel=0.3)  # 100x the samples: a tenth of the width
    assert np.isnan(multiscale.mean_ci([1.0])[1])


@pytest.mark.parametrize("latent_floats", [4 * 32 * 32, 16 * 16 * 16, 32 * 8 * 8, 12 * 64 * 64])
def test_bicubic_keeps_the_float_count(garden, latent_floats):
    (h, w), factor = bicubic_size(256, 256, latent_floats)
    assert abs(3 * h * w - latent_floats) / latent_floats < 0.03
    assert factor == pytest.approx(np.sqrt(3 * 256 * 256 / latent_floats))
    crops = torch.stack([tile for _, _, tile in multiscale_crops(garden, (512,), 256)])
    out = bicubic_round_trip(crops, latent_floats)
    assert out.shape == crops.shape and out.dtype == torch.uint8
    assert np.all(psnr(crops, out) < 60)  # information was really thrown away


def test_fewer_floats_make_bicubic_worse(garden):
    crops = torch.stack([tile for _, _, tile in multiscale_crops(garden, (768,), 256)])
    budgets = [3 * 128 * 128, 4 * 32 * 32, 16 * 8 * 8]
    means = [psnr(crops, bicubic_round_trip(crops, floats)).mean() for floats in budgets]
    assert means[0] > means[1] > means[2]


def test_compare_summarizes_per_scale(shared_data):
    crops = load_multiscale(shared_data / "images" / "val", (256, 384), 256, max_items=10)
    result = multiscale.compare(crops, lambda batch: bicubic_round_trip(batch, 3 * 64 * 64), 4 * 32 * 32)
    assert result["n"] == 10 and sum(s["n"] for s in result["per_scale"].values()) == 10
    assert set(result["per_scale"]) == {str(s) for s in crops.scales}
    assert result["gain_db"] > 0  # 12288 floats per crop beat 4096 floats per crop
    assert result["gain_db"] == pytest.approx(result["psnr"] - result["bicubic_psnr"])


def test_cli_multiscale_writes_the_per_scale_table(shared_data, tmp_path):
    out = tmp_path / "report"
    argv = ["--model", "sd-vae-tiny", "--data", str(shared_data / "images" / "val"), "--crop", "multiscale"]
    argv += ["--resolution", "64", "--scales", "64,96", "--max-items", "8", "--batch-size", "8"]
    argv += ["--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    result = json.loads((out / "report.json").read_text())
    assert result["n"] == 8 and result["protocol"]["multiscale"]["scales"] == [64, 96]
    with open(out / "items.csv") as handle:
        items = [row["item"] for row in csv.DictReader(handle) if row["model"] == "sd-vae-tiny"]
    scales_seen = Counter(name.split("@")[1].split("#")[0] for name in items)
    model, baseline = result["results"]
    vs = model["vs_bicubic"]
    assert {scale: s["n"] for scale, s in vs["per_scale"].items()} == dict(scales_seen)
    assert vs["psnr"] == pytest.approx(model["metrics"]["psnr"])
    assert vs["bicubic_psnr"] == pytest.approx(baseline["metrics"]["psnr"])
    assert vs["gain_db"] < 0 and vs["gain_ci95"] > 0  # random-init VAE loses to bicubic
    assert np.isfinite(model["metrics"]["psnr_ci95"]) and np.isfinite(model["metrics"]["rfid"])
    table = (out / "report.md").read_text()
    (all_row,) = [line for line in table.splitlines() if line.startswith("| sd-vae-tiny | all | 8 |")]
    assert f"| {baseline['name']} |" in all_row  # the baseline the gain is measured against, by name
    for scale in scales_seen:
        assert f"| sd-vae-tiny | {scale} | {scales_seen[scale]} |" in table


def test_cli_rejects_scales_below_the_crop_size(shared_data, tmp_path, capsys):
    argv = ["--model", "sd-vae-tiny", "--data", str(shared_data / "images" / "val"), "--crop", "multiscale"]
    argv += ["--resolution", "256", "--scales", "128,256", "--out", str(tmp_path)]
    assert main(argv) == 1
    assert "--scales" in capsys.readouterr().err
