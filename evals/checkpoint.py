"""The evaluation's resume point: statistics of the done shards and items.csv, always a consistent pair."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from evals.accumulator import Accumulator, EvalConfig

CHECKPOINT = "checkpoint.npz"


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
