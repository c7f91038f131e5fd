"""The job's output directory: shards written atomically, the run that owns it, and what it holds.

A shard is written under a temporary name and renamed, so it is complete or absent; ``run.id`` names
the run that owns the directory (writers of a killed run discard their shards); the ids already
written are what a rerun skips.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from tokenizers_svc.datasets import SHARD_GLOB

TMP_SUFFIX = ".tmp"
JOB_FILE = "job.json"
INPUTS_FILE = "inputs.parquet"  # the listing of the last run; usable as an --input manifest
RUN_FILE = "run.id"  # the run that owns the output directory; other runs' writers discard their shards


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}{TMP_SUFFIX}")
    tmp.write_text(text)
    os.replace(tmp, path)


def owner(output: Path) -> str | None:
    """The run id that owns ``output``, if any run claimed it."""
    try:
        return (output / RUN_FILE).read_text()
    except FileNotFoundError:
        return None


def shard_paths(output: str | Path) -> list[Path]:
    return sorted(Path(output).glob(SHARD_GLOB))


@dataclass
class WrittenRows:
    """What the shards in an output directory hold, per input path."""

    ids: dict[str, list[str]]  # input path (file system bytes decoded as os.fsdecode) -> ids written
    expected: dict[str, int]  # input path -> rows it produces (clip_count)
    rows: int
    errors: int
    duplicates: int  # ids written more than once (0 unless two jobs shared the directory)

    def complete(self, path: str) -> bool:
        return path in self.expected and len(set(self.ids[path])) >= self.expected[path]


def read_progress(output: Path) -> WrittenRows:
    ids: dict[str, list[str]] = {}
    expected: dict[str, int] = {}
    rows = errors = 0
    for path in shard_paths(output):
        table = pq.read_table(path, columns=["id", "source_path_bytes", "clip_count", "error"])
        rows += table.num_rows
        errors += table.num_rows - table.column("error").null_count
        for id_, source, count in zip(
            table.column("id").to_pylist(),
            [os.fsdecode(name) for name in table.column("source_path_bytes").to_pylist()],
            table.column("clip_count").to_pylist(),
            strict=True,
        ):
            ids.setdefault(source, []).append(id_)
            expected[source] = count
    unique = sum(len(set(v)) for v in ids.values())
    return WrittenRows(ids, expected, rows, errors, rows - unique)
