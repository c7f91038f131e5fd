"""Training data: image folders, video folders, WebDataset shards, mixed into deterministic batches.

Every batch is a pure function of ``(seed, micro_step)``: which source it comes from, its crop size,
and, for each position in the *global* batch, which file and which crop. A process of rank ``r``
out of ``w`` takes positions ``[r * b, (r + 1) * b)`` of the global batch, so one process with batch
``2b`` sees exactly the samples that two processes with batch ``b`` see together, and resuming at
step ``s`` needs no loader state at all: the loader simply starts at ``s``.

Batches leave the workers as uint8 (cheap to pass between processes): images ``(B, 3, S, S)``,
clips ``(B, 3, T, S, S)``. For a video model an image is a one-frame clip ``(B, 3, 1, S, S)``
(repeated to the smallest frame count the model accepts). Files that fail to decode are skipped
(the next file in the epoch order takes their place) and reported with the batch, never fatal.
"""

from __future__ import annotations

import fnmatch
import glob
import math
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tokenizers_svc.camera import MOVE_KINDS, random_move, render_clip
from tokenizers_svc.errors import ConfigError, TokenizerError
from tokenizers_svc.formats import IMAGE_SUFFIXES as IMAGE_EXTENSIONS
from tokenizers_svc.formats import VIDEO_SUFFIXES as VIDEO_EXTENSIONS
from tokenizers_svc.media import decode_image, probe_video, read_image, read_video
from tokenizers_svc.pixels import center_crop as center_square
from tokenizers_svc.pixels import resize_uint8
from tokenizers_svc.spec import TokenizerSpec
from training.config import DataSection, Recipe, SourceSection


def list_files(root: Path, extensions: tuple[str, ...], include: list[str], exclude: list[str]) -> list[Path]:
    """Files under ``root`` (recursive, sorted) with one of ``extensions``, filtered by globs on the
    path relative to ``root``."""
    if not root.is_dir():
        raise ConfigError(f"data folder {str(root)!r} does not exist", param="data.sources.path")
    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if not path.is_file() or path.suffix.lower() not in extensions:
            continue
        if include and not any(fnmatch.fnmatch(rel, pattern) for pattern in include):
            continue
        if any(fnmatch.fnmatch(rel, pattern) for pattern in exclude):
            continue
        files.append(path)
    return files


class _DecodeCache:
    """A small per-process LRU of decoded images (dataset folders of a few dozen photos decode once)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: OrderedDict[str, np.ndarray] = OrderedDict()

    def get(self, key: str, load) -> np.ndarray:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = load()
        if self.capacity:
            self.items[key] = value
            if len(self.items) > self.capacity:
                self.items.popitem(last=False)
        return value


class Source:
    """A list of items, each loadable as frames ``(T, H, W, 3)`` uint8 (images: T = 1)."""

    kind: str
    frames: int = 1

    def __init__(self, section: SourceSection, cache: _DecodeCache) -> None:
        self.section = section
        self.cache = cache

    def __len__(self) -> int:
        raise NotImplementedError

    def name(self, index: int) -> str:
        raise NotImplementedError

    def load(self, index: int, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def summary(self) -> dict:
        return {"kind": self.section.kind, "path": self.section.path, "items": len(self)}

    def crop(
        self, frames: np.ndarray, size: int, rng: np.random.Generator, data: DataSection
    ) -> torch.Tensor:
        """A loaded item (T, H, W, 3) uint8 -> a training sample (3, T, size, size) uint8."""
        return random_crop(frames, size, rng, data.min_scale, data.hflip, data.max_scale)


class ImageFolder(Source):
    kind = "images"

    def __init__(self, section: SourceSection, cache: _DecodeCache) -> None:
        super().__init__(section, cache)
        self.files = list_files(Path(section.path), IMAGE_EXTENSIONS, section.include, section.exclude)

    def __len__(self) -> int:
        return len(self.files)

    def name(self, index: int) -> str:
        return str(self.files[index])

    def load(self, index: int, rng: np.random.Generator) -> np.ndarray:
        path = self.files[index]
        return self.cache.get(str(path), lambda: read_image(path))[None]  # (1, H, W, 3)


class VideoFolder(Source):
    """Clips of ``frames`` frames, every ``frame_stride``-th, from a uniformly random start time inside
    the source's ``segment`` (fractions of each file's duration: train on one part of a clip, hold
    out the rest)."""

    kind = "videos"

    def __init__(self, section: SourceSection, cache: _DecodeCache) -> None:
        super().__init__(section, cache)
        self.files = list_files(Path(section.path), VIDEO_EXTENSIONS, section.include, section.exclude)
        self.frames = section.frames
        self._durations: dict[int, tuple[float, float]] = {}

    def __len__(self) -> int:
        return len(self.files)

    def name(self, index: int) -> str:
        return str(self.files[index])

    def _probe(self, index: int) -> tuple[float, float]:
        """(duration s, fps) from the container header, cached."""
        if index not in self._durations:
            self._durations[index] = probe_video(self.files[index])
        return self._durations[index]

    def load(self, index: int, rng: np.random.Generator) -> np.ndarray:
        duration, fps = self._probe(index)
        span = self.frames * self.section.frame_stride / fps  # seconds one clip covers
        first, last = (fraction * duration for fraction in self.section.segment)
        start = float(rng.uniform(first, max(last - span - 1.0 / fps, first)))
        video = read_video(
            self.files[index], start=start, max_frames=self.frames, stride=self.section.frame_stride
        )
        frames = video.frames
        if frames.shape[0] < self.frames:  # a clip cut short by the end of the file repeats its last frame
            pad = np.repeat(frames[-1:], self.frames - frames.shape[0], axis=0)
            frames = np.concatenate([frames, pad])
        return frames  # (T, H, W, 3)


class WebDatasetShards(Source):
    """Images inside WebDataset ``.tar`` shards (samples grouped by key = path up to the first dot of
    the basename, as webdataset does). Shards are indexed once (member offsets) so any sample can be
    read directly, which keeps batches a pure function of the step."""

    kind = "webdataset"

    def __init__(self, section: SourceSection, cache: _DecodeCache) -> None:
        super().__init__(section, cache)
        root = Path(section.path)
        shards = sorted(root.glob("*.tar")) if root.is_dir() else sorted(map(Path, glob.glob(section.path)))
        if not shards:
            raise ConfigError(f"no .tar shards found at {section.path!r}", param="data.sources.path")
        self.entries: list[tuple[Path, str, int, int]] = []  # (shard, key, data offset, size)
        for shard in shards:
            with tarfile.open(shard) as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    directory, _, base = member.name.rpartition("/")
                    stem, _, extension = base.partition(".")
                    key = f"{directory}/{stem}" if directory else stem
                    if f".{extension.lower()}" not in IMAGE_EXTENSIONS:
                        continue
                    if section.include and not any(fnmatch.fnmatch(key, p) for p in section.include):
                        continue
                    if any(fnmatch.fnmatch(key, p) for p in section.exclude):
                        continue
                    self.entries.append((shard, key, member.offset_data, member.size))
        self.shards = shards

    def __len__(self) -> int:
        return len(self.entries)

    def name(self, index: int) -> str:
        shard, key, _, _ = self.entries[index]
        return f"{shard}#{key}"

    def load(self, index: int, rng: np.random.Generator) -> np.ndarray:
        shard, key, offset, size = self.entries[index]

        def read() -> np.ndarray:
            with open(shard, "rb") as handle:
                handle.seek(offset)
                return decode_image(handle.read(size))

        return self.cache.get(f"{shard}#{key}", read)[None]

    def summary(self) -> dict:
        return {**super().summary(), "shards": len(self.shards)}


class PhotoClips(ImageFolder):
    """Clips of ``frames`` frames made from the folder's photos as they are drawn: a still shot, a pan
    or a zoom (equally likely; :mod:`tokenizers_svc.camera`, the moves the evaluation's held-out
    photo clips use). The photo is first resized so that its shorter side is ``u`` times the crop
    size, ``u`` log-uniform in [1, 2 x the photo's own shorter side / crop size]: from the whole
    photo in view to detail magnified twice (the multi-scale part); ``data.min_scale`` and
    ``max_scale`` do not apply."""

    kind = "photo_clips"

    def __init__(self, section: SourceSection, cache: _DecodeCache) -> None:
        super().__init__(section, cache)
        self.frames = section.frames

    def crop(
        self, frames: np.ndarray, size: int, rng: np.random.Generator, data: DataSection
    ) -> torch.Tensor:
        photo = torch.from_numpy(np.ascontiguousarray(frames[0])).permute(2, 0, 1)  # (3, H, W) uint8
        short = min(photo.shape[-2:])
        high = max(1.0, 2.0 * short / size)
        scale = math.exp(rng.uniform(0.0, math.log(high)))
        h, w = photo.shape[-2:]
        resized = resize_uint8(
            photo, (max(size, round(h * size * scale / short)), max(size, round(w * size * scale / short)))
        )
        kind = MOVE_KINDS[int(rng.integers(len(MOVE_KINDS)))]
        move = random_move(kind, *resized.shape[-2:], size, self.frames, rng)
        clip = render_clip(resized, move, self.frames, size)  # (3, T, size, size)
        if data.hflip and rng.random() < 0.5:
            clip = clip.flip(-1)
        return clip


SOURCE_KINDS: dict[str, type[Source]] = {
    "images": ImageFolder,
    "videos": VideoFolder,
    "webdataset": WebDatasetShards,
    "photo_clips": PhotoClips,
}


def build_sources(recipe: Recipe, cache: _DecodeCache | None = None) -> list[Source]:
    cache = cache or _DecodeCache(recipe.data.cache_images)
    sources = [SOURCE_KINDS[section.kind](section, cache) for section in recipe.data.sources]
    for source in sources:
        if not len(source):
            raise ConfigError(
                f"data source {source.section.path!r} ({source.kind}) has no usable files",
                param="data.sources",
            )
    return sources


def random_crop(
    frames: np.ndarray,
    size: int,
    rng: np.random.Generator,
    min_scale: float,
    hflip: bool,
    max_scale: float = 1.0,
) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, size, size) uint8: a random square window, resized to ``size``.

    The window side is log-uniform in ``[size / max_scale, min(short side, size / min_scale)]``: from
    a ``max_scale`` upscale (smooth content, as photos shown larger than they were taken) to a
    ``min_scale`` downscale (dense detail): the multi-scale part. Images smaller than ``size`` are
    upscaled.
    """
    _, h, w, _ = frames.shape  # (T, H, W, 3)
    short = min(h, w)
    low = min(math.ceil(size / max_scale), short)
    high = min(short, max(size, int(size / min_scale)))
    window = round(math.exp(rng.uniform(math.log(low), math.log(high)))) if high > low else low
    top = int(rng.integers(0, h - window + 1))
    left = int(rng.integers(0, w - window + 1))
    flip = bool(hflip and rng.random() < 0.5)
    crop = torch.from_numpy(np.ascontiguousarray(frames[:, top : top + window, left : left + window]))
    crop = crop.permute(0, 3, 1, 2)  # (T, 3, window, window)
    if window != size:
        crop = resize_uint8(crop, (size, size))
    if flip:
        crop = crop.flip(-1)
    return crop.permute(1, 0, 2, 3).contiguous()  # (3, T, size, size)


def center_crop(frames: np.ndarray, resolution: int) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, r, r) uint8: shorter side resized to ``r`` (bicubic, as the
    evaluation resizes), center square."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (T, 3, H, W)
    return center_square(x, resolution).permute(1, 0, 2, 3).contiguous()


@dataclass
class BatchPlan:
    """How micro-batches are laid out across processes (see the module docstring)."""

    seed: int
    rank: int = 0
    world_size: int = 1
    grad_accum: int = 1
    start_micro_step: int = 0


class TrainBatches(Dataset):
    """Map-style dataset whose item ``i`` is micro-batch ``start + i`` for this process:
    ``{"pixels": uint8 (B, 3, [T,] S, S), "skipped": [names of files that failed to decode]}``."""

    def __init__(self, recipe: Recipe, sources: list[Source], spec: TokenizerSpec, plan: BatchPlan) -> None:
        self.recipe = recipe
        self.sources = sources
        self.spec = spec
        self.plan = plan
        self.weights = np.array([s.section.weight for s in sources], dtype=np.float64)
        self.weights /= self.weights.sum()
        self.video_model = spec.modality != "image"
        self.image_frames = spec.frame_rule.padded_frames(1) if self.video_model else 1
        for source in sources:
            if source.frames > 1 and not self.video_model:
                raise ConfigError(
                    f"{spec.name} is an image model; data source {source.section.path!r} gives "
                    f"{source.frames}-frame clips (use frames: 1 or a video model)",
                    param="data.sources.frames",
                )
            if source.frames > 1 and not spec.frame_rule.is_valid(source.frames):
                raise ConfigError(
                    f"{spec.name} accepts {spec.frame_rule.describe()} frames; data source "
                    f"{source.section.path!r} has frames={source.frames}",
                    param="data.sources.frames",
                )
        total_micro = recipe.total_steps * recipe.optim.grad_accum
        self.length = max(total_micro - plan.start_micro_step, 0)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        micro = self.plan.start_micro_step + index
        step = micro // self.plan.grad_accum
        rng = np.random.default_rng([self.plan.seed, micro])
        source_index = int(rng.choice(len(self.sources), p=self.weights))
        source = self.sources[source_index]
        size = int(rng.choice(self.recipe.crop_sizes_at(step)))
        local = source.section.batch_size or self.recipe.batch_size_at(step)
        global_batch = local * self.plan.world_size
        skipped: list[str] = []
        samples = []
        for slot in range(self.plan.rank * local, (self.plan.rank + 1) * local):
            position = micro * global_batch + slot  # this sample's place in the source's epoch order
            sample_rng = np.random.default_rng([self.plan.seed, micro, slot])
            samples.append(self._sample(source_index, position, size, sample_rng, skipped))
        pixels = torch.stack(samples)  # (B, 3, T, S, S)
        if not self.video_model:
            pixels = pixels[:, :, 0]  # (B, 3, S, S)
        elif pixels.shape[2] < self.image_frames:
            pixels = pixels.expand(-1, -1, self.image_frames, -1, -1).contiguous()
        return {"pixels": pixels, "skipped": skipped, "source": source_index}

    def _sample(
        self, source_index: int, position: int, size: int, rng: np.random.Generator, skipped: list[str]
    ) -> torch.Tensor:
        source = self.sources[source_index]
        n = len(source)
        for attempt in range(n):
            k = position + attempt
            epoch, offset = divmod(k, n)
            order = np.random.default_rng([self.plan.seed, source_index, epoch]).permutation(n)
            index = int(order[offset])
            try:
                frames = source.load(index, rng)
            except TokenizerError:
                skipped.append(source.name(index))
                continue
            return source.crop(frames, size, rng, self.recipe.data)
        raise ConfigError(
            f"no file of data source {source.section.path!r} could be decoded", param="data.sources"
        )


def _one_thread(worker_id: int) -> None:
    """Loader workers crop and resize on the CPU; with torch's default of one thread per core in
    every worker they oversubscribe the machine (measured: a GPU run starved for data)."""
    torch.set_num_threads(1)


def _collate(items: list[dict]) -> dict:
    return items[0]  # the dataset already yields whole batches


def make_loader(recipe: Recipe, sources: list[Source], spec: TokenizerSpec, plan: BatchPlan) -> DataLoader:
    """Batches from ``plan.start_micro_step`` on. The loader's own generator is seeded so that
    creating it never draws from the global torch RNG (which the checkpoint restores bit-exactly)."""
    dataset = TrainBatches(recipe, sources, spec, plan)
    workers = recipe.data.num_workers
    return DataLoader(
        dataset,
        batch_size=1,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        worker_init_fn=_one_thread,
        generator=torch.Generator().manual_seed(recipe.seed),
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


def load_validation(recipe: Recipe) -> torch.Tensor | None:
    """Held-out images, center-cropped: uint8 (N, 3, r, r), or None when validation is off."""
    section = recipe.validation
    if section.path is None:
        return None
    files = list_files(Path(section.path), IMAGE_EXTENSIONS, [], [])[: section.max_images]
    images = []
    for path in files:
        try:
            images.append(center_crop(read_image(path)[None], section.resolution)[:, 0])
        except TokenizerError:
            continue
    if not images:
        raise ConfigError(
            f"validation folder {section.path!r} has no readable images", param="validation.path"
        )
    return torch.stack(images)


def data_summary(sources: list[Source]) -> list[dict]:
    return [{**source.summary(), "weight": source.section.weight} for source in sources]
