"""What a request or job item costs, computed before any work, and the caps it must fit.

One :class:`Limits` (the server's ``limits`` config; the CLI and the batch job use the same
defaults, raised by flags; the media decoders check it while they read) and one cost function per
direction: :func:`encode_cost` counts the
pixels the model will read (per frame after any resize, frames, in all) and :func:`decode_cost`
the pixels it will write from a latent shape. :func:`check_cost` refuses what is over a cap with a
LimitExceededError (HTTP 413) naming the number that was over, so no entry point starts work that
the caps were meant to prevent: an upscale past the pixel cap, a decode of gigapixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from tokenizers_svc.errors import ConfigError, LimitExceededError
from tokenizers_svc.pixels import policy_size
from tokenizers_svc.spec import FrameRule


@dataclass(frozen=True)
class Limits:
    """Caps on one request or job item; the defaults are ``serving/config.yaml``'s.

    ``max_pixels``: H*W of one image or frame the model reads (after resize) or writes (decode).
    ``max_frames``: frames of a video (after range and stride). ``max_duration_s``: seconds of
    video spanned by the decoded range. ``max_total_pixels``: T*H*W in all, read or written, so
    that frame and per-frame caps cannot multiply into an out-of-memory. ``max_latent_elements``:
    N*C*T*h*w of latents to decode.
    """

    max_pixels: int = 16_000_000
    max_frames: int = 512
    max_duration_s: float = 120.0
    max_total_pixels: int = 256_000_000
    max_latent_elements: int = 64_000_000

    def with_settings(self, settings: list[str]) -> Limits:
        """These limits with ``NAME=VALUE`` settings applied (the CLI's and the batch job's
        ``--set-limit``; names as in the server config's ``limits``); a typo is an error."""
        changes: dict[str, float] = {}
        for setting in settings:
            name, _, text = setting.partition("=")
            name = name.strip().replace("-", "_")
            if name not in self.__dataclass_fields__:
                raise ConfigError(
                    f"--set-limit {setting!r}: expected NAME=VALUE with NAME one of "
                    f"{sorted(self.__dataclass_fields__)}",
                    param="set_limit",
                )
            try:
                value = float(text)
            except ValueError:
                value = math.nan
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"--set-limit {setting!r}: expected a positive number", param="set_limit")
            changes[name] = value if name == "max_duration_s" else int(value)
        return replace(self, **changes)


# The media readers' caps when the caller passes none (``media.read_image``/``read_video``, as the
# trainer and the evals read their own datasets): local files the caller owns may be larger than
# what a service accepts from anyone: 8K photos (64 MP), 2048 frames, 10 minutes, 1e9 pixels
# (3 GB of RGB uint8) in all.
FILE_LIMITS = Limits(
    max_pixels=64_000_000, max_frames=2048, max_duration_s=600.0, max_total_pixels=1_000_000_000
)


@dataclass(frozen=True)
class Cost:
    """Pixels one item makes the model read (encode) or write (decode), and its latent size."""

    height: int
    width: int
    frames: int = 1  # per item; 1 for images
    items: int = 1
    latent_elements: int = 0  # decode only: what the model reads

    @property
    def frame_pixels(self) -> int:
        return self.height * self.width

    @property
    def total_pixels(self) -> int:
        """Pixels over every frame of every item: the unit service time is estimated in."""
        return self.frame_pixels * self.frames * self.items


def encode_cost(
    height: int, width: int, frames: int | None = None, resize: str = "none", resolution: int | None = None
) -> Cost:
    """Cost of encoding ``frames`` (None: an image) of ``height`` x ``width`` after the resize policy."""
    if resize != "none" and resolution:
        height, width = policy_size(height, width, resize, resolution)
    return Cost(height=height, width=width, frames=frames or 1)


def decode_cost(latent_shape: tuple[int, ...], spatial_compression: int, frame_rule: FrameRule) -> Cost:
    """Cost of decoding latents (N, C, h, w) / (N, C, t, h, w): the padded pixels the model writes."""
    items, height, width = latent_shape[0], latent_shape[-2], latent_shape[-1]
    frames = frame_rule.pixel_frames(latent_shape[2]) if len(latent_shape) == 5 else 1
    return Cost(
        height=height * spatial_compression,
        width=width * spatial_compression,
        frames=frames,
        items=items,
        latent_elements=math.prod(latent_shape),
    )


def check_cost(cost: Cost, limits: Limits, *, what: str = "input", param: str = "file") -> None:
    """Refuse an item over any cap (LimitExceededError, 413) before work starts, naming the number."""
    if cost.latent_elements > limits.max_latent_elements:
        raise LimitExceededError(
            f"{what} has {cost.latent_elements:,} latent elements; the limit is "
            f"{limits.max_latent_elements:,}",
            param=param,
        )
    if cost.frame_pixels > limits.max_pixels:
        raise LimitExceededError(
            f"{what} is {cost.height}x{cost.width} = {cost.frame_pixels:,} pixels per frame; the limit is "
            f"{limits.max_pixels:,}",
            param=param,
        )
    if cost.frames > limits.max_frames:
        raise LimitExceededError(
            f"{what} has {cost.frames:,} frames; the limit is {limits.max_frames:,}", param=param
        )
    if cost.total_pixels > limits.max_total_pixels:
        raise LimitExceededError(
            f"{what} is {cost.total_pixels:,} pixels in all; the limit is {limits.max_total_pixels:,}",
            param=param,
        )
