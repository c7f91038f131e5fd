"""Clips made from still photos: a still shot (one photo held for every frame) and camera moves
(pans, zooms) over it.

Real clips are few and their scenes repeat, so a video tokenizer trained and scored on them measures
memory of those scenes. Photos are many; a camera move over a photo is the commonest motion in real
footage. The evaluation builds such clips from held-out photos (``evals.heldout_video``) and training
from training photos (the ``photo_clips`` source of ``training.data``) with the same code, so both see
the same kind of motion.

A move is drawn from a seeded generator (:func:`random_move`) and rendered deterministically
(:func:`render_clip`): a square window of ``side`` pixels whose centre moves ``velocity`` pixels per
frame and whose side is multiplied by ``zoom`` per frame, resampled bicubically to ``size`` x ``size``.
A still shot is an integer crop repeated (no resampling). Windows always stay inside the photo.

Tensors: photos uint8 ``(3, H, W)``; clips uint8 ``(3, T, size, size)``, both in [0, 255].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from tokenizers_svc.crops import MIN_STD, list_media
from tokenizers_svc.media import read_image
from tokenizers_svc.pixels import resize_shorter_side

MoveKind = Literal["still", "pan", "zoom"]
MOVE_KINDS: tuple[MoveKind, ...] = ("still", "pan", "zoom")
# Pans of 0.5-3 pixels per frame (of the clip) and zooms of 0.5-1.5% per frame: ordinary handheld and
# tripod camera work at 24-30 fps; 16 frames of the fastest pan cross 3/16 of a 256-pixel frame.
PAN_SPEED = (0.5, 3.0)
ZOOM_RATE = (0.005, 0.015)


@dataclass(frozen=True)
class CameraMove:
    """A window over a photo: centre ``(y, x)`` and ``side`` at frame 0 in the photo's pixels, centre
    velocity ``(dy, dx)`` in pixels per frame, side multiplied by ``zoom`` per frame."""

    kind: MoveKind
    center: tuple[float, float]
    side: float
    velocity: tuple[float, float] = (0.0, 0.0)
    zoom: float = 1.0

    def window(self, t: int) -> tuple[float, float, float]:
        """(centre y, centre x, side) of frame ``t``."""
        return (
            self.center[0] + self.velocity[0] * t,
            self.center[1] + self.velocity[1] * t,
            self.side * self.zoom**t,
        )


def random_move(
    kind: MoveKind, height: int, width: int, size: int, frames: int, rng: np.random.Generator
) -> CameraMove:
    """A move of ``kind`` over a (height, width) photo whose window is ``size`` pixels at its largest,
    drawn from ``rng``; speeds are in pixels of the clip (the window side is ``size`` for pans).
    Where the photo leaves no room for the drawn travel along an axis, the travel is shortened."""
    if min(height, width) < size:
        raise ValueError(f"a {height}x{width} photo cannot hold a {size}-pixel window")
    span = max(frames - 1, 1)
    if kind == "still":
        top = int(rng.integers(0, height - size + 1))
        left = int(rng.integers(0, width - size + 1))
        return CameraMove("still", (top + size / 2, left + size / 2), float(size))
    if kind == "pan":
        speed = rng.uniform(*PAN_SPEED)
        angle = rng.uniform(0, 2 * math.pi)
        velocity = []
        center = []
        for extent, component in ((height, math.sin(angle)), (width, math.cos(angle))):
            room = extent - size  # pixels the window can travel along this axis
            travel = float(np.clip(speed * component * span, -room, room))
            low = size / 2 + max(0.0, -travel)
            high = extent - size / 2 - max(0.0, travel)
            center.append(rng.uniform(low, high))
            velocity.append(travel / span)
        return CameraMove("pan", (center[0], center[1]), float(size), (velocity[0], velocity[1]))
    if kind == "zoom":
        rate = rng.uniform(*ZOOM_RATE)
        zoom_in = bool(rng.random() < 0.5)
        # the largest window is `size`: the first frame of a zoom in, the last of a zoom out
        zoom = 1 / (1 + rate) if zoom_in else 1 + rate
        side = size if zoom_in else size / zoom**span
        cy = rng.uniform(size / 2, height - size / 2)
        cx = rng.uniform(size / 2, width - size / 2)
        return CameraMove("zoom", (cy, cx), float(side), zoom=float(zoom))
    raise ValueError(f"kind must be one of {list(MOVE_KINDS)}, got {kind!r}")


def render_clip(photo: torch.Tensor, move: CameraMove, frames: int, size: int) -> torch.Tensor:
    """uint8 (3, H, W) photo -> uint8 (3, frames, size, size) clip seen through ``move``'s window."""
    if move.kind == "still":
        top = round(move.center[0] - move.side / 2)
        left = round(move.center[1] - move.side / 2)
        crop = photo[:, top : top + size, left : left + size]  # (3, size, size)
        return crop.unsqueeze(1).expand(-1, frames, -1, -1).contiguous()
    h, w = photo.shape[-2:]
    steps = (torch.arange(size, dtype=torch.float64) + 0.5) / size - 0.5  # window-relative, [-0.5, 0.5)
    grids = []
    for t in range(frames):
        cy, cx, side = move.window(t)
        ys = (cy + steps * side) / h * 2 - 1  # normalized, align_corners=False
        xs = (cx + steps * side) / w * 2 - 1
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        grids.append(torch.stack([grid_x, grid_y], dim=-1))  # (size, size, 2) as (x, y)
    grid = torch.stack(grids).float()  # (T, size, size, 2)
    source = photo.float().unsqueeze(0).expand(frames, -1, -1, -1)  # (T, 3, H, W)
    out = F.grid_sample(source, grid, mode="bicubic", padding_mode="border", align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8).transpose(0, 1).contiguous()  # (3, T, size, size)


# Shorter side of the photo before the window is cut, in multiples of the clip side: 1 = the whole
# photo's short side in view (broad content), 3 = a third of it (dense detail), as the image protocol.
STILL_SCALES = (1.0, 2.0)
MOTION_SCALES = (1.5, 2.0, 3.0)  # > 1 leaves room for the window to travel
MOTION_KINDS: tuple[MoveKind, ...] = ("pan", "zoom")
WINDOW_TRIES = 8  # draws of a window before a flat one (first frame std < MIN_STD) is accepted


def photo_clips(
    photos: Path,
    group: str,
    frames: int = 17,
    resolution: int = 256,
    seed: int = 0,
) -> tuple[torch.Tensor, list[str]]:
    """The ``stills`` or ``motion`` group built from every photo under ``photos`` (sorted): uint8
    (N, 3, T, R, R) and names ``file@scale:kind``. Each photo draws from its own generator
    (``seed``, photo index), so a clip does not change when other photos are added."""
    if group not in ("stills", "motion"):
        raise ValueError(f"photo clip group must be 'stills' or 'motion', got {group!r}")
    clips, names = [], []
    for index, path in enumerate(list_media(Path(photos), "image")):
        photo = torch.from_numpy(read_image(path)).permute(2, 0, 1)  # (3, H, W) uint8
        rng = np.random.default_rng([seed, index])
        if group == "stills":
            plan = [(scale, "still") for scale in STILL_SCALES]
        else:
            plan = [(float(rng.choice(MOTION_SCALES)), kind) for kind in MOTION_KINDS]
        for scale, kind in plan:
            resized = resize_shorter_side(photo, round(scale * resolution))  # (3, H', W')
            h, w = resized.shape[-2:]
            for _ in range(WINDOW_TRIES):
                clip = render_clip(
                    resized, random_move(kind, h, w, resolution, frames, rng), frames, resolution
                )
                if float(clip[:, 0].float().std()) >= MIN_STD:
                    break
            clips.append(clip)
            names.append(f"{path.relative_to(photos)}@{scale:g}:{kind}")
    if not clips:
        raise ValueError(f"no photos under {photos}")
    return torch.stack(clips), names
