"""The job's stages: what Ray Data runs on a block of rows, and the shard writer the driver runs.

1. :func:`prepare_row` (decoding): read the input's bytes once, hash and sniff them once, decode,
   apply the plan's ``--resize`` (``pipeline.load_media``), cut video clips; rows carry uint8 pixels.
   It runs inside the encoder actors when
   they decode their own inputs (CPUs only), or in Ray Data tasks ahead of them
   (:func:`prepare_batch`, GPUs), which hand the pixels on as one Arrow buffer.
2. :class:`EncodeWorker` (an actor pool, one model each): apply the plan's crop, encode
   rows of the same resulting shape in one call (``pipeline.run_in_groups``: a failing group is retried item
   by item, as in the server, and whatever the model raises on an item becomes that item's error
   row), fill the latent file.
3. :func:`write_shard` (the driver): rows -> one Parquet shard, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from serving.batch.output import TMP_SUFFIX, owner
from serving.batch.plan import JobPlan, clip_ranges, error_text, path_text, row_id
from tokenizers_svc import media
from tokenizers_svc.api import Tokenizer
from tokenizers_svc.datasets import ROW_SCHEMA, SHARD_PREFIX, SHARD_SUFFIX
from tokenizers_svc.errors import ConfigError, InvalidMediaError, InvalidRequestError, TokenizerError
from tokenizers_svc.loading import load_tokenizer
from tokenizers_svc.memory import allocate_images_whole, tune_for_model_calls
from tokenizers_svc.pipeline import encode_stacked, load_media, run_in_groups
from tokenizers_svc.pixels import (
    cover_size,
    nearest_bucket,
    resize_crop,
    to_float_pixels,
)
from tokenizers_svc.spec import ID_DTYPE
from tokenizers_svc.tokens import TokenIds
from tokenizers_svc.wire import PIXEL_DTYPES, dtype_name

# Between decode tasks and the encoder actors: pixels as raw C-order bytes (the wire format of
# tokenizers_svc.wire), shape (1, 3, H, W) or (1, 3, T, H, W), uint8 [0, 255] after the resize (float
# [-1, 1] is accepted too, for pixels made elsewhere). Null on error rows.
PREPARED_SCHEMA = pa.schema(
    [
        *ROW_SCHEMA,
        ("pixels", pa.large_binary()),
        ("pixel_shape", pa.list_(pa.int64())),
        ("pixel_dtype", pa.string()),
    ]
)

# ---------------------------------------------------------------------------------------------- CPU stage


def prepare_row(item: dict, *, plan: JobPlan) -> list[dict]:
    """``{path, done_ids}`` -> rows to encode (``pixels``: a uint8 tensor) and error rows
    (``pixels`` None), with PREPARED_SCHEMA's other columns. Clips whose id is in ``done_ids`` are
    already written by an earlier run and are left out."""
    done = set(item["done_ids"])
    path = os.fsdecode(item["path"])  # bytes from the driver (any file name), or text
    return [row for row in prepare_input(path, plan, plan.key()) if row["id"] not in done]


def prepare_batch(items: pa.Table, *, plan: JobPlan) -> pa.Table:
    """Decode stage (Ray Data tasks, when decoding runs apart from the encoders): ``{path,
    done_ids}`` rows -> PREPARED_SCHEMA rows, one per image or clip or failed input."""
    allocate_images_whole()  # once per task process: large photos reach torch without numpy's copies
    return prepared_table([row for item in items.to_pylist() for row in prepare_row(item, plan=plan)])


def prepared_table(rows: list[dict]) -> pa.Table:
    """Rows with tensor pixels -> PREPARED_SCHEMA: each item's pixels copied once, into the Arrow
    column's buffer."""
    pixels = [row["pixels"] for row in rows]
    table = pa.Table.from_pylist(
        [
            {
                **row,
                "pixels": None,
                "pixel_shape": None if p is None else list(p.shape),
                "pixel_dtype": None if p is None else dtype_name(p.dtype),
            }
            for row, p in zip(rows, pixels, strict=True)
        ],
        schema=PREPARED_SCHEMA,
    )
    column = pa.array(
        [None if p is None else memoryview(p.contiguous().numpy()).cast("B") for p in pixels],
        type=pa.large_binary(),
    )
    return table.set_column(table.schema.get_field_index("pixels"), "pixels", column)


def _pixel_views(table: pa.Table) -> list[torch.Tensor | None]:
    """PREPARED_SCHEMA's pixels as tensors over the Arrow buffer, without a copy (read only: the
    encoder makes float pixels of them before anything is written)."""
    views: list[torch.Tensor | None] = []
    shapes = table.column("pixel_shape").to_pylist()
    dtypes = table.column("pixel_dtype").to_pylist()
    for chunk in table.column("pixels").chunks:
        _, offsets, data = chunk.buffers()
        starts = np.frombuffer(offsets, dtype=np.int64)[chunk.offset : chunk.offset + len(chunk) + 1]
        for i in range(len(chunk)):
            shape, dtype = shapes[len(views)], dtypes[len(views)]
            if not chunk[i].is_valid:
                views.append(None)
                continue
            torch_dtype = PIXEL_DTYPES[dtype]
            count = int(starts[i + 1] - starts[i]) // torch_dtype.itemsize
            flat = torch.frombuffer(data, dtype=torch_dtype, count=count, offset=int(starts[i]))
            views.append(flat.reshape(shape))
    return views


def _row(plan: JobPlan, key: dict, path: str, clip: tuple[int, int] | None = None, **fields) -> dict:
    row = dict.fromkeys(PREPARED_SCHEMA.names)
    row.update(
        id=row_id(key, path, clip),
        source_path=path_text(path),
        source_path_bytes=os.fsencode(path),
        clip_count=1,
        model=plan.model_name,
        weights_hash=plan.weights_hash,
    )
    row.update(fields)
    return row


def prepare_input(path: str, plan: JobPlan, key: dict) -> list[dict]:
    """One input path -> its rows: one per image, one per video clip, or one error row; ``pixels``
    holds the uint8 (1, 3, H, W) or (1, 3, t, H, W) after the plan's resize, None on an error row."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        error = InvalidMediaError(f"cannot read {path_text(Path(path).name)}: {reason}")
        return [_row(plan, key, path, error=error_text(error))]
    sha = hashlib.sha256(data).hexdigest()
    kind = None
    try:
        kind = media.sniff_media(data)
        if kind == "video" and plan.modality == "image":
            raise InvalidRequestError(
                f"{plan.model_name} encodes images only; expected an image, got a video (use a video model)",
                param="model",
            )
        loaded = load_media(data, plan.limits, plan.options, kind=kind, sha256=sha)
    except TokenizerError as exc:
        return [_row(plan, key, path, sha256=sha, kind=kind, error=error_text(exc))]
    except Exception as exc:  # a decoder's unforeseen failure: this input's error row, the job goes on
        error = InvalidMediaError(f"cannot decode {path_text(Path(path).name)}: {type(exc).__name__}: {exc}")
        return [_row(plan, key, path, sha256=sha, kind=kind, error=error_text(error))]
    height, width = loaded.original_size
    common = {"sha256": sha, "kind": loaded.kind, "original_height": height, "original_width": width}
    if loaded.kind == "image":
        return [_row(plan, key, path, **common, pixels=loaded.pixels)]
    ranges = clip_ranges(loaded.num_frames, plan.clip_frames)
    rows = []
    for index, (s, e) in enumerate(ranges):
        row = _row(
            plan,
            key,
            path,
            (s, e),
            **common,
            clip_index=index,
            clip_count=len(ranges),
            clip_start_frame=s,
            clip_end_frame=e,
            clip_start=s / loaded.fps,
            clip_end=e / loaded.fps,
            fps=loaded.fps,
            original_frames=loaded.num_frames,
        )
        rows.append({**row, "pixels": loaded.pixels[:, :, s:e]})  # (1, 3, t, H, W) uint8
    return rows


# ---------------------------------------------------------------------------------------------- encoder


def _ray_node_id() -> str | None:
    """The Ray node this process runs on (rows record where they were encoded); None outside Ray."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


class EncodeWorker:
    """Encoder stage (Ray Data actor pool): loads the model once, encodes each group of rows of the
    same resized shape in one call, and returns rows in ROW_SCHEMA (pixels dropped, latents filled).
    With ``decode`` it takes ``{path, done_ids}`` rows and decodes them itself (:func:`prepare_row`),
    else PREPARED_SCHEMA rows from the decode tasks."""

    def __init__(
        self, plan: JobPlan, num_threads: int, decode: bool = False, tokenizer: Tokenizer | None = None
    ) -> None:
        """``tokenizer``: one the caller loaded for ``plan`` (the driver's, for its head start); the
        process's torch threads are then the caller's to set."""
        if tokenizer is None:  # an encoder actor: the process is the stage's
            torch.set_num_threads(max(1, num_threads))
            tune_for_model_calls()  # freed activations stay for the next call; images decode whole
            tokenizer = load_tokenizer(plan.model, device=plan.device, dtype=getattr(torch, plan.dtype))
        self.tokenizer = tokenizer
        if self.tokenizer.weights_hash != plan.weights_hash:
            raise ConfigError(
                f"worker loaded {plan.model} with weights {self.tokenizer.weights_hash[:12]}, the driver "
                f"planned {plan.weights_hash[:12]}; the model changed during the job",
                param="model",
            )
        self.plan = plan
        self.decode = decode
        self.node_id = _ray_node_id()
        # The resize happens here, per row, so that rows of any source size batch by resized size.
        self.options = replace(plan.options, resize="none", resolution=None)

    def __call__(self, table: pa.Table) -> pa.Table:
        if self.decode:
            rows = [row for item in table.to_pylist() for row in prepare_row(item, plan=self.plan)]
        else:
            views = _pixel_views(table)
            rows = table.drop_columns(["pixels"]).to_pylist()
            for row, pixels in zip(rows, views, strict=True):
                row["pixels"] = pixels
        for row in rows:
            row["encoder_node"] = self.node_id
        pending = [i for i, row in enumerate(rows) if row["error"] is None]
        if self.plan.crop != "none":
            for i in pending:
                rows[i].update(self._crop_window(rows[i]))
        results = run_in_groups(
            pending, lambda i: self._group_key(rows[i], i), lambda group: self._encode(rows, group)
        )
        for i, (result, _) in zip(pending, results, strict=True):
            rows[i] = (
                {**rows[i], "error": error_text(result)} if isinstance(result, TokenizerError) else result
            )
        return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)  # pixels left behind

    def _crop_window(self, row: dict) -> dict:
        """The row's bucket (its crop size) and where the crop sits in the item resized to cover it
        (SDXL's crop coordinates): the center, or a window drawn from the row id, so a rerun agrees."""
        *_, height, width = row["pixels"].shape
        size = nearest_bucket(height, width, self.plan.crop_sizes)
        cover = cover_size(height, width, size)
        draw = random.Random(row["id"])
        fy, fx = (0.5, 0.5) if self.plan.crop == "center" else (draw.random(), draw.random())
        return {
            "bucket_height": size[0],
            "bucket_width": size[1],
            "crop_top": round((cover[0] - size[0]) * fy),
            "crop_left": round((cover[1] - size[1]) * fx),
        }

    def _group_key(self, row: dict, index: int) -> tuple:
        """Rows that stack: the same shape after the plan's resize (made as they were decoded,
        ``load_media``) or crop. Sampling is seeded per item, so sampled items go one by one."""
        *lead, height, width = row["pixels"].shape
        if self.plan.crop != "none":
            height, width = row["bucket_height"], row["bucket_width"]
        return (*lead, height, width, index) if self.options.sample else (*lead, height, width)

    def _model_input(self, row: dict) -> torch.Tensor:
        """(1, 3, [T,] H', W') after the plan's crop, in the row's dtype (uint8 [0, 255] as decoded,
        or float [-1, 1]); validated and converted by the Tokenizer."""
        pixels = row["pixels"]
        if self.plan.crop == "none":
            return pixels
        size = (row["bucket_height"], row["bucket_width"])
        cover = cover_size(*pixels.shape[-2:], size)
        return resize_crop(pixels, cover, size, row["crop_top"], row["crop_left"])

    def _encode(self, rows: list[dict], group: list[int]) -> list[dict]:
        inputs = [self._model_input(rows[i]) for i in group]
        if len({x.dtype for x in inputs}) > 1:  # decoded uint8 beside float pixels: stacked as float
            inputs = [to_float_pixels(x) if x.dtype == torch.uint8 else x for x in inputs]
        stacked = torch.cat(inputs)  # (B, 3, [T,] H', W')
        resized = (int(stacked.shape[-2]), int(stacked.shape[-1]))
        results = []
        for i, latents in zip(group, encode_stacked(self.tokenizer, stacked, self.options), strict=True):
            row = rows[i]
            source_hw = (row["original_height"], row["original_width"])
            extra = {}
            if row["clip_index"] is not None:
                extra = {"clip_start": repr(row["clip_start"]), "clip_end": repr(row["clip_end"])}
            item = replace(
                latents,
                fps=row["fps"],
                source_sha256=row["sha256"],
                resized_from=source_hw if source_hw != resized else None,
                extra=extra,
            )
            if isinstance(item, TokenIds):  # the token file, and the ids as an int32 column
                columns = {
                    "ids": item.ids.flatten().tolist(),
                    "shape": list(item.ids.shape),
                    "dtype": ID_DTYPE,
                }
            else:
                columns = {
                    "shape": list(item.latents.shape),
                    "dtype": str(item.latents.dtype).removeprefix("torch."),
                    "normalized": item.normalized,
                    "normalization": json.dumps(item.normalization.to_dict()),
                }
            results.append({**row, "latents": item.to_bytes(), **columns})
        return results


# ---------------------------------------------------------------------------------------------- shards


def write_shard(table: pa.Table, *, output: str | Path, run_id: str) -> dict:
    """Rows -> one Parquet shard, written under a temporary name and renamed, so that a shard is
    either complete or absent. A writer whose run no longer owns the directory (a later run of the
    same command took it over) finds another run id in RUN_FILE and discards its shard: the current
    run encodes those inputs itself. Returns ``{shard, ok, errors, bytes}`` (shard "" when discarded)."""
    rows = table.select(ROW_SCHEMA.names).cast(ROW_SCHEMA)
    directory = Path(output)
    shard = f"{SHARD_PREFIX}{uuid.uuid4().hex}{SHARD_SUFFIX}"
    tmp = directory / f".{shard}{TMP_SUFFIX}"
    pq.write_table(rows, tmp)
    if owner(directory) != run_id:
        tmp.unlink(missing_ok=True)
        return {"shard": "", "ok": 0, "errors": 0, "bytes": 0}
    os.replace(tmp, directory / shard)
    errors = rows.num_rows - rows.column("error").null_count
    return {
        "shard": shard,
        "ok": rows.num_rows - errors,
        "errors": errors,
        "bytes": (directory / shard).stat().st_size,
    }
