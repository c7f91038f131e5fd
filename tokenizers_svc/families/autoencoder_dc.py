"""DC-AE: deep-compression image auto-encoders on diffusers ``AutoencoderDC``.

Paper: Chen et al., "Deep Compression Autoencoder for Efficient High-Resolution Diffusion Models"
(arXiv 2410.10733). Residual auto-encoding (space-to-channel shortcuts around every down/up stage)
reaches 32x, 64x and 128x spatial compression. The latent is deterministic (no posterior), so
``encode_moments`` returns ``logvar=None``. Normalization is ``z * scaling_factor`` with the factor
from the model's config; each released variant has its own factor:

============================  =========  =======================================
variant (mit-han-lab/...)     scaling    preset here
============================  =========  =======================================
dc-ae-f32c32-in-1.0           0.3189     ``dc-ae-f32c32``
dc-ae-f32c32-mix-1.0          0.4552     (same architecture; pass the directory)
dc-ae-f32c32-sana-1.0         0.41407    (different blocks: EViT-S5 multiscale)
dc-ae-f64c128-in-1.0          0.2889     ``dc-ae-f64c128``
dc-ae-f64c128-mix-1.0         0.4538     (same architecture)
dc-ae-f128c512-in-1.0         0.4883     ``dc-ae-f128c512``
dc-ae-f128c512-mix-1.0        0.3620     (same architecture)
============================  =========  =======================================

Pixels: ``(N, 3, H, W)`` float in [-1, 1], ``H, W`` multiples of the compression factor.
Latents: ``(N, c, H/f, W/f)``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from tokenizers_svc.families.base import Backend, Preset
from tokenizers_svc.spec import LatentNormalization, TokenizerSpec

if TYPE_CHECKING:  # torch is imported where tensors are made: listing specs needs no torch
    pass


def _normalization(cfg: Mapping) -> LatentNormalization:
    """Per-channel ``latents_mean``/``latents_std`` when the export carries them (fitted by
    ``training.latent_stats``; ``scaling_factor``/``shift_factor`` are then the scalar fallback for
    pipelines that read only those two, kept as such), else the released models' ``z * scaling_factor``."""
    mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
    scalar_pair = (float(cfg["scaling_factor"]), float(cfg.get("shift_factor") or 0.0))
    if mean is not None and std is not None:
        return LatentNormalization(
            scale=1.0,
            mean=tuple(map(float, mean)),
            std=tuple(map(float, std)),
            scalar_fallback=None if scalar_pair == (1.0, 0.0) else scalar_pair,
        )
    return LatentNormalization(scale=scalar_pair[0])


class _FittedStatisticsFilter(logging.Filter):
    """diffusers warns that config keys AutoencoderDC does not take "will be ignored"; the backend
    reads the fitted statistics itself, so that warning would mislead."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("latents_mean" in message and "will be ignored" in message)


logging.getLogger("diffusers.configuration_utils").addFilter(_FittedStatisticsFilter())


class AutoencoderDCBackend(Backend):
    class_names = ("AutoencoderDC",)
    traced_inference = True

    @classmethod
    def spec_from_config(cls, config: Mapping, name: str) -> TokenizerSpec:
        return TokenizerSpec(
            name=name,
            family="DC-AE",
            modality="image",
            spatial_compression=2 ** (len(config["encoder_block_out_channels"]) - 1),
            latent_channels=config["latent_channels"],
            normalization=_normalization(config),
            is_kl=False,
            in_channels=config["in_channels"],
        )


def released_config(levels: int, latent_channels: int, scaling_factor: float) -> dict:
    """The ``*-in-1.0`` / ``*-mix-1.0`` diffusers configs (``scripts/convert_dcae_to_diffusers.py``).

    ``levels`` = 6 / 7 / 8 for f32 / f64 / f128: three ResBlock stages (the first with no layers),
    then EfficientViT stages; the encoder is shallower than the decoder.
    """
    vit_stages = levels - 3
    channels = [128, 256, 512, 512, 1024, 1024, 2048, 2048][:levels]
    return {
        "in_channels": 3,
        "latent_channels": latent_channels,
        "attention_head_dim": 32,
        "encoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * vit_stages,
        "decoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * vit_stages,
        "encoder_block_out_channels": channels,
        "decoder_block_out_channels": channels,
        "encoder_layers_per_block": [0, 4, 8] + [2] * vit_stages,
        "decoder_layers_per_block": [0, 5, 10] + [2] * vit_stages,
        "encoder_qkv_multiscales": [[]] * levels,
        "decoder_qkv_multiscales": [[]] * levels,
        "upsample_block_type": "pixel_shuffle",
        "downsample_block_type": "pixel_unshuffle",
        "decoder_norm_types": ["batch_norm"] * 3 + ["rms_norm"] * vit_stages,
        "decoder_act_fns": ["relu"] * 3 + ["silu"] * vit_stages,
        "encoder_out_shortcut": True,
        "decoder_in_shortcut": True,
        "decoder_conv_act_fn": "relu",
        "scaling_factor": scaling_factor,
    }


def tiny_config(levels: int, latent_channels: int) -> dict:
    """Same block layout as the released models with 1 layer per stage and 16..128 channels."""
    vit_stages = levels - 3
    channels = [16, 32, 64, 64, 128, 128, 128, 128][:levels]
    return {
        **released_config(levels, latent_channels, scaling_factor=1.0),
        "attention_head_dim": 16,
        "encoder_block_out_channels": channels,
        "decoder_block_out_channels": channels,
        "encoder_layers_per_block": [0, 1, 1] + [1] * vit_stages,
        "decoder_layers_per_block": [0, 1, 1] + [1] * vit_stages,
    }


RELEASED = {
    # preset: (levels, latent channels, scaling factor, hub id of the diffusers-format weights)
    "dc-ae-f32c32": (6, 32, 0.3189, "mit-han-lab/dc-ae-f32c32-in-1.0-diffusers"),
    "dc-ae-f64c128": (7, 128, 0.2889, "mit-han-lab/dc-ae-f64c128-in-1.0-diffusers"),
    "dc-ae-f128c512": (8, 512, 0.4883, "mit-han-lab/dc-ae-f128c512-in-1.0-diffusers"),
}

BACKENDS = (AutoencoderDCBackend,)
PRESETS = (
    *(
        Preset(
            name=name,
            class_name="AutoencoderDC",
            config=released_config(levels, channels, scale),
            source=hub_id,
            description=f"DC-AE f{2 ** (levels - 1)}c{channels} ImageNet 1.0 (scaling {scale}); {hub_id}",
        )
        for name, (levels, channels, scale, hub_id) in RELEASED.items()
    ),
    Preset(
        name="dc-ae-f32c32-tiny",
        class_name="AutoencoderDC",
        config=tiny_config(6, 32),
        description="6-level DC-AE (f32c32, 1 layer per stage), random init; tests and CPU training",
        random_init=True,
    ),
    Preset(
        name="dc-ae-f64c128-tiny",
        class_name="AutoencoderDC",
        config=tiny_config(7, 128),
        description="7-level DC-AE (f64c128, 1 layer per stage), random init; tests and CPU training",
        random_init=True,
    ),
)
