"""Held-out clip segments and the classical video codecs a video tokenizer has to beat at equal floats.

The video default trains on the first part of each real clip (``segment: [0, 0.8]`` in its recipe) and
is scored here on clips cut from the rest. Two baselines keep the same number of floats per clip as
the tokenizer's latent: *spatial* (every frame bicubic down/up-sampled) and *spatio-temporal* (every
``temporal``-th frame kept, bicubic in space, linear interpolation in time, like a t4 latent's frame
rule). The colour cast is the per-channel mean error of the reconstruction in grey levels.

Tensors: clips are uint8 ``(N, 3, T, R, R)`` in [0, 255].

    python -m evals.heldout_video --model tsvc-video-f16t4c16 --resolution 256
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from evals.image_metrics import psnr
from evals.multiscale import mean_ci
from evals.video_metrics import frames
from tokenizers_svc.crops import bicubic_round_trip, segment_clips
from tokenizers_svc.loading import load_tokenizer
from tokenizers_svc.pixels import to_uint8_pixels

REAL_CLIPS = ("vtest.avi", "tree.avi", "bikes.mp4", "carphone_pristine.mp4")  # the real (not rendered) clips


def _clips(frames: torch.Tensor, n: int) -> torch.Tensor:
    """(N * T, 3, H, W) -> (N, 3, T, H, W)."""
    _, c, h, w = frames.shape
    return frames.reshape(n, -1, c, h, w).transpose(1, 2).contiguous()


def spatial_bicubic(clips: torch.Tensor, floats_per_item: int) -> torch.Tensor:
    """Every frame bicubic down/up-sampled; the clip keeps ``floats_per_item`` floats."""
    t = clips.shape[2]
    return _clips(bicubic_round_trip(frames(clips), floats_per_item // t), clips.shape[0])


def spatiotemporal_bicubic(clips: torch.Tensor, floats_per_item: int, temporal: int = 4) -> torch.Tensor:
    """Frames 0, k, 2k, ... kept (bicubic in space, the floats shared among them), the others linearly
    interpolated between their kept neighbours; trailing frames repeat the last kept one."""
    n, _, t, h, w = clips.shape
    kept = list(range(0, t, temporal))
    small = bicubic_round_trip(frames(clips[:, :, kept]), floats_per_item // len(kept))
    keys = _clips(small, n).float()  # (N, 3, K, H, W)
    out = torch.empty(n, 3, t, h, w)
    for i in range(t):
        left = min(i // temporal, len(kept) - 1)
        right = min(left + 1, len(kept) - 1)
        weight = 0.0 if right == left else (i - kept[left]) / (kept[right] - kept[left])
        out[:, :, i] = (1 - weight) * keys[:, :, left] + weight * keys[:, :, right]
    return out.round().clamp(0, 255).to(torch.uint8)


def clip_psnr(original: torch.Tensor, recon: torch.Tensor) -> np.ndarray:
    """PSNR per clip over all its frames (MSE pooled over the clip)."""
    mse = (original.float() - recon.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(255.0**2 / mse)).numpy()


def compare_video(
    clips: torch.Tensor,
    names: list[str],
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    floats_per_item: int,
    temporal: int = 4,
) -> dict:
    """Model (uint8 clip batch -> uint8) vs both baselines on every clip: PSNR mean and 95% CI, paired
    gain over the better baseline, frame PSNR, and the model's per-channel mean error (colour cast)."""
    recon = torch.cat([reconstruct(batch).cpu() for batch in clips.split(2)])
    spatial = spatial_bicubic(clips, floats_per_item)
    spatiotemporal = spatiotemporal_bicubic(clips, floats_per_item, temporal)
    scores = {
        "model": clip_psnr(clips, recon),
        "bicubic_spatial": clip_psnr(clips, spatial),
        "bicubic_spatiotemporal": clip_psnr(clips, spatiotemporal),
    }
    best = max(("bicubic_spatial", "bicubic_spatiotemporal"), key=lambda k: scores[k].mean())
    cast = (recon.float() - clips.float()).mean(dim=(0, 2, 3, 4))  # (3,) grey levels
    result = {
        name: dict(zip(("psnr", "psnr_ci95"), mean_ci(values), strict=True))
        for name, values in scores.items()
    }
    gain, gain_ci = mean_ci(scores["model"] - scores[best])
    return {
        **result,
        "n": len(names),
        "clips": names,
        "floats_per_item": floats_per_item,
        "best_baseline": best,
        "gain_db": gain,
        "gain_ci95": gain_ci,
        "frame_psnr": float(psnr(frames(clips), frames(recon)).mean()),
        "mean_error_rgb": [round(float(v), 3) for v in cast],
        "pixel_floats_per_latent_float": 3 * math.prod(clips.shape[2:]) / floats_per_item,
    }


def compare_tokenizer(clips: torch.Tensor, names: list[str], tokenizer) -> dict:
    """:func:`compare_video` of a Tokenizer at its own float budget for these clips."""
    floats = tokenizer.spec.latent_floats(tuple(clips.shape))
    return compare_video(clips, names, tokenizer_round_trip(tokenizer), floats)


def tokenizer_round_trip(tokenizer) -> Callable[[torch.Tensor], torch.Tensor]:
    """A Tokenizer as a uint8 -> uint8 reconstruction function (no gradients)."""

    device = next(tokenizer.module.parameters()).device

    def run(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return to_uint8_pixels(tokenizer.decode(tokenizer.encode(pixels.to(device))).float())

    return run


def markdown(model: str, result: dict, resolution: int, frames: int) -> str:
    """The comparison as the table the video card shows."""
    lines = [
        f"{model} on {result['n']} held-out clips of {frames} frames at {resolution}x{resolution} "
        f"({result['floats_per_item']} floats per clip, "
        f"{result['pixel_floats_per_latent_float']:.1f} pixel values per latent float)",
        "",
        "| reconstruction | PSNR dB (95% CI) |",
        "|---|---|",
    ]
    for name in ("model", "bicubic_spatial", "bicubic_spatiotemporal"):
        lines.append(f"| {name} | {result[name]['psnr']:.2f} ± {result[name]['psnr_ci95']:.2f} |")
    lines += [
        "",
        f"gain over {result['best_baseline']}: {result['gain_db']:+.2f} ± {result['gain_ci95']:.2f} dB (paired); "
        f"model mean error R, G, B: {', '.join(f'{v:+.2f}' for v in result['mean_error_rgb'])} grey levels",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evals.heldout_video",
        description="A video tokenizer vs bicubic at equal floats on "
        "clips from the held-out end of each real clip.",
    )
    parser.add_argument("--model", default="tsvc-video-f16t4c16", help="registry name or save_pretrained dir")
    parser.add_argument("--videos", type=Path, default=Path("../shared/data/videos"))
    parser.add_argument("--segment", default="0.8,1.0", help="fractions of each clip's duration")
    parser.add_argument("--clips-per-video", type=int, default=4)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the full result here")
    args = parser.parse_args(argv)
    first, last = (float(v) for v in args.segment.split(","))
    clips, names = segment_clips(
        [args.videos / name for name in REAL_CLIPS],
        segment=(first, last),
        clips_per_video=args.clips_per_video,
        frames=args.frames,
        resolution=args.resolution,
    )
    result = compare_tokenizer(clips, names, load_tokenizer(args.model, device=args.device))
    print(markdown(args.model, result, args.resolution, args.frames))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
