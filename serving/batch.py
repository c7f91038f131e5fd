"""Batch tokenization of a dataset with Ray Data: every input accounted for, resumable.

    tokenizers-svc batch-encode --input DIR|GLOB|MANIFEST.parquet --output OUT --model NAME [...]
    python -m serving.batch ...                              (same arguments)
    ray job submit --working-dir . -- python -m serving.batch ...

Pipeline: list inputs and drop those already done (driver) -> read bytes, hash, decode, resize,
cut video clips (CPU tasks) -> encode same-shape items together (a pool of actors, each loading
the model once, on a GPU when the cluster has one) -> write Parquet shards atomically (temporary
name, then rename). Decoding and encoding are the library's :mod:`tokenizers_svc.pipeline`, the
same calls the CLI and the HTTP server make.

Every input ends as exactly one row (one per clip for videos): a success row holding a complete
latent file (``Latents.to_bytes``: safetensors bytes with the crop/normalization metadata), or an
error row with ``type: message``. Row ids are stable (path + clip + job options), so a rerun of
the same command reads the ids already written and encodes only what is missing: a killed job
resumes without gaps or duplicates. docs/batch.md has the row schema.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shlex
import sys
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tokenizers_svc import media
from tokenizers_svc.datasets import MANIFEST_FILE, ROW_SCHEMA, SHARD_GLOB, SHARD_PREFIX, SHARD_SUFFIX
from tokenizers_svc.defaults import default_model_for
from tokenizers_svc.errors import ConfigError, InvalidMediaError, InvalidRequestError, TokenizerError
from tokenizers_svc.loading import load_tokenizer
from tokenizers_svc.pipeline import EncodeOptions, MediaInput, encode_media, load_media
from tokenizers_svc.pixels import RESIZE_POLICIES, resize_pixels, to_float_pixels
from tokenizers_svc.spec import FrameRule

TMP_SUFFIX = ".tmp"
JOB_FILE = "job.json"
INPUTS_FILE = "inputs.parquet"  # the listing of the last run; usable as an --input manifest
RUN_FILE = "run.id"  # the run that owns the output directory; other runs' writers discard their shards
DEFAULT_CLIP_FRAMES = 16  # rounded up to the model's frame rule (17 for 1 + 4k / 1 + 8k models)
DTYPES = ("float32", "bfloat16", "float16")
MAX_INPUT_BLOCKS = 1000  # one CPU task per block of inputs; enough blocks to keep a cluster busy

# Between the CPU and the encoder stage: pixels as raw C-order bytes, uint8 [0, 255] as decoded or
# float32 [-1, 1] after --resize, shape (1, 3, H, W) or (1, 3, T, H, W). Null on error rows.
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
_PIXEL_DTYPES = {"uint8": torch.uint8, "float32": torch.float32}


@dataclass(frozen=True)
class JobPlan:
    """Everything the workers need, validated on the driver before any work."""

    model: str  # as given: preset name or model directory
    model_name: str
    weights_hash: str
    modality: str  # of the model: image | video | both
    frame_rule: FrameRule
    options: EncodeOptions
    clip_frames: int
    device: str
    dtype: str

    def key(self) -> dict:
        """What determines a row's latents; part of every id and of job.json."""
        options = asdict(self.options)
        options.pop("tiling")
        return {
            "model": self.model_name,
            "weights_hash": self.weights_hash,
            "options": options,
            "clip_frames": self.clip_frames,
            "dtype": self.dtype,
        }


def digest(value: object) -> str:
    """Stable 32-hex-digit id of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:32]


def row_id(plan_key: dict, path: str, clip: tuple[int, int] | None) -> str:
    return digest({"path": path, "clip": list(clip) if clip else None, **plan_key})


def _error_text(exc: TokenizerError) -> str:
    return f"{exc.type}: {exc.message}"


# ---------------------------------------------------------------------------------------------- inputs


def list_inputs(spec: str) -> tuple[list[str], list[str]]:
    """DIR (recursive, media suffixes), GLOB, or a Parquet manifest with a ``path`` column ->
    (sorted absolute input paths, ignored non-media paths). Manifest paths are relative to it."""
    path = Path(spec)
    ignored: list[str] = []
    if path.is_dir():
        files = sorted(p.resolve() for p in path.rglob("*") if p.is_file())
        inputs = [str(p) for p in files if p.suffix.lower() in media.MEDIA_SUFFIXES]
        ignored = [str(p) for p in files if p.suffix.lower() not in media.MEDIA_SUFFIXES]
    elif path.is_file() and path.suffix == ".parquet":
        table = pq.read_table(path)
        if "path" not in table.column_names:
            raise ConfigError(
                f"manifest {path.name} needs a 'path' column, got columns {table.column_names}",
                param="input",
            )
        base = path.resolve().parent
        inputs = [str((base / p).resolve()) for p in table.column("path").to_pylist() if p]
    else:
        inputs = [str(Path(p).resolve()) for p in glob.glob(spec, recursive=True) if Path(p).is_file()]
    if not inputs:
        raise ConfigError(
            f"--input {spec!r} matched no media files; expected a directory, a glob or a .parquet "
            "manifest with a 'path' column",
            param="input",
        )
    return sorted(set(inputs)), ignored


# ---------------------------------------------------------------------------------------------- CPU stage


def clip_ranges(frames: int, clip_frames: int) -> list[tuple[int, int]]:
    """Consecutive windows of ``clip_frames`` frames; the last one may be shorter (the model pads
    it to its frame rule and decode crops back to the clip's length), so no frame is dropped."""
    return [(s, min(s + clip_frames, frames)) for s in range(0, frames, clip_frames)]


def prepare_row(item: dict, *, plan: JobPlan) -> list[dict]:
    """CPU stage (Ray Data tasks, ``flat_map``): ``{path, done_ids}`` -> rows to encode (pixels
    set) and error rows, with PREPARED_SCHEMA's columns. Clips whose id is in ``done_ids`` are
    already written by an earlier run and are left out."""
    done = set(item["done_ids"])
    return [row for row in prepare_input(item["path"], plan, plan.key()) if row["id"] not in done]


def _row(plan: JobPlan, key: dict, path: str, clip: tuple[int, int] | None = None, **fields) -> dict:
    row = dict.fromkeys(PREPARED_SCHEMA.names)
    row.update(
        id=row_id(key, path, clip),
        source_path=path,
        clip_count=1,
        model=plan.model_name,
        weights_hash=plan.weights_hash,
    )
    row.update(fields)
    return row


def _with_pixels(row: dict, pixels: torch.Tensor, options: EncodeOptions) -> dict:
    """Attach pixels after the explicit resize (done here on CPU with the library's resize, so that
    items of the same resized size share one encoder call); errors become the row's error."""
    if options.resize != "none":
        try:
            pixels = resize_pixels(to_float_pixels(pixels), options.resize, options.resolution)
        except TokenizerError as exc:
            return {**row, "error": _error_text(exc)}
    return {
        **row,
        "pixels": pixels.contiguous().numpy().tobytes(),
        "pixel_shape": list(pixels.shape),
        "pixel_dtype": str(pixels.dtype).removeprefix("torch."),
    }


def prepare_input(path: str, plan: JobPlan, key: dict) -> list[dict]:
    """One input path -> its rows: one per image, one per video clip, or one error row."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        error = InvalidMediaError(f"cannot read {Path(path).name}: {exc.strerror or type(exc).__name__}")
        return [_row(plan, key, path, error=_error_text(error))]
    sha = hashlib.sha256(data).hexdigest()
    kind = None
    try:
        kind = media.sniff_media(data)
        if kind == "video" and plan.modality == "image":
            raise InvalidRequestError(
                f"{plan.model_name} encodes images only; expected an image, got a video (use a video model)",
                param="model",
            )
        loaded = load_media(data, media.MediaLimits(), plan.options)
    except TokenizerError as exc:
        return [_row(plan, key, path, sha256=sha, kind=kind, error=_error_text(exc))]
    height, width = loaded.original_size
    common = {"sha256": sha, "kind": loaded.kind, "original_height": height, "original_width": width}
    if loaded.kind == "image":
        return [_with_pixels(_row(plan, key, path, **common), loaded.pixels, plan.options)]
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
        rows.append(_with_pixels(row, loaded.pixels[:, :, s:e], plan.options))  # (1, 3, t, H, W)
    return rows


# ---------------------------------------------------------------------------------------------- encoder


def _pixels(row: dict) -> torch.Tensor:
    """A prepared row's pixels back as a tensor (see PREPARED_SCHEMA for layout and range)."""
    flat = torch.frombuffer(bytearray(row["pixels"]), dtype=_PIXEL_DTYPES[row["pixel_dtype"]])
    return flat.reshape(row["pixel_shape"])


class EncodeWorker:
    """Encoder stage (Ray Data actor pool): loads the model once, encodes each group of same-shape
    rows in one call, and returns rows in ROW_SCHEMA (pixels dropped, latents filled)."""

    def __init__(self, plan: JobPlan, num_threads: int) -> None:
        torch.set_num_threads(max(1, num_threads))
        self.tokenizer = load_tokenizer(plan.model, device=plan.device, dtype=getattr(torch, plan.dtype))
        if self.tokenizer.weights_hash != plan.weights_hash:
            raise ConfigError(
                f"worker loaded {plan.model} with weights {self.tokenizer.weights_hash[:12]}, the driver "
                f"planned {plan.weights_hash[:12]}; the model changed during the job",
                param="model",
            )
        # Resize already happened on CPU; encode pads to the model's constraints as usual.
        self.options = replace(plan.options, resize="none", resolution=None)

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = table.to_pylist()  # PREPARED_SCHEMA's columns
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            if row["error"] is None:
                # Sampling is seeded per item, so sampled items go one by one.
                key = (tuple(row["pixel_shape"]), row["pixel_dtype"])
                groups.setdefault((*key, i) if self.options.sample else key, []).append(i)
        for members in groups.values():
            for i, result in zip(members, self._encode_group([rows[i] for i in members]), strict=True):
                rows[i] = result
        return pa.Table.from_pylist(rows, schema=PREPARED_SCHEMA).select(ROW_SCHEMA.names)

    def _encode_group(self, group: list[dict]) -> list[dict]:
        """Same-shape rows in one call; if that fails, item by item, so that one bad item becomes
        one error row and its neighbours still succeed."""
        try:
            return self._encode(group)
        except TokenizerError as exc:
            if len(group) == 1:
                return [{**group[0], "error": _error_text(exc)}]
        return [result for row in group for result in self._encode_group([row])]

    def _encode(self, group: list[dict]) -> list[dict]:
        stacked = torch.cat([_pixels(row) for row in group])  # (B, 3, [T,] H, W)
        batch = MediaInput(
            pixels=stacked,
            kind="video" if stacked.ndim == 5 else "image",
            fps=None,
            sha256="",
            original_size=(int(stacked.shape[-2]), int(stacked.shape[-1])),
        )
        latents = encode_media(self.tokenizer, batch, self.options)
        results = []
        for i, row in enumerate(group):
            source_hw = (row["original_height"], row["original_width"])
            extra = {}
            if row["clip_index"] is not None:
                extra = {"clip_start": repr(row["clip_start"]), "clip_end": repr(row["clip_end"])}
            item = replace(
                latents.select(i),
                fps=row["fps"],
                source_sha256=row["sha256"],
                resized_from=source_hw if source_hw != batch.original_size else None,
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
    if _owner(directory) != run_id:
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


def _owner(output: Path) -> str | None:
    try:
        return (output / RUN_FILE).read_text()
    except FileNotFoundError:
        return None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}{TMP_SUFFIX}")
    tmp.write_text(text)
    os.replace(tmp, path)


def shard_paths(output: str | Path) -> list[Path]:
    return sorted(Path(output).glob(SHARD_GLOB))


@dataclass
class Progress:
    """What the shards in an output directory hold, per input path."""

    ids: dict[str, list[str]]  # source_path -> ids written
    expected: dict[str, int]  # source_path -> rows it produces (clip_count)
    rows: int
    errors: int
    duplicates: int  # ids written more than once (0 unless two jobs shared the directory)

    def complete(self, path: str) -> bool:
        return path in self.expected and len(set(self.ids[path])) >= self.expected[path]


def read_progress(output: Path) -> Progress:
    ids: dict[str, list[str]] = {}
    expected: dict[str, int] = {}
    rows = errors = 0
    for path in shard_paths(output):
        table = pq.read_table(path, columns=["id", "source_path", "clip_count", "error"])
        rows += table.num_rows
        errors += table.num_rows - table.column("error").null_count
        for id_, source, count in zip(
            table.column("id").to_pylist(),
            table.column("source_path").to_pylist(),
            table.column("clip_count").to_pylist(),
            strict=True,
        ):
            ids.setdefault(source, []).append(id_)
            expected[source] = count
    unique = sum(len(set(v)) for v in ids.values())
    return Progress(ids, expected, rows, errors, rows - unique)


# ---------------------------------------------------------------------------------------------- driver


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tokenizers-svc batch-encode",
        description="Encode a dataset of images/videos into Parquet shards of latents with Ray Data.",
    )
    p.add_argument(
        "--input", required=True, help="directory (recursive), glob, or .parquet with a 'path' column"
    )
    p.add_argument("--output", required=True, help="output directory for shards, job.json and manifest.json")
    p.add_argument(
        "--model",
        default=None,
        help="preset name or local model directory (default: the shipped video tokenizer when an input "
        "is a video, else the shipped image tokenizer)",
    )
    p.add_argument("--resize", choices=RESIZE_POLICIES, default="none", help="explicit resize policy")
    p.add_argument("--resolution", type=int, default=None, help="target size for --resize")
    p.add_argument("--no-normalize", action="store_true", help="store raw latents instead of normalized")
    p.add_argument("--sample", action="store_true", help="sample the posterior (KL models); default its mode")
    p.add_argument("--seed", type=int, default=None, help="seed for --sample (per item)")
    p.add_argument(
        "--clip-frames",
        type=int,
        default=None,
        help="frames per video clip (default: 16 rounded up to the frame rule)",
    )
    p.add_argument("--stride", type=int, default=1, help="keep every n-th video frame before cutting clips")
    p.add_argument("--max-frames", type=int, default=None, help="decode at most this many frames per video")
    p.add_argument(
        "--batch-size", type=int, default=8, help="rows per encoder call (same shapes batch together)"
    )
    p.add_argument("--shard-rows", type=int, default=256, help="rows per Parquet shard (at most)")
    p.add_argument("--workers", type=int, default=1, help="encoder actors")
    p.add_argument(
        "--num-gpus-per-worker",
        type=float,
        default=None,
        help="GPUs per encoder actor (default: 1 when the Ray cluster has GPUs, else 0)",
    )
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per encoder actor")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="model dtype")
    p.add_argument(
        "--limit", type=int, default=None, help="encode at most this many pending inputs, then stop"
    )
    p.add_argument(
        "--address", default=None, help="Ray address (default: RAY_ADDRESS, else start a local Ray)"
    )
    return p


def make_plan(args: argparse.Namespace, device: str) -> JobPlan:
    """Validate the arguments against the model (loaded once here, on CPU) before any work."""
    for name in (
        "batch_size",
        "shard_rows",
        "workers",
        "clip_frames",
        "stride",
        "max_frames",
        "resolution",
        "limit",
    ):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value}", param=name)
    if args.resize != "none" and args.resolution is None:
        raise ConfigError(f"--resize {args.resize} needs --resolution", param="resolution")
    if args.seed is not None and not args.sample:
        raise ConfigError("--seed only applies with --sample", param="seed")
    tokenizer = load_tokenizer(args.model, device="cpu")
    spec = tokenizer.spec
    if args.dtype not in spec.dtypes:
        raise ConfigError(
            f"--dtype must be one of {list(spec.dtypes)} for {spec.name}, got {args.dtype}", param="dtype"
        )
    rule = spec.frame_rule if spec.modality != "image" else FrameRule()
    clip_frames = args.clip_frames or rule.padded_frames(DEFAULT_CLIP_FRAMES)
    if not rule.is_valid(clip_frames):
        lower = rule.padded_frames(max(clip_frames - rule.temporal_compression, 1))
        raise ConfigError(
            f"--clip-frames must follow {spec.name}'s frame rule ({rule.describe()}), got {clip_frames}; "
            f"nearest valid: {lower} or {rule.padded_frames(clip_frames)}",
            param="clip_frames",
        )
    options = EncodeOptions(
        normalize=not args.no_normalize,
        sample=args.sample,
        resize=args.resize,
        resolution=args.resolution,
        max_frames=args.max_frames,
        stride=args.stride,
        seed=args.seed,
    )
    return JobPlan(
        model=args.model,
        model_name=spec.name,
        weights_hash=tokenizer.weights_hash,
        modality=spec.modality,
        frame_rule=rule,
        options=options,
        clip_frames=clip_frames,
        device=device,
        dtype=args.dtype,
    )


def _check_job_file(output: Path, plan: JobPlan) -> None:
    """One output directory holds one model and one set of options: a rerun with others would mix
    latents of two kinds. Inputs may change (new files are encoded by the next run)."""
    job = plan.key()
    path = output / JOB_FILE
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous != job:
            changed = sorted(k for k in set(job) | set(previous) if job.get(k) != previous.get(k))
            raise ConfigError(
                f"{output} holds a job with different {', '.join(changed)}; rerun the same command to "
                "resume, or use a new --output",
                param="output",
            )
        return
    _write_atomic(path, json.dumps(job, indent=2, sort_keys=True))


def _gpus_per_worker(requested: float | None) -> float:
    import ray

    available = ray.cluster_resources().get("GPU", 0)
    if requested is None:
        return 1.0 if available else 0.0
    if requested < 0:
        raise ConfigError(f"--num-gpus-per-worker must be >= 0, got {requested}", param="num_gpus_per_worker")
    if requested > available:
        raise ConfigError(
            f"--num-gpus-per-worker {requested} but the Ray cluster has {available:g} GPUs",
            param="num_gpus_per_worker",
        )
    return requested


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    """Plan, run the Ray Data pipeline, write manifest.json; returns the manifest."""
    import ray

    inputs, ignored = list_inputs(args.input)
    if args.model is None:
        args.model = default_model_for(inputs)
    plan = make_plan(args, device="cpu")
    if not ray.is_initialized():
        ray.init(address=args.address)
    gpus = _gpus_per_worker(args.num_gpus_per_worker)
    plan = replace(plan, device="cuda" if gpus > 0 else "cpu")
    output = Path(args.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    _check_job_file(output, plan)
    run_id = uuid.uuid4().hex
    _write_atomic(output / RUN_FILE, run_id)  # from here on, writers of earlier runs discard
    for stale in output.glob(f".{SHARD_PREFIX}*{TMP_SUFFIX}"):
        stale.unlink(missing_ok=True)  # half-written shards of a killed run; their rows are redone
    before = read_progress(output)
    pending = [
        {"path": path, "done_ids": before.ids.get(path, [])} for path in inputs if not before.complete(path)
    ]
    skipped = len(inputs) - len(pending)
    pending = pending[: args.limit]

    started = time.perf_counter()
    summaries = []
    if pending:
        ds = ray.data.from_items(pending, override_num_blocks=min(len(pending), MAX_INPUT_BLOCKS))
        # flat_map: one input -> several rows (clips); Ray Data keeps it in CPU tasks instead of
        # fusing it into the encoder actors.
        ds = ds.flat_map(prepare_row, fn_kwargs={"plan": plan})
        ds = ds.map_batches(
            EncodeWorker,
            fn_constructor_args=(plan, int(args.cpus_per_worker)),
            batch_size=args.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=args.workers),
            num_gpus=gpus,
            num_cpus=args.cpus_per_worker,
        )
        ds = ds.map_batches(
            write_shard,
            fn_kwargs={"output": str(output), "run_id": run_id},
            batch_size=args.shard_rows,
            batch_format="pyarrow",
        )
        summaries = list(ds.iter_rows())
    wall = time.perf_counter() - started

    after = read_progress(output)
    missing = [path for path in inputs if not after.complete(path)]
    ok = sum(s["ok"] for s in summaries)
    errors = sum(s["errors"] for s in summaries)
    written = sum(s["bytes"] for s in summaries)
    manifest = {
        "command": shlex.join(["python", "-m", "serving.batch", *argv]),  # rerun it to resume
        "process": shlex.join(sys.orig_argv),  # how this run was started (CLI, ray job, tests)
        "model": {"name": plan.model_name, "source": plan.model, "weights_hash": plan.weights_hash},
        "options": plan.key(),
        "device": plan.device,
        "inputs": {"spec": args.input, "count": len(inputs), "listing": INPUTS_FILE, "ignored": ignored},
        "outputs": {
            "dir": str(output),
            "shards": [p.name for p in shard_paths(output)],
            "rows": after.rows,
            "error_rows": after.errors,
            "duplicate_rows": after.duplicates,
        },
        "complete": not missing,
        "missing": missing,
        "run": {
            "inputs_skipped": skipped,
            "inputs_encoded": len(pending),
            "rows_ok": ok,
            "rows_error": errors,
            "shards_written": [s["shard"] for s in summaries if s["shard"]],
            "bytes_written": written,
            "wall_s": round(wall, 3),
            "rows_per_s": round((ok + errors) / wall, 3) if summaries else 0.0,
        },
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp = output / f".{INPUTS_FILE}{TMP_SUFFIX}"
    pq.write_table(pa.table({"path": pa.array(inputs, pa.string())}), tmp)
    os.replace(tmp, output / INPUTS_FILE)
    manifest_path = output / MANIFEST_FILE
    history = json.loads(manifest_path.read_text()).get("runs", []) if manifest_path.is_file() else []
    runs = [
        *history,
        {"command": manifest["command"], "finished_at": manifest["finished_at"], **manifest["run"]},
    ]
    _write_atomic(manifest_path, json.dumps({**manifest, "runs": runs}, indent=2))
    return manifest


def summary_line(manifest: dict) -> str:
    run, out = manifest["run"], manifest["outputs"]
    done = run["rows_ok"] + run["rows_error"]
    state = (
        "complete" if manifest["complete"] else f"{len(manifest['missing'])} inputs left (rerun to resume)"
    )
    return (
        f"batch-encode: {done} rows ({run['rows_ok']} ok, {run['rows_error']} errors) from "
        f"{run['inputs_encoded']} inputs in {run['wall_s']:.1f} s = {run['rows_per_s']:.2f} items/s, "
        f"{run['inputs_skipped']} inputs already done; {run['bytes_written'] / 1e6:.2f} MB written to "
        f"{len(run['shards_written'])} shards; {out['rows']} rows in {out['dir']}: {state}"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tokenizers-svc batch-encode`` and ``python -m serving.batch``: 0 when the
    run finished (error rows included), 1 on a configuration error or when inputs are missing
    although no --limit was given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        manifest = run(args, argv)
    except TokenizerError as exc:
        print(f"error: {_error_text(exc)}", file=sys.stderr)
        return 1
    print(summary_line(manifest))
    return 0 if manifest["complete"] or args.limit else 1


if __name__ == "__main__":
    sys.exit(main())
