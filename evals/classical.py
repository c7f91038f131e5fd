"""Classical codecs at a discrete tokenizer's bit budget: what its ids have to beat.

A discrete tokenizer spends ``bits = tokens x log2(vocabulary)`` per item. At that budget:

- **8-bit thumbnail**: antialiased bicubic down to ``bits / 8`` uint8 values (3 per pixel), rounded
  to uint8 as a stored thumbnail would be, bicubic back up;
- **WebP** (Pillow's libwebp, lossy, default method 4): per item the largest quality 0..100 whose
  file fits ``bits / 8`` bytes; where even quality 0 does not fit, quality 0 is used and its size
  reported (``over_budget``).

Tensors: uint8 ``(N, 3, H, W)`` in [0, 255] in and out.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tokenizers_svc.crops import bicubic_size
from tokenizers_svc.pixels import to_uint8_pixels

WEBP_QUALITIES = (0, 100)


def thumbnail_round_trip(pixels: torch.Tensor, bits_per_image: float) -> tuple[torch.Tensor, tuple[int, int]]:
    """uint8 (N, 3, H, W) -> (uint8 (N, 3, H, W) reconstruction, thumbnail (h, w)) of an 8-bit RGB
    thumbnail holding ``bits_per_image`` bits, its sides rounded to the nearest pixel as the
    equal-floats baseline's (``bicubic_size``): up to a pixel per side more than the budget, so the
    comparison errs in the thumbnail's favour (21x21 = 10,584 bits for 10,205 at 256²)."""
    h, w = pixels.shape[-2:]
    small_size, _ = bicubic_size(h, w, bits_per_image / 8)
    x = pixels.float() / 127.5 - 1  # (N, 3, H, W) float [-1, 1]
    small = F.interpolate(x, size=small_size, mode="bicubic", antialias=True, align_corners=False)
    stored = to_uint8_pixels(small).float() / 127.5 - 1  # the thumbnail as uint8 holds it
    return to_uint8_pixels(
        F.interpolate(stored, size=(h, w), mode="bicubic", align_corners=False)
    ), small_size


def _webp(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="WEBP", quality=quality)
    return buffer.getvalue()


def webp_at_budget(pixels: torch.Tensor, budget_bytes: int) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """uint8 (N, 3, H, W) -> (uint8 reconstructions, per item ``bytes``, ``quality``, ``over_budget``):
    the largest quality whose file fits ``budget_bytes`` (binary search: size grows with quality)."""
    out, sizes, qualities, over = [], [], [], []
    for item in pixels.cpu():
        image = Image.fromarray(item.permute(1, 2, 0).numpy())
        low, high = WEBP_QUALITIES
        best = None
        while low <= high:
            quality = (low + high) // 2
            data = _webp(image, quality)
            if len(data) <= budget_bytes:
                best, low = (quality, data), quality + 1
            else:
                high = quality - 1
        fits = best is not None
        quality, data = best if fits else (WEBP_QUALITIES[0], _webp(image, WEBP_QUALITIES[0]))
        decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        out.append(torch.from_numpy(decoded.copy()).permute(2, 0, 1))
        sizes.append(len(data))
        qualities.append(quality)
        over.append(not fits)
    stats = {"bytes": np.array(sizes), "quality": np.array(qualities), "over_budget": np.array(over)}
    return torch.stack(out), stats


def bits_per_item(tokens_per_item: int, vocabulary_size: int) -> float:
    """The bits a discrete tokenizer spends on an item: tokens x log2(vocabulary)."""
    return tokens_per_item * math.log2(vocabulary_size)
