"""The batch job's driver: plan, run the Ray Data pipeline, write the manifest.

    tokenizers-svc batch-encode --input DIR|GLOB|MANIFEST.parquet --output OUT --model NAME [...]
    python -m serving.batch ...                              (same arguments)
    ray job submit --working-dir . -- python -m serving.batch ...

Reading order: :func:`main` -> :func:`run`: list the inputs and drop those already done, size the
job (on this machine alone it runs in this process, without Ray: :func:`_driver_size`), then
``prepare_row`` (in the actors on CPUs, else in tasks) -> ``EncodeWorker`` (actor pool, and on
CPUs one batch on the driver while the pool starts: :func:`_head_start`) -> ``write_shard`` (on the
driver), then the manifest (what was written, what is missing, the history of runs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import threading
import time
import uuid
import warnings
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, as_completed, wait
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from serving.batch import sizing
from serving.batch.output import (
    INPUTS_FILE,
    JOB_FILE,
    RUN_FILE,
    TMP_SUFFIX,
    WrittenRows,
    read_progress,
    shard_paths,
    write_atomic,
)
from serving.batch.plan import (
    DTYPES,
    JobPlan,
    actor_flags_given,
    check_flags,
    list_inputs,
    make_plan,
    path_text,
)
from serving.batch.sizing import GPU_BATCH_SIZE, JobSize, ModelCost, Resources
from serving.batch.stages import EncodeWorker, prepare_batch, write_shard
from tokenizers_svc import media
from tokenizers_svc.api import Tokenizer
from tokenizers_svc.datasets import MANIFEST_FILE, SHARD_PREFIX
from tokenizers_svc.defaults import default_model_for
from tokenizers_svc.errors import EXIT_ERROR, EXIT_OK, ConfigError, TokenizerError, print_error
from tokenizers_svc.formats import is_video_file
from tokenizers_svc.loading import load_tokenizer, resolved_dtype
from tokenizers_svc.memory import model_actor_options, tune_for_model_calls
from tokenizers_svc.options import add_arguments
from tokenizers_svc.pixels import CROP_MODES, policy_size
from tokenizers_svc.progress import Progress
from tokenizers_svc.ray_cluster import cluster_is_this_machine, init_ray, started_here
from tokenizers_svc.wire import dtype_name

MEASURED_INPUTS = 5  # inputs the driver encodes to judge whether a job on many cores runs in it (auto)
MAX_INPUT_BLOCKS = 1000  # blocks of pending inputs; enough to spread over a cluster's actors
FLUSH_S = 30.0  # a shard at least this often while rows come (a killed run loses at most this)


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
    add_arguments(
        p, ("resize", "resolution", "normalize", "sample", "seed", "stride", "max_frames", "tokens")
    )
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
    p.add_argument("--shard-rows", type=int, default=256, help="rows per Parquet shard (at most)")
    # How big the stages are: chosen from the cluster and the model (serving/batch/sizing.py)
    # unless given; each flag overrides its part only.
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="rows per encoder call; same shapes batch together (default: about 1 s of model work on "
        f"CPUs and at most {sizing.CPU_CALL_PIXELS} pixels per call, {GPU_BATCH_SIZE} on GPUs)",
    )
    p.add_argument(
        "--workers", type=int, default=None, help="encoder actors (default: one per CPU, or one per GPU)"
    )
    p.add_argument(
        "--num-gpus-per-worker",
        type=float,
        default=None,
        help="GPUs per encoder actor (default: 1 when the Ray cluster has GPUs, else 0)",
    )
    p.add_argument(
        "--cpus-per-worker",
        type=float,
        default=None,
        help="Ray CPUs per encoder actor, and as many torch threads (default: the CPUs shared by the "
        "actors, the cores by their torch threads; 1 per actor with GPUs)",
    )
    p.add_argument(
        "--decode-tasks",
        type=int,
        default=None,
        help="Ray Data tasks decoding ahead of the encoder actors; 0: each actor decodes its own inputs "
        "(default: 0 on CPUs, the CPUs the actors leave with GPUs)",
    )
    p.add_argument(
        "--no-head-start",
        action="store_true",
        help="leave every input to the actors (default on CPUs: the driver, which has the model loaded, "
        "encodes the first batch while the actors start, so the first rows come within seconds)",
    )
    p.add_argument(
        "--engine",
        choices=("auto", "ray", "driver"),
        default="auto",
        help="where items are encoded. auto: in this process, without Ray, when no cluster is named "
        "(--address, RAY_ADDRESS), the inputs are images, there is no GPU and no actor flag, and the "
        "job is short enough (its measured work) that starting Ray's encoder actors (~6 s) would cost "
        "more than 5%% of it; else Ray Data. "
        "ray: always Ray Data; driver: always this process (one thread per core)",
    )
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
        job = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is unreadable ({exc}); use a new --output", param="output") from None
    if not isinstance(job, dict):
        raise ConfigError(
            f"{path} is not a job description (a JSON object); use a new --output", param="output"
        )
    return job


def _check_job(output: Path, plan: JobPlan, previous: dict | None) -> None:
    """One output directory holds one model and one set of options: a rerun with others would mix
    latents of two kinds. Inputs may change (new files are encoded by the next run)."""
    job = plan.key()
    if previous is None or previous == job:
        return
    earlier = previous.get("model_input_resize")
    previous_resize = (previous.get("options") or {}).get("resize", "none")
    resized_before = earlier is not None or "crop" in previous or previous_resize != "none"
    if resized_before and "model_input_resize" in job and earlier != job["model_input_resize"]:
        # the directory was resized by another version's arithmetic, or by one that did not name it
        how = f"resized inputs by {earlier}" if earlier else "did not name its input resize"
        raise ConfigError(
            f"{output} was written by a version of tokenizers-svc that {how}; this one resizes by "
            f"{job['model_input_resize']}, and resuming would mix latents of two kinds of pixels: "
            "use a new --output",
            param="output",
        )
    changed = sorted(k for k in set(job) | set(previous) if job.get(k) != previous.get(k))
    raise ConfigError(
        f"{output} holds a job with different {', '.join(changed)}; rerun the same command to "
        "resume, or use a new --output",
        param="output",
    )


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


def _item_shape(plan: JobPlan, sample: str | None) -> tuple[int, ...]:
    """The shape (1, 3, [T,] H, W) of a typical item after the resize or crop, from a sample
    image's header (no pixels decoded); with no image, a clip of 512x512 frames."""
    dims = media.probe_dimensions(Path(sample).read_bytes()) if sample is not None else None
    frames, height, width = dims if dims is not None else (plan.clip_frames, 512, 512)
    if plan.crop_sizes:
        height, width = plan.crop_sizes[0]
    elif plan.options.resize != "none":
        height, width = policy_size(height, width, plan.options.resize, plan.options.resolution)
    if plan.modality == "image":
        return (1, 3, height, width)
    return (1, 3, min(frames or 1, plan.clip_frames), height, width)


def _model_cost(tokenizer: Tokenizer, plan: JobPlan, pending: list[dict]) -> ModelCost:
    """What one item costs the model, measured on this machine (sizing.probe_seconds_per_item) at
    the size of the first pending image (videos are not read for this: 512x512 frames then)."""
    paths = (os.fsdecode(item["path"]) for item in pending)
    sample = next((path for path in paths if not is_video_file(path)), None)
    try:
        shape = _item_shape(plan, sample)
    except OSError:  # unreadable: it becomes an error row; size the job for a typical photo
        shape = _item_shape(plan, None)
    seconds = sizing.probe_seconds_per_item(tokenizer, shape)
    params = sum(p.numel() for p in tokenizer.module.parameters())
    return ModelCost(seconds=seconds, pixels=math.prod(shape[2:]), params=params)


def _ray_size(args: argparse.Namespace, cost: ModelCost, pending: int) -> JobSize:
    """Start or join Ray, and size the job's stages on its resources (sizing.choose, flags win)."""
    import ray

    if not ray.is_initialized():
        # Ray's own process logs stay in its log files (init_ray says where), as for `serve`: a
        # failed item is a row and a failed actor an exception here; what else Ray prints (e.g. the
        # GCS's E lines about actors it kills as the job's local Ray shuts down) is not the job's
        init_ray(
            args.address, dashboard_port=args.dashboard_port, announce="batch-encode", log_to_driver=False
        )
    return sizing.choose(
        Resources.of_cluster(),
        cost,
        pending,
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.num_gpus_per_worker,
        decode_tasks=args.decode_tasks,
        batch_size=args.batch_size,
    )


def _machine_cores() -> int:
    """This machine's cores as the job sees them: the local Ray's CPUs when one is up, else the
    cores this process may run on."""
    import ray

    if ray.is_initialized():
        return max(1, math.floor(ray.cluster_resources().get("CPU", 1)))
    return len(os.sched_getaffinity(0))


def _loaded_dtype(tokenizer: Tokenizer) -> str:
    """The dtype name of the driver's copy of the model (float32 as it measured it, unless reloaded)."""
    return dtype_name(next(tokenizer.module.parameters()).dtype)


def _measure_items(
    tokenizer: Tokenizer, plan: JobPlan, pending: list[dict]
) -> tuple[float | None, list[pa.Table]]:
    """What a pending image costs end to end at one torch thread (read, decode, resize, encode,
    serialize), measured on the first MEASURED_INPUTS inputs, one at a time -> (the mean CPU-seconds
    of those that encoded without error, None if none did; the first one warms the decoders and
    the model up and is not counted unless alone), and their rows: real rows of the job, kept."""
    worker = EncodeWorker(plan, 1, decode=True, tokenizer=tokenizer)
    tables, seconds = [], []
    with sizing.torch_threads(1):
        for item in pending[:MEASURED_INPUTS]:
            started = time.thread_time()
            tables.append(worker(pa.Table.from_pylist([item])))
            if tables[-1].column("error")[0].is_valid:
                continue  # an error row costs little and says nothing about the others
            seconds.append(time.thread_time() - started)
    counted = seconds[1:] or seconds
    return (sum(counted) / len(counted) if counted else None), tables


def _driver_size(
    args: argparse.Namespace, plan: JobPlan, tokenizer: Tokenizer, pending: list[dict], cost: ModelCost
) -> tuple[JobSize | None, list[pa.Table]]:
    """The job's size when it runs in this process, else None: it runs on Ray; and the rows of the
    inputs encoded to measure them (:func:`_measure_items`). In this process: ``--engine driver``;
    or ``auto`` on a cluster that is this machine alone (no actors elsewhere to use), no GPU (the
    pool runs the model there), images only (a video's clips are not counted before decoding it)
    and no actor flag, when the driver has a thread for every core
    (sizing.driver_takes_every_job), or else when the job is short (sizing.runs_in_driver, from
    the first inputs' measured cost). One thread per core, at most sizing.MAX_DRIVER_THREADS."""
    cores = _machine_cores()
    threads = min(cores, sizing.MAX_DRIVER_THREADS)
    if args.engine == "driver":  # check_flags refused actor flags with it
        return sizing.in_driver(cost, len(pending), threads, args.batch_size, "--engine driver"), []
    if (
        args.engine == "ray"
        or actor_flags_given(args)
        or torch.cuda.is_available()
        or not cluster_is_this_machine(args.address)
        or any(is_video_file(os.fsdecode(item["path"])) for item in pending)
    ):
        return None, []
    if sizing.driver_takes_every_job(cores):
        why = (
            f"this machine alone, {cores} cores: a driver thread for each encodes faster than Ray's "
            "encoder actors, however long the job"
        )
        return sizing.in_driver(cost, len(pending), threads, args.batch_size, why), []
    if (
        _loaded_dtype(tokenizer) != plan.dtype  # its measured rows would be in another dtype
        or not sizing.runs_in_driver(cost.seconds, len(pending), threads)  # the model alone is too much
    ):
        return None, []
    seconds, measured = _measure_items(tokenizer, plan, pending)
    left = len(pending) - len(measured)
    if seconds is None or not sizing.runs_in_driver(seconds, left, threads):
        return None, measured
    why = (
        f"{len(pending)} inputs x {seconds:.3g} CPU-s on {threads} threads: about "
        f"{left * seconds / threads:.2g} s here, where starting Ray's encoder actors (~{sizing.POOL_START_S:g} s) "
        f"would cost more than {sizing.MAX_START_SHARE:.0%} of the job"
    )
    return sizing.in_driver(cost, max(1, left), threads, args.batch_size, why), measured


def _head_start(
    args: argparse.Namespace, plan: JobPlan, size: JobSize, tokenizer: Tokenizer, pending: int
) -> int:
    """How many pending inputs the driver encodes itself while the actor pool starts (0: none).

    An actor is a fresh process: it imports torch, diffusers and Ray Data and loads the model, ~5
    CPU-seconds, so its first rows come seconds after Ray is up. The driver already holds the model
    (it measured its cost), so on CPU plans, in the dtype it loaded, it encodes one batch itself,
    and the first shard lands within a few seconds. It takes at most the share one more worker
    would have, so a small job on a cluster still runs on the cluster. ``--no-head-start`` turns it
    off (e.g. a driver on a small head node)."""
    if args.no_head_start or plan.device != "cpu" or _loaded_dtype(tokenizer) != plan.dtype:
        return 0
    return min(size.batch_size, pending // (size.workers + 1))


class _ShardWriter:
    """Encoded rows -> shards, on the driver: the first rows at once (the job shows output within
    seconds), then a shard per ``shard_rows`` rows or per FLUSH_S seconds, whichever comes first
    (a killed run loses at most that much work), and the rest at the end."""

    def __init__(self, output: Path, run_id: str, shard_rows: int) -> None:
        self.output, self.run_id, self.shard_rows = output, run_id, shard_rows
        self.pending: list[pa.Table] = []
        self.rows = 0
        self.last = time.monotonic()
        self.summaries: list[dict] = []
        self.first_shard_at: float | None = None  # time.perf_counter() when the first shard landed
        self.lock = threading.Lock()  # rows come from Ray Data and from the driver's head start

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.rows += table.num_rows
        if not self.summaries or self.rows >= self.shard_rows or time.monotonic() - self.last >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        rows = pa.concat_tables(self.pending) if self.pending else None
        self.pending, self.rows, self.last = [], 0, time.monotonic()
        for start in range(0, rows.num_rows if rows is not None else 0, self.shard_rows):
            self.summaries.append(
                write_shard(rows.slice(start, self.shard_rows), output=self.output, run_id=self.run_id)
            )
            self.first_shard_at = self.first_shard_at or time.perf_counter()


def _encode(
    pending: list[dict],
    plan: JobPlan,
    args: argparse.Namespace,
    size: JobSize,
    output: Path,
    run_id: str,
    here: EncodeWorker | None,
    head: int,
    measured: list[pa.Table],
) -> _ShardWriter:
    """Encode ``pending`` inputs -> the writer (its shards' summaries). The first ones are done
    already: ``measured``, a table per input (:func:`_measure_items`). Run in the driver, ``here``
    (the driver's model) encodes the rest in this process; else the Ray Data pipeline does, but for
    the first ``head`` of them, which ``here`` encodes in a thread while Ray Data starts its actors
    (:func:`_head_start`). Progress counts rows as they are encoded: of the pending inputs when all
    are images (one row each), else (clips) without a total."""
    total = None if any(is_video_file(os.fsdecode(item["path"])) for item in pending) else len(pending)
    writer = _ShardWriter(output, run_id, args.shard_rows)
    with Progress("batch-encode", total, "row") as progress, ThreadPoolExecutor(1) as driver:

        def take(table: pa.Table) -> None:
            with writer.lock:
                writer.add(table)
                progress.update(table.num_rows)

        for table in measured:
            take(table)
        rest = pending[len(measured) :]
        if size.engine == "driver":
            _encode_here(here, rest, size.batch_size, size.driver_threads, size.torch_threads, take)
        else:
            head_done = (
                driver.submit(_encode_here, here, rest[:head], head, 1, size.torch_threads, take)
                if head
                else None
            )
            for table in _pipeline(rest[head:], plan, size).iter_batches(
                batch_size=None, batch_format="pyarrow"
            ):
                take(table)
            if head_done is not None:
                head_done.result()  # its rows are written; an unexpected failure is raised here
        writer.flush()
    return writer


def _pipeline(inputs: list[dict], plan: JobPlan, size: JobSize):
    """The Ray Data dataset that encodes ``inputs``: decode tasks when the size has them, then the
    encoder actor pool."""
    import ray
    from ray.util.annotations import RayDeprecationWarning

    ds = ray.data.from_items(inputs, override_num_blocks=min(len(inputs), MAX_INPUT_BLOCKS))
    if size.decode_tasks:  # decoding apart, ahead of the encoders; uint8 pixels in one Arrow buffer
        ds = ds.map_batches(
            prepare_batch,
            fn_kwargs={"plan": plan},
            batch_size=size.batch_size,
            batch_format="pyarrow",
            num_cpus=size.cpus_per_decode_task,
            compute=ray.data.TaskPoolStrategy(size=size.decode_tasks),
        )
    with warnings.catch_warnings():  # Ray 2.60 sets max_restarts through ray_remote_args only
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", RayDeprecationWarning)
        return ds.map_batches(
            EncodeWorker,
            fn_constructor_args=(plan, size.torch_threads, size.decode_tasks == 0),
            batch_size=size.batch_size,
            batch_format="pyarrow",
            # two calls queued per actor: the next batch is at hand, the tail stays short
            compute=ray.data.ActorPoolStrategy(size=size.workers, max_tasks_in_flight_per_actor=2),
            num_gpus=size.gpus_per_worker,
            num_cpus=size.cpus_per_worker,
            **_restarts(),
            # Ray Data calls the encoder in a thread of the actor's: one malloc arena, as a replica's
            **model_actor_options(),
        )


def _encode_here(
    worker: EncodeWorker, items: list[dict], batch_size: int, threads: int, torch_threads: int, take
) -> None:
    """``items`` encoded on this process: ``threads`` threads, a batch each at a time (and as many
    batches queued), at ``torch_threads`` torch threads (then restored); each batch's rows go to
    ``take`` when done. An interrupt cancels the queued batches and waits for those running."""
    pool = ThreadPoolExecutor(threads, thread_name_prefix="batch-encode")
    running: set = set()
    with sizing.torch_threads(torch_threads):
        try:
            for start in range(0, len(items), batch_size):
                if len(running) >= 2 * threads:
                    done, running = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        take(future.result())
                running.add(pool.submit(worker, pa.Table.from_pylist(items[start : start + batch_size])))
            for future in as_completed(running):
                take(future.result())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _manifest(
    args: argparse.Namespace,
    argv: list[str],
    plan: JobPlan,
    inputs: list[str],
    ignored: list[dict],
    run: dict,
    after: WrittenRows,
    output: Path,
) -> dict:
    missing = [path for path in inputs if not after.complete(path)]
    return {
        "command": shlex.join(["python", "-m", "serving.batch", *argv]),  # rerun it to resume
        "process": shlex.join(sys.orig_argv),  # how this run was started (CLI, ray job, tests)
        "model": {"name": plan.model_name, "source": plan.model, "weights_hash": plan.weights_hash},
        # --tokens: vocabulary, levels, id dtype and base, layout and order of the ids column
        **({"tokens": plan.tokens} if plan.tokens is not None else {}),
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
    inputs, ignored = list_inputs(args.input)
    if args.model is None:
        args.model = default_model_for(inputs, args.tokens)
    output = _checked_output(args.output)
    previous = _previous_job(output)
    check_flags(args)
    tokenizer = load_tokenizer(args.model, device="cpu")
    plan = make_plan(args, "cpu", tokenizer)
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

    summaries, wall, size, first_row_s, head = [], 0.0, None, None, 0
    if pending:  # else nothing to do, and no Ray started for it
        cost = _model_cost(tokenizer, plan, pending)
        began = time.perf_counter()
        size, measured = _driver_size(args, plan, tokenizer, pending, cost)
        measuring = time.perf_counter() - began  # part of the job's encoding time
        rest = len(pending) - len(measured)  # inputs left to encode
        if size is None:
            size = _ray_size(args, cost, rest)
            if size.gpus_per_worker > 0:  # --dtype auto: bfloat16 on GPUs, unless the job began in another
                dtype = plan.dtype if previous is not None else resolved_dtype(args.dtype, "cuda")
                plan = replace(plan, device="cuda", dtype=dtype)
        ready = time.perf_counter() if size.engine == "ray" else began  # Ray is up, or the job began here
        print(f"batch-encode: {size.describe()}", file=sys.stderr)
        run_id = _claim(output, plan, previous)
        head = _head_start(args, plan, size, tokenizer, rest) if size.engine == "ray" else 0
        if size.engine == "driver" and _loaded_dtype(tokenizer) != plan.dtype:  # --dtype X
            tokenizer = load_tokenizer(plan.model, device="cpu", dtype=getattr(torch, plan.dtype))
        here = (
            EncodeWorker(plan, size.torch_threads, decode=True, tokenizer=tokenizer)
            if head or size.engine == "driver"
            else None
        )
        del tokenizer  # the actors load their own (``here`` holds it for the driver's share)
        started = time.perf_counter()
        writer = _encode(pending, plan, args, size, output, run_id, here, head, measured)
        wall = time.perf_counter() - started + measuring
        summaries = writer.summaries
        if writer.first_shard_at is not None:
            first_row_s = round(writer.first_shard_at - ready, 3)

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
        "first_row_s": first_row_s,  # from Ray being up (run in the driver: the job's start) to the first shard
        "head_start_inputs": head,  # encoded by the driver while the actor pool started
        "size": size.to_dict() if size is not None else None,  # what the job chose (or was told)
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
    tune_for_model_calls()  # this process may encode (a short job, the head start), as a server does
    try:
        manifest = run(args, argv)
    except TokenizerError as exc:
        return print_error(exc)
    print(summary_line(manifest))
    return EXIT_OK if manifest["complete"] or args.limit else EXIT_ERROR
