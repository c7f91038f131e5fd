"""LTX-Video style causal video VAE on diffusers ``AutoencoderKLLTXVideo``.

Paper: HaCohen et al., "LTX-Video: Realtime Video Latent Diffusion" (arXiv 2501.00103). The input
is patchified 4x4 before the first convolution, then three spatio-temporal down stages give 32x
spatial and 8x temporal compression to 128 channels: 1:192 of the pixel floats. The encoder is
causal in time, so a clip of ``1 + 8k`` frames maps to ``1 + k`` latent frames (the first frame is
encoded alone and a single image is a valid one-frame clip).

Pixels: ``(N, 3, T, H, W)`` float in [-1, 1], ``T = 1 + t*k``, ``H, W`` multiples of the spatial
factor. Latents: ``(N, c, 1 + (T-1)/t, H/s, W/s)``. Normalization as in diffusers' LTX pipeline:
``(z - latents_mean[c]) / latents_std[c] * scaling_factor``, the per-channel statistics being
buffers saved with the weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers_svc.families.base import Backend, Preset
from tokenizers_svc.formats import read_safetensors_vector
from tokenizers_svc.spec import FrameRule, LatentNormalization, TokenizerSpec

if TYPE_CHECKING:
    from diffusers import AutoencoderKLLTXVideo


WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # diffusers' save_pretrained name


def _channel_stats(
    module: AutoencoderKLLTXVideo,
) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """Per-channel latents_mean/std buffers, or None while they hold no values (meta device)."""
    mean, std = module.latents_mean, module.latents_std
    if mean.is_meta or std.is_meta:
        return None, None
    return tuple(mean.float().tolist()), tuple(std.float().tolist())


class LTXVideoBackend(Backend):
    class_names = ("AutoencoderKLLTXVideo",)

    @classmethod
    def spec_from_config(cls, config: Mapping, name: str) -> TokenizerSpec:
        """Compression as diffusers derives it; per-channel statistics are buffers in the weights, so
        this spec has ``scaling_factor`` only and :meth:`from_module` adds them."""
        scaling = 2 ** sum(config["spatio_temporal_scaling"])
        return TokenizerSpec(
            name=name,
            family="LTX-Video",
            modality="video",
            spatial_compression=config.get("spatial_compression_ratio") or config["patch_size"] * scaling,
            latent_channels=config["latent_channels"],
            frame_rule=FrameRule(
                temporal_compression=config.get("temporal_compression_ratio")
                or config["patch_size_t"] * scaling,
                causal=True,
            ),
            normalization=LatentNormalization(scale=float(config["scaling_factor"])),
            is_kl=True,
            in_channels=config["in_channels"],
        )

    @classmethod
    def spec_from_export(cls, directory: Path, config: Mapping, name: str) -> TokenizerSpec:
        """With the latents_mean/std buffers read from the weights file (no torch)."""
        spec = cls.spec_from_config(config, name)
        weights = Path(directory) / WEIGHTS_FILE
        mean, std = (read_safetensors_vector(weights, key) for key in ("latents_mean", "latents_std"))
        if mean is None or std is None:
            return spec
        return replace(spec, normalization=replace(spec.normalization, mean=mean, std=std))

    @classmethod
    def from_module(
        cls, module: AutoencoderKLLTXVideo, name: str, weights_hash: str | None = None
    ) -> LTXVideoBackend:
        spec = cls.spec_from_config(module.config, name)
        mean, std = _channel_stats(module)
        normalization = replace(spec.normalization, mean=mean, std=std)
        return cls(module, replace(spec, normalization=normalization), weights_hash)


# Lightricks/LTX-Video vae/config.json (0.9.0); the decoder keys it omits take diffusers' defaults,
# which equal the encoder's (that is how the released checkpoint loads).
LTX_VIDEO_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 128,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": [4, 3, 3, 3, 4],
    "spatio_temporal_scaling": [True, True, True, False],
    "patch_size": 4,
    "patch_size_t": 1,
    "resnet_norm_eps": 1e-6,
    "scaling_factor": 1.0,
    "encoder_causal": True,
    "decoder_causal": False,
}

# 16x spatial (4x4 patchify + 2 stages), 4x temporal (2 stages), 16 channels: also 1:192.
TINY_VIDEO_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": [16, 32, 64],
    "down_block_types": ["LTXVideoDownBlock3D"] * 3,
    "downsample_type": ["conv"] * 3,
    "layers_per_block": [1, 1, 1, 1],
    "spatio_temporal_scaling": [True, True, False],
    "decoder_block_out_channels": [16, 32, 64],
    "decoder_layers_per_block": [1, 1, 1, 1],
    "decoder_spatio_temporal_scaling": [True, True, False],
    "decoder_inject_noise": [False] * 4,
    "upsample_residual": [False] * 3,
    "upsample_factor": [1] * 3,
    "patch_size": 4,
    "patch_size_t": 1,
    "resnet_norm_eps": 1e-6,
    "scaling_factor": 1.0,
    "encoder_causal": True,
    "decoder_causal": False,
}

BACKENDS = (LTXVideoBackend,)
PRESETS = (
    Preset(
        name="ltx-video-vae",
        class_name="AutoencoderKLLTXVideo",
        config=LTX_VIDEO_VAE,
        source="Lightricks/LTX-Video",
        subfolder="vae",
        description="LTX-Video 0.9 VAE (f32 t8 c128, causal, 1:192)",
    ),
    Preset(
        name="video-vae-f32t8c128",
        class_name="AutoencoderKLLTXVideo",
        config=LTX_VIDEO_VAE,
        description="LTX-Video architecture (f32 t8 c128, causal 1+8k, 1:192), random init; to train",
        random_init=True,
    ),
    Preset(
        name="video-vae-tiny",
        class_name="AutoencoderKLLTXVideo",
        config=TINY_VIDEO_VAE,
        description="tiny causal video VAE (f16 t4 c16, 1+4k frames, 1:192), random init; tests and CPU",
        random_init=True,
    ),
)
