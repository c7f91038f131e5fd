"""Training data on real photos and clips: determinism, process split, bad files, shards, clips."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from tokenizers_svc.errors import ConfigError
from tokenizers_svc.spec import FrameRule, TokenizerSpec
from training.config import parse_recipe
from training.data import BatchPlan, TrainBatches, build_sources, center_crop, load_validation, random_crop

IMAGE_SPEC = TokenizerSpec(
    name="img", family="test", modality="image", spatial_compression=8, latent_channels=4
)
VIDEO_SPEC = TokenizerSpec(
    name="vid",
    family="test",
    modality="video",
    spatial_compression=8,
    latent_channels=4,
    frame_rule=FrameRule(temporal_compression=4, causal=True),
)
REAL_CLIPS = ["bikes.mp4", "carphone_pristine.mp4"]  # MANIFEST: content "real"


def recipe_for(sources: list[dict], **data) -> object:
    return parse_recipe(
        {
            "name": "t",
            "model": {"preset": "sd-vae-tiny"},
            "data": {"sources": sources, "batch_size": 2, "crop_sizes": [32, 48], **data},
            "phases": [{"name": "p", "steps": 50}],
        }
    )


def batches(recipe, spec, plan, indices):
    dataset = TrainBatches(recipe, build_sources(recipe), spec, plan)
    return [dataset[i] for i in indices]


def test_batches_are_a_pure_function_of_seed_and_step(shared_data):
    recipe = recipe_for([{"kind": "images", "path": str(shared_data / "images" / "train")}])
    a = batches(recipe, IMAGE_SPEC, BatchPlan(seed=3), [0, 5, 6])
    b = batches(recipe, IMAGE_SPEC, BatchPlan(seed=3, start_micro_step=5), [0, 1])
    assert torch.equal(a[1]["pixels"], b[0]["pixels"]) and torch.equal(a[2]["pixels"], b[1]["pixels"])
    assert a[0]["pixels"].dtype == torch.uint8 and a[0]["pixels"].shape[:2] == (2, 3)
    assert {x["pixels"].shape[-1] for x in a} <= {32, 48}
    other = batches(recipe, IMAGE_SPEC, BatchPlan(seed=4), [0])
    assert not torch.equal(other[0]["pixels"], a[0]["pixels"])
    sizes = {batches(recipe, IMAGE_SPEC, BatchPlan(seed=3), [i])[0]["pixels"].shape[-1] for i in range(8)}
    assert sizes == {32, 48}  # multi-scale: both crop sizes occur


def test_two_processes_see_the_one_process_global_batch(shared_data):
    path = str(shared_data / "images" / "train")
    one = batches(
        recipe_for([{"kind": "images", "path": path}], batch_size=4), IMAGE_SPEC, BatchPlan(seed=0), [2]
    )
    halves = [
        batches(
            recipe_for([{"kind": "images", "path": path}], batch_size=2),
            IMAGE_SPEC,
            BatchPlan(seed=0, rank=rank, world_size=2),
            [2],
        )[0]["pixels"]
        for rank in (0, 1)
    ]
    assert torch.equal(one[0]["pixels"], torch.cat(halves))


def test_bad_files_are_skipped_and_reported(shared_data, tmp_path):
    photos = sorted((shared_data / "images" / "train").glob("*.jpg"))[:3]
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    for photo in photos:
        shutil.copy(photo, nested / photo.name)  # recursive listing finds nested files
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "notes.txt").write_text("ignored: not an image extension")
    recipe = recipe_for([{"kind": "images", "path": str(tmp_path)}])
    sources = build_sources(recipe)
    assert len(sources[0]) == 4
    dataset = TrainBatches(recipe, sources, IMAGE_SPEC, BatchPlan(seed=0))
    skipped = [name for i in range(6) for name in dataset[i]["skipped"]]
    assert skipped and set(skipped) == {str(tmp_path / "broken.jpg")}


def test_all_files_bad_is_a_clear_error(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    recipe = recipe_for([{"kind": "images", "path": str(tmp_path)}])
    dataset = TrainBatches(recipe, build_sources(recipe), IMAGE_SPEC, BatchPlan(seed=0))
    with pytest.raises(ConfigError, match="could be decoded"):
        dataset[0]


def test_missing_or_empty_folder_fails_at_start(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_sources(recipe_for([{"kind": "images", "path": str(tmp_path / "nope")}]))
    with pytest.raises(ConfigError, match="no usable files"):
        build_sources(recipe_for([{"kind": "images", "path": str(tmp_path)}]))


def test_webdataset_shards(shared_data, tmp_path):
    import webdataset as wds

    photos = sorted((shared_data / "images" / "train").glob("*.jpg"))[:5]
    for shard_index, chunk in enumerate([photos[:3], photos[3:]]):
        with wds.TarWriter(str(tmp_path / f"shard-{shard_index:04d}.tar")) as sink:
            for photo in chunk:
                sink.write({"__key__": f"sample/{photo.stem}", "jpg": photo.read_bytes(), "txt": photo.stem})
    recipe = recipe_for([{"kind": "webdataset", "path": str(tmp_path)}])
    sources = build_sources(recipe)
    assert len(sources[0]) == 5 and sources[0].summary()["shards"] == 2
    decoded = sources[0].load(0, np.random.default_rng(0))
    from tokenizers_svc.media import read_image

    assert np.array_equal(decoded[0], read_image(photos[0]))  # bytes read back from the tar offset
    by_glob = build_sources(recipe_for([{"kind": "webdataset", "path": str(tmp_path / "shard-0001.tar")}]))
    assert len(by_glob[0]) == 2
    batch = TrainBatches(recipe, sources, IMAGE_SPEC, BatchPlan(seed=0))[0]
    assert batch["pixels"].shape[:2] == (2, 3) and not batch["skipped"]


def test_video_clips_and_joint_image_batches(shared_data):
    recipe = recipe_for(
        [
            {"kind": "videos", "path": str(shared_data / "videos"), "include": REAL_CLIPS, "frames": 5},
            {"kind": "images", "path": str(shared_data / "images" / "train")},
        ],
        crop_sizes=[32],
    )
    sources = build_sources(recipe)
    assert [s.name(i).rsplit("/", 1)[-1] for s in sources[:1] for i in range(len(s))] == REAL_CLIPS
    dataset = TrainBatches(recipe, sources, VIDEO_SPEC, BatchPlan(seed=0))
    shapes = {tuple(dataset[i]["pixels"].shape) for i in range(6)}
    assert shapes == {(2, 3, 5, 32, 32), (2, 3, 1, 32, 32)}  # clips and one-frame images
    clip = next(dataset[i]["pixels"] for i in range(6) if dataset[i]["pixels"].shape[2] == 5)
    assert (clip[:, :, 1:].float() - clip[:, :, :-1].float()).abs().mean() > 0  # frames differ: real motion


def test_clip_length_must_fit_the_model(shared_data):
    recipe = recipe_for(
        [{"kind": "videos", "path": str(shared_data / "videos"), "include": REAL_CLIPS, "frames": 4}]
    )
    with pytest.raises(ConfigError, match=r"1 \+ 4k"):
        TrainBatches(recipe, build_sources(recipe), VIDEO_SPEC, BatchPlan(seed=0))
    with pytest.raises(ConfigError, match="image model"):
        TrainBatches(recipe, build_sources(recipe), IMAGE_SPEC, BatchPlan(seed=0))


def test_crops(photo_uint8):
    rng = np.random.default_rng(0)
    crop = random_crop(photo_uint8[None], 64, rng, min_scale=0.25, hflip=True)
    assert crop.shape == (3, 1, 64, 64) and crop.dtype == torch.uint8
    small = random_crop(photo_uint8[None, :40, :50], 64, rng, min_scale=0.25, hflip=False)
    assert small.shape == (3, 1, 64, 64)  # smaller than the crop: upscaled
    center = center_crop(photo_uint8[None, :, :400], 128)
    assert center.shape == (3, 1, 128, 128)


def test_validation_images(shared_data):
    recipe = parse_recipe(
        {
            "name": "t",
            "model": {"preset": "sd-vae-tiny"},
            "data": {"sources": [{"kind": "images", "path": "x"}]},
            "phases": [{"name": "p", "steps": 1}],
            "validation": {"path": str(shared_data / "images" / "val"), "resolution": 64, "max_images": 3},
        }
    )
    images = load_validation(recipe)
    assert images.shape == (3, 3, 64, 64) and images.dtype == torch.uint8


def test_photo_clips_are_stills_pans_and_zooms_of_training_photos(shared_data):
    """The photo_clips source: 17-frame clips rendered from the training photos on the fly, a pure
    function of seed and step like every source, with still shots and moving shots among them."""
    recipe = recipe_for(
        [{"kind": "photo_clips", "path": str(shared_data / "images" / "train"), "frames": 17}],
        crop_sizes=[32],
    )
    first = batches(recipe, VIDEO_SPEC, BatchPlan(seed=0), range(12))
    again = batches(recipe, VIDEO_SPEC, BatchPlan(seed=0, start_micro_step=3), [0])
    assert torch.equal(first[3]["pixels"], again[0]["pixels"])
    clips = torch.cat([b["pixels"] for b in first])  # (24, 3, 17, 32, 32) uint8
    assert clips.shape == (24, 3, 17, 32, 32) and clips.dtype == torch.uint8
    change = (clips[:, :, 1:].float() - clips[:, :, :-1].float()).abs().flatten(1).amax(1)
    assert (change == 0).any() and (change > 0).sum() >= 8  # still shots and moving shots (2/3 expected)
