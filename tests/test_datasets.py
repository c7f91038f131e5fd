"""LatentDataset over real batch-encode shards: latents and metadata back, raw/normalized spaces,
decode to pixels equal to the in-process path, a torch DataLoader over same-shape rows, and one
over aspect-ratio buckets (--crop random --aspect-buckets) with the BucketBatchSampler."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from serving import batch
from tokenizers_svc.datasets import BucketBatchSampler, LatentDataset
from tokenizers_svc.errors import InvalidLatentsError, InvalidRequestError, ShapeMismatchError
from tokenizers_svc.loading import load_tokenizer
from tokenizers_svc.pipeline import EncodeOptions, encode_media, load_media
from tokenizers_svc.pixels import bucket_sizes, cover_size, nearest_bucket, resize_crop

pytestmark = (
    pytest.mark.slow
)  # the whole module starts Ray (its fixtures run the batch job): `make test-fast` skips it

MODEL = "sd-vae-tiny"
PHOTOS = ("board.jpg", "stuff.jpg", "plant.jpg")  # board and stuff: both 640x480
OPTIONS = EncodeOptions(resize="shorter-side", resolution=48)
BUCKET_RESOLUTION = 64


@pytest.fixture(scope="module")
def job(tmp_path_factory, shared_data, local_ray):
    folder = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        shutil.copy(shared_data / "images" / "val" / name, folder / name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path_factory.mktemp("latents")
    argv = [
        "--input",
        folder,
        "--output",
        out,
        "--model",
        MODEL,
        "--resize",
        "shorter-side",
        "--resolution",
        "48",
        "--workers",  # one actor for four inputs: a second one's start-up costs more than it encodes
        "1",
    ]
    assert batch.main([str(a) for a in argv]) == 0
    return folder, out


@pytest.fixture(scope="module")
def bucket_job(tmp_path_factory, shared_data, local_ray) -> Path:
    """The 40 training photos (landscape, portrait and square, 333 to 1280 px) cropped at random
    to aspect-ratio buckets of about 64x64 pixels."""
    out = tmp_path_factory.mktemp("buckets")
    argv = ["--input", shared_data / "images" / "train", "--output", out, "--model", MODEL]
    argv += ["--crop", "random", "--aspect-buckets", "--resolution", BUCKET_RESOLUTION, "--batch-size", 8]
    argv += ["--workers", 1]  # 40 small crops: one actor's start-up is most of the job
    assert batch.main([str(a) for a in argv]) == 0
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MODEL)


def test_rows_latents_and_metadata(job, tokenizer):
    folder, out = job
    dataset = LatentDataset(out)
    assert len(dataset) == len(PHOTOS)
    assert [e["source_path"] for e in dataset.errors()] == [str((folder / "broken.jpg").resolve())]
    assert dataset.errors()[0]["error"].startswith("invalid_media: ")
    for i in range(len(dataset)):
        item = dataset[i]
        expected = encode_media(
            tokenizer, load_media(Path(item["source_path"]).read_bytes(), options=OPTIONS), OPTIONS
        )
        torch.testing.assert_close(item["latents"], expected.latents[0])  # (C, h, w), normalized
        assert item["normalized"] and item["model"] == MODEL and item["kind"] == "image"
        assert item["shape"] == [1, *item["latents"].shape]
        assert item["normalization"] == tokenizer.spec.normalization.to_dict()
        assert "latents" not in dataset.metadata(i)


def test_raw_space_is_the_inverse_normalization(job, tokenizer):
    _, out = job
    normalized, raw, stored = (
        LatentDataset(out),
        LatentDataset(out, normalized=False),
        LatentDataset(out, normalized=None),
    )
    torch.testing.assert_close(
        raw[0]["latents"], tokenizer.spec.normalization.invert(normalized[0]["latents"][None])[0]
    )
    torch.testing.assert_close(stored[0]["latents"], normalized[0]["latents"])
    assert not torch.equal(raw[0]["latents"], normalized[0]["latents"])  # sd scale 0.18215 applied


def test_decode_to_pixels_equals_in_process_decode(job, tokenizer):
    _, out = job
    dataset = LatentDataset(out)
    for i in (0, len(dataset) - 1):
        row = dataset.metadata(i)
        pixels = dataset.decode(i)  # loads the job's model by itself
        data = Path(row["source_path"]).read_bytes()
        expected = tokenizer.decode(
            encode_media(tokenizer, load_media(data, options=OPTIONS), OPTIONS), output_dtype=torch.uint8
        )
        assert pixels.dtype == torch.uint8 and pixels.shape == expected.shape
        assert pixels.shape[2] == 48  # shorter side after --resize, cropped back from padding
        torch.testing.assert_close(pixels, expected, atol=1, rtol=0)  # uint8 rounding of equal floats
        torch.testing.assert_close(
            dataset.decode(i, tokenizer, output_dtype=torch.float32), tokenizer.decode(dataset.latent_file(i))
        )


def test_decode_refuses_other_weights(job):
    _, out = job
    dataset = LatentDataset(out)
    other = load_tokenizer(MODEL)
    with torch.no_grad():
        next(other.module.parameters()).add_(1.0)  # before the (lazy) weights hash is taken
    assert other.weights_hash != dataset.metadata(0)["weights_hash"]
    with pytest.raises(InvalidLatentsError, match="weights"):
        dataset.decode(0, other)


def test_dataloader_batches_same_shape_rows(job):
    _, out = job
    dataset = LatentDataset(out)
    same = [i for i in range(len(dataset)) if dataset.metadata(i)["original_width"] == 640]
    assert len(same) == 2
    loader = DataLoader(Subset(dataset, same), batch_size=2, collate_fn=LatentDataset.collate)
    (latents, metadata) = next(iter(loader))
    assert latents.shape == (2, *dataset[same[0]]["latents"].shape)
    torch.testing.assert_close(latents[1], dataset[same[1]]["latents"])
    assert [m["source_path"] for m in metadata] == [dataset.metadata(i)["source_path"] for i in same]


def test_dataloader_over_mixed_shapes_says_how_to_batch(job):
    """The --resize output holds latents of several shapes: a plain DataLoader's batch is refused
    with the way out (issue 25), and the bucket sampler over the same rows stacks every batch."""
    _, out = job
    dataset = LatentDataset(out)
    assert len({tuple(dataset[i]["latents"].shape) for i in range(len(dataset))}) > 1
    loader = DataLoader(dataset, batch_size=16, collate_fn=LatentDataset.collate)
    with pytest.raises(ShapeMismatchError) as refused:
        next(iter(loader))
    assert all(name in refused.value.message for name in ("--crop", "--aspect-buckets", "BucketBatchSampler"))
    sampler = BucketBatchSampler(dataset, batch_size=16)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=LatentDataset.collate)
    assert sum(len(latents) for latents, _ in loader) == len(dataset)


def test_empty_directory_is_refused(tmp_path):
    with pytest.raises(InvalidRequestError, match=r"no part-\*\.parquet shards"):
        LatentDataset(tmp_path)


def test_dataloader_over_aspect_buckets_stacks_every_batch(bucket_job, tokenizer):
    """Training-ready output: every batch of the bucket sampler stacks, covers one bucket, and an
    epoch yields every row once; each row's bucket is the nearest aspect ratio of about 64^2
    pixels and its latents are the encoding of exactly the recorded crop window."""
    dataset = LatentDataset(bucket_job)
    sampler = BucketBatchSampler(dataset, batch_size=4, seed=1)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=LatentDataset.collate)
    seen, sizes, buckets = [], [], set()
    for latents, metadata in loader:
        (bucket,) = {(m["bucket_height"], m["bucket_width"]) for m in metadata}
        assert latents.shape == (len(metadata), 4, bucket[0] // 2, bucket[1] // 2)  # sd-vae-tiny: f2 c4
        seen += [m["id"] for m in metadata]
        sizes.append(len(metadata))
        buckets.add(bucket)
    assert len(dataset) == 40 and sorted(seen) == sorted(dataset.metadata(i)["id"] for i in range(40))
    assert len(buckets) >= 3 and max(sizes) == 4 and len(sizes) == len(sampler)

    allowed = bucket_sizes(BUCKET_RESOLUTION, tokenizer.spec.multiple)
    offsets = set()
    for i in range(len(dataset)):
        row = dataset.metadata(i)
        bucket = (row["bucket_height"], row["bucket_width"])
        assert bucket == nearest_bucket(row["original_height"], row["original_width"], allowed)
        assert abs(bucket[0] * bucket[1] / BUCKET_RESOLUTION**2 - 1) < 0.05
        cover = cover_size(row["original_height"], row["original_width"], bucket)
        assert 0 <= row["crop_top"] <= cover[0] - bucket[0] and 0 <= row["crop_left"] <= cover[1] - bucket[1]
        offsets.add((row["crop_top"], row["crop_left"]))
    assert len(offsets) > 3  # random windows, not all centered

    row = dataset.metadata(0)
    bucket = (row["bucket_height"], row["bucket_width"])
    pixels = load_media(
        Path(row["source_path"]).read_bytes()
    ).pixels  # uint8, cropped in uint8 as the job does
    window = resize_crop(
        pixels, cover_size(*pixels.shape[-2:], bucket), bucket, row["crop_top"], row["crop_left"]
    )
    expected = tokenizer.encode(window).latents[0]
    torch.testing.assert_close(dataset[0]["latents"], expected, rtol=1e-4, atol=1e-4)
    assert dataset.decode(0, tokenizer).shape[-2:] == bucket


def test_bucket_sampler_epochs_reshuffle_and_drop_last(bucket_job):
    """set_epoch reshuffles (every row still once); drop_last keeps only full batches."""
    dataset = LatentDataset(bucket_job)
    sampler = BucketBatchSampler(dataset, batch_size=4, seed=0)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert first != second
    assert sorted(i for b in first for i in b) == sorted(i for b in second for i in b) == list(range(40))
    full = BucketBatchSampler(dataset, batch_size=4, drop_last=True)
    per_bucket = [len(indices) for indices in full.buckets.values()]
    assert all(len(b) == 4 for b in full) and len(list(full)) == len(full) == sum(n // 4 for n in per_bucket)
