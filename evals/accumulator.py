"""Sufficient statistics of a set of evaluated shards: per stream (a model, a baseline, the reference)
FID/KID/metric sums, per-model timings, token counts of discrete models, the first sample items;
mergeable (Ray actors' shards sum on the driver) and saved as arrays (the checkpoint).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from evals import fid, sources, stats

REFERENCE = "reference"  # the stream of the original items


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
