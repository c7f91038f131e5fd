"""DC-AE video: an image DC-AE on every frame plus a causal temporal codec in its latent space.

Backend and presets; the network is :mod:`tokenizers_svc.families.autoencoder_dc_video_model` (imported when a
model is built, so listing the registry imports neither torch nor diffusers). A clip of ``1 + t k``
frames maps to ``1 + k`` latent frames of the image model's latent channels at its spatial factor;
the first frame is encoded alone, so an image is a one-frame clip whose latent is the image model's.

Pixels: ``(N, 3, T, H, W)`` float in [-1, 1]. Latents: ``(N, c, 1 + k, H/f, W/f)``, deterministic.
Normalization: ``(z - latents_mean[c]) / latents_std[c]`` from the saved config when fitted
(``training.latent_stats``), else ``z * scaling_factor``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from tokenizers_svc.families.base import Backend, Preset
from tokenizers_svc.spec import FrameRule, LatentNormalization, TokenizerSpec

if TYPE_CHECKING:  # torch is imported where tensors are made: listing specs needs no torch
    import torch


class AutoencoderDCVideoBackend(Backend):
    class_names = ("AutoencoderDCVideo",)

    @classmethod
    def spec_from_config(cls, config: Mapping, name: str) -> TokenizerSpec:
        spatial = config["spatial_config"]
        mean, std = config.get("latents_mean"), config.get("latents_std")
        if mean is not None and std is not None:
            normalization = LatentNormalization(mean=tuple(map(float, mean)), std=tuple(map(float, std)))
        else:
            normalization = LatentNormalization(scale=float(config.get("scaling_factor", 1.0)))
        return TokenizerSpec(
            name=name,
            family="DC-AE-Video",
            modality="video",
            spatial_compression=2 ** (len(spatial["encoder_block_out_channels"]) - 1),
            latent_channels=spatial["latent_channels"],
            frame_rule=FrameRule(temporal_compression=config["temporal_compression"], causal=True),
            normalization=normalization,
            is_kl=False,
            in_channels=spatial["in_channels"],
        )

    def frame_latent_objective(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, 3, 1 + t k, H, W) float [-1, 1] -> (prediction, target) per-frame latents, each
        (N, c, 1 + t k, H/f, W/f): the training objective of the temporal codec (loss.space)."""
        return self.module.frame_latent_objective(x)


# A 4-level DC-AE (f8) with 1 layer per stage and 16..64 channels as the spatial path: tests and CPU.
_TINY_SPATIAL = {
    "in_channels": 3,
    "latent_channels": 4,
    "attention_head_dim": 16,
    "encoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"],
    "decoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"],
    "encoder_block_out_channels": [16, 32, 64, 64],
    "decoder_block_out_channels": [16, 32, 64, 64],
    "encoder_layers_per_block": [0, 1, 1, 1],
    "decoder_layers_per_block": [0, 1, 1, 1],
    "encoder_qkv_multiscales": [[]] * 4,
    "decoder_qkv_multiscales": [[]] * 4,
    "upsample_block_type": "pixel_shuffle",
    "downsample_block_type": "pixel_unshuffle",
    "decoder_norm_types": ["rms_norm"] * 4,
    "decoder_act_fns": ["silu"] * 4,
    "scaling_factor": 1.0,
}
# The shipped image default's architecture (DC-AE f8c4, 6.7M: tokenizers_svc/weights/tsvc-image-f8c4)
# as the spatial path; built with model.spatial_init_from pointing at those weights.
_IMAGE_DEFAULT_SPATIAL = {
    **_TINY_SPATIAL,
    "attention_head_dim": 32,
    "encoder_block_out_channels": [32, 64, 128, 256],
    "decoder_block_out_channels": [64, 128, 128, 256],
    "encoder_layers_per_block": [1, 1, 1, 1],
    "decoder_layers_per_block": [1, 1, 2, 2],
    "decoder_conv_act_fn": "relu",
    "encoder_out_shortcut": True,
    "decoder_in_shortcut": True,
}
_TINY = {"spatial_config": _TINY_SPATIAL, "temporal_compression": 4, "temporal_width": 16}

BACKENDS = (AutoencoderDCVideoBackend,)
# native: config.json names it, diffusers does not know it; imported when a model is built
MODEL_CLASSES = {"AutoencoderDCVideo": "tokenizers_svc.families.autoencoder_dc_video_model"}
PRESETS = (
    Preset(
        name="dc-ae-video-f8t4c4",
        class_name="AutoencoderDCVideo",
        config={
            "spatial_config": _IMAGE_DEFAULT_SPATIAL,
            "temporal_compression": 4,
            "temporal_width": 64,
            "encoder_blocks": 2,
            "decoder_blocks": 3,
        },
        description="the image default's DC-AE f8c4 per frame + causal temporal codec (f8 t4 c4, 1+4k "
        "frames, 1:192); train from it with model.spatial_init_from",
        random_init=True,
    ),
    Preset(
        name="dc-ae-video-tiny",
        class_name="AutoencoderDCVideo",
        config=_TINY,
        description="DC-AE f8c4 per frame + causal temporal codec (t4, 1+4k frames), random init; "
        "tests and CPU (train from an image DC-AE with model.spatial_init_from)",
        random_init=True,
    ),
)
