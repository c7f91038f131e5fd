"""The batch job's driver: plan, run the Ray Data pipeline, write the manifest.

    tokenizers-svc batch-encode --input DIR|GLOB|MANIFEST.parquet --output OUT --model NAME [...]
    python -m serving.batch ...                              (same arguments)
    ray job submit --working-dir . -- python -m serving.batch ...

Reading order: :func:`main` -> :func:`run`: list the inputs and drop those already done, then
``prepare_row`` (CPU tasks) -> ``EncodeWorker`` (actor pool) -> ``write_shard`` (CPU tasks), then
the manifest (what was written, what is missing, the history of runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import uuid
import warnings
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from serving.batch.output import (
    INPUTS_FILE,
    JOB_FILE,
    RUN_FILE,
    TMP_SUFFIX,
    Progress,
    read_progress,
    shard_paths,
    write_atomic,
)
from serving.batch.plan import DTYPES, JobPlan, list_inputs, make_plan, path_text
from serving.batch.stages import EncodeWorker, prepare_row, write_shard
from tokenizers_svc.datasets import MANIFEST_FILE, SHARD_PREFIX
from tokenizers_svc.defaults import default_model_for
from tokenizers_svc.errors import EXIT_ERROR, EXIT_OK, ConfigError, TokenizerError, print_error
from tokenizers_svc.formats import is_video_file
from tokenizers_svc.loading import resolved_dtype
from tokenizers_svc.options import add_arguments
from tokenizers_svc.pixels import CROP_MODES
from tokenizers_svc.progress import Progress as ProgressLog  # output.Progress: what the shards hold
from tokenizers_svc.ray_cluster import init_ray, started_here

MAX_INPUT_BLOCKS = 1000  # one CPU task per block of inputs; enough blocks to keep a cluster busy


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
    # The encode options, declared from their one definition (tokenizers_svc.options)
    add_arguments(p, ("resize", "resolution", "normalize", "sample", "seed", "stride", "max_frames"))
    p.add_argument(
        "--crop",
        choices=CROP_MODES,
        default="none",
        help="fixed-size latents for training: resize each item to cover RESOLUTIONxRESOLUTION (or its "
        "aspect bucket) and crop the center or a random window (seeded by the row id, so reruns agree)",
    )
    p.add_argument(
        "--aspect-buckets",
        action="store_true",
        help="with --crop: crop each item to the nearest of a few aspect ratios (1:1, 4:3, 3:4, 3:2, 2:3, "
        "16:9, 9:16) of about RESOLUTION^2 pixels instead of a square; the bucket is recorded per row",
    )
    p.add_argument(
        "--clip-frames",
        type=int,
        default=None,
        help="frames per video clip (default: 16 rounded up to the frame rule)",
    )
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
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="model dtype (auto: bfloat16 on a GPU)")
    p.add_argument(
        "--limit", type=int, default=None, help="encode at most this many pending inputs, then stop"
    )
    p.add_argument(
        "--set-limit",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="raise (or lower) a per-input cap; names and defaults as the server's limits "
        "(max_pixels, max_frames, max_duration_s, max_total_pixels, max_latent_elements)",
    )
    p.add_argument(
        "--address", default=None, help="Ray address (default: RAY_ADDRESS, else start a local Ray)"
    )
    p.add_argument(
        "--dashboard-port",
        type=int,
        default=None,
        help="with a local Ray: start its dashboard on 127.0.0.1 at this port (default: no dashboard)",
    )
    return p


def _checked_output(spec: str) -> Path:
    """``--output`` as an absolute directory path, checked before Ray starts: an existing file, a
    path under a file, or a folder this user cannot create are refused with one line."""
    output = Path(spec).resolve()
    if output.exists() and not output.is_dir():
        raise ConfigError(
            f"--output {spec} is an existing file; expected a directory (new, or a batch-encode output "
            "to resume)",
            param="output",
        )
    existing = next(parent for parent in (output, *output.parents) if parent.exists())
    if not existing.is_dir():
        raise ConfigError(f"--output {spec} is under {existing}, which is a file", param="output")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--output {spec}: cannot write in {existing} (permission denied)", param="output")
    return output


def _previous_job(output: Path) -> dict | None:
    """The model and options pinned in ``output``'s job.json by an earlier run, if any."""
    path = output / JOB_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is unreadable ({exc}); use a new --output", param="output") from None


def _check_job(output: Path, plan: JobPlan, previous: dict | None) -> None:
    """One output directory holds one model and one set of options: a rerun with others would mix
    latents of two kinds. Inputs may change (new files are encoded by the next run)."""
    job = plan.key()
    if previous is not None and previous != job:
        changed = sorted(k for k in set(job) | set(previous) if job.get(k) != previous.get(k))
        raise ConfigError(
            f"{output} holds a job with different {', '.join(changed)}; rerun the same command to "
            "resume, or use a new --output",
            param="output",
        )


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


def _fit_workers(workers: int, cpus_per_worker: float) -> tuple[float, float]:
    """(CPUs per encoder actor, CPUs per read/write task) that let the job make progress: the
    actors may take at most the cluster's CPUs less what one read/write task needs (1, or half
    the cluster when it has fewer than 2), else every CPU sits in an actor waiting for rows that
    no task is left to decode. Asking for more is scaled down, with a note on stderr."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    task_cpus = min(1.0, total / 2)
    budget = total - task_cpus
    if task_cpus <= 0:
        raise ConfigError(
            "the Ray cluster has no CPUs; the job's read and write tasks need some", param="workers"
        )
    if workers * cpus_per_worker <= budget:
        return cpus_per_worker, task_cpus
    fitted = budget / workers
    print(
        f"batch-encode: --workers {workers} x --cpus-per-worker {cpus_per_worker:g} would take every one of "
        f"the cluster's {total:g} CPUs and leave none for reading inputs; using {fitted:.3g} CPUs per "
        f"worker ({task_cpus:g} kept for the read/write tasks)",
        file=sys.stderr,
    )
    return fitted, task_cpus


def _restarts() -> dict:
    """Encoder actor restarts: Ray Data's default (restart forever) on a cluster this job joined,
    where a lost node must not stop the job; none on a local instance this process started, where
    every node dies with the driver and an actor dies only by crashing (a rerun resumes). Ray Data
    hands its actors their constructor arguments through the object store, so every actor that may
    restart makes Ray core log an E-level "constructor arguments in the object store and
    max_restarts > 0" line (ray-project/ray#57733); a local run is quiet."""
    return {"max_restarts": 0} if started_here() else {}


def _claim(output: Path, plan: JobPlan, previous: dict | None) -> str:
    """Make this run the owner of ``output``; returns its run id. From here on, writers of earlier
    runs discard their shards, and their half-written shards are removed (their rows are redone)."""
    _check_job(output, plan, previous)  # again: the device may have changed the dtype
    output.mkdir(parents=True, exist_ok=True)
    if previous is None:
        write_atomic(output / JOB_FILE, json.dumps(plan.key(), indent=2, sort_keys=True))
    run_id = uuid.uuid4().hex
    write_atomic(output / RUN_FILE, run_id)
    for stale in output.glob(f".{SHARD_PREFIX}*{TMP_SUFFIX}"):
        stale.unlink(missing_ok=True)
    return run_id


def _encode(
    pending: list[dict], plan: JobPlan, args: argparse.Namespace, gpus: float, output: Path, run_id: str
) -> list[dict]:
    """The Ray Data pipeline over ``pending`` inputs -> one summary row per shard written. Progress
    counts rows as shards land: of the pending inputs when all are images (one row each), else
    (clips) without a total."""
    import ray
    from ray.util.annotations import RayDeprecationWarning

    worker_cpus, task_cpus = _fit_workers(args.workers, args.cpus_per_worker)
    ds = ray.data.from_items(pending, override_num_blocks=min(len(pending), MAX_INPUT_BLOCKS))
    # flat_map: one input -> several rows (clips); Ray Data keeps it in CPU tasks instead of
    # fusing it into the encoder actors.
    ds = ds.flat_map(prepare_row, fn_kwargs={"plan": plan}, num_cpus=task_cpus)
    with warnings.catch_warnings():  # Ray 2.60 sets max_restarts through ray_remote_args only
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", RayDeprecationWarning)
        ds = ds.map_batches(
            EncodeWorker,
            fn_constructor_args=(plan, max(1, int(worker_cpus))),
            batch_size=args.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=args.workers),
            num_gpus=gpus,
            num_cpus=worker_cpus,
            **_restarts(),
        )
    ds = ds.map_batches(
        write_shard,
        fn_kwargs={"output": str(output), "run_id": run_id},
        batch_size=args.shard_rows,
        batch_format="pyarrow",
        num_cpus=task_cpus,
    )
    total = None if any(is_video_file(os.fsdecode(item["path"])) for item in pending) else len(pending)
    summaries = []
    with ProgressLog("batch-encode", total, "row") as progress:
        for summary in ds.iter_rows():
            summaries.append(summary)
            progress.update(summary["ok"] + summary["errors"])
    return summaries


def _manifest(
    args: argparse.Namespace,
    argv: list[str],
    plan: JobPlan,
    inputs: list[str],
    ignored: list[dict],
    run: dict,
    after: Progress,
    output: Path,
) -> dict:
    missing = [path for path in inputs if not after.complete(path)]
    return {
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
        "run": run,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _write_manifest(output: Path, inputs: list[str], manifest: dict) -> None:
    """The input listing (usable as a manifest) and manifest.json with the history of every run."""
    tmp = output / f".{INPUTS_FILE}{TMP_SUFFIX}"
    listing = {
        "path": pa.array([path_text(p) for p in inputs], pa.string()),
        "path_bytes": pa.array([os.fsencode(p) for p in inputs], pa.binary()),  # exact, any bytes
    }
    pq.write_table(pa.table(listing), tmp)
    tmp.replace(output / INPUTS_FILE)
    path = output / MANIFEST_FILE
    history = json.loads(path.read_text()).get("runs", []) if path.is_file() else []
    runs = [
        *history,
        {"command": manifest["command"], "finished_at": manifest["finished_at"], **manifest["run"]},
    ]
    write_atomic(path, json.dumps({**manifest, "runs": runs}, indent=2))


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    """Plan and check everything on this machine (inputs, output directory, model, options, what
    is already done), start Ray only when there is work, run the pipeline, write manifest.json;
    returns the manifest."""
    import ray

    inputs, ignored = list_inputs(args.input)
    if args.model is None:
        args.model = default_model_for(inputs)
    output = _checked_output(args.output)
    previous = _previous_job(output)
    plan = make_plan(args, device="cpu")
    if args.dtype == "auto" and previous is not None:  # auto resumes in the dtype the job began with
        plan = replace(plan, dtype=previous.get("dtype", plan.dtype))
    _check_job(output, plan, previous)
    before = read_progress(output)
    pending = [  # paths as bytes: names that are not UTF-8 travel through Arrow unchanged
        {"path": os.fsencode(path), "done_ids": before.ids.get(path, [])}
        for path in inputs
        if not before.complete(path)
    ]
    skipped = len(inputs) - len(pending)
    pending = pending[: args.limit]

    summaries, wall = [], 0.0
    if pending:  # else nothing to do, and no Ray started for it
        if not ray.is_initialized():
            init_ray(args.address, dashboard_port=args.dashboard_port, announce="batch-encode")
        gpus = _gpus_per_worker(args.num_gpus_per_worker)
        if gpus > 0:  # --dtype auto: bfloat16 on GPUs, unless the job began in another dtype
            dtype = plan.dtype if previous is not None else resolved_dtype(args.dtype, "cuda")
            plan = replace(plan, device="cuda", dtype=dtype)
        run_id = _claim(output, plan, previous)
        started = time.perf_counter()
        summaries = _encode(pending, plan, args, gpus, output, run_id)
        wall = time.perf_counter() - started

    ok = sum(s["ok"] for s in summaries)
    errors = sum(s["errors"] for s in summaries)
    run = {
        "inputs_skipped": skipped,
        "inputs_encoded": len(pending),
        "rows_ok": ok,
        "rows_error": errors,
        "shards_written": [s["shard"] for s in summaries if s["shard"]],
        "bytes_written": sum(s["bytes"] for s in summaries),
        "wall_s": round(wall, 3),
        "rows_per_s": round((ok + errors) / wall, 3) if summaries else 0.0,
    }
    manifest = _manifest(args, argv, plan, inputs, ignored, run, read_progress(output), output)
    _write_manifest(output, inputs, manifest)
    return manifest


def summary_line(manifest: dict) -> str:
    run, out = manifest["run"], manifest["outputs"]
    done = run["rows_ok"] + run["rows_error"]
    state = (
        "complete" if manifest["complete"] else f"{len(manifest['missing'])} inputs left (rerun to resume)"
    )
    if run["inputs_encoded"] == 0:
        return (
            f"batch-encode: nothing to do: all {run['inputs_skipped']} inputs already done (Ray not started); "
            f"{out['rows']} rows in {out['dir']}: {state}"
        )
    return (
        f"batch-encode: {done} rows ({run['rows_ok']} ok, {run['rows_error']} errors) from "
        f"{run['inputs_encoded']} inputs in {run['wall_s']:.1f} s = {run['rows_per_s']:.2f} items/s, "
        f"{run['inputs_skipped']} inputs already done; {run['bytes_written'] / 1e6:.2f} MB written to "
        f"{len(run['shards_written'])} shards; {out['rows']} rows in {out['dir']}: {state}"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tokenizers-svc batch-encode`` and ``python -m serving.batch``. Exit codes as
    every entry point (``tokenizers_svc.errors``): 0 when the run finished (error rows included),
    1 on a typed error or when inputs are missing although no --limit was given, 2 on bad usage."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        manifest = run(args, argv)
    except TokenizerError as exc:
        return print_error(exc)
    print(summary_line(manifest))
    return EXIT_OK if manifest["complete"] or args.limit else EXIT_ERROR
