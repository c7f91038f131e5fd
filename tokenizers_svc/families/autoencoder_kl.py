"""Adapters over diffusers autoencoder classes: each knows its family's normalization and frame rule.

This file holds the image ``AutoencoderKL`` (SD / SDXL / FLUX); other classes have their own files.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from tokenizers_svc.families.base import Backend, Preset, group_norm_min_latent_size
from tokenizers_svc.spec import LatentNormalization, TokenizerSpec

if TYPE_CHECKING:  # torch is imported where tensors are made: listing specs needs no torch
    pass


class AutoencoderKLBackend(Backend):
    """SD / SDXL / FLUX style image VAE. Normalization: ``(z - shift_factor) * scaling_factor``."""

    class_names = ("AutoencoderKL",)

    @classmethod
    def spec_from_config(cls, config: Mapping, name: str) -> TokenizerSpec:
        return TokenizerSpec(
            name=name,
            family="AutoencoderKL",
            modality="image",
            spatial_compression=2 ** (len(config["block_out_channels"]) - 1),
            latent_channels=config["latent_channels"],
            normalization=LatentNormalization(
                scale=float(config["scaling_factor"]), shift=float(config.get("shift_factor") or 0.0)
            ),
            is_kl=True,
            in_channels=config["in_channels"],
            min_latent_size=group_norm_min_latent_size(
                config["block_out_channels"], config.get("norm_num_groups", 32)
            ),
        )


_TINY_KL = {
    "in_channels": 3,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 64,
}

# The published architecture of the SD-family VAEs (the hub config.json files), so the registry can
# describe them and training can build them without their weights; the hub weights override nothing
# here, they are loaded from ``source`` with their own config.
_SD_VAE = {
    "in_channels": 3,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
}

BACKENDS = (AutoencoderKLBackend,)
PRESETS = (
    Preset(
        name="sd-vae-tiny",
        class_name="AutoencoderKL",
        config={**_TINY_KL, "scaling_factor": 0.18215},
        description="2-level AutoencoderKL (f2c4), random init; for tests and CPU development",
        random_init=True,
    ),
    Preset(
        name="sd-vae-ft-mse",
        class_name="AutoencoderKL",
        config={**_SD_VAE, "sample_size": 256, "scaling_factor": 0.18215},
        source="stabilityai/sd-vae-ft-mse",
        description="Stable Diffusion 1.x VAE (f8c4, scaling 0.18215)",
    ),
    Preset(
        name="sdxl-vae",
        class_name="AutoencoderKL",
        config={**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        source="stabilityai/sdxl-vae",
        description="SDXL VAE (f8c4, scaling 0.13025)",
    ),
    Preset(
        name="flux-vae",
        class_name="AutoencoderKL",
        config={
            **_SD_VAE,
            "latent_channels": 16,
            "sample_size": 1024,
            "scaling_factor": 0.3611,
            "shift_factor": 0.1159,
            "use_quant_conv": False,
            "use_post_quant_conv": False,
        },
        source="black-forest-labs/FLUX.1-dev",
        subfolder="vae",
        gated=True,
        description="FLUX.1 VAE (f8c16, shift 0.1159, scaling 0.3611)",
    ),
)
