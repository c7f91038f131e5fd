"""Reconstruction evaluation of one or more tokenizers on the same inputs.

    python -m evals.reconstruct --model sd-vae-tiny --model DIR --data DIR --resolution 256 \
        --crop center --max-items 1000 --out REPORT_DIR [--inception PATH] [--i3d PATH] [--device cpu]

Every model sees exactly the same uint8 inputs (files in sorted order, deterministic crops). The report
directory gets report.json, report.md, items.csv and samples.png (see evals/report.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from evals import fid, image_metrics, multiscale, report, video_metrics
from evals.crops import SQUARE_CROPS, bicubic_round_trip, bicubic_size, list_media, square_crops
from tokenizers_svc import load_tokenizer
from tokenizers_svc.api import Tokenizer
from tokenizers_svc.defaults import default_model
from tokenizers_svc.errors import InvalidRequestError, TokenizerError, print_error
from tokenizers_svc.media import read_image, read_video
from tokenizers_svc.registry import weights_home

CROPS = (*SQUARE_CROPS, "multiscale")


@dataclass
class Dataset:
    """The evaluation inputs: uint8 (N, 3, R, R) images or (N, 3, T, R, R) clips, with item names."""

    pixels: torch.Tensor
    names: list[str]
    files: list[Path]
    kind: str  # "image" | "video"
    scales: list[int] | None = None  # --crop multiscale: each item's shorter-side scale

    def frames(self, pixels: torch.Tensor | None = None) -> torch.Tensor:
        """``pixels`` (default: the inputs) as uint8 (M, 3, R, R) images; clips become their frames."""
        pixels = self.pixels if pixels is None else pixels
        return pixels if self.kind == "image" else video_metrics.frames(pixels)


def load_dataset(
    data: Path,
    resolution: int,
    crop: str,
    max_items: int | None,
    frames: int = 17,
    scales: tuple[int, ...] = multiscale.DEFAULT_SCALES,
) -> Dataset:
    """Images under ``data`` if there are any, else videos (first ``frames`` frames of each clip).
    ``crop="multiscale"`` cuts each image at every shorter-side scale in ``scales`` (see evals/multiscale.py)."""
    kind = "image" if list_media(data, "image") else "video"
    files = list_media(data, kind)
    if not files:
        raise InvalidRequestError(f"no images or videos found under {data}", param="data")
    if crop == "multiscale" and kind == "video":
        raise InvalidRequestError("--crop multiscale is defined for images only", param="crop")
    if crop == "multiscale" and min(scales) < resolution:
        raise InvalidRequestError(
            f"every --scales value must be >= --resolution {resolution}, got {list(scales)}", param="scales"
        )
    items, names, used, item_scales = [], [], [], []
    for path in files:
        if kind == "image":
            pixels = torch.from_numpy(read_image(path)).permute(2, 0, 1)  # (3, H, W) uint8
        else:
            clip = read_video(path, max_frames=frames).frames  # (T, H, W, 3) uint8
            if clip.shape[0] < frames:
                continue  # shorter clips would make the batch ragged
            pixels = torch.from_numpy(clip).permute(3, 0, 1, 2)  # (3, T, H, W) uint8
        used.append(path)
        if crop == "multiscale":
            cut = multiscale.multiscale_crops(pixels, scales, resolution)
        else:
            cut = [(None, suffix, tile) for suffix, tile in square_crops(pixels, resolution, crop)]
        for scale, suffix, crop_pixels in cut:
            items.append(crop_pixels.contiguous())
            names.append(str(path.relative_to(data)) + suffix)
            item_scales.append(scale)
            if max_items and len(items) >= max_items:
                break
        if max_items and len(items) >= max_items:
            break
    if not items:
        raise InvalidRequestError(f"no usable {kind}s under {data} at resolution {resolution}", param="data")
    return Dataset(torch.stack(items), names, used, kind, item_scales if crop == "multiscale" else None)


class PeakMemory:
    """Peak memory of a block: CUDA ``max_memory_allocated`` on GPU; on CPU the peak resident-set growth
    above the block's start, sampled from /proc/self/statm every 2 ms (torch's CPU allocations are
    invisible to tracemalloc, so RSS is the honest measure there)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = (
            "cuda max_memory_allocated"
            if device.type == "cuda"
            else "cpu peak RSS delta (sampled /proc/self/statm, 2 ms)"
        )
        self.peak_bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = _rss_bytes()
        self._peak = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self._peak, _rss_bytes()) - self._base


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class Reconstruction:
    """One model's (or baseline's) output on the dataset, with what the report needs about it."""

    name: str
    pixels: torch.Tensor  # uint8, same shape as Dataset.pixels
    floats_per_item: int
    info: dict = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reconstruct(tokenizer: Tokenizer, data: Dataset, batch_size: int) -> Reconstruction:
    """Encode/decode every item in batches; times each phase separately (after one warm-up batch)."""
    device = tokenizer.backend.device
    per_frame = data.kind == "video" and tokenizer.spec.modality == "image"

    def as_input(x: torch.Tensor) -> torch.Tensor:  # image models see clips as independent frames
        return video_metrics.frames(x) if per_frame else x

    warm = as_input(data.pixels[:1])
    tokenizer.decode(tokenizer.encode(warm), output_dtype=torch.uint8)
    latents, outputs = [], []
    encode_s = decode_s = 0.0
    with PeakMemory(device) as encode_mem:
        for start in range(0, len(data.pixels), batch_size):
            _sync(device)
            t0 = time.perf_counter()
            latents.append(tokenizer.encode(as_input(data.pixels[start : start + batch_size])))
            _sync(device)
            encode_s += time.perf_counter() - t0
    with PeakMemory(device) as decode_mem:
        for lat in latents:
            _sync(device)
            t0 = time.perf_counter()
            outputs.append(tokenizer.decode(lat, output_dtype=torch.uint8))  # round half up to uint8
            _sync(device)
            decode_s += time.perf_counter() - t0
    pixels = torch.cat(outputs)
    if per_frame:
        n, c, t, h, w = data.pixels.shape
        pixels = pixels.reshape(n, t, c, h, w).transpose(1, 2)
    n = len(data.pixels)
    first = latents[0].latents
    floats = first[0].numel() * (data.pixels.shape[2] if per_frame else 1)
    return Reconstruction(
        name=tokenizer.name,
        pixels=pixels.contiguous(),
        floats_per_item=floats,
        info={
            "source": tokenizer.source,
            "weights_hash": tokenizer.weights_hash,
            "spec": tokenizer.spec.to_dict(),
            "latent_shape_per_item": list(first.shape[1:]),
            "frames_encoded_independently": per_frame,
            "throughput": {
                "device": str(device),
                "batch_size": batch_size,
                "encode_items_per_s": n / encode_s,
                "decode_items_per_s": n / decode_s,
                "encode_peak_memory_mb": encode_mem.peak_bytes / 2**20,
                "decode_peak_memory_mb": decode_mem.peak_bytes / 2**20,
                "memory_method": encode_mem.method,
            },
        },
    )


def bicubic_baseline(data: Dataset, floats_per_item: int) -> Reconstruction:
    """Bicubic down- then up-sampling (antialiased) keeping ``floats_per_item`` values per item, like a latent
    of that size (clips: the same share of floats per frame)."""
    frames_per_item = 1 if data.kind == "image" else data.pixels.shape[2]
    h, w = data.pixels.shape[-2:]
    size, factor = bicubic_size(h, w, floats_per_item / frames_per_item)
    out = bicubic_round_trip(data.frames(), floats_per_item / frames_per_item)
    if data.kind == "video":
        n, c, t = data.pixels.shape[:3]
        out = out.reshape(n, t, c, h, w).transpose(1, 2).contiguous()
    return Reconstruction(
        name=f"bicubic-x{factor:.2f}",
        pixels=out,
        floats_per_item=3 * size[0] * size[1] * frames_per_item,
        info={
            "downsampled_size": list(size),
            "side_factor": factor,
            "target_floats_per_item": floats_per_item,
        },
    )


@dataclass
class Evaluator:
    """Metrics shared by every reconstruction of one dataset (reference features are computed once)."""

    data: Dataset
    inception: fid.Inception
    lpips: image_metrics.Lpips
    reference_features: np.ndarray
    i3d: video_metrics.I3D | None = None
    reference_i3d: np.ndarray | None = None

    @cached_property
    def reference_stats(self) -> fid.FeatureStats:
        return fid.FeatureStats.from_features(self.reference_features)  # its sqrt factor is reused too

    def score(self, rec: Reconstruction) -> tuple[dict, dict]:
        """-> (aggregate metrics, per-item columns)."""
        a, b = self.data.pixels, rec.pixels
        per_item: dict[str, np.ndarray] = {}
        if self.data.kind == "image":
            per_item["psnr"] = image_metrics.psnr(a, b)
            per_item["ssim"] = image_metrics.ssim(a, b)
        else:
            per_item["psnr"] = video_metrics.per_frame_psnr(a, b)
            per_item["ssim"] = video_metrics.per_frame_ssim(a, b)
            per_item["temporal_diff_psnr"] = video_metrics.temporal_difference_psnr(a, b)
        if self.lpips.available:
            per_item["lpips"] = (
                self.lpips(self.data.frames(a), self.data.frames(b)).reshape(len(a), -1).mean(1)
            )
        feats = self.inception.features(self.data.frames(b))
        metrics = {key: float(np.mean(value)) for key, value in per_item.items()}
        metrics["psnr_ci95"] = multiscale.mean_ci(per_item["psnr"])[1]
        metrics["rfid"] = fid.frechet_distance(self.reference_stats, fid.FeatureStats.from_features(feats))
        metrics["kid"], metrics["kid_std"] = fid.kernel_inception_distance(self.reference_features, feats)
        metrics["fid_n"] = int(feats.shape[0])
        if self.i3d is not None:
            fake = self.i3d.features(b)
            metrics["rfvd"] = fid.frechet_distance(
                fid.FeatureStats.from_features(self.reference_i3d), fid.FeatureStats.from_features(fake)
            )
        return metrics, per_item


def reference_features(
    data: Dataset, inception: fid.Inception, cache_dir: Path, protocol: dict
) -> np.ndarray:
    """Inception features of the originals, cached as .npz keyed by the inputs' bytes and the protocol."""
    key = {
        **protocol,
        "inception_sha1": inception.sha1,
        "pixels_sha256": report.sha256_tensor(data.pixels),
        "names": data.names,
    }
    feats, _ = fid.cached_features(cache_dir, key, lambda: inception.features(data.frames()))
    return feats


def parse_scales(text: str) -> tuple[int, ...]:
    """ "256,384" -> (256, 384)."""
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
    parser.add_argument("--data", type=Path, required=True, help="directory of images (or videos)")
    parser.add_argument("--resolution", type=int, default=256, help="items are R x R crops")
    parser.add_argument("--crop", choices=CROPS, default="center")
    parser.add_argument(
        "--scales",
        type=parse_scales,
        default=multiscale.DEFAULT_SCALES,
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
    return parser


def run(args: argparse.Namespace) -> dict:
    """Evaluate every model and the matching bicubic baselines; write the report; return report.json's dict."""
    if args.resolution < 16:
        raise InvalidRequestError(f"--resolution must be >= 16, got {args.resolution}", param="resolution")
    device = torch.device(args.device)
    data = load_dataset(args.data, args.resolution, args.crop, args.max_items, args.frames, args.scales)
    if len(data.frames()) < 2:
        raise InvalidRequestError(
            f"FID/KID need at least 2 images (or frames), got {len(data.frames())} from {args.data}",
            param="data",
        )
    if args.i3d is not None and data.kind != "video":
        raise InvalidRequestError("--i3d (rFVD) needs video data", param="i3d")
    models = args.model or [default_model(data.kind)]
    inception = fid.load_inception(args.inception, device)
    protocol = {
        "resolution": args.resolution,
        "crop": args.crop,
        "max_items": args.max_items,
        "frames": args.frames if data.kind == "video" else None,
        "kind": data.kind,
        "fid": fid.PROTOCOL,
    }
    if args.crop == "multiscale":
        protocol["multiscale"] = {"scales": list(args.scales), "min_std": multiscale.MIN_STD}
    cache_dir = args.cache_dir or weights_home().parent / "fid-stats"
    evaluator = Evaluator(
        data=data,
        inception=inception,
        lpips=image_metrics.Lpips.load(),
        reference_features=reference_features(data, inception, cache_dir, protocol),
    )
    if args.i3d is not None:
        evaluator.i3d = video_metrics.I3D.load(args.i3d, device)
        evaluator.reference_i3d = evaluator.i3d.features(data.pixels)
    results, baselines = [], {}
    for name in models:
        tokenizer = load_tokenizer(name, device=device)
        rec = reconstruct(tokenizer, data, args.batch_size)
        metrics, per_item = evaluator.score(rec)
        results.append((rec, metrics, per_item))
        if rec.floats_per_item not in baselines:
            base = bicubic_baseline(data, rec.floats_per_item)
            base_metrics, base_items = evaluator.score(base)
            baselines[rec.floats_per_item] = (base, base_metrics, base_items)
        if data.scales is not None:  # paired per-crop comparison with bicubic at this model's float budget
            base_items = baselines[rec.floats_per_item][2]
            rec.info["vs_bicubic"] = multiscale.psnr_comparison(
                per_item["psnr"], base_items["psnr"], data.scales
            )
        del tokenizer
    return report.write_report(
        args.out,
        data=data,
        protocol=protocol,
        inception=inception,
        lpips=evaluator.lpips,
        i3d=evaluator.i3d,
        models=results,
        baselines=list(baselines.values()),
        samples=args.samples,
    )


def main(argv: list[str] | None = None) -> int:
    """CLI entry (also ``tokenizers-svc eval``): 0 on success, 1 on a typed error, 2 on bad usage."""
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except TokenizerError as exc:
        return print_error(exc)
    print((args.out / "report.md").read_text())
    print(f"wrote {args.out} ({result['n']} items)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
