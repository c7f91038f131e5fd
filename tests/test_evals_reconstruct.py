"""The evals.reconstruct script end to end: two models on the same inputs, report files, pinned values."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from skimage import data

from evals import fid
from evals.reconstruct import main
from evals.report import HEADER_HEIGHT, LABEL_WIDTH, LEGEND_HEIGHT
from tokenizers_svc.crops import square_crops
from tokenizers_svc.loading import build_module
from tokenizers_svc.media import decode_image, encode_image
from tokenizers_svc.registry import get_preset

# The tiny fixed set: four scikit-image photos (available to every user), center-cropped to 64x64.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")

# Regression values, produced once by this test's own run (sd-vae-tiny, random init seed 0, CPU float32,
# torch 2.13) via `python -m pytest tests/test_evals_reconstruct.py` and copied here. They are recomputed
# by the full pipeline on every run: resize/crop, encode/decode, uint8 quantization, Inception, metrics.
PINNED = {
    "sd-vae-tiny": {
        "psnr": 10.339816563452217,
        "ssim": 0.09063992435879689,
        "rfid": 446.1455960028741,
        "kid": 0.2453666149711045,
    },
    "baseline": {"psnr": 28.956185705619248, "ssim": 0.9145440755187826, "rfid": 85.79755163212815},
}


# CPU float reductions depend on the thread count, and KID of 4 items amplifies that to ~2e-4
# relative, so the pinned run fixes the count it was produced with.
PINNED_TORCH_THREADS = 2


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict, object]:
    threads = torch.get_num_threads()
    torch.set_num_threads(PINNED_TORCH_THREADS)
    try:
        return _run_report(tmp_path_factory)
    finally:
        torch.set_num_threads(threads)


def _run_report(tmp_path_factory) -> tuple[dict, object]:
    root = tmp_path_factory.mktemp("eval")
    images = root / "images"
    images.mkdir()
    for name in PHOTOS:
        (images / f"{name}.png").write_bytes(encode_image(getattr(data, name)(), format="png"))
    other = root / "vae-seed1"
    build_module(get_preset("sd-vae-tiny"), seed=1).save_pretrained(other)
    out = root / "report"
    argv = ["--model", "sd-vae-tiny", "--model", str(other), "--data", str(images), "--resolution", "64"]
    argv += ["--max-items", "4", "--out", str(out), "--cache-dir", str(root / "cache"), "--samples", "2"]
    assert main(argv) == 0
    return json.loads((out / "report.json").read_text()), out


def test_report_files_and_protocol(report):
    result, out = report
    assert {p.name for p in out.iterdir()} == {"report.json", "report.md", "items.csv", "samples.png"}
    assert result["n"] == 4 and result["item_shape"] == [3, 64, 64]
    assert "small-N" in result["sample_size_label"]
    assert result["protocol"]["inception"]["sha1"] == fid.INCEPTION_SHA1
    assert result["protocol"]["inception"]["standard"] is True
    assert result["protocol"]["lpips"].startswith(("unavailable", "lpips"))
    assert result["versions"]["torch"] and result["versions"]["diffusers"]
    models = [r for r in result["results"] if r["kind"] == "model"]
    assert [r["name"] for r in models] == ["sd-vae-tiny", "vae-seed1"]
    assert models[0]["weights_hash"] != models[1]["weights_hash"]
    for row in models:
        assert row["throughput"]["encode_items_per_s"] > 0 and row["throughput"]["decode_items_per_s"] > 0
        assert row["metrics"]["fid_n"] == 4
    table = (out / "report.md").read_text()
    assert "| sd-vae-tiny |" in table and "(baseline)" in table and "not comparable" in table


def test_every_model_sees_the_same_items(report):
    _, out = report
    with open(out / "items.csv") as handle:
        rows = list(csv.DictReader(handle))
    by_model: dict[str, list[str]] = {}
    for row in rows:
        by_model.setdefault(row["model"], []).append(row["item"])
    names = [f"{p}.png" for p in sorted(PHOTOS)]
    assert all(items == names for items in by_model.values()), by_model
    assert len(by_model) == 3  # two models + one bicubic baseline (both latents have the same size)


def test_baseline_matches_latent_size(report):
    result, _ = report
    model = result["results"][0]
    baseline = next(r for r in result["results"] if r["kind"] == "baseline")
    assert model["floats_per_item"] == 4 * 32 * 32  # sd-vae-tiny: f2, 4 channels at 64x64
    assert abs(baseline["floats_per_item"] - model["floats_per_item"]) / model["floats_per_item"] < 0.05
    # a random-init VAE is far worse than bicubic at the same size: the report must show it
    assert baseline["metrics"]["psnr"] > model["metrics"]["psnr"]


def test_pinned_regression_values(report):
    result, _ = report
    rows = {r["name"] if r["kind"] == "model" else "baseline": r["metrics"] for r in result["results"]}
    for name, expected in PINNED.items():
        for metric, value in expected.items():
            assert rows[name][metric] == pytest.approx(value, rel=1e-4, abs=1e-6), (name, metric)


def test_samples_png_names_its_rows_columns_and_error_scale(report):
    """samples.png: the two sample items' rows (64 px) under a header of column names, a label column on
    the left, the error colour scale below; the cells are the items themselves."""
    _, out = report
    image = decode_image((out / "samples.png").read_bytes())
    columns = 1 + 2 * 2  # original + (reconstruction, error map) per model
    height = HEADER_HEIGHT + 2 * 64 + LEGEND_HEIGHT
    assert image.shape == (height, LABEL_WIDTH + columns * 64, 3)

    def inked(region: np.ndarray) -> bool:  # black text on the white canvas
        return bool((region.min(axis=2) < 100).any())

    for column in range(columns):
        left = LABEL_WIDTH + column * 64
        assert inked(image[:HEADER_HEIGHT, left : left + 64]), f"column {column} has no title"
    for row in range(2):
        top = HEADER_HEIGHT + row * 64
        assert inked(image[top : top + 64, :LABEL_WIDTH]), f"row {row} has no name"
    legend = image[HEADER_HEIGHT + 2 * 64 :]
    assert inked(legend[:, :LABEL_WIDTH]) and inked(legend[:, LABEL_WIDTH:])
    first = square_crops(torch.from_numpy(data.astronaut()).permute(2, 0, 1), 64, "center")[0][1]
    cell = image[HEADER_HEIGHT : HEADER_HEIGHT + 64, LABEL_WIDTH : LABEL_WIDTH + 64]
    np.testing.assert_array_equal(cell, first.permute(1, 2, 0).numpy())


def test_bmp_and_tiff_are_read_and_unreadable_files_are_skipped_with_a_reason(tmp_path):
    """Datasets ship BMP and TIFF: the evaluation decodes them (the service does not take them). A file
    that cannot be decoded is skipped, counted and named in the report instead of ending the run."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    (images / "a-astronaut.png").write_bytes(encode_image(data.astronaut(), format="png"))
    Image.fromarray(data.chelsea()).save(images / "b-chelsea.bmp")
    Image.fromarray(data.coffee()).save(images / "c-coffee.tif")
    (images / "d-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    out = tmp_path / "report"
    argv = ["--model", "sd-vae-tiny", "--data", str(images), "--resolution", "64", "--samples", "1"]
    assert main([*argv, "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    result = json.loads((out / "report.json").read_text())
    assert result["n"] == 3
    skipped = result["data"]["skipped"]
    assert skipped["count"] == 1 and skipped["by_type"] == {"invalid_media": 1}
    assert list(skipped["entries"]) == ["d-broken.png"]
    assert "Skipped 1 unreadable entries (1 invalid_media)" in (out / "report.md").read_text()
    with open(out / "items.csv") as handle:
        items = {row["item"] for row in csv.DictReader(handle)}
    assert items == {"a-astronaut.png", "b-chelsea.bmp", "c-coffee.tif"}


def test_video_data_with_an_image_model(shared_data, tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / "bikes.mp4").symlink_to(shared_data / "videos" / "bikes.mp4")
    out = tmp_path / "report"
    argv = ["--model", "sd-vae-tiny", "--data", str(clips), "--resolution", "32", "--frames", "3"]
    argv += ["--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    result = json.loads((out / "report.json").read_text())
    assert result["kind"] == "video" and result["fid_n"] == 3 and result["item_shape"] == [3, 3, 32, 32]
    model = result["results"][0]
    assert model["frames_encoded_independently"] is True
    assert np.isfinite(model["metrics"]["temporal_diff_psnr"])
    assert "tPSNR" in (out / "report.md").read_text()


def test_bad_arguments_exit_nonzero(tmp_path, capsys):
    assert main(["--model", "sd-vae-tiny", "--data", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 1
    assert "--data must be a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--data", str(tmp_path)])
    assert exc.value.code == 2


class _MeanPoolI3D(torch.nn.Module):
    """A stand-in for an I3D TorchScript (same call contract: (N, 3, T, 224, 224) float -> (N, D));
    it only exercises the rFVD plumbing, its numbers mean nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3 * 4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool3d(x, (1, 2, 2)).flatten(1)  # (N, 12)
        return self.proj(pooled)  # (N, 6)


def test_rfvd_with_a_given_i3d_torchscript(shared_data, tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    for name in ("bikes.mp4", "carphone_pristine.mp4", "tree.avi"):
        (clips / name).symlink_to(shared_data / "videos" / name)
    i3d = tmp_path / "i3d.pt"
    torch.jit.save(torch.jit.script(_MeanPoolI3D()), str(i3d))
    out = tmp_path / "report"
    argv = ["--model", "sd-vae-tiny", "--data", str(clips), "--resolution", "32", "--frames", "2"]
    argv += ["--i3d", str(i3d), "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--samples", "1"]
    assert main(argv) == 0
    result = json.loads((out / "report.json").read_text())
    assert result["n"] == 3 and result["protocol"]["i3d"]["path"] == str(i3d)
    model, baseline = result["results"]
    assert np.isfinite(model["metrics"]["rfvd"]) and np.isfinite(baseline["metrics"]["rfvd"])
    assert "rFVD" in (out / "report.md").read_text()


def test_i3d_needs_video_data(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(encode_image(data.astronaut()[:64, :64], format="png"))
    (images / "b.png").write_bytes(encode_image(data.astronaut()[64:128, :64], format="png"))
    argv = [
        "--model",
        "sd-vae-tiny",
        "--data",
        str(images),
        "--resolution",
        "32",
        "--i3d",
        str(tmp_path / "x.pt"),
    ]
    assert main([*argv, "--out", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c")]) == 1
    assert "--i3d (rFVD) needs video data" in capsys.readouterr().err


def test_tokenizers_svc_eval_subcommand(tmp_path):
    from typer.testing import CliRunner

    from tokenizers_svc.cli import app

    result = CliRunner().invoke(
        app, ["eval", "--model", "sd-vae-tiny", "--data", str(tmp_path / "none"), "--out", str(tmp_path)]
    )
    assert result.exit_code == 1


def test_crops_are_deterministic_squares():
    image = torch.from_numpy(data.astronaut()[:70, :100].copy()).permute(2, 0, 1)  # (3, 70, 100)
    tiles = square_crops(image, 32, "grid")
    assert [name for name, _ in tiles] == ["#r0c0", "#r0c1", "#r0c2", "#r1c0", "#r1c1", "#r1c2"]
    assert torch.equal(tiles[4][1], image[:, 32:64, 32:64])
    ((_, center),) = square_crops(image, 32, "center")  # shorter side 70 -> 32, then the middle square
    assert center.shape == (3, 32, 32) and center.dtype == torch.uint8
    ((_, upscaled),) = square_crops(image[:, :20, :30], 32, "grid")  # too small: resized up, one tile
    assert upscaled.shape == (3, 32, 32)


def test_discrete_tokenizer_reports_codebook_health_and_codecs_at_equal_bits(tmp_path):
    """An FSQ model is scored from its ids: codebook usage and perplexity on the set, bits per pixel,
    and the 8-bit thumbnail and WebP baselines given the same bits per item."""
    from dataclasses import replace

    from evals import classical

    images = tmp_path / "images"
    images.mkdir()
    for name in PHOTOS[:2]:
        (images / f"{name}.png").write_bytes(encode_image(getattr(data, name)(), format="png"))
    preset = get_preset("dc-ae-f32c32-tiny")
    quantizer = {"kind": "fsq", "levels": [5, 5, 5]}
    model = tmp_path / "fsq"
    build_module(replace(preset, config={**preset.config, "quantizer": quantizer})).save_pretrained(model)
    out = tmp_path / "report"
    argv = ["--model", str(model), "--data", str(images), "--resolution", "128", "--samples", "1"]
    assert main([*argv, "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    result = json.loads((out / "report.json").read_text())
    rows = {row["name"]: row for row in result["results"]}
    fsq = rows["fsq"]
    bits = 16 * np.log2(125)  # (128 / 32)^2 tokens of a 125-id vocabulary
    assert fsq["tokens_per_item"] == 16 and fsq["bits_per_item"] == pytest.approx(bits)
    assert fsq["bits_per_pixel"] == pytest.approx(bits / 128**2)
    assert 0 < fsq["metrics"]["codebook_usage"] <= 32 / 125  # at most 32 distinct ids in 2 x 16 tokens
    assert 1 <= fsq["metrics"]["perplexity"] <= 32
    thumbnail, webp = fsq["codecs"]
    assert fsq["baseline"] == thumbnail and rows[thumbnail]["downsampled_size"] == [2, 2]  # 111 bits: 4.6 px
    assert rows[webp]["budget_bytes"] == int(bits // 8)
    assert rows[webp]["metrics"]["webp_over_budget"] in (0.0, 0.5, 1.0)
    assert "Discrete tokens" in (out / "report.md").read_text()
    # the codecs hold what they were given: an 8-bit thumbnail of at most `bits`, WebP files measured
    photo = torch.from_numpy(data.astronaut()[:128, :128].copy()).permute(2, 0, 1).unsqueeze(0)
    recon, size = classical.thumbnail_round_trip(photo, bits)
    assert recon.shape == photo.shape and 3 * 8 * size[0] * size[1] <= bits * 1.25
    decoded, stats = classical.webp_at_budget(photo, 2000)
    assert decoded.shape == photo.shape and stats["bytes"][0] <= 2000 and not stats["over_budget"][0]
    assert stats["quality"][0] > 0
