"""The streaming evaluation engine: shards of items are reconstructed by every model, scored, and
dropped; only sufficient statistics (evals/stats.py), the first K sample items and items.csv rows remain.

One process: a DataLoader with workers decodes and crops; the main process runs models, bicubic baselines,
metrics and Inception on ``device``. With Ray (``--ray``): actors score whole shards and return their
statistics, which the driver sums (local Ray by default, the cluster named by ``RAY_ADDRESS`` otherwise).
Both write the same checkpoint after every finished shard (statistics, done shard ids, items.csv size),
so an interrupted run resumes without recomputing done shards.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from evals import classical, fid, image_metrics, sources, stats, video_metrics
from tokenizers_svc import load_tokenizer
from tokenizers_svc.crops import bicubic_round_trip, bicubic_size
from tokenizers_svc.metrics import id_counts

log = logging.getLogger("evals")

REFERENCE = "reference"
CHECKPOINT = "checkpoint.npz"


@dataclass
class EvalConfig:
    """What a scoring process needs (picklable: Ray actors build their own Scorer from it)."""

    models: list[str]
    spec: sources.CropSpec
    device: str = "cpu"
    inception: str | None = None
    i3d: str | None = None
    batch_size: int = 4
    kid_capacity: int = stats.KID_CAPACITY
    samples: int = 4


@dataclass
class StreamInfo:
    """What the report says about a stream besides its metrics."""

    name: str
    kind: str  # "model" | "baseline"
    floats_per_item: int
    info: dict = field(default_factory=dict)


class Accumulator:
    """Statistics of a set of shards: per stream, per model timings, the first sample items."""

    def __init__(self, config: EvalConfig, device) -> None:
        self.config = config
        self.device = device
        self.streams: dict[str, stats.StreamStats] = {}
        self.info: dict[str, dict] = {}  # stream -> StreamInfo fields (models, baselines)
        self.timing: dict[str, dict] = {}  # model -> encode_s, decode_s, items, peak bytes
        self.samples: list[
            tuple[tuple[int, int], str, dict[str, torch.Tensor]]
        ] = []  # ((shard, pos), name, ...)
        self.item_shape: list[int] | None = None
        self.frames_per_item = 1
        self.skipped: dict[str, dict] = {}  # entry name -> {"type", "message"} of why it was not read
        self.token_counts: dict[str, np.ndarray] = {}  # discrete model -> per-id counts (V,) int64

    def stream(self, name: str) -> stats.StreamStats:
        if name not in self.streams:
            self.streams[name] = stats.StreamStats(fid.FEATURE_DIM, self.device, self.config.kid_capacity)
        return self.streams[name]

    def wants_sample(self, key: tuple[int, int]) -> bool:
        """Whether the item at (shard, position) is among the first ``samples`` items seen so far."""
        return len(self.samples) < self.config.samples or key < self.samples[-1][0]

    def add_sample(self, key: tuple[int, int], name: str, pixels: dict[str, torch.Tensor]) -> None:
        if not self.wants_sample(key):
            return
        self.samples = sorted([*self.samples, (key, name, pixels)], key=lambda s: s[0])[: self.config.samples]

    def merge(self, other: Accumulator) -> None:
        for name, stream in other.streams.items():
            if name in self.streams:
                self.streams[name].merge(stream)
            else:
                self.streams[name] = stream
        self.info.update(other.info)
        for model, timing in other.timing.items():
            mine = self.timing.setdefault(model, {k: 0.0 for k in timing})
            for key, value in timing.items():
                mine[key] = max(mine[key], value) if key.endswith("peak_bytes") else mine[key] + value
        for key, name, pixels in other.samples:
            self.add_sample(key, name, pixels)
        self.item_shape = self.item_shape or other.item_shape
        self.frames_per_item = other.frames_per_item
        self.skipped.update(other.skipped)
        for model, counts in other.token_counts.items():
            self.count_tokens(model, counts)

    def count_tokens(self, model: str, counts: np.ndarray) -> None:
        """Add per-id counts (V,) of a discrete model's tokens (codebook usage, perplexity)."""
        mine = self.token_counts.get(model)
        self.token_counts[model] = counts.copy() if mine is None else mine + counts

    def state(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for i, stream in enumerate(self.streams.values()):
            out.update(stream.state(f"s{i}"))
        for j, (_, _, pixels) in enumerate(self.samples):
            for k, value in enumerate(pixels.values()):
                out[f"sample{j}.{k}"] = value.cpu().numpy()
        for k, counts in enumerate(self.token_counts.values()):
            out[f"token_counts{k}"] = counts
        meta = {
            "streams": list(self.streams),
            "info": self.info,
            "timing": self.timing,
            "samples": [(list(key), name, list(pixels)) for key, name, pixels in self.samples],
            "item_shape": self.item_shape,
            "frames_per_item": self.frames_per_item,
            "skipped": self.skipped,
            "token_counts": list(self.token_counts),
        }
        out["meta"] = np.array(json.dumps(meta))
        return out

    @classmethod
    def from_state(cls, state: dict, config: EvalConfig, device) -> Accumulator:
        acc = cls(config, device)
        meta = json.loads(str(state["meta"]))
        for i, name in enumerate(meta["streams"]):
            acc.streams[name] = stats.StreamStats.from_state(state, f"s{i}", device, config.kid_capacity)
        acc.info, acc.timing = meta["info"], meta["timing"]
        acc.item_shape, acc.frames_per_item = meta["item_shape"], meta["frames_per_item"]
        acc.skipped = meta["skipped"]
        acc.token_counts = {
            m: np.array(state[f"token_counts{k}"]) for k, m in enumerate(meta["token_counts"])
        }
        for j, (key, name, names) in enumerate(meta["samples"]):
            pixels = {
                s: torch.tensor(state[f"sample{j}.{k}"]) for k, s in enumerate(names)
            }  # a copy: Ray arrays are read-only
            acc.samples.append((tuple(key), name, pixels))
        return acc


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of a block: CUDA ``max_memory_allocated`` on GPU; on CPU the peak resident-set growth
    above the block's start, sampled from /proc/self/statm every 2 ms (torch's CPU allocations are
    invisible to tracemalloc, so RSS is the honest measure there)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = (
            "cuda max_memory_allocated"
            if device.type == "cuda"
            else "cpu peak RSS delta (sampled /proc/self/statm, 2 ms)"
        )
        self.peak_bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = _rss_bytes()
        self._peak = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self._peak, _rss_bytes()) - self._base


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Scorer:
    """Models, baselines, metrics and feature networks of one process, applied batch by batch."""

    def __init__(self, config: EvalConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.video = config.spec.kind == "video"
        self.tokenizers = [load_tokenizer(name, device=self.device) for name in config.models]
        self.inception = fid.load_inception(config.inception, self.device)
        self.lpips = image_metrics.Lpips.load()
        self.i3d = None if config.i3d is None else video_metrics.I3D.load(config.i3d, self.device)
        self.warm: set[str] = set()

    def columns(self) -> list[str]:
        """items.csv metric columns (sorted)."""
        names = ["psnr", "ssim"] + ["lpips"] * self.lpips.available + ["temporal_diff_psnr"] * self.video
        return sorted(names)

    def new_accumulator(self) -> Accumulator:
        return Accumulator(self.config, self.device)

    def frames(self, pixels: torch.Tensor) -> torch.Tensor:
        return video_metrics.frames(pixels) if self.video else pixels

    @torch.no_grad()
    def score(
        self, chunk: dict, acc: Accumulator, with_reference: bool, first_position: int = 0
    ) -> list[list[str]]:
        """Score one batch (a chunk's slice) into ``acc``; -> items.csv rows [item, stream, *columns]."""
        names, scales = chunk["names"], chunk["scales"]
        x = chunk["pixels"].to(self.device)  # uint8 (B, 3, R, R) or (B, 3, T, R, R)
        acc.item_shape = list(x.shape[1:])
        acc.frames_per_item = x.shape[2] if self.video else 1
        keys = stats.name_keys(names)
        groups = [str(s) for s in scales] if scales[0] is not None else ["all"] * len(names)
        if with_reference:
            self._add_features(acc.stream(REFERENCE), x, keys)
        rows: list[list[str]] = []
        outputs: dict[str, torch.Tensor] = {}
        baselines: dict = {}  # floats per item -> baseline stream; bits per item -> (thumbnail, codecs)
        baseline_psnr: dict[str, np.ndarray] = {}
        for tokenizer in self.tokenizers:
            rec, floats, info = self._reconstruct(tokenizer, x, acc)
            acc.info[tokenizer.name] = {"kind": "model", "floats_per_item": floats, **info}
            model_psnr = self._score_stream(acc, tokenizer.name, x, rec, keys, groups, names, rows)
            outputs[tokenizer.name] = rec
            if "bits_per_item" in info:  # discrete: classical codecs at the same number of bits
                bits = info["bits_per_item"]
                if bits not in baselines:
                    baselines[bits] = self._bit_baselines(acc, x, bits, outputs, (keys, groups, names, rows))
                    baseline_psnr.update(baselines[bits][1])
                thumbnail, scored = baselines[bits]
                acc.info[tokenizer.name] |= {"baseline": thumbnail, "codecs": list(scored)}
                gain = model_psnr - baseline_psnr[thumbnail]  # paired per item
                acc.streams[tokenizer.name].metrics.add("gain_db", gain, groups)
                continue
            if floats not in baselines:
                frames_per_item = acc.frames_per_item
                size, factor = bicubic_size(*x.shape[-2:], floats / frames_per_item)
                name = f"bicubic-x{factor:.2f}"
                base = bicubic_round_trip(self.frames(x), floats / frames_per_item)  # (B or B*T, 3, R, R)
                base = base.reshape(x.shape[0], -1, *base.shape[1:]).transpose(1, 2) if self.video else base
                acc.info[name] = {
                    "kind": "baseline",
                    "floats_per_item": 3 * size[0] * size[1] * frames_per_item,
                    "downsampled_size": list(size),
                    "side_factor": factor,
                    "target_floats_per_item": floats,
                }
                baselines[floats] = name
                outputs[name] = base.contiguous()
                baseline_psnr[name] = self._score_stream(
                    acc, name, x, outputs[name], keys, groups, names, rows
                )
            acc.info[tokenizer.name]["baseline"] = baselines[floats]
            gain = model_psnr - baseline_psnr[baselines[floats]]  # paired per item
            acc.streams[tokenizer.name].metrics.add("gain_db", gain, groups)
        for pos, name in enumerate(names):
            key = (chunk["shard"], first_position + pos)
            if acc.wants_sample(key):
                pixels = {
                    "original": chunk["pixels"][pos],
                    **{m: rec[pos].cpu() for m, rec in outputs.items()},
                }
                acc.add_sample(key, name, pixels)
        return rows

    def _bit_baselines(self, acc, x: torch.Tensor, bits: float, outputs: dict, scoring: tuple) -> tuple:
        """The 8-bit thumbnail and WebP at ``bits`` per item (evals/classical.py), scored as streams;
        -> (thumbnail stream, {stream: per-item PSNR}). Images only (WebP has no video mode here)."""
        frames = self.frames(x)
        per_frame_bits = bits / acc.frames_per_item
        thumb, size = classical.thumbnail_round_trip(frames, per_frame_bits)
        thumb = thumb.reshape(x.shape[0], -1, *thumb.shape[1:]).transpose(1, 2) if self.video else thumb
        budget = int(bits // 8)
        name = f"thumbnail8-{size[0]}x{size[1]}"
        acc.info[name] = {
            "kind": "baseline",
            "floats_per_item": bits / 8,
            "downsampled_size": list(size),
            "target_bits_per_item": bits,
            "codec": "8-bit RGB thumbnail, antialiased bicubic down and bicubic up",
        }
        outputs[name] = thumb.contiguous()
        psnrs = {name: self._score_stream(acc, name, x, outputs[name], *scoring)}
        if not self.video:
            webp, stats = classical.webp_at_budget(x, budget)
            webp_name = f"webp-{budget}B"
            acc.info[webp_name] = {
                "kind": "baseline",
                "floats_per_item": bits / 8,
                "budget_bytes": budget,
                "target_bits_per_item": bits,
                "codec": "WebP (libwebp via Pillow, lossy, method 4), largest quality within the budget",
            }
            outputs[webp_name] = webp.to(x.device)
            psnrs[webp_name] = self._score_stream(acc, webp_name, x, outputs[webp_name], *scoring)
            metrics = acc.stream(webp_name).metrics
            groups = scoring[1]
            for key, values in stats.items():
                metrics.add(f"webp_{key}", values.astype(np.float64), groups)
        return name, psnrs

    def _reconstruct(self, tokenizer, x: torch.Tensor, acc: Accumulator) -> tuple[torch.Tensor, int, dict]:
        per_frame = self.video and tokenizer.spec.modality == "image"
        inputs = video_metrics.frames(x) if per_frame else x  # image models see clips as independent frames
        quantizer = tokenizer.spec.quantizer  # discrete: ids are what is stored, decode reads them
        if tokenizer.name not in self.warm:  # first call pays one-off costs; keep it out of the timing
            tokenizer.decode(
                tokenizer.encode(inputs[:1], tokens=quantizer is not None), output_dtype=torch.uint8
            )
            self.warm.add(tokenizer.name)
        timing = acc.timing.setdefault(
            tokenizer.name,
            {"encode_s": 0.0, "decode_s": 0.0, "items": 0, "encode_peak_bytes": 0, "decode_peak_bytes": 0},
        )
        _sync(self.device)
        with PeakMemory(self.device) as encode_mem:
            t0 = time.perf_counter()
            latents = tokenizer.encode(inputs, tokens=quantizer is not None)
            _sync(self.device)
            t1 = time.perf_counter()
        with PeakMemory(self.device) as decode_mem:
            rec = tokenizer.decode(latents, output_dtype=torch.uint8).to(self.device)  # round half up
            _sync(self.device)
            t2 = time.perf_counter()
        timing["encode_s"] += t1 - t0
        timing["decode_s"] += t2 - t1
        timing["items"] += x.shape[0]
        timing["encode_peak_bytes"] = max(timing["encode_peak_bytes"], encode_mem.peak_bytes)
        timing["decode_peak_bytes"] = max(timing["decode_peak_bytes"], decode_mem.peak_bytes)
        if per_frame:
            n, c, t, h, w = x.shape
            rec = rec.reshape(n, t, c, h, w).transpose(1, 2)
        first = latents.ids if quantizer is not None else latents.latents
        floats = first[0].numel() * (x.shape[2] if per_frame else 1)
        info = {
            "source": tokenizer.source,
            "weights_hash": tokenizer.weights_hash,
            "spec": tokenizer.spec.to_dict(),
            "latent_shape_per_item": list(first.shape[1:]),
            "frames_encoded_independently": per_frame,
        }
        if quantizer is not None:  # floats_per_item: the ids' bytes, what the equal-bits codecs get
            bits = classical.bits_per_item(floats, quantizer.vocabulary_size)
            pixels = math.prod(x.shape[2:])  # per item: [T x] H x W
            info |= {"tokens_per_item": floats, "bits_per_item": bits, "bits_per_pixel": bits / pixels}
            acc.count_tokens(tokenizer.name, id_counts(latents.ids, quantizer.vocabulary_size).numpy())
            floats = bits / 8
        return rec.contiguous(), floats, info

    def _add_features(self, stream: stats.StreamStats, pixels: torch.Tensor, keys: np.ndarray) -> None:
        """Inception (and I3D) features of ``pixels`` into the stream's FID sums and KID sample."""
        feats = self.inception.device_features(self.frames(pixels))  # (B or B*T, 2048) float32
        stream.inception.add(feats)
        frame_keys = np.repeat(keys, pixels.shape[2]) if self.video else keys
        if self.video:  # distinct keys per frame, still a function of the item name
            frame_keys = frame_keys + np.tile(np.arange(pixels.shape[2], dtype=np.uint64), len(keys))
        stream.kid.add(frame_keys, feats.cpu().numpy())
        if self.i3d is not None:
            i3d = torch.from_numpy(self.i3d.features(pixels))  # (B, D_i3d)
            if stream.i3d is None:
                stream.i3d = stats.Moments(i3d.shape[1], self.device)
            stream.i3d.add(i3d)

    def _score_stream(self, acc, name, x, rec, keys, groups, names, rows) -> np.ndarray:
        """Per-item metrics and features of one reconstruction; -> its per-item PSNR."""
        stream = acc.stream(name)
        a, b = self.frames(x), self.frames(rec)
        per_frame = x.shape[2] if self.video else 1
        values = {
            "psnr": image_metrics.psnr_device(a, b).reshape(-1, per_frame).mean(1).double().cpu().numpy(),
            "ssim": image_metrics.ssim_device(a, b).reshape(-1, per_frame).mean(1).double().cpu().numpy(),
        }
        if self.video:
            values["temporal_diff_psnr"] = video_metrics.temporal_difference_psnr(x.cpu(), rec.cpu())
        if self.lpips.available:
            values["lpips"] = self.lpips(a.cpu(), b.cpu()).reshape(-1, per_frame).mean(1)
        for metric, v in values.items():
            stream.metrics.add(metric, v, groups)
        self._add_features(stream, rec, keys)
        columns = self.columns()
        rows.extend([item, name, *(f"{values[c][i]:.6f}" for c in columns)] for i, item in enumerate(names))
        return values["psnr"]

    def score_chunk(
        self, chunk: dict, acc: Accumulator, with_reference: bool, position: int
    ) -> list[list[str]]:
        """A loader chunk in model batches of ``batch_size``; ``position``: its first item's index in its shard."""
        rows: list[list[str]] = []
        acc.skipped.update(chunk["skipped"])
        if chunk["pixels"] is None:
            return rows
        size = self.config.batch_size
        for start in range(0, len(chunk["names"]), size):
            part = {
                "shard": chunk["shard"],
                "names": chunk["names"][start : start + size],
                "scales": chunk["scales"][start : start + size],
                "pixels": chunk["pixels"][start : start + size],
            }
            rows += self.score(part, acc, with_reference, position + start)
        return rows


class Progress:
    """Counts, rate and ETA: a tqdm bar on a terminal, else one log line every ``interval_s`` seconds."""

    def __init__(self, total_entries: int, done_entries: int, interval_s: float = 30.0) -> None:
        self.total, self.done, self.items = total_entries, done_entries, 0
        self.start = self.last_log = time.perf_counter()
        self.start_done = done_entries
        self.interval_s = interval_s
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_entries, initial=done_entries, unit="file", desc="eval")

    def update(self, entries: int, items: int) -> None:
        self.done += entries
        self.items += items
        elapsed = time.perf_counter() - self.start
        if self.bar is not None:
            self.bar.update(entries)
            self.bar.set_postfix(items=self.items, items_per_s=f"{self.items / max(elapsed, 1e-9):.2f}")
        elif time.perf_counter() - self.last_log >= self.interval_s or self.done == self.total:
            self.last_log = time.perf_counter()
            log.info(self.line(elapsed))

    def line(self, elapsed: float) -> str:
        rate = (self.done - self.start_done) / max(elapsed, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if np.isfinite(eta) else "?"
        return (
            f"eval: {self.done}/{self.total} files, {self.items} items, "
            f"{self.items / max(elapsed, 1e-9):.2f} items/s, ETA {eta_text}"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Checkpoint:
    """``out/checkpoint.npz`` (statistics of the done shards, their ids, items.csv's size then) and
    ``out/items.csv``; rows of a shard are appended when it is done, then the checkpoint is replaced
    atomically, so a kill at any point leaves a consistent pair (items.csv is cut back to the size)."""

    def __init__(self, out: Path, run_key: str, columns: list[str]) -> None:
        self.path, self.csv_path, self.run_key = out / CHECKPOINT, out / "items.csv", run_key
        self.columns = columns

    def load(self, config: EvalConfig, device) -> tuple[Accumulator, set[int]] | None:
        """The saved state of this same run (same data, protocol and models), or None."""
        if not self.path.is_file():
            return None
        with np.load(self.path) as saved:
            state = dict(saved)
        if str(state["run_key"]) != self.run_key or not self.csv_path.is_file():
            return None
        with open(self.csv_path, "r+b") as handle:
            handle.truncate(int(state["csv_bytes"]))
        return Accumulator.from_state(state, config, device), set(json.loads(str(state["done"])))

    def start(self) -> None:
        self.path.unlink(missing_ok=True)
        with open(self.csv_path, "w", newline="") as handle:
            csv.writer(handle).writerow(["item", "model", *self.columns])

    def save(self, acc: Accumulator, done: set[int], rows: list[list[str]]) -> None:
        with open(self.csv_path, "a", newline="") as handle:
            csv.writer(handle).writerows(rows)
        state = acc.state()
        state.update(
            run_key=np.array(self.run_key),
            done=np.array(json.dumps(sorted(done))),
            csv_bytes=np.array(self.csv_path.stat().st_size),
        )
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as handle:
            np.savez(handle, **state)
        os.replace(tmp, self.path)


def evaluate(
    config: EvalConfig,
    shards: list[sources.Shard],
    out: Path,
    run_key: str,
    reference: stats.StreamStats | None,
    resume: bool = False,
    workers: int = 2,
    ray_actors: int | None = None,
    entries_per_chunk: int = 1,
) -> tuple[Accumulator, list[str]]:
    """Score every shard not yet done; -> (statistics of all shards, items.csv columns).

    ``reference``: cached reference statistics (then the originals' Inception pass is skipped).
    ``ray_actors``: score shards with that many Ray actors instead of in this process.
    """
    scorer = Scorer(config) if ray_actors is None else None
    columns = scorer.columns() if scorer else _columns(config)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = Checkpoint(out, run_key, columns)
    device = torch.device(config.device) if scorer else torch.device("cpu")
    loaded = checkpoint.load(config, device) if resume else None
    if loaded is None:
        checkpoint.start()
        totals, done = Accumulator(config, device), set()
    else:
        totals, done = loaded
        log.info("eval: resuming with %d of %d shards done", len(done), len(shards))
    pending = [shard for shard in shards if shard.index not in done]
    progress = Progress(
        sum(len(s.entries) for s in shards), sum(len(s.entries) for s in shards if s.index in done)
    )
    with_reference = reference is None
    if ray_actors is None:
        _run_local(
            scorer, pending, totals, done, checkpoint, progress, with_reference, workers, entries_per_chunk
        )
    else:
        _run_ray(
            config, pending, totals, done, checkpoint, progress, with_reference, ray_actors, entries_per_chunk
        )
    progress.close()
    if reference is not None:
        totals.streams[REFERENCE] = reference
    return totals, columns


def _columns(config: EvalConfig) -> list[str]:
    names = ["psnr", "ssim"] + ["lpips"] * image_metrics.Lpips.load().available
    return sorted(names + ["temporal_diff_psnr"] * (config.spec.kind == "video"))


def _run_local(
    scorer, pending, totals, done, checkpoint, progress, with_reference, workers, per_chunk
) -> None:
    stream = sources.ItemStream(pending, scorer.config.spec, per_chunk)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None)
    rows: list[list[str]] = []
    position = 0  # items of the current shard so far (chunks arrive in order)
    for chunk in loader:
        rows += scorer.score_chunk(chunk, totals, with_reference, position)
        position += len(chunk["names"])
        progress.update(chunk["entries"], len(chunk["names"]))
        if chunk["last"]:
            done.add(chunk["shard"])
            checkpoint.save(totals, done, rows)
            rows, position = [], 0


class ShardWorker:
    """A Ray actor: one Scorer, whole shards in, their statistics and items.csv rows out."""

    def __init__(self, config: EvalConfig, torch_threads: int) -> None:
        logging.basicConfig(level=logging.WARNING)
        # the driver's thread count, not Ray's one per CPU: float results of the model and the
        # metrics depend on it, and a sharded run must equal the single-process one
        torch.set_num_threads(torch_threads)
        self.scorer = Scorer(config)

    def score_shard(self, shard: sources.Shard, with_reference: bool, per_chunk: int):
        acc = self.scorer.new_accumulator()
        rows: list[list[str]] = []
        position = 0
        for chunk in sources.ItemStream([shard], self.scorer.config.spec, per_chunk):
            rows += self.scorer.score_chunk(chunk, acc, with_reference, position)
            position += len(chunk["names"])
        return shard.index, acc.state(), rows, len(shard.entries), position


def _run_ray(config, pending, totals, done, checkpoint, progress, with_reference, actors, per_chunk) -> None:
    """Shards to Ray actors (one in flight per actor); the driver sums their statistics as they finish."""
    import ray

    from tokenizers_svc.ray_cluster import init_ray

    address = os.environ.get("RAY_ADDRESS")
    started_here = not ray.is_initialized()
    if started_here:
        init_ray(address=address, **({} if address else {"num_cpus": actors}), log_to_driver=False)
    gpus = 1 if torch.device(config.device).type == "cuda" else 0
    worker_class = ray.remote(num_cpus=1, num_gpus=gpus)(ShardWorker)
    threads = torch.get_num_threads()
    workers = [worker_class.remote(config, threads) for _ in range(min(actors, max(len(pending), 1)))]
    queue = list(pending)
    in_flight = {}
    for worker in workers:
        if queue:
            in_flight[worker.score_shard.remote(queue.pop(0), with_reference, per_chunk)] = worker
    while in_flight:
        (ready,), _ = ray.wait(list(in_flight), num_returns=1)
        worker = in_flight.pop(ready)
        index, state, rows, entries, items = ray.get(ready)
        totals.merge(Accumulator.from_state(state, config, totals.device))
        done.add(index)
        checkpoint.save(totals, done, rows)
        progress.update(entries, items)
        if queue:
            in_flight[worker.score_shard.remote(queue.pop(0), with_reference, per_chunk)] = worker
    for worker in workers:
        ray.kill(worker)
    if started_here:
        ray.shutdown()
