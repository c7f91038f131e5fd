"""Reconstruction evaluation of one or more tokenizers on the same inputs, streamed with bounded memory.

    python -m evals.reconstruct --model sd-vae-tiny --model DIR --data DIR|'shards/*.tar'|paths.parquet \
        --resolution 256 --crop center|grid|multiscale --out REPORT_DIR [--device cuda] [--workers 8] \
        [--ray [--ray-actors N]] [--resume]

Every model sees exactly the same uint8 inputs (entries in sorted order, deterministic crops). Items are
read, reconstructed, scored and dropped in batches (evals/streaming.py); the report directory gets
report.json, report.md, items.csv (written as shards finish) and samples.png (see evals/report.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from evals import fid, image_metrics, multiscale, report, sources, stats, streaming
from evals.accumulator import REFERENCE, Accumulator, EvalConfig
from evals.checkpoint import CHECKPOINT
from evals.scorer import PeakMemory
from tokenizers_svc.crops import DEFAULT_SCALES, MIN_STD, SQUARE_CROPS
from tokenizers_svc.defaults import default_model
from tokenizers_svc.errors import InvalidRequestError, TokenizerError, print_error
from tokenizers_svc.metrics import codebook_health
from tokenizers_svc.registry import weights_home

CROPS = (*SQUARE_CROPS, "multiscale")
log = logging.getLogger(__name__)
DEFAULT_SHARD_SIZE = 1000  # entries per shard: the unit of resume, Ray work and checkpoints


def parse_scales(text: str) -> tuple[int, ...]:
    """Parse "256,384" into (256, 384)."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--scales takes comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evals.reconstruct", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help="preset name or model directory; repeat (default: the shipped tokenizer for the data's kind)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="directory of images (class folders welcome) or videos, a WebDataset tar glob, or a Parquet of paths",
    )
    parser.add_argument("--resolution", type=int, default=256, help="items are R x R crops")
    parser.add_argument("--crop", choices=CROPS, default="center")
    parser.add_argument(
        "--scales",
        type=parse_scales,
        default=DEFAULT_SCALES,
        help="--crop multiscale: shorter-side sizes, comma-separated (default 256,384,512,768)",
    )
    parser.add_argument("--max-items", type=int, default=None)
    parser.add_argument("--frames", type=int, default=17, help="frames per clip for video data")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True, help="report directory")
    parser.add_argument(
        "--inception", type=Path, default=None, help="another compatible Inception TorchScript"
    )
    parser.add_argument("--i3d", type=Path, default=None, help="I3D TorchScript for rFVD (video data)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", type=Path, default=None, help="reference statistics cache")
    parser.add_argument("--samples", type=int, default=4, help="items shown in samples.png")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (decode + crop)")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="entries per shard")
    parser.add_argument(
        "--kid-items", type=int, default=stats.KID_CAPACITY, help="items kept (float32 features) for KID"
    )
    parser.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    parser.add_argument(
        "--ray", action="store_true", help="score shards with Ray actors (RAY_ADDRESS: cluster)"
    )
    parser.add_argument("--ray-actors", type=int, default=2, help="--ray: number of actors")
    return parser


def run(args: argparse.Namespace) -> dict:
    """Evaluate every model and the matching bicubic baselines; write the report; return report.json's dict."""
    started = time.perf_counter()
    kind, spec, entries = _inputs(args)
    models = args.model or [default_model(kind)]
    # loading the networks takes tens of seconds on a CPU: say so before the first item is scored
    log.info("eval: %d %s entries from %s; loading Inception", len(entries), kind, args.data)
    inception = fid.load_inception(args.inception, "cpu")  # identity and checks; scorers load their own
    protocol = _protocol(args, kind)
    data_sha256 = sources.content_hash(entries)
    reference_key = {**protocol, "inception_sha1": inception.sha1, "data_sha256": data_sha256}
    cache_path = (
        args.cache_dir or weights_home().parent / "fid-stats"
    ) / f"ref-{fid.stats_cache_key(reference_key)}.npz"
    reference = load_reference(cache_path, args.kid_items)
    config = _eval_config(args, models, spec)
    run_key = fid.stats_cache_key({**reference_key, "models": models, "shard_size": args.shard_size})
    shards = sources.make_shards(entries, args.shard_size)
    log.info("eval: loading %s and the metrics' networks, then scoring", ", ".join(models))
    totals, columns = streaming.evaluate(
        config,
        shards,
        args.out,
        run_key,
        reference,
        resume=args.resume,
        workers=args.workers,
        ray_actors=args.ray_actors if args.ray else None,
        entries_per_chunk=args.batch_size if (args.crop == "center" or kind == "video") else 1,
    )
    if reference is None:
        save_reference(cache_path, totals.streams[REFERENCE], reference_key)
    result = summarize(totals, protocol, inception, config, columns)
    result["data"] = {
        "source": str(args.data),
        "entries": len(entries),
        "sha256": data_sha256,
        "skipped": skipped_summary(totals.skipped),
    }
    if totals.skipped:
        log.warning("eval: skipped %d unreadable entries (see report.json data.skipped)", len(totals.skipped))
    result["run"] = _run_summary(args, len(shards), result["n"], time.perf_counter() - started)
    model_names = [row["name"] for row in result["results"] if row["kind"] == "model"]
    report.write_report(args.out, result, totals.samples, model_names)
    (args.out / CHECKPOINT).unlink(missing_ok=True)  # finished: nothing left to resume
    return result


def _inputs(args: argparse.Namespace) -> tuple[str, sources.CropSpec, list[sources.Entry]]:
    """The data's kind, how its entries become items, and the entries (cut to --max-items), after
    checking the options against the data."""
    if args.resolution < 16:
        raise InvalidRequestError(f"--resolution must be >= 16, got {args.resolution}", param="resolution")
    kind, entries = sources.list_entries(args.data)
    spec = sources.CropSpec(kind, args.crop, args.resolution, tuple(args.scales), args.frames)
    if args.crop == "multiscale" and kind == "video":
        raise InvalidRequestError("--crop multiscale is defined for images only", param="crop")
    if args.crop == "multiscale" and min(args.scales) < args.resolution:
        raise InvalidRequestError(
            f"every --scales value must be >= --resolution {args.resolution}, got {list(args.scales)}",
            param="scales",
        )
    if args.i3d is not None and kind != "video":
        raise InvalidRequestError("--i3d (rFVD) needs video data", param="i3d")
    return kind, spec, sources.limit_entries(entries, spec, args.max_items)


def _protocol(args: argparse.Namespace, kind: str) -> dict:
    """What makes two runs' numbers comparable (part of the reference statistics' cache key)."""
    protocol = {
        "resolution": args.resolution,
        "crop": args.crop,
        "max_items": args.max_items,
        "frames": args.frames if kind == "video" else None,
        "kind": kind,
        "fid": fid.PROTOCOL,
    }
    if args.crop == "multiscale":
        protocol["multiscale"] = {"scales": list(args.scales), "min_std": MIN_STD}
    return protocol


def _eval_config(args: argparse.Namespace, models: list[str], spec: sources.CropSpec) -> EvalConfig:
    return EvalConfig(
        models=models,
        spec=spec,
        device=args.device,
        inception=None if args.inception is None else str(args.inception),
        i3d=None if args.i3d is None else str(args.i3d),
        batch_size=args.batch_size,
        kid_capacity=args.kid_items,
        samples=args.samples,
    )


def _run_summary(args: argparse.Namespace, shards: int, items: int, wall: float) -> dict:
    return {
        "shards": shards,
        "shard_size": args.shard_size,
        "workers": args.workers,
        "ray_actors": args.ray_actors if args.ray else None,
        "wall_s": wall,
        "items_per_s": items / wall,
    }


def skipped_summary(skipped: dict[str, dict], listed: int = 100) -> dict:
    """Entries the stream could not read: their count, counts by error type, the first ``listed`` by name."""
    by_type: dict[str, int] = {}
    for error in skipped.values():
        by_type[error["type"]] = by_type.get(error["type"], 0) + 1
    names = sorted(skipped)[:listed]
    return {"count": len(skipped), "by_type": by_type, "entries": {name: skipped[name] for name in names}}


def load_reference(path: Path, kid_capacity: int) -> stats.StreamStats | None:
    """Cached statistics of the originals (keyed by protocol, Inception and the data's content hash)."""
    if not path.is_file():
        return None
    with np.load(path) as saved:
        return stats.StreamStats.from_state(dict(saved), "reference", "cpu", kid_capacity)


def save_reference(path: Path, reference: stats.StreamStats, key: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, key=np.array(json.dumps(key)), **reference.state("reference"))


def summarize(totals: Accumulator, protocol: dict, inception, config, columns: list[str]) -> dict:
    """Statistics of every stream -> report.json's dict (metrics, throughput, per-scale comparison)."""
    reference = totals.streams.get(REFERENCE)
    if reference is None or reference.inception.n < 2:
        count = 0 if reference is None else reference.inception.n
        raise InvalidRequestError(f"FID/KID need at least 2 images (or frames), got {count}", param="data")
    reference_stats = reference.inception.feature_stats()
    reference_kid = reference.kid.sorted_features()
    rows = []
    by_kind = sorted(totals.info.items(), key=lambda item: item[1]["kind"] != "model")  # models, baselines
    for name, info in by_kind:
        stream = totals.streams[name]
        metrics = {column: stream.metrics.mean_ci(column)[1] for column in columns}
        metrics["psnr_ci95"] = stream.metrics.mean_ci("psnr")[2]
        metrics["rfid"] = fid.frechet_distance(reference_stats, stream.inception.feature_stats())
        metrics["kid"], metrics["kid_std"] = fid.kernel_inception_distance(
            reference_kid, stream.kid.sorted_features()
        )
        metrics["fid_n"] = stream.inception.n
        if reference.i3d is not None:
            metrics["rfvd"] = fid.frechet_distance(reference.i3d.feature_stats(), stream.i3d.feature_stats())
        for extra in ("webp_bytes", "webp_quality", "webp_over_budget"):
            if stream.metrics.groups(extra):
                metrics[extra] = stream.metrics.mean_ci(extra)[1]
        if name in totals.token_counts:  # codebook health on the eval set
            metrics |= codebook_health(torch.from_numpy(totals.token_counts[name]))
        row = {"name": name, **info, "metrics": metrics}
        if info["kind"] == "model":
            timing = totals.timing[name]
            row["throughput"] = {
                "device": config.device,
                "batch_size": config.batch_size,
                "encode_items_per_s": timing["items"] / timing["encode_s"],
                "decode_items_per_s": timing["items"] / timing["decode_s"],
                "encode_peak_memory_mb": timing["encode_peak_bytes"] / 2**20,
                "decode_peak_memory_mb": timing["decode_peak_bytes"] / 2**20,
                "memory_method": PeakMemory(torch.device(config.device)).method,
            }
            if protocol["crop"] == "multiscale":
                row["vs_bicubic"] = multiscale.comparison_from_sums(
                    stream.metrics, totals.streams[info["baseline"]].metrics
                )
        rows.append(row)
    n = totals.streams[rows[0]["name"]].metrics.mean_ci("psnr")[0]
    pixel_floats = int(np.prod(totals.item_shape))
    for row in rows:
        row["compression_ratio"] = pixel_floats / row["floats_per_item"]
    return {
        "n": n,
        "fid_n": reference.inception.n,
        "sample_size_label": fid.sample_size_label(reference.inception.n),
        "kind": protocol["kind"],
        "item_shape": totals.item_shape,
        "protocol": {
            **protocol,
            "inception": {
                "path": str(inception.path),
                "sha1": inception.sha1,
                "standard": inception.standard,
            },
            "kid": (
                "unbiased MMD^2, polynomial kernel (x.y/d + 1)^3, 100 subsets of min(1000, N), over the "
                f"{config.kid_capacity} items with the smallest name hash (all items when N is smaller)"
            ),
            "psnr": "per-item mean, uint8, peak 255 (video: per-frame mean); float32 on the device",
            "ssim": "Gaussian window 11, sigma 1.5, data range 255, per-channel mean (RGB); float32",
            "lpips": image_metrics.Lpips.load().reason,
            "i3d": None
            if config.i3d is None
            else {"path": config.i3d, "sha1": fid.sha1_file(Path(config.i3d))},
            "reconstruction_quantization": "round half up to uint8",
            "fid_statistics": "streamed float64 count, sum, sum of outer products",
        },
        "versions": report.versions(),
        "results": rows,
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry (also ``tokenizers-svc eval``): 0 on success, 1 on a typed error, 2 on bad usage."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = run(args)
    except TokenizerError as exc:
        return print_error(exc)
    print((args.out / "report.md").read_text())
    print(f"wrote {args.out} ({result['n']} items)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
