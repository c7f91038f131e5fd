"""Sufficient statistics of a streaming evaluation: they are added batch by batch, merged across shards,
processes and Ray actors by exact sums, saved for resume, and turned into the report's metrics at the end.

Memory does not grow with N: FID keeps float64 (count, sum, sum of outer products) per feature network
(2048x2048 float64 = 32 MB per stream), KID a fixed-size uniform subsample of float32 features (the
``capacity`` items with the smallest hash of their name, so every stream, shard and actor picks the same
items), and per-item metrics (count, sum, sum of squares) per group (all items, and each crop scale).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from evals import fid

KID_CAPACITY = 10_000  # float32 Inception features kept per stream for KID: 80 MB


def name_keys(names: list[str]) -> np.ndarray:
    """Item names -> uint64 keys (first 8 bytes of BLAKE2b): the KID subsample's order, independent of
    sharding and worker counts."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(n.encode(), digest_size=8).digest(), "little") for n in names],
        dtype=np.uint64,
    )


class Moments:
    """Running float64 count, sum and sum of outer products of feature vectors (FID's Gaussian)."""

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.n = 0
        self.total = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def add(self, feats: torch.Tensor) -> None:
        """feats: (B, D) on any device."""
        f = feats.to(self.total.device, torch.float64)
        self.n += f.shape[0]
        self.total += f.sum(0)
        self.outer.addmm_(f.T, f)

    def merge(self, other: Moments) -> None:
        self.n += other.n
        self.total += other.total.to(self.total.device)
        self.outer += other.outer.to(self.outer.device)

    def feature_stats(self) -> fid.FeatureStats:
        """Mean and unbiased covariance (ddof=1, as ``np.cov``) from the sums."""
        n = self.n
        mu = (self.total / n).cpu().numpy()
        sigma = (self.outer.cpu().numpy() - n * np.outer(mu, mu)) / (n - 1)
        return fid.FeatureStats(mu=mu, sigma=(sigma + sigma.T) / 2, n=n)

    def state(self, prefix: str) -> dict[str, np.ndarray]:
        return {
            f"{prefix}.n": np.array(self.n),
            f"{prefix}.total": self.total.cpu().numpy(),
            f"{prefix}.outer": self.outer.cpu().numpy(),
        }

    @classmethod
    def from_state(cls, state: dict, prefix: str, device: torch.device | str = "cpu") -> Moments:
        total = state[f"{prefix}.total"]
        moments = cls(total.shape[0], device)
        moments.n = int(state[f"{prefix}.n"])
        moments.total += torch.tensor(total, device=device)  # copies: Ray hands out read-only arrays
        moments.outer += torch.tensor(state[f"{prefix}.outer"], device=device)
        return moments


class KidSample:
    """The ``capacity`` items with the smallest name keys, with their float32 features (KID's input).
    Batches are appended and pruned only past twice the capacity, so adding stays O(batch) amortized."""

    def __init__(self, capacity: int = KID_CAPACITY) -> None:
        self.capacity = capacity
        self._keys: list[np.ndarray] = []
        self._feats: list[np.ndarray] = []  # (b, D) float32 each
        self._count = 0

    def add(self, keys: np.ndarray, feats: np.ndarray) -> None:
        self._keys.append(np.asarray(keys, dtype=np.uint64))
        self._feats.append(np.asarray(feats, dtype=np.float32))
        self._count += len(keys)
        if self._count > 2 * self.capacity:
            self._prune()

    def _prune(self) -> None:
        keys, feats = self.arrays()
        keep = np.argsort(keys, kind="stable")[: self.capacity]  # key order
        self._keys, self._feats, self._count = [keys[keep]], [feats[keep]], len(keep)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys (k,), features (k, D)) as held, at most twice the capacity."""
        if not self._keys:
            return np.zeros(0, dtype=np.uint64), np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(self._keys), np.concatenate(self._feats)

    def merge(self, other: KidSample) -> None:
        if other._count:
            self.add(*other.arrays())

    def sorted_features(self) -> np.ndarray:
        """(k, D) features of the ``capacity`` smallest keys in key order: the same whatever the sharding."""
        self._prune()
        return self._feats[0]


class MetricSums:
    """Per-item metrics summarized per group as [count, sum, sum of squares] in float64."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}  # "metric|group" -> (3,)

    def add(self, metric: str, values: np.ndarray, groups: list[str]) -> None:
        values = np.asarray(values, dtype=np.float64)
        for group in {*groups, "all"}:
            v = values if group == "all" else values[np.asarray(groups) == group]
            acc = self.sums.setdefault(f"{metric}|{group}", np.zeros(3))
            acc += (len(v), v.sum(), (v * v).sum())

    def merge(self, other: MetricSums) -> None:
        for key, value in other.sums.items():
            self.sums.setdefault(key, np.zeros(3))
            self.sums[key] += value

    def groups(self, metric: str) -> list[str]:
        return sorted(key.split("|", 1)[1] for key in self.sums if key.split("|", 1)[0] == metric)

    def mean_ci(self, metric: str, group: str = "all") -> tuple[int, float, float]:
        """(count, mean, half width of the 95% CI of the mean): :func:`evals.multiscale.mean_ci` from sums."""
        n, total, squares = self.sums[f"{metric}|{group}"]
        mean = total / n
        if n < 2:
            return int(n), float(mean), float("nan")
        variance = max(squares - n * mean * mean, 0.0) / (n - 1)
        return int(n), float(mean), float(1.96 * np.sqrt(variance / n))


class StreamStats:
    """Everything one stream (the reference, a model, a baseline) accumulates."""

    def __init__(self, dim: int, device, kid_capacity: int) -> None:
        self.inception = Moments(dim, device)
        self.kid = KidSample(kid_capacity)
        self.i3d: Moments | None = None  # created with the I3D's feature size on first use (--i3d)
        self.metrics = MetricSums()

    def merge(self, other: StreamStats) -> None:
        self.inception.merge(other.inception)
        self.kid.merge(other.kid)
        if self.i3d is None:
            self.i3d = other.i3d
        elif other.i3d is not None:
            self.i3d.merge(other.i3d)
        self.metrics.merge(other.metrics)

    def state(self, prefix: str) -> dict[str, np.ndarray]:
        out = self.inception.state(f"{prefix}.inception")
        if self.i3d is not None:
            out.update(self.i3d.state(f"{prefix}.i3d"))
        out[f"{prefix}.kid_keys"], out[f"{prefix}.kid_feats"] = self.kid.arrays()
        out[f"{prefix}.metrics"] = np.array(json.dumps({k: v.tolist() for k, v in self.metrics.sums.items()}))
        return out

    @classmethod
    def from_state(cls, state: dict, prefix: str, device, kid_capacity: int) -> StreamStats:
        stream = cls.__new__(cls)
        stream.inception = Moments.from_state(state, f"{prefix}.inception", device)
        stream.i3d = (
            Moments.from_state(state, f"{prefix}.i3d", device) if f"{prefix}.i3d.n" in state else None
        )
        stream.kid = KidSample(kid_capacity)
        if state[f"{prefix}.kid_feats"].size:
            stream.kid.add(state[f"{prefix}.kid_keys"], state[f"{prefix}.kid_feats"])
        stream.metrics = MetricSums()
        stream.metrics.sums = {k: np.array(v) for k, v in json.loads(str(state[f"{prefix}.metrics"])).items()}
        return stream
