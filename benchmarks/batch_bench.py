"""Batch job throughput vs a plain in-process loop over the same files and model, in one run.

Both sides do the same work per file: read, decode, resize (shorter side), encode, serialize the
latent file and write it to Parquet. The loop is the simplest correct script (one file at a time,
one process, all torch threads); the job is ``serving.batch`` on a local Ray (decode in CPU tasks,
``--workers`` encoder actors). Both times include loading the model; Ray's own start-up is
reported separately. Prints items/s for each and the ratio job/loop.

    .venv/bin/python benchmarks/batch_bench.py [--input ../shared/data/images] [--resolution 128]
        [--workers 1] [--batch-size 8] [--num-cpus 2] [--model sd-vae-tiny] [--loop-threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from serving import batch
from tokenizers_svc.errors import TokenizerError
from tokenizers_svc.loading import load_tokenizer
from tokenizers_svc.pipeline import EncodeOptions, encode_media, load_media

REPO = Path(__file__).resolve().parents[1]


def plain_loop(paths: list[str], model: str, options: EncodeOptions, out: Path) -> tuple[float, int]:
    """One file at a time in this process -> (seconds, rows)."""
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
    return time.perf_counter() - start, len(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", default=str(REPO.parent / "shared" / "data" / "images"))
    p.add_argument("--model", default="sd-vae-tiny")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument(
        "--loop-threads", type=int, default=None, help="torch threads for the loop (default: torch's)"
    )
    args = p.parse_args()
    if args.loop_threads:
        torch.set_num_threads(args.loop_threads)
    load_before = os.getloadavg()[0]

    paths, _ = batch.list_inputs(args.input)
    options = EncodeOptions(resize="shorter-side", resolution=args.resolution)
    with tempfile.TemporaryDirectory() as tmp:
        loop_s, loop_rows = plain_loop(paths, args.model, options, Path(tmp))

        t0 = time.perf_counter()
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        ray_init_s = time.perf_counter() - t0
        argv = [
            "--input", args.input, "--output", str(Path(tmp) / "job"), "--model", args.model,
            "--resize", "shorter-side", "--resolution", str(args.resolution),
            "--workers", str(args.workers), "--batch-size", str(args.batch_size),
        ]  # fmt: skip
        t0 = time.perf_counter()
        manifest = batch.run(batch.build_parser().parse_args(argv), argv)
        job_s = time.perf_counter() - t0
        ray.shutdown()

    job_rows = manifest["outputs"]["rows"]
    result = {
        "files": len(paths),
        "model": args.model,
        "resolution": args.resolution,
        "workers": args.workers,
        "batch_size": args.batch_size,
        "num_cpus": args.num_cpus,
        "loop_torch_threads": torch.get_num_threads(),
        "job_torch_threads_per_actor": 1,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after
        "loop": {"seconds": round(loop_s, 2), "rows": loop_rows, "items_per_s": round(loop_rows / loop_s, 2)},
        "job": {
            "seconds": round(job_s, 2),
            "rows": job_rows,
            "errors": manifest["outputs"]["error_rows"],
            "items_per_s": round(job_rows / job_s, 2),
            "bytes_written": manifest["run"]["bytes_written"],
            "ray_init_s": round(ray_init_s, 2),
        },
    }
    result["ratio_job_over_loop"] = round(result["job"]["items_per_s"] / result["loop"]["items_per_s"], 2)
    print(json.dumps(result, indent=2))
    print(
        f"job {result['job']['items_per_s']} items/s vs loop {result['loop']['items_per_s']} items/s "
        f"-> ratio {result['ratio_job_over_loop']}"
    )


if __name__ == "__main__":
    main()
