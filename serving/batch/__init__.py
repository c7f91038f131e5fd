"""Batch tokenization of a dataset with Ray Data: every input accounted for, resumable.

The offline way of running tokenizers on Ray (the HTTP app is the online one), in its own modules:
:mod:`~serving.batch.plan` (inputs, model and options, validated on the driver),
:mod:`~serving.batch.sizing` (how many actors, threads, decode tasks, rows per call),
:mod:`~serving.batch.stages` (decode -> encode on an actor pool -> write shards),
:mod:`~serving.batch.output` (atomic shards, run ownership, progress) and
:mod:`~serving.batch.driver` (``main``/``run``: the pipeline and the manifest).

Every input ends as exactly one row (one per clip for videos): a success row holding a complete
latent file (``Latents.to_bytes``: safetensors bytes with the crop/normalization metadata), or an
error row with ``type: message``. Row ids are stable (path + clip + job options), so a rerun of
the same command reads the ids already written and encodes only what is missing: a killed job
resumes without gaps or duplicates. docs/batch.md has the row schema.
"""

from serving.batch.driver import build_parser, main, run, summary_line
from serving.batch.output import JOB_FILE, RUN_FILE, read_progress, shard_paths
from serving.batch.plan import JobPlan, list_inputs, make_plan
from serving.batch.stages import (
    PREPARED_SCHEMA,
    EncodeWorker,
    prepare_input,
    prepare_row,
    prepared_table,
    write_shard,
)
from tokenizers_svc.datasets import ROW_SCHEMA

__all__ = [
    "JOB_FILE",
    "PREPARED_SCHEMA",
    "ROW_SCHEMA",
    "RUN_FILE",
    "EncodeWorker",
    "JobPlan",
    "build_parser",
    "list_inputs",
    "main",
    "make_plan",
    "prepare_input",
    "prepare_row",
    "prepared_table",
    "read_progress",
    "run",
    "shard_paths",
    "summary_line",
    "write_shard",
]
