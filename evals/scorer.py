"""Scoring one process's batches: every model reconstructs them (timed, its peak memory measured), the
baselines at each model's budget (bicubic at equal floats; for discrete models the classical codecs at
equal bits), the metrics, and the Inception (and I3D) features; everything lands in an
:class:`~evals.accumulator.Accumulator` and items.csv rows.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from evals import classical, fid, image_metrics, stats, video_metrics
from evals.accumulator import REFERENCE, Accumulator, EvalConfig
from tokenizers_svc import load_tokenizer
from tokenizers_svc.crops import bicubic_round_trip, bicubic_size
from tokenizers_svc.memory import PeakRss
from tokenizers_svc.metrics import id_counts


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of a block: CUDA ``max_memory_allocated`` on GPU; on CPU the peak resident-set growth
    above the block's start (:class:`tokenizers_svc.memory.PeakRss`, sampled every 2 ms)."""

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
        self._rss = PeakRss(interval_s=0.002).__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._rss.__exit__(*exc)
        self.peak_bytes = self._rss.growth


class Scorer:
    """Models, baselines, metrics and feature networks of one process, applied batch by batch."""

    def __init__(self, config: EvalConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.video = config.spec.kind == "video"
        self.tokenizers = [load_tokenizer(name, device=self.device) for name in config.models]
        self.inception = fid.load_inception(config.inception, self.device)
        self.lpips = image_metrics.Lpips.load()
        self.i3d = None if config.i3d is None else video_metrics.I3D.load(config.i3d, self.device)
        self.warm: set[str] = set()

    def columns(self) -> list[str]:
        """items.csv metric columns (sorted)."""
        names = ["psnr", "ssim"] + ["lpips"] * self.lpips.available + ["temporal_diff_psnr"] * self.video
        return sorted(names)

    def new_accumulator(self) -> Accumulator:
        return Accumulator(self.config, self.device)

    def frames(self, pixels: torch.Tensor) -> torch.Tensor:
        return video_metrics.frames(pixels) if self.video else pixels

    @torch.no_grad()
    def score(
        self, chunk: dict, acc: Accumulator, with_reference: bool, first_position: int = 0
    ) -> list[list[str]]:
        """Score one batch (a chunk's slice) into ``acc``; -> items.csv rows [item, stream, *columns]."""
        names, scales = chunk["names"], chunk["scales"]
        x = chunk["pixels"].to(self.device)  # uint8 (B, 3, R, R) or (B, 3, T, R, R)
        acc.item_shape = list(x.shape[1:])
        acc.frames_per_item = x.shape[2] if self.video else 1
        keys = stats.name_keys(names)
        groups = [str(s) for s in scales] if scales[0] is not None else ["all"] * len(names)
        if with_reference:
            self._add_features(acc.stream(REFERENCE), x, keys)
        rows: list[list[str]] = []
        outputs: dict[str, torch.Tensor] = {}
        baselines: dict = {}  # floats per item -> baseline stream; bits per item -> (thumbnail, codecs)
        baseline_psnr: dict[str, np.ndarray] = {}
        for tokenizer in self.tokenizers:
            rec, floats, info = self._reconstruct(tokenizer, x, acc)
            acc.info[tokenizer.name] = {"kind": "model", "floats_per_item": floats, **info}
            model_psnr = self._score_stream(acc, tokenizer.name, x, rec, keys, groups, names, rows)
            outputs[tokenizer.name] = rec
            if "bits_per_item" in info:  # discrete: classical codecs at the same number of bits
                bits = info["bits_per_item"]
                if bits not in baselines:
                    baselines[bits] = self._bit_baselines(acc, x, bits, outputs, (keys, groups, names, rows))
                    baseline_psnr.update(baselines[bits][1])
                thumbnail, scored = baselines[bits]
                acc.info[tokenizer.name] |= {"baseline": thumbnail, "codecs": list(scored)}
                gain = model_psnr - baseline_psnr[thumbnail]  # paired per item
                acc.streams[tokenizer.name].metrics.add("gain_db", gain, groups)
                continue
            if floats not in baselines:
                frames_per_item = acc.frames_per_item
                size, factor = bicubic_size(*x.shape[-2:], floats / frames_per_item)
                name = f"bicubic-x{factor:.2f}"
                base = bicubic_round_trip(self.frames(x), floats / frames_per_item)  # (B or B*T, 3, R, R)
                base = base.reshape(x.shape[0], -1, *base.shape[1:]).transpose(1, 2) if self.video else base
                acc.info[name] = {
                    "kind": "baseline",
                    "floats_per_item": 3 * size[0] * size[1] * frames_per_item,
                    "downsampled_size": list(size),
                    "side_factor": factor,
                    "target_floats_per_item": floats,
                }
                baselines[floats] = name
                outputs[name] = base.contiguous()
                baseline_psnr[name] = self._score_stream(
                    acc, name, x, outputs[name], keys, groups, names, rows
                )
            acc.info[tokenizer.name]["baseline"] = baselines[floats]
            gain = model_psnr - baseline_psnr[baselines[floats]]  # paired per item
            acc.streams[tokenizer.name].metrics.add("gain_db", gain, groups)
        for pos, name in enumerate(names):
            key = (chunk["shard"], first_position + pos)
            if acc.wants_sample(key):
                pixels = {
                    "original": chunk["pixels"][pos],
                    **{m: rec[pos].cpu() for m, rec in outputs.items()},
                }
                acc.add_sample(key, name, pixels)
        return rows

    def _bit_baselines(self, acc, x: torch.Tensor, bits: float, outputs: dict, scoring: tuple) -> tuple:
        """The 8-bit thumbnail and WebP at ``bits`` per item (evals/classical.py), scored as streams;
        -> (thumbnail stream, {stream: per-item PSNR}). Images only (WebP has no video mode here)."""
        frames = self.frames(x)
        per_frame_bits = bits / acc.frames_per_item
        thumb, size = classical.thumbnail_round_trip(frames, per_frame_bits)
        thumb = thumb.reshape(x.shape[0], -1, *thumb.shape[1:]).transpose(1, 2) if self.video else thumb
        budget = int(bits // 8)
        name = f"thumbnail8-{size[0]}x{size[1]}"
        acc.info[name] = {
            "kind": "baseline",
            "floats_per_item": bits / 8,
            "downsampled_size": list(size),
            "target_bits_per_item": bits,
            "codec": "8-bit RGB thumbnail, antialiased bicubic down and bicubic up",
        }
        outputs[name] = thumb.contiguous()
        psnrs = {name: self._score_stream(acc, name, x, outputs[name], *scoring)}
        if not self.video:
            webp, stats = classical.webp_at_budget(x, budget)
            webp_name = f"webp-{budget}B"
            acc.info[webp_name] = {
                "kind": "baseline",
                "floats_per_item": bits / 8,
                "budget_bytes": budget,
                "target_bits_per_item": bits,
                "codec": "WebP (libwebp via Pillow, lossy, method 4), largest quality within the budget",
            }
            outputs[webp_name] = webp.to(x.device)
            psnrs[webp_name] = self._score_stream(acc, webp_name, x, outputs[webp_name], *scoring)
            metrics = acc.stream(webp_name).metrics
            groups = scoring[1]
            for key, values in stats.items():
                metrics.add(f"webp_{key}", values.astype(np.float64), groups)
        return name, psnrs

    def _reconstruct(self, tokenizer, x: torch.Tensor, acc: Accumulator) -> tuple[torch.Tensor, int, dict]:
        per_frame = self.video and tokenizer.spec.modality == "image"
        inputs = video_metrics.frames(x) if per_frame else x  # image models see clips as independent frames
        quantizer = tokenizer.spec.quantizer  # discrete: ids are what is stored, decode reads them
        if tokenizer.name not in self.warm:  # first call pays one-off costs; keep it out of the timing
            tokenizer.decode(
                tokenizer.encode(inputs[:1], tokens=quantizer is not None), output_dtype=torch.uint8
            )
            self.warm.add(tokenizer.name)
        timing = acc.timing.setdefault(
            tokenizer.name,
            {"encode_s": 0.0, "decode_s": 0.0, "items": 0, "encode_peak_bytes": 0, "decode_peak_bytes": 0},
        )
        _sync(self.device)
        with PeakMemory(self.device) as encode_mem:
            t0 = time.perf_counter()
            latents = tokenizer.encode(inputs, tokens=quantizer is not None)
            _sync(self.device)
            t1 = time.perf_counter()
        with PeakMemory(self.device) as decode_mem:
            rec = tokenizer.decode(latents, output_dtype=torch.uint8).to(self.device)  # round half up
            _sync(self.device)
            t2 = time.perf_counter()
        timing["encode_s"] += t1 - t0
        timing["decode_s"] += t2 - t1
        timing["items"] += x.shape[0]
        timing["encode_peak_bytes"] = max(timing["encode_peak_bytes"], encode_mem.peak_bytes)
        timing["decode_peak_bytes"] = max(timing["decode_peak_bytes"], decode_mem.peak_bytes)
        if per_frame:
            n, c, t, h, w = x.shape
            rec = rec.reshape(n, t, c, h, w).transpose(1, 2)
        first = latents.ids if quantizer is not None else latents.latents
        floats = first[0].numel() * (x.shape[2] if per_frame else 1)
        info = {
            "source": tokenizer.source,
            "weights_hash": tokenizer.weights_hash,
            "spec": tokenizer.spec.to_dict(),
            "latent_shape_per_item": list(first.shape[1:]),
            "frames_encoded_independently": per_frame,
        }
        if quantizer is not None:  # floats_per_item: the ids' bytes, what the equal-bits codecs get
            bits = classical.bits_per_item(floats, quantizer.vocabulary_size)
            pixels = math.prod(x.shape[2:])  # per item: [T x] H x W
            info |= {"tokens_per_item": floats, "bits_per_item": bits, "bits_per_pixel": bits / pixels}
            acc.count_tokens(tokenizer.name, id_counts(latents.ids, quantizer.vocabulary_size).numpy())
            floats = bits / 8
        return rec.contiguous(), floats, info

    def _add_features(self, stream: stats.StreamStats, pixels: torch.Tensor, keys: np.ndarray) -> None:
        """Inception (and I3D) features of ``pixels`` into the stream's FID sums and KID sample."""
        feats = self.inception.device_features(self.frames(pixels))  # (B or B*T, 2048) float32
        stream.inception.add(feats)
        frame_keys = np.repeat(keys, pixels.shape[2]) if self.video else keys
        if self.video:  # distinct keys per frame, still a function of the item name
            frame_keys = frame_keys + np.tile(np.arange(pixels.shape[2], dtype=np.uint64), len(keys))
        stream.kid.add(frame_keys, feats.cpu().numpy())
        if self.i3d is not None:
            i3d = torch.from_numpy(self.i3d.features(pixels))  # (B, D_i3d)
            if stream.i3d is None:
                stream.i3d = stats.Moments(i3d.shape[1], self.device)
            stream.i3d.add(i3d)

    def _score_stream(self, acc, name, x, rec, keys, groups, names, rows) -> np.ndarray:
        """Per-item metrics and features of one reconstruction; -> its per-item PSNR."""
        stream = acc.stream(name)
        a, b = self.frames(x), self.frames(rec)
        per_frame = x.shape[2] if self.video else 1
        values = {
            "psnr": image_metrics.psnr_device(a, b).reshape(-1, per_frame).mean(1).double().cpu().numpy(),
            "ssim": image_metrics.ssim_device(a, b).reshape(-1, per_frame).mean(1).double().cpu().numpy(),
        }
        if self.video:
            values["temporal_diff_psnr"] = video_metrics.temporal_difference_psnr(x.cpu(), rec.cpu())
        if self.lpips.available:
            values["lpips"] = self.lpips(a.cpu(), b.cpu()).reshape(-1, per_frame).mean(1)
        for metric, v in values.items():
            stream.metrics.add(metric, v, groups)
        self._add_features(stream, rec, keys)
        columns = self.columns()
        rows.extend([item, name, *(f"{values[c][i]:.6f}" for c in columns)] for i, item in enumerate(names))
        return values["psnr"]

    def score_chunk(
        self, chunk: dict, acc: Accumulator, with_reference: bool, position: int
    ) -> list[list[str]]:
        """A loader chunk in model batches of ``batch_size``; ``position``: its first item's index in its shard."""
        rows: list[list[str]] = []
        acc.skipped.update(chunk["skipped"])
        if chunk["pixels"] is None:
            return rows
        size = self.config.batch_size
        for start in range(0, len(chunk["names"]), size):
            part = {
                "shard": chunk["shard"],
                "names": chunk["names"][start : start + size],
                "scales": chunk["scales"][start : start + size],
                "pixels": chunk["pixels"][start : start + size],
            }
            rows += self.score(part, acc, with_reference, position + start)
        return rows
