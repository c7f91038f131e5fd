"""Streaming evaluation inputs: where items come from, how they are cut into shards, and the
``IterableDataset`` that decodes and crops them in DataLoader workers.

Sources (``--data``):
- a directory: images (recursive, so an ImageNet-style ``class/xxx.JPEG`` tree works as is), else videos;
- a WebDataset tar glob (``shards/*.tar``): every image member of every tar, in tar order;
- a Parquet file with a ``path`` column (relative paths are relative to the Parquet file's folder).

Entries (files or tar members) are listed in a deterministic order and cut into shards of ``shard_size``
entries: the unit of Ray work, of resume, and of progress. Items are uint8 (3, R, R) crops, or (3, T, R, R)
clips.
"""

from __future__ import annotations

import glob
import hashlib
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from tokenizers_svc.crops import DEFAULT_SCALES, list_media, multiscale_crops, square_crops
from tokenizers_svc.errors import InvalidMediaError, InvalidRequestError, TokenizerError
from tokenizers_svc.formats import EVAL_IMAGE_SUFFIXES, EVAL_ONLY_IMAGE_FORMATS
from tokenizers_svc.manifests import read_manifest
from tokenizers_svc.media import decode_image, read_video


@dataclass(frozen=True)
class Entry:
    """One file or tar member; ``limit`` keeps only its first items (the last entry under --max-items)."""

    name: str  # item names are this plus the crop suffix
    path: str
    member: str | None = None  # tar member
    limit: int | None = None


@dataclass(frozen=True)
class CropSpec:
    """How entries become items (the protocol's crop part)."""

    kind: str  # "image" | "video"
    crop: str  # "center" | "grid" | "multiscale"
    resolution: int
    scales: tuple[int, ...] = DEFAULT_SCALES
    frames: int = 17


@dataclass(frozen=True)
class Shard:
    index: int
    entries: tuple[Entry, ...]


def list_entries(data: str | Path) -> tuple[str, list[Entry]]:
    """-> (kind, entries) for a directory, a tar glob or a Parquet of paths."""
    text = str(data)
    if text.endswith(".parquet"):
        return "image", _parquet_entries(Path(text))
    if text.endswith(".tar") or any(ch in text for ch in "*?["):
        tars = sorted(glob.glob(text))
        if not tars:
            raise InvalidRequestError(f"no tar files match {text}", param="data")
        return "image", [entry for tar in tars for entry in _tar_entries(Path(tar))]
    root = Path(data)
    kind = "image" if list_media(root, "image") else "video"
    files = list_media(root, kind)
    if not files:
        raise InvalidRequestError(f"no images or videos found under {root}", param="data")
    return kind, [Entry(str(p.relative_to(root)), str(p)) for p in files]


def _tar_entries(tar: Path) -> list[Entry]:
    with tarfile.open(tar) as handle:
        members = [m.name for m in handle.getmembers() if m.isfile()]
    return [
        Entry(f"{tar.name}/{m}", str(tar), member=m)
        for m in members
        if Path(m).suffix.lower() in EVAL_IMAGE_SUFFIXES
    ]


def _parquet_entries(path: Path) -> list[Entry]:
    """A Parquet manifest's rows (:func:`tokenizers_svc.manifests.read_manifest`), named as listed;
    empty rows are left out."""
    return [Entry(listed, absolute) for listed, absolute in read_manifest(path, param="data") if listed]


def entry_bytes(entry: Entry, tars: dict | None = None) -> bytes:
    """The raw bytes of an entry; ``tars`` caches open tar files (one per worker)."""
    if entry.member is None:
        try:
            return Path(entry.path).read_bytes()
        except OSError as exc:
            raise InvalidMediaError(f"cannot read {entry.path}: {exc.strerror}", param="data") from None
    if tars is None:
        with tarfile.open(entry.path) as handle:
            return handle.extractfile(entry.member).read()
    if entry.path not in tars:
        tars[entry.path] = tarfile.open(entry.path)  # noqa: SIM115 (open for the worker's lifetime)
    return tars[entry.path].extractfile(entry.member).read()


def entry_items(
    entry: Entry, spec: CropSpec, tars: dict | None = None
) -> list[tuple[str, int | None, torch.Tensor]]:
    """Entry -> [(item name, crop scale or None, uint8 item)] (videos shorter than ``spec.frames``: [])."""
    if spec.kind == "video":
        clip = read_video(entry.path, max_frames=spec.frames).frames  # (T, H, W, 3) uint8
        if clip.shape[0] < spec.frames:
            return []  # shorter clips would make the batch ragged
        pixels = torch.from_numpy(clip).permute(3, 0, 1, 2)  # (3, T, H, W)
    else:
        data = entry_bytes(entry, tars)
        pixels = torch.from_numpy(decode_image(data, extra_formats=EVAL_ONLY_IMAGE_FORMATS)).permute(2, 0, 1)
    if spec.crop == "multiscale":
        cut = multiscale_crops(pixels, spec.scales, spec.resolution)
    else:
        cut = [(None, suffix, tile) for suffix, tile in square_crops(pixels, spec.resolution, spec.crop)]
    items = [(entry.name + suffix, scale, tile.contiguous()) for scale, suffix, tile in cut]
    return items[: entry.limit] if entry.limit is not None else items


def limit_entries(entries: list[Entry], spec: CropSpec, max_items: int | None) -> list[Entry]:
    """The entries holding the first ``max_items`` items (counted by decoding them; one item per entry for
    center-cropped images needs no decoding)."""
    if not max_items:
        return entries
    if spec.kind == "image" and spec.crop == "center":
        return entries[:max_items]
    kept, count = [], 0
    for entry in entries:
        try:
            n = len(entry_items(entry, spec))
        except TokenizerError:  # kept with no items: the stream reports it as skipped, with its reason
            kept.append(replace(entry, limit=0))
            continue
        if n:
            kept.append(replace(entry, limit=min(n, max_items - count)))
            count += kept[-1].limit
        if count >= max_items:
            break
    return kept


def make_shards(entries: list[Entry], shard_size: int) -> list[Shard]:
    return [
        Shard(i, tuple(entries[start : start + shard_size]))
        for i, start in enumerate(range(0, len(entries), shard_size))
    ]


def content_hash(entries: list[Entry], threads: int = 8) -> str:
    """SHA-256 over every entry's name, limit and raw bytes, in order: the data's identity for caches."""

    def digest(entry: Entry) -> bytes:
        try:
            return hashlib.sha256(entry_bytes(entry)).digest()
        except TokenizerError as exc:  # unreadable: skipped by the stream, so its error is its identity
            return hashlib.sha256(str(exc).encode()).digest()

    total = hashlib.sha256()
    with ThreadPoolExecutor(threads) as pool:
        for entry, part in zip(entries, pool.map(digest, entries), strict=True):
            total.update(f"{entry.name}\0{entry.limit}\0".encode() + part)
    return total.hexdigest()


class ItemStream(IterableDataset):
    """Shards -> chunks of ``entries_per_chunk`` entries, each yielded as one dict of stacked items.

    Chunk k goes to DataLoader worker k % num_workers, and the DataLoader takes one chunk from each worker
    in turn, so chunks arrive in order whatever the worker count: shards finish one after another and
    items keep the sorted order. A chunk never spans two shards; its ``last`` flag ends its shard.
    """

    def __init__(self, shards: list[Shard], spec: CropSpec, entries_per_chunk: int) -> None:
        self.spec = spec
        self.chunks = []
        for shard in shards:
            parts = range(0, len(shard.entries), entries_per_chunk)
            for start in parts:
                last = start + entries_per_chunk >= len(shard.entries)
                self.chunks.append((shard.index, shard.entries[start : start + entries_per_chunk], last))

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        tars: dict = {}
        for shard, entries, last in self.chunks[worker::workers]:
            yield load_chunk(shard, entries, self.spec, last, tars)


def load_chunk(shard: int, entries, spec: CropSpec, last: bool, tars: dict | None = None) -> dict:
    """Decode and crop ``entries`` -> {"shard", "names", "scales", "pixels" (uint8 (B, ...) or None),
    "entries" (how many were read), "skipped" ({entry name: why it was not read}), "last"}.
    An entry that cannot be read or decoded is skipped with its reason rather than ending the run."""
    items, skipped = [], {}
    for entry in entries:
        try:
            items += entry_items(entry, spec, tars)
        except TokenizerError as exc:
            skipped[entry.name] = {"type": exc.type, "message": exc.message}
    return {
        "shard": shard,
        "names": [name for name, _, _ in items],
        "scales": [scale for _, scale, _ in items],
        "pixels": torch.stack([pixels for _, _, pixels in items]) if items else None,
        "entries": len(entries),
        "skipped": skipped,
        "last": last,
    }
