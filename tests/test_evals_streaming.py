"""Streaming evaluation: sufficient statistics equal the in-memory metrics, float32 device metrics equal
the float64 ones, every source yields the same items in the same order, and Ray-sharded and resumed runs
equal the single-process, uninterrupted one."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from evals import fid, image_metrics, sources, stats
from evals.reconstruct import main
from tests.helpers import load_dataset, noise
from tokenizers_svc.crops import bicubic_round_trip

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def val_dir(shared_data):
    return shared_data / "images" / "val"


@pytest.fixture(scope="module")
def val256(val_dir) -> torch.Tensor:
    """The 14 val photos, center 256x256 crops, uint8 (14, 3, 256, 256)."""
    return load_dataset(val_dir, 256, "center", None).pixels


def test_fid_from_streaming_sums_equals_in_memory(val256):
    inception = fid.load_inception()
    real = inception.features(val256)  # (14, 2048) float64
    fake = inception.features(bicubic_round_trip(val256, 4 * 32 * 32))
    expected = fid.frechet_distance(
        fid.FeatureStats.from_features(real), fid.FeatureStats.from_features(fake)
    )
    moments = {"real": stats.Moments(fid.FEATURE_DIM), "fake": stats.Moments(fid.FEATURE_DIM)}
    for start in range(0, 14, 3):  # uneven batches, merged from two halves like two shards
        for key, feats in (("real", real), ("fake", fake)):
            part = stats.Moments(fid.FEATURE_DIM)
            part.add(torch.from_numpy(feats[start : start + 3]).float())
            moments[key].merge(part)
    streamed = fid.frechet_distance(moments["real"].feature_stats(), moments["fake"].feature_stats())
    # float32 features (what the device path keeps) against float64 ones, summed instead of np.cov
    assert streamed == pytest.approx(expected, rel=1e-6)


def test_moments_stay_exact_with_a_large_mean():
    rng = np.random.default_rng(0)
    feats = rng.normal(loc=50.0, scale=0.5, size=(3000, 64))  # mean >> std: the cancellation-prone case
    moments = stats.Moments(64)
    for batch in np.array_split(feats, 17):
        moments.add(torch.from_numpy(batch))
    got, want = moments.feature_stats(), fid.FeatureStats.from_features(feats)
    np.testing.assert_allclose(got.mu, want.mu, rtol=1e-12)
    np.testing.assert_allclose(got.sigma, want.sigma, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("distortion", ["bicubic", "noise"])
def test_float32_metrics_match_float64(val256, distortion):
    rec = bicubic_round_trip(val256, 4 * 32 * 32) if distortion == "bicubic" else noise(val256, 8.0)
    psnr64, ssim64 = image_metrics.psnr(val256, rec), image_metrics.ssim(val256, rec)
    psnr32 = image_metrics.psnr_device(val256, rec).double().numpy()
    ssim32 = image_metrics.ssim_device(val256, rec).double().numpy()
    np.testing.assert_allclose(psnr32, psnr64, rtol=0, atol=1e-4)
    np.testing.assert_allclose(ssim32, ssim64, rtol=0, atol=1e-4)
    assert image_metrics.psnr_device(val256, val256).eq(image_metrics.PSNR_CAP).all()


def test_kid_subsample_does_not_depend_on_sharding():
    rng = np.random.default_rng(1)
    keys = stats.name_keys([f"item{i}" for i in range(300)])
    feats = rng.normal(size=(300, 8)).astype(np.float32)
    whole = stats.KidSample(capacity=50)
    whole.add(keys, feats)
    merged = stats.KidSample(capacity=50)
    for part in np.array_split(rng.permutation(300), 7):
        shard = stats.KidSample(capacity=50)
        shard.add(keys[part], feats[part])
        merged.merge(shard)
    np.testing.assert_array_equal(whole.sorted_features(), merged.sorted_features())
    smallest = np.argsort(keys)[:50]
    np.testing.assert_array_equal(whole.sorted_features(), feats[smallest])


def test_every_source_yields_the_same_items(val_dir, tmp_path):
    files = sorted(val_dir.iterdir())[:4]
    folder = load_dataset(val_dir, 64, "center", 4)
    classes = tmp_path / "classes"  # ImageNet style: class folders
    for i, path in enumerate(files):
        (classes / f"n0{i // 2}").mkdir(parents=True, exist_ok=True)
        (classes / f"n0{i // 2}" / path.name).symlink_to(path)
    tar_dir = tmp_path / "wds"
    tar_dir.mkdir()
    for i in range(2):
        with tarfile.open(tar_dir / f"shard-{i}.tar", "w") as tar:
            for path in files[2 * i : 2 * i + 2]:
                tar.add(path, arcname=f"{path.stem}.jpg")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": [str(p) for p in files]}), tmp_path / "paths.parquet")
    for data in (classes, str(tar_dir / "*.tar"), tmp_path / "paths.parquet"):
        other = load_dataset(data, 64, "center", None)
        assert torch.equal(other.pixels, folder.pixels), data
    assert load_dataset(classes, 64, "center", None).names[0] == f"n00/{files[0].name}"


def test_loader_workers_keep_the_order_and_shard_ends(val_dir):
    kind, entries = sources.list_entries(val_dir)
    spec = sources.CropSpec(kind, "multiscale", 128, (128, 192), 17)
    stream = sources.ItemStream(sources.make_shards(entries, 4), spec, entries_per_chunk=1)
    serial = [(c["shard"], c["names"], c["last"]) for c in stream]
    loader = DataLoader(stream, batch_size=None, num_workers=2)
    parallel = [(c["shard"], c["names"], c["last"]) for c in loader]
    assert parallel == serial
    assert [shard for shard, _, last in serial if last] == [0, 1, 2, 3]  # 14 files in shards of 4


def _eval_args(val_dir, out, cache, *extra, max_items: int = 8) -> list[str]:
    argv = ["--model", "sd-vae-tiny", "--data", str(val_dir), "--resolution", "64"]
    argv += ["--max-items", str(max_items)]
    return [
        *argv,
        "--shard-size",
        "1",
        "--workers",
        "0",
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
        *extra,
    ]


@pytest.fixture(scope="module")
def uninterrupted(val_dir, tmp_path_factory) -> tuple[dict, list, Path]:
    """The whole run's report, its item rows, and the cache it filled (the reference statistics)."""
    root = tmp_path_factory.mktemp("whole")
    assert main(_eval_args(val_dir, root / "report", root / "cache")) == 0
    return (*_report(root / "report"), root / "cache")


def _report(out) -> tuple[dict, list]:
    with open(out / "items.csv") as handle:
        rows = sorted(tuple(row.values()) for row in csv.DictReader(handle))
    return json.loads((out / "report.json").read_text()), rows


def _assert_same_metrics(result: dict, expected: dict, rel: float) -> None:
    assert [r["name"] for r in result["results"]] == [r["name"] for r in expected["results"]]
    for got, want in zip(result["results"], expected["results"], strict=True):
        for key in ("psnr", "ssim", "rfid", "kid", "fid_n"):
            assert got["metrics"][key] == pytest.approx(want["metrics"][key], rel=rel), (got["name"], key)


@pytest.mark.slow  # two evaluations; the second computes the reference features of 6 items
def test_reference_statistics_are_cached_by_content(val_dir, tmp_path, uninterrupted):
    cache = shutil.copytree(uninterrupted[2], tmp_path / "cache")  # what the whole run cached
    [cached] = cache.glob("ref-*.npz")
    written = cached.stat().st_mtime_ns
    assert main(_eval_args(val_dir, tmp_path / "b", cache)) == 0  # reference Inception pass skipped
    assert list(cache.glob("ref-*.npz")) == [cached] and cached.stat().st_mtime_ns == written
    _assert_same_metrics(_report(tmp_path / "b")[0], uninterrupted[0], rel=1e-6)
    assert main(_eval_args(val_dir, tmp_path / "c", cache, max_items=6)) == 0
    assert len(list(cache.glob("ref-*.npz"))) == 2  # other items: other content hash


@pytest.mark.slow
def test_ray_sharded_equals_single_process(val_dir, tmp_path, uninterrupted):
    out = tmp_path / "ray"
    assert main(_eval_args(val_dir, out, tmp_path / "cache", "--ray", "--ray-actors", "2")) == 0
    result, rows = _report(out)
    assert result["run"]["ray_actors"] == 2 and result["run"]["shards"] == 8
    _assert_same_metrics(result, uninterrupted[0], rel=1e-6)
    assert rows == uninterrupted[1]


@pytest.mark.slow
def test_resume_after_a_kill_equals_the_uninterrupted_run(val_dir, tmp_path, uninterrupted):
    out = tmp_path / "killed"
    argv = _eval_args(val_dir, out, tmp_path / "cache")
    # the killed run computes with this process's torch threads, as the uninterrupted and resumed runs
    # here do: other tests in the same pytest worker may have set them (a TokenizerWorker sets its
    # num_cpus), and another thread count sums in another order (rFID 468.2347 vs 468.2386)
    threads = str(torch.get_num_threads())
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    process = subprocess.Popen([sys.executable, "-m", "evals.reconstruct", *argv], env=env, cwd=REPO)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        checkpoint = out / "checkpoint.npz"
        if checkpoint.is_file():
            with np.load(checkpoint) as saved:
                if len(json.loads(str(saved["done"]))) >= 2:
                    break
        time.sleep(0.05)
    process.kill()
    process.wait()
    with np.load(out / "checkpoint.npz") as saved:
        done = json.loads(str(saved["done"]))
    assert 2 <= len(done) < 8, "the kill must land mid-run"
    assert not (out / "report.json").exists()
    assert main([*argv, "--resume"]) == 0
    result, rows = _report(out)
    _assert_same_metrics(result, uninterrupted[0], rel=1e-6)
    assert rows == uninterrupted[1]  # every item once: no lost or repeated rows


ALIGN_PROBE = (
    "import evals, torch; "
    "print(all(torch.empty(n, dtype=torch.uint8).data_ptr() % 4096 == 0 for n in (3 << 20, 4 << 20, 9 << 20)))"
)


@pytest.mark.parametrize("setting, page_aligned", [(None, True), ("0", False)])
def test_importing_evals_turns_on_torchs_huge_page_buffers(setting, page_aligned):
    """evals/__init__.py sets THP_MEM_ALLOC_ENABLE before torch loads, which keeps a long evaluation's
    heap from growing (docs/benchmarks.md); a user's own setting wins. Only in that mode does torch
    page-align (and advise huge pages for) buffers of 2 MiB and more; otherwise it aligns to 64 bytes,
    so three page-aligned buffers by chance are a 1 in 64^3 event."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if setting is not None:
        env["THP_MEM_ALLOC_ENABLE"] = setting
    run = subprocess.run(
        [sys.executable, "-c", ALIGN_PROBE], env=env, capture_output=True, text=True, check=True
    )
    assert run.stdout.split()[-1] == str(page_aligned), run.stdout
