"""Cosmos 1.0 continuous video tokenizer on diffusers ``AutoencoderKLCosmos``.

A causal video VAE: the spec and the frame rule come from
:class:`~tokenizers_svc.families.base.CausalVideoVAEBackend`, which this file's backend configures.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from tokenizers_svc.families.base import TINY_LATENT_MEAN, TINY_LATENT_STD, CausalVideoVAEBackend
from tokenizers_svc.spec import LatentNormalization

if TYPE_CHECKING:  # torch is imported where tensors are made: listing specs needs no torch
    import torch

# Cosmos 1.0 pipelines scale normalized latents by their EDM scheduler's ``sigma_data``, which lives
# in the scheduler config, not the VAE's: ``EDMEulerScheduler``'s default (tests/test_backends.py
# checks it against diffusers; the hub scheduler config could not be checked offline).
COSMOS_SIGMA_DATA = 0.5


def _per_channel(values, channels: int) -> list[list[float]]:
    """A flat (channels x frames) list, row-major as released -> one row of floats per channel."""
    flat = [float(v) for v in values]
    frames = len(flat) // channels
    return [flat[k * frames : (k + 1) * frames] for k in range(channels)]


class CosmosVAEBackend(CausalVideoVAEBackend):
    """Cosmos 1.0 continuous tokenizer (CV8x8x8), deterministic. Pipeline:
    ``(z - latents_mean) / latents_std * sigma_data``.

    The released stats hold one value per (channel, latent frame) for 16 latent frames (256 =
    16 x 16, applied as ``view(1, c, -1, 1, 1)[:, :, :t]``). :class:`LatentNormalization` has one
    value per channel, so per-frame stats are reduced to per-channel ones (mean of the means, RMS
    of the stds over frames): diffusion-ready latents are then approximate for Cosmos 1.0, exact
    for configs with per-channel stats (as the tiny preset has). ``normalize=False`` is exact.
    """

    class_names = ("AutoencoderKLCosmos",)
    family = "Cosmos"
    is_kl = False

    @staticmethod
    def compression(cfg) -> tuple[int, int]:
        return int(cfg["spatial_compression_ratio"]), int(cfg["temporal_compression_ratio"])

    @staticmethod
    def normalization(cfg) -> LatentNormalization:
        if cfg.get("latents_mean") is None:
            return LatentNormalization(scale=COSMOS_SIGMA_DATA)
        c = int(cfg["latent_channels"])
        means = _per_channel(cfg["latents_mean"], c)  # c rows of per-frame values
        stds = _per_channel(cfg["latents_std"], c)
        return LatentNormalization(
            scale=COSMOS_SIGMA_DATA,
            mean=tuple(math.fsum(row) / len(row) for row in means),
            std=tuple(math.sqrt(math.fsum(v * v for v in row) / len(row)) for row in stds),
        )

    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        """x: (N, 3, 1 + k t, H, W) float [-1, 1] -> (latents (N, c, 1 + k, H/f, W/f), None)."""
        return self.module.encode(x).latent_dist.mode(), None


BACKENDS = (CosmosVAEBackend,)
PRESETS = CosmosVAEBackend.presets(
    hub=("cosmos-vae", "nvidia/Cosmos-1.0-Tokenizer-CV8x8x8", "Cosmos 1.0 CV8x8x8 tokenizer (f8 t8 c16, 1 + 8k frames, deterministic)"),
    # haar patch 4 then one 2x stage; temporal 4x (Cosmos ships 4x and 8x variants)
    tiny=("cosmos-vae-tiny", {"latent_channels": 4, "encoder_block_out_channels": [8, 16, 16, 16],
          "decode_block_out_channels": [8, 16, 16, 16], "attention_resolutions": [], "resolution": 64,
          "num_layers": 1, "patch_size": 4, "spatial_compression_ratio": 8, "temporal_compression_ratio": 4,
          "latents_mean": TINY_LATENT_MEAN, "latents_std": TINY_LATENT_STD},
          "Cosmos-style deterministic tokenizer (f8 t4 c4), random init"),
)  # fmt: skip
