"""The job's three stages, each a function or class Ray Data runs on a block of rows.

1. :func:`prepare_row` (CPU tasks): read the input's bytes once, hash and sniff them once, decode,
   cut video clips; rows carry uint8 pixels as decoded.
2. :class:`EncodeWorker` (an actor pool, one model each): apply the plan's resize or crop, encode
   rows of the same resulting shape in one call (``pipeline.run_in_groups``: a failing group is retried item
   by item, as in the server, and whatever the model raises on an item becomes that item's error
   row), fill the latent file.
3. :func:`write_shard` (CPU tasks): one Parquet shard per block, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import uuid
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from serving.batch.output import TMP_SUFFIX, owner
from serving.batch.plan import JobPlan, clip_ranges, error_text, path_text, row_id
from tokenizers_svc import media
from tokenizers_svc.datasets import ROW_SCHEMA, SHARD_PREFIX, SHARD_SUFFIX
from tokenizers_svc.errors import ConfigError, InvalidMediaError, InvalidRequestError, TokenizerError
from tokenizers_svc.loading import load_tokenizer
from tokenizers_svc.pipeline import encode_stacked, load_media, run_in_groups
from tokenizers_svc.pixels import (
    cover_size,
    nearest_bucket,
    policy_size,
    resize_crop,
    resize_pixels,
    to_float_pixels,
)
from tokenizers_svc.wire import dtype_name, tensor_from_bytes, tensor_to_bytes

# Between the CPU and the encoder stage: pixels in the wire format (tokenizers_svc.wire), shape
# (1, 3, H, W) or (1, 3, T, H, W), uint8 [0, 255] as decoded (float [-1, 1] is accepted too, for
# pixels made elsewhere). Null on error rows.
PREPARED_SCHEMA = pa.schema(
    [
        *ROW_SCHEMA,
        ("pixels", pa.large_binary()),
        ("pixel_shape", pa.list_(pa.int64())),
        ("pixel_dtype", pa.string()),
    ]
)
SUMMARY_SCHEMA = pa.schema(
    [("shard", pa.string()), ("ok", pa.int64()), ("errors", pa.int64()), ("bytes", pa.int64())]
)


# ---------------------------------------------------------------------------------------------- CPU stage


def prepare_row(item: dict, *, plan: JobPlan) -> list[dict]:
    """CPU stage (Ray Data tasks, ``flat_map``): ``{path, done_ids}`` -> rows to encode (pixels
    set) and error rows, with PREPARED_SCHEMA's columns. Clips whose id is in ``done_ids`` are
    already written by an earlier run and are left out."""
    done = set(item["done_ids"])
    path = os.fsdecode(item["path"])  # bytes from the driver (any file name), or text
    return [row for row in prepare_input(path, plan, plan.key()) if row["id"] not in done]


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


def _with_pixels(row: dict, pixels: torch.Tensor) -> dict:
    return {
        **row,
        "pixels": tensor_to_bytes(pixels),
        "pixel_shape": list(pixels.shape),
        "pixel_dtype": dtype_name(pixels.dtype),
    }


def prepare_input(path: str, plan: JobPlan, key: dict) -> list[dict]:
    """One input path -> its rows: one per image, one per video clip, or one error row."""
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
        return [_with_pixels(_row(plan, key, path, **common), loaded.pixels)]
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
        rows.append(_with_pixels(row, loaded.pixels[:, :, s:e]))  # (1, 3, t, H, W) uint8
    return rows


# ---------------------------------------------------------------------------------------------- encoder


def _pixels(row: dict) -> torch.Tensor:
    """A prepared row's pixels back as a tensor (see PREPARED_SCHEMA for layout and range)."""
    return tensor_from_bytes(row["pixels"], row["pixel_shape"], row["pixel_dtype"])


def _ray_node_id() -> str | None:
    """The Ray node this process runs on (rows record where they were encoded); None outside Ray."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


class EncodeWorker:
    """Encoder stage (Ray Data actor pool): loads the model once, encodes each group of rows of the
    same resized shape in one call, and returns rows in ROW_SCHEMA (pixels dropped, latents filled)."""

    def __init__(self, plan: JobPlan, num_threads: int) -> None:
        torch.set_num_threads(max(1, num_threads))
        self.tokenizer = load_tokenizer(plan.model, device=plan.device, dtype=getattr(torch, plan.dtype))
        if self.tokenizer.weights_hash != plan.weights_hash:
            raise ConfigError(
                f"worker loaded {plan.model} with weights {self.tokenizer.weights_hash[:12]}, the driver "
                f"planned {plan.weights_hash[:12]}; the model changed during the job",
                param="model",
            )
        self.plan = plan
        self.node_id = _ray_node_id()
        # The resize happens here, per row, so that rows of any source size batch by resized size.
        self.options = replace(plan.options, resize="none", resolution=None)

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = [{**row, "encoder_node": self.node_id} for row in table.to_pylist()]  # PREPARED_SCHEMA
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
        return pa.Table.from_pylist(rows, schema=PREPARED_SCHEMA).select(ROW_SCHEMA.names)

    def _crop_window(self, row: dict) -> dict:
        """The row's bucket (its crop size) and where the crop sits in the item resized to cover it
        (SDXL's crop coordinates): the center, or a window drawn from the row id, so a rerun agrees."""
        *_, height, width = row["pixel_shape"]
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
        """Rows that stack: the same shape after the resize or crop. Sampling is seeded per item, so
        sampled items go one by one."""
        *lead, height, width = row["pixel_shape"]
        if self.plan.crop != "none":
            height, width = row["bucket_height"], row["bucket_width"]
        elif self.plan.options.resize != "none":
            height, width = policy_size(height, width, self.plan.options.resize, self.plan.options.resolution)
        return (*lead, height, width, index) if self.options.sample else (*lead, height, width)

    def _model_input(self, row: dict) -> torch.Tensor:
        """(1, 3, [T,] H', W') float [-1, 1] after the plan's resize or crop; validated by the Tokenizer."""
        pixels = _pixels(row)
        pixels = to_float_pixels(pixels) if pixels.dtype == torch.uint8 else pixels
        if self.plan.crop != "none":
            size = (row["bucket_height"], row["bucket_width"])
            cover = cover_size(*pixels.shape[-2:], size)
            return resize_crop(pixels, cover, size, row["crop_top"], row["crop_left"])
        return resize_pixels(pixels, self.plan.options.resize, self.plan.options.resolution)

    def _encode(self, rows: list[dict], group: list[int]) -> list[dict]:
        stacked = torch.cat([self._model_input(rows[i]) for i in group])  # (B, 3, [T,] H', W')
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
            results.append(
                {
                    **row,
                    "latents": item.to_bytes(),
                    "shape": list(item.latents.shape),
                    "dtype": str(item.latents.dtype).removeprefix("torch."),
                    "normalized": item.normalized,
                    "normalization": json.dumps(item.normalization.to_dict()),
                }
            )
        return results


# ---------------------------------------------------------------------------------------------- shards


def write_shard(table: pa.Table, *, output: str, run_id: str) -> pa.Table:
    """Writer stage (Ray Data tasks): rows -> one Parquet shard, written under a temporary name and
    renamed, so that a shard is either complete or absent. A writer left over from a killed run
    (its driver gone, the cluster still up) finds another run id in RUN_FILE and discards its
    shard: the current run encodes those inputs itself. Returns one SUMMARY_SCHEMA row."""
    rows = table.select(ROW_SCHEMA.names).cast(ROW_SCHEMA)
    directory = Path(output)
    shard = f"{SHARD_PREFIX}{uuid.uuid4().hex}{SHARD_SUFFIX}"
    tmp = directory / f".{shard}{TMP_SUFFIX}"
    pq.write_table(rows, tmp)
    if owner(directory) != run_id:
        tmp.unlink(missing_ok=True)
        return pa.Table.from_pylist([{"shard": "", "ok": 0, "errors": 0, "bytes": 0}], schema=SUMMARY_SCHEMA)
    os.replace(tmp, directory / shard)
    errors = rows.num_rows - rows.column("error").null_count
    summary = {
        "shard": shard,
        "ok": rows.num_rows - errors,
        "errors": errors,
        "bytes": (directory / shard).stat().st_size,
    }
    return pa.Table.from_pylist([summary], schema=SUMMARY_SCHEMA)
