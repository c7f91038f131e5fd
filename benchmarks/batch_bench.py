"""Batch job throughput vs the best plain in-process loop over the same files and model, two cases in one run.

Cases (each on ``--items`` inputs, the photos of ../shared/data/images repeated, as in a real
dataset where start-up is amortized):

- **model-bound**: the default image model (tsvc-image-f8c4) at 256 (``--resize shorter-side``);
- **decode-bound**: a tiny model (dc-ae-f32c32-tiny) on the full-size photos, at 64 by default:
  each photo is decoded and resized at full size and the model sees 64 px, so decoding and
  resizing are most of the work, as on a fast GPU. ``--decode-resolution 0`` encodes at full
  size instead (on CPUs the tiny DC-AE then costs ~0.6 CPU-s per 0.6 MP photo: model-bound again).

Both sides do the same work per file: read, decode, resize, encode, serialize the latent file,
write it to Parquet. The loop is the simplest correct script (one file at a time, one process),
run at its best torch thread count: each count from 1 to the CPUs is timed on the first
``--calibrate`` files, twice, alternated, then the whole loop runs at the fastest. The job is ``serving.batch`` with
its defaults only (it sizes itself: serving/batch/sizing.py), as from the command line on this
machine with no Ray running: it runs in its driver (``run.size.engine``), or starts a local Ray
itself for the actor pool (``--engine ray`` asks for the pool whatever the job), whose start then
counts in its time. Both times include loading the model; ``first_row_s`` is the time from Ray
being up (the job's start, in the driver) to the job's first row on disk. ``--num-cpus N`` starts
a local Ray of N CPUs first instead, which the job joins; the loop then runs beside it too, so that
Ray's idle processes (~0.07 of a core measured here) weigh on both sides.

    .venv/bin/python benchmarks/batch_bench.py [--items 500] [--num-cpus N] [--calibrate 40]
        [--cases model-bound decode-bound] [--model tsvc-image-f8c4] [--resolution 256]
        [--decode-model dc-ae-f32c32-tiny] [--decode-resolution 64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from serving import batch
from tokenizers_svc.errors import TokenizerError
from tokenizers_svc.formats import is_media_file
from tokenizers_svc.loading import load_tokenizer
from tokenizers_svc.memory import tune_for_model_calls
from tokenizers_svc.pipeline import EncodeOptions, encode_media, load_media

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO.parent / "shared" / "data" / "images"
CALIBRATION_ROUNDS = 2  # timings per torch thread count when finding the loop's best


def repeated_photos(source: Path, items: int, folder: Path) -> list[str]:
    """``items`` files in ``folder``: the photos under ``source`` copied round-robin (distinct files,
    as a dataset has; links would be listed once)."""
    photos = sorted(p for p in source.rglob("*") if p.is_file() and is_media_file(p))
    folder.mkdir(parents=True)
    paths = []
    for i in range(items):
        photo = photos[i % len(photos)]
        target = folder / f"{i:06d}-{photo.name}"
        shutil.copyfile(photo, target)
        paths.append(str(target))
    return paths


def plain_loop(paths: list[str], model: str, options: EncodeOptions, out: Path, threads: int) -> float:
    """One file at a time in this process with ``threads`` torch threads -> seconds (model load included)."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    tokenizer = load_tokenizer(model)
    rows = []
    for path in paths:
        try:
            latents = encode_media(tokenizer, load_media(Path(path).read_bytes(), options=options), options)
            rows.append({"source_path": path, "latents": latents.to_bytes(), "error": None})
        except TokenizerError as exc:
            rows.append({"source_path": path, "latents": None, "error": f"{exc.type}: {exc.message}"})
    pq.write_table(pa.Table.from_pylist(rows), out / "loop.parquet")
    return time.perf_counter() - start


def best_loop(
    paths: list[str], model: str, options: EncodeOptions, out: Path, cpus: int, calibrate: int
) -> dict:
    """The loop at its best torch thread count: each count timed on the first ``calibrate`` files
    (after one warm-up pass), in CALIBRATION_ROUNDS alternated rounds, each count's fastest round
    kept (one round of a fast case lasts under a second, and a single noisy round had picked one
    thread where two ran ~40% faster), then every file at the fastest."""
    head = paths[:calibrate]
    plain_loop(head[:2], model, options, out, 1)  # warm-up: file cache, first-call set-up
    trials: dict[int, list[float]] = {threads: [] for threads in range(1, cpus + 1)}
    for _ in range(CALIBRATION_ROUNDS):
        for threads, times in trials.items():
            times.append(plain_loop(head, model, options, out, threads))
    threads = min(trials, key=lambda count: min(trials[count]))
    seconds = plain_loop(paths, model, options, out, threads)
    return {
        "threads": threads,
        "calibration_s": {str(k): [round(v, 2) for v in times] for k, times in trials.items()},
        "seconds": round(seconds, 2),
        "items_per_s": round(len(paths) / seconds, 3),
    }


def run_job(folder: Path, model: str, resize: list[str], out: Path, engine: str) -> dict:
    """``serving.batch`` with defaults only (but ``--engine`` when not auto), in this process: it
    joins the Ray this process runs (``--num-cpus``), else starts one itself if it runs the pool."""
    argv = ["--input", str(folder), "--output", str(out), "--model", model, *resize]
    argv += ["--engine", engine] if engine != "auto" else []
    started = time.perf_counter()
    manifest = batch.run(batch.build_parser().parse_args(argv), argv)
    seconds = time.perf_counter() - started
    rows = manifest["outputs"]["rows"]
    return {
        "seconds": round(seconds, 2),
        "rows": rows,
        "errors": manifest["outputs"]["error_rows"],
        "items_per_s": round(rows / seconds, 3),
        "first_row_s": manifest["run"]["first_row_s"],
        "engine": manifest["run"]["size"]["engine"],
        "size": manifest["run"]["size"],
    }


def run_case(name: str, model: str, resolution: int, args: argparse.Namespace, tmp: Path) -> dict:
    folder = tmp / f"{name}-inputs"
    paths = repeated_photos(Path(args.photos), args.items, folder)
    if resolution:
        options = EncodeOptions(resize="shorter-side", resolution=resolution)
        resize = ["--resize", "shorter-side", "--resolution", str(resolution)]
    else:
        options, resize = EncodeOptions(), []
    load = [round(os.getloadavg()[0], 2)]
    ray_init_s = None
    if args.num_cpus is not None:  # a Ray of that size up for both sides, the job joins it
        started = time.perf_counter()
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        ray_init_s = round(time.perf_counter() - started, 2)
    try:
        loop = best_loop(
            paths, model, options, tmp, args.num_cpus or len(os.sched_getaffinity(0)), args.calibrate
        )
        job = run_job(folder, model, resize, tmp / f"{name}-job", args.engine)
    finally:
        ray.shutdown()  # the bench's Ray, or the one the job started: the next case starts clean
    job["ray_init_s"] = ray_init_s  # None: no Ray started ahead (the job's own start is in its time)
    load.append(round(os.getloadavg()[0], 2))
    shutil.rmtree(folder)
    result = {
        "case": name,
        "model": model,
        "resolution": resolution or "full size",
        "items": len(paths),
        "loop": loop,
        "job": job,
        "ratio_job_over_best_loop": round(job["items_per_s"] / loop["items_per_s"], 3),
        "load_average_1min": load,  # before, after: the box is shared
    }
    print(
        f"{name}: job ({job['engine']}) {job['items_per_s']} items/s (first row {job['first_row_s']} s after "
        f"{'Ray was up' if job['engine'] == 'ray' else 'the job began'}) vs "
        f"loop {loop['items_per_s']} items/s at {loop['threads']} threads -> {result['ratio_job_over_best_loop']}x",
        flush=True,
    )
    return result


def main() -> None:
    # The plain loop calls the model in this main thread: without this, glibc hands each call's freed
    # activations back and the next call faults them in again (10-20% slower than in a thread). The
    # job's processes allocate images as the loop's does (tokenizers_svc.memory).
    tune_for_model_calls()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", default=str(PHOTOS), help="folder of photos, repeated to --items")
    p.add_argument("--items", type=int, default=500)
    p.add_argument(
        "--num-cpus",
        type=int,
        default=None,
        help="start a local Ray of N CPUs before each case, for both sides (default: none; the job starts its own if it needs one)",
    )
    p.add_argument(
        "--calibrate", type=int, default=40, help="files per thread count when finding the loop's best"
    )
    p.add_argument(
        "--cases", nargs="+", choices=("model-bound", "decode-bound"), default=["model-bound", "decode-bound"]
    )
    p.add_argument(
        "--engine",
        choices=("auto", "ray", "driver"),
        default="auto",
        help="the job's --engine (auto: its default, which runs short jobs in the driver)",
    )
    p.add_argument("--model", default="tsvc-image-f8c4")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--decode-model", default="dc-ae-f32c32-tiny")
    p.add_argument("--decode-resolution", type=int, default=64, help="0: encode at full size")
    args = p.parse_args()
    cases = {
        "model-bound": (args.model, args.resolution),
        "decode-bound": (args.decode_model, args.decode_resolution),
    }
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_case(name, *cases[name], args, Path(tmp)) for name in args.cases]
    print(json.dumps({"num_cpus": args.num_cpus, "cases": results}, indent=2))


if __name__ == "__main__":
    main()
