"""Mochi 1 video VAE on diffusers ``AutoencoderKLMochi``.

A causal video VAE: the spec and the frame rule come from
:class:`~tokenizers_svc.families.base.CausalVideoVAEBackend`, which this file's backend configures.
"""

from __future__ import annotations

import math

from tokenizers_svc.families.base import (
    TINY_LATENT_MEAN,
    TINY_LATENT_STD,
    CausalVideoVAEBackend,
    group_norm_min_latent_size,
)
from tokenizers_svc.spec import LatentNormalization


class MochiVAEBackend(CausalVideoVAEBackend):
    """Mochi 1 VAE (1 + 6k frames). Pipeline: ``(z - latents_mean) / latents_std * scaling_factor``."""

    class_names = ("AutoencoderKLMochi",)
    family = "Mochi"

    @staticmethod
    def compression(cfg) -> tuple[int, int]:
        return math.prod(cfg["spatial_expansions"]), math.prod(cfg["temporal_expansions"])

    @staticmethod
    def min_latent_size(cfg) -> int:
        channels = [*cfg["encoder_block_out_channels"], *cfg["decoder_block_out_channels"]]
        return group_norm_min_latent_size(channels, 32)  # diffusers' Mochi GroupNorms have 32 groups

    @staticmethod
    def normalization(cfg) -> LatentNormalization:
        if cfg.get("latents_mean") is None:
            return LatentNormalization(scale=float(cfg["scaling_factor"]))
        return LatentNormalization(
            scale=float(cfg["scaling_factor"]), mean=tuple(cfg["latents_mean"]), std=tuple(cfg["latents_std"])
        )


BACKENDS = (MochiVAEBackend,)
PRESETS = MochiVAEBackend.presets(
    hub=("mochi-vae", "genmo/mochi-1-preview", "Mochi 1 VAE (f8 t6 c12, 1 + 6k frames, per-channel mean/std)"),
    # Mochi's GroupNorm has 32 groups, so 32 channels is the narrowest width
    tiny=("mochi-vae-tiny", {"latent_channels": 4, "encoder_block_out_channels": [32, 32, 32, 32],
          "decoder_block_out_channels": [32, 32, 32, 32], "layers_per_block": [1, 1, 1, 1, 1],
          "add_attention_block": [False] * 5, "latents_mean": TINY_LATENT_MEAN, "latents_std": TINY_LATENT_STD,
          "scaling_factor": 1.0, "spatial_expansions": [2, 2, 2], "temporal_expansions": [1, 2, 3]},
          "Mochi-style VAE (f8 t6 c4, 1 + 6k frames), random init"),
)  # fmt: skip
