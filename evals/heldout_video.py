"""Video content a tokenizer never trained on, and the classical video codecs it has to beat at equal floats.

Three groups of clips, each scored on its own:

- ``stills``: one held-out photo held for every frame (a still shot), cut at two scales;
- ``motion``: a camera pan and a zoom over every held-out photo (``tokenizers_svc.camera``), at a
  scale drawn per clip;
- ``real``: clips from the held-out end of each real clip (the video recipes train on the first 80%);
  the same scenes and cameras as training, so this group measures less than the other two.

Photo clips are a pure function of the photo folder, the seed and the resolution. Two baselines keep
the same number of floats per clip as the tokenizer's latent: *spatial* (every frame bicubic
down/up-sampled) and *spatio-temporal* (every ``temporal``-th frame kept, bicubic in space, linear
interpolation in time, like a t4 latent's frame rule). The colour cast is the per-channel mean error
of the reconstruction in grey levels.

Tensors: clips are uint8 ``(N, 3, T, R, R)`` in [0, 255].

    python -m evals.heldout_video --model tsvc-video-f8t4c4 --resolution 256
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
from tokenizers_svc.camera import photo_clips
from tokenizers_svc.crops import bicubic_round_trip, segment_clips
from tokenizers_svc.defaults import DEFAULT_MODELS
from tokenizers_svc.loading import load_tokenizer
from tokenizers_svc.pixels import to_uint8_pixels

REAL_CLIPS = ("vtest.avi", "tree.avi", "bikes.mp4", "carphone_pristine.mp4")  # the real (not rendered) clips
GROUPS = ("stills", "motion", "real")


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
    """Model (uint8 clip batch -> uint8) vs both baselines on every clip: PSNR mean and 95% CI, the
    paired gain over each baseline (``gains``) and over the better one (``gain_db``), frame PSNR, and
    the model's per-channel mean error (colour cast)."""
    recon = torch.cat([reconstruct(batch).cpu() for batch in clips.split(2)])
    spatial = spatial_bicubic(clips, floats_per_item)
    spatiotemporal = spatiotemporal_bicubic(clips, floats_per_item, temporal)
    scores = {
        "model": clip_psnr(clips, recon),
        "bicubic_spatial": clip_psnr(clips, spatial),
        "bicubic_spatiotemporal": clip_psnr(clips, spatiotemporal),
    }
    baselines = ("bicubic_spatial", "bicubic_spatiotemporal")
    best = max(baselines, key=lambda k: scores[k].mean())
    cast = (recon.float() - clips.float()).mean(dim=(0, 2, 3, 4))  # (3,) grey levels
    result = {
        name: dict(zip(("psnr", "psnr_ci95"), mean_ci(values), strict=True))
        for name, values in scores.items()
    }
    gains = {
        name: dict(zip(("gain_db", "gain_ci95"), mean_ci(scores["model"] - scores[name]), strict=True))
        for name in baselines
    }
    return {
        **result,
        "n": len(names),
        "clips": names,
        "clip_psnr": {name: [round(float(v), 3) for v in values] for name, values in scores.items()},
        "floats_per_item": floats_per_item,
        "best_baseline": best,
        "gains": gains,
        "gain_db": gains[best]["gain_db"],
        "gain_ci95": gains[best]["gain_ci95"],
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


def group_clips(
    group: str,
    photos: Path,
    videos: Path,
    frames: int,
    resolution: int,
    seed: int = 0,
    clips_per_video: int = 4,
) -> tuple[torch.Tensor, list[str]]:
    """The clips of one of :data:`GROUPS`: photo clips from ``photos`` or ``clips_per_video`` clips
    from the held-out end of each real clip in ``videos``."""
    if group == "real":
        paths = [videos / name for name in REAL_CLIPS]
        return segment_clips(paths, clips_per_video=clips_per_video, frames=frames, resolution=resolution)
    return photo_clips(photos, group, frames, resolution, seed)


def markdown(model: str, results: dict[str, dict], resolution: int, frames: int) -> str:
    """One row per group: the model and both baselines (PSNR, 95% CI), the paired gains, the colour cast."""
    first = next(iter(results.values()))
    lines = [
        f"{model} on clips of {frames} frames at {resolution}x{resolution} it never trained on "
        f"({first['floats_per_item']} floats per clip, "
        f"{first['pixel_floats_per_latent_float']:.1f} pixel values per latent float); PSNR dB ± 95% CI",
        "",
        "| group | clips | model | bicubic spatial | bicubic spatio-temporal | gain vs spatial "
        "| gain vs spatio-temporal | mean error R, G, B |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for group, r in results.items():
        cells = [
            f"{r[k]['psnr']:.2f} ± {r[k]['psnr_ci95']:.2f}"
            for k in ("model", "bicubic_spatial", "bicubic_spatiotemporal")
        ]
        cells += [f"{g['gain_db']:+.2f} ± {g['gain_ci95']:.2f}" for g in r["gains"].values()]
        cast = ", ".join(f"{v:+.2f}" for v in r["mean_error_rgb"])
        lines.append(f"| {group} | {r['n']} | " + " | ".join(cells) + f" | {cast} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evals.heldout_video",
        description="A video tokenizer vs bicubic at equal floats on still shots and camera moves over "
        "held-out photos and on the held-out end of each real clip.",
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODELS["video"],
        help="registry name or save_pretrained dir (default: the video default)",
    )
    parser.add_argument(
        "--groups", default=",".join(GROUPS), help=f"comma-separated subset of {','.join(GROUPS)}"
    )
    parser.add_argument(
        "--photos", type=Path, default=Path("../shared/data/images/val"), help="held-out photos"
    )
    parser.add_argument("--videos", type=Path, default=Path("../shared/data/videos"))
    parser.add_argument("--clips-per-video", type=int, default=4, help="real group: clips per held-out end")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="draws the photo clips' windows and moves")
    parser.add_argument(
        "--stride",
        type=int,
        default=1,
        help="score every n-th clip of each group (quick looks; the photo groups hold 2 clips per photo, so an even n keeps one kind: 1x stills, pans)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the full result here")
    args = parser.parse_args(argv)
    groups = [g for g in args.groups.split(",") if g]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        parser.error(f"unknown groups {unknown}; choose from {list(GROUPS)}")
    tokenizer = load_tokenizer(args.model, device=args.device)
    results = {}
    for group in groups:
        clips, names = group_clips(
            group, args.photos, args.videos, args.frames, args.resolution, args.seed, args.clips_per_video
        )
        results[group] = compare_tokenizer(clips[:: args.stride], names[:: args.stride], tokenizer)
    print(markdown(args.model, results, args.resolution, args.frames))
    if args.json:
        protocol = {k: str(v) for k, v in vars(args).items() if k != "json"}
        args.json.write_text(json.dumps({"protocol": protocol, "groups": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
