"""Fit a trained tokenizer's latent normalization so diffusion sees centred, unit-variance latents.

    python -m training.latent_stats EXPORT_DIR --data ../shared/data/images/train [--no-skimage-photos]
    python -m training.latent_stats EXPORT_DIR --video ../shared/data/videos/bikes.mp4 ... --segment 0,0.8 \
        [--data ../shared/data/images/train]   # a video model: also stills and camera moves over these photos

A diffusion model wants every latent channel near mean 0 and std 1; a plain ``1 / std`` scaling
factor leaves channels off-centre (the first shipped image default had per-channel means of -1.1 to
-0.3 after scaling). This measures raw latents on multi-scale crops of the *training* photos (never
the evaluation photos) and writes per-channel statistics into the export:

- models that keep them as buffers (LTX-Video's ``latents_mean``/``latents_std``) get the buffers
  set and ``scaling_factor = 1``;
Crops come from the given folders plus the colour photos scikit-image bundles (other cameras and
content: the shared training folder alone gave channel means up to 0.3 off on other photos).

- others (DC-AE) get ``latents_mean``/``latents_std`` in ``config.json``, read back by their backend,
  plus ``scaling_factor = 1 / std`` and ``shift_factor = mean`` over all channels: the scalar
  fallback for pipelines that only read those two (diffusers' SANA / FLUX style).

The Tokenizer then normalizes as ``(raw - mean[c]) / std[c]``; latent files and ``/v1/models`` carry
the numbers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from tokenizers_svc.camera import photo_clips
from tokenizers_svc.crops import DEFAULT_SCALES, load_multiscale, multiscale_crops, segment_clips
from tokenizers_svc.errors import EXIT_OK, EXIT_USAGE
from tokenizers_svc.families.base import Backend
from tokenizers_svc.media import read_image
from tokenizers_svc.pixels import to_float_pixels
from tokenizers_svc.registry import backend_for, model_class, read_class_name

# Colour photographs that scikit-image bundles (allowed training data): other cameras and content
# than the shared training folder, so the statistics hold beyond it.
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")
MAX_CROPS = 400  # evenly spaced over all photos and scales (the first N would be a few photos)
CLIPS_PER_VIDEO = 8
PHOTO_CLIP_STRIDE = 4  # of each photo-clip group (stills, motion): 40 training photos give 20 + 20 clips


@torch.no_grad()
def latent_statistics(backend: Backend, pixels: torch.Tensor, batch_size: int = 8) -> dict:
    """Per-channel and overall mean/std of raw latents of uint8 (N, 3, H, W) images or (N, 3, T, H, W)
    clips (a video model sees an image as a one-frame clip)."""
    sums = count = squares = None
    device = backend.device
    for batch in pixels.split(batch_size):
        x = to_float_pixels(batch.to(device)).to(backend.dtype)  # (n, 3, [T,] H, W) float [-1, 1]
        if backend.spec.modality != "image" and x.dim() == 4:
            x = x.unsqueeze(2).expand(-1, -1, backend.spec.frame_rule.padded_frames(1), -1, -1)
        z = backend.encode_moments(x)[0].double()  # (n, c, [t,] h, w) raw latents
        per_channel = z.transpose(0, 1).flatten(1)  # (c, elements)
        sums = per_channel.sum(1) if sums is None else sums + per_channel.sum(1)
        squares = per_channel.pow(2).sum(1) if squares is None else squares + per_channel.pow(2).sum(1)
        count = per_channel.shape[1] + (count or 0)
    mean = sums / count
    std = (squares / count - mean.pow(2)).clamp_min(1e-12).sqrt()
    overall_mean = float(mean.mean())
    overall_std = float((squares.sum() / (count * len(mean)) - overall_mean**2) ** 0.5)
    return {
        "mean": [round(float(v), 6) for v in mean],
        "std": [round(float(v), 6) for v in std],
        "overall_mean": round(overall_mean, 6),
        "overall_std": round(overall_std, 6),
        "items": len(pixels),
    }


def apply_statistics(module: torch.nn.Module, stats: dict) -> None:
    """Write ``stats`` into the module (buffers or config, see the module docstring)."""
    mean, std = stats["mean"], stats["std"]
    buffers = dict(module.named_buffers())
    if "latents_mean" in buffers and "latents_std" in buffers:
        buffers["latents_mean"].copy_(torch.tensor(mean))
        buffers["latents_std"].copy_(torch.tensor(std))
        module.register_to_config(scaling_factor=1.0)
        return
    module.register_to_config(
        latents_mean=mean,
        latents_std=std,
        scaling_factor=round(1.0 / stats["overall_std"], 6),
        shift_factor=stats["overall_mean"],
    )


def skimage_photo_crops() -> torch.Tensor:
    """Multi-scale crops of :data:`SKIMAGE_PHOTOS`: uint8 (N, 3, 256, 256). scikit-image is an
    optional dependency (the ``eval``/``dev`` extras), imported only when these photos are used."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    crops = []
    for name in SKIMAGE_PHOTOS:
        image = torch.from_numpy(read_image(folder / name)).permute(2, 0, 1)  # (3, H, W) uint8
        crops += [crop for _, _, crop in multiscale_crops(image, DEFAULT_SCALES)]
    return torch.stack(crops)


def training_clips(videos: list[Path], segment: tuple[float, float]) -> torch.Tensor:
    """:data:`CLIPS_PER_VIDEO` clips of 17 frames at 256x256, evenly spaced in ``segment`` of each
    video (its training part): uint8 (N, 3, 17, 256, 256)."""
    return segment_clips(videos, segment, clips_per_video=CLIPS_PER_VIDEO, frames=17, resolution=256)[0]


def photo_clip_set(folder: Path, stride: int = PHOTO_CLIP_STRIDE) -> torch.Tensor:
    """Still shots and camera moves over the training photos in ``folder`` (tokenizers_svc.camera, as
    the video recipe trains on), every ``stride``-th of each: uint8 (N, 3, 17, 256, 256). A video
    model's statistics from the real clips alone miss this content: the shipped video default's
    detail channel had std 2.5 on val-photo clips with statistics from the real clips only."""
    groups = [
        photo_clips(folder, group, frames=17, resolution=256)[0][::stride] for group in ("stills", "motion")
    ]
    return torch.cat(groups)


def fit_export(
    export: Path,
    photos: list[Path],
    device: str = "cpu",
    with_skimage: bool = True,
    clips: torch.Tensor | None = None,
) -> dict:
    """Measure on multi-scale crops of every folder in ``photos`` (and the scikit-image photos), or on
    ``clips`` (uint8 (N, 3, T, H, W)) when given: a video model's latents of clips, not of photos, are
    what a video diffusion model sees. Write into ``export`` (re-saved in place)."""
    class_name = read_class_name(export)
    module = model_class(class_name).from_pretrained(str(export)).to(device).eval()
    backend = backend_for(class_name).from_module(module, export.name)
    if clips is not None:
        stats = latent_statistics(backend, clips, batch_size=2)  # 17-frame clips: small batches
    else:
        pixels = [load_multiscale(folder, scales=DEFAULT_SCALES).pixels for folder in photos]
        pixels = torch.cat(pixels + ([skimage_photo_crops()] if with_skimage else []))
        stride = max(1, -(-len(pixels) // MAX_CROPS))
        stats = latent_statistics(backend, pixels[::stride])
    apply_statistics(module, stats)
    module.to("cpu").save_pretrained(str(export))
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.latent_stats", description=__doc__.split("\n")[0]
    )
    parser.add_argument("export", type=Path, help="save_pretrained directory to update in place")
    parser.add_argument(
        "--data",
        type=Path,
        action="append",
        default=[],
        help="training photos (not evaluation ones); repeatable. With --video: still shots and camera "
        "moves over them join the clips",
    )
    parser.add_argument(
        "--video", type=Path, action="append", default=[], help="a training video file; repeatable"
    )
    parser.add_argument(
        "--segment", default="0,0.8", help="the training part of each --video (fractions of its duration)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--no-skimage-photos", action="store_true", help="leave out the photos scikit-image bundles"
    )
    args = parser.parse_args(argv)
    if not (args.export / "config.json").is_file():
        print(f"error: {args.export} has no config.json", file=sys.stderr)
        return EXIT_USAGE
    if not args.data and not args.video:
        print("error: give training photos (--data) or training videos (--video)", file=sys.stderr)
        return EXIT_USAGE
    first, last = (float(v) for v in args.segment.split(","))
    clips = None
    if args.video:
        clips = torch.cat([training_clips(args.video, (first, last)), *map(photo_clip_set, args.data)])
    stats = fit_export(args.export, args.data, args.device, not args.no_skimage_photos, clips)
    print(f"per-channel mean {stats['mean']}, std {stats['std']} over {stats['items']} crops or clips")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
