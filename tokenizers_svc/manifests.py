"""Parquet manifests: a table with a ``path`` column naming the inputs of a run.

The batch job (``--input x.parquet``) and the evaluation (``--data x.parquet``) read them the same
way: the ``path_bytes`` column when present (the file system's exact bytes, for names that are not
UTF-8), else ``path``; relative paths are relative to the manifest's folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers_svc.errors import ConfigError


def read_manifest(path: Path, param: str) -> list[tuple[str, str]]:
    """One ``(listed, absolute)`` pair per row, in row order: the path as the row gives it (decoded
    with ``os.fsdecode``) and the absolute path it names; an empty row is ``("", "")``. A manifest
    that is missing or has no ``path`` column is a ConfigError naming ``param``."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise ConfigError(f"no Parquet manifest at {path}", param=param)
    table = pq.read_table(path)
    if "path" not in table.column_names:
        raise ConfigError(
            f"manifest {path.name} needs a 'path' column, got columns {table.column_names}", param=param
        )
    base = path.resolve().parent
    column = "path_bytes" if "path_bytes" in table.column_names else "path"
    rows = []
    for name in table.column(column).to_pylist():
        listed = os.fsdecode(name) if name else ""
        rows.append((listed, os.path.abspath(base / listed) if listed else ""))
    return rows
