"""Adapters over the diffusers causal video VAEs: Wan, HunyuanVideo, CogVideoX, Cosmos, Mochi.

Every class here encodes (N, 3, T, H, W) float [-1, 1] clips with ``T = 1 + k * t`` (the first
frame alone, then groups of ``t`` frames: a causal :class:`~tokenizers_svc.spec.FrameRule`) into
(N, c, 1 + k, H / f, W / f) latents, and decodes them back to ``1 + k * t`` frames; an image is a
one-frame clip. Each adapter reads compression, channels and the latent normalization its
diffusers pipeline applies from the model's own ``config.json``, so a hub checkpoint and a tiny
random-init preset go through the same code:

============  =========  ====  ==========================================  =========================
family        rule       f     normalized latents (as the pipeline does)   config fields
============  =========  ====  ==========================================  =========================
Wan 2.1       1 + 4k     8     ``(z - mean[c]) / std[c]``                  latents_mean/latents_std
HunyuanVideo  1 + 4k     8     ``z * scaling_factor``                      scaling_factor
CogVideoX     1 + 4k     8     ``z * scaling_factor``                      scaling_factor
Cosmos 1.0    1 + 8k     8     ``(z - mean[c]) / std[c] * sigma_data``     latents_mean/latents_std
Mochi 1       1 + 6k     8     ``(z - mean[c]) / std[c] * scaling_factor`` latents_mean/latents_std
============  =========  ====  ==========================================  =========================

Cosmos is deterministic (no posterior); the others are KL models (mean, logvar). Cosmos 1.0 ships
per-(channel, latent frame) stats, reduced here to per-channel ones (see :class:`CosmosVAEBackend`).
Pixel input is always RGB (Mochi's ``in_channels=15`` counts its internal Fourier features).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from tokenizers_svc.families.base import Backend, Preset
from tokenizers_svc.spec import FrameRule, LatentNormalization, TokenizerSpec

if TYPE_CHECKING:  # torch is imported where tensors are made: listing specs needs no torch
    import torch

# Cosmos 1.0 pipelines scale normalized latents by their EDM scheduler's ``sigma_data``, which lives
# in the scheduler config, not the VAE's: ``EDMEulerScheduler``'s default (tests/test_video_vae.py
# checks it against diffusers; the hub scheduler config could not be checked offline).
COSMOS_SIGMA_DATA = 0.5


class _VideoVAEBackend(Backend):
    """Shared compute for the diffusers video VAEs: ``encode().latent_dist`` and ``decode().sample``."""

    family = ""
    is_kl = True

    @classmethod
    def spec_from_config(cls, config: Mapping, name: str) -> TokenizerSpec:
        spatial, temporal = cls.compression(config)
        return TokenizerSpec(
            name=name,
            family=cls.family,
            modality="video",
            spatial_compression=spatial,
            latent_channels=cls.latent_channels(config),
            frame_rule=FrameRule(temporal_compression=temporal, causal=True),
            normalization=cls.normalization(config),
            is_kl=cls.is_kl,
            in_channels=3,  # RGB for every family (see the module docstring)
        )

    @staticmethod
    def compression(cfg) -> tuple[int, int]:
        """(spatial, temporal) compression from the model config."""
        raise NotImplementedError

    @staticmethod
    def latent_channels(cfg) -> int:
        return int(cfg["latent_channels"])

    @staticmethod
    def normalization(cfg) -> LatentNormalization:
        raise NotImplementedError

    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (N, 3, 1 + k t, H, W) float [-1, 1] -> raw (mean, logvar), each (N, c, 1 + k, H/f, W/f)."""
        dist = self.module.encode(x).latent_dist
        return dist.mean, dist.logvar

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """z: raw (N, c, 1 + k, h, w) -> (N, 3, 1 + k t, h f, w f) float, nominally [-1, 1]."""
        return self.module.decode(z).sample


class WanVAEBackend(_VideoVAEBackend):
    """Wan 2.1 (and Wan-style, e.g. Cosmos 2) VAE. Pipeline: ``(z - latents_mean) / latents_std``."""

    class_names = ("AutoencoderKLWan",)
    family = "Wan"
    streams_frames = True  # encode: 1 then 4 frames per step, decode: 1 latent per step (feat_cache)

    @staticmethod
    def compression(cfg) -> tuple[int, int]:
        # as the Wan/Cosmos-2 pipelines derive it: one 2x spatial stage per temperal_downsample entry
        # (times the patchifier's factor for Wan 2.2), 2x temporal where the entry is True
        spatial = 2 ** len(cfg["temperal_downsample"]) * (cfg.get("patch_size") or 1)
        return spatial, 2 ** sum(cfg["temperal_downsample"])

    @staticmethod
    def latent_channels(cfg) -> int:
        return int(cfg["z_dim"])

    @staticmethod
    def normalization(cfg) -> LatentNormalization:
        return LatentNormalization(mean=tuple(cfg["latents_mean"]), std=tuple(cfg["latents_std"]))


class HunyuanVideoVAEBackend(_VideoVAEBackend):
    """HunyuanVideo VAE. Pipeline: ``z * scaling_factor``."""

    class_names = ("AutoencoderKLHunyuanVideo",)
    family = "HunyuanVideo"

    @staticmethod
    def compression(cfg) -> tuple[int, int]:
        return int(cfg["spatial_compression_ratio"]), int(cfg["temporal_compression_ratio"])

    @staticmethod
    def normalization(cfg) -> LatentNormalization:
        return LatentNormalization(scale=float(cfg["scaling_factor"]))


class CogVideoXVAEBackend(_VideoVAEBackend):
    """CogVideoX VAE. Pipeline: ``z * scaling_factor`` (1.15258426 for 2b, 0.7 for 5b).

    Its decoder upsamples time in batches of ``num_latent_frames_batch_size`` (2) latent frames and
    treats only an *odd*-sized first batch as "first frame alone", so an even latent count decodes
    to ``4 k`` instead of ``1 + 4 (k - 1)`` frames (the CogVideoX pipelines only ever use odd counts).
    :meth:`decode_latents` appends a copy of the last latent frame to make the count odd and drops
    the ``t`` frames it decodes to; earlier frames are unaffected (causal convolutions) except
    through the GroupNorm statistics of the last decode batch.
    """

    class_names = ("AutoencoderKLCogVideoX",)
    family = "CogVideoX"
    streams_frames = True  # encode: 8 frames per step, decode: 2 latents per step (conv_cache)

    @staticmethod
    def compression(cfg) -> tuple[int, int]:
        return 2 ** (len(cfg["block_out_channels"]) - 1), int(cfg["temporal_compression_ratio"])

    @staticmethod
    def normalization(cfg) -> LatentNormalization:
        return LatentNormalization(scale=float(cfg["scaling_factor"]))

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        frames = z.shape[2]
        if frames % 2 == 1:
            return self.module.decode(z).sample
        import torch

        padded = torch.cat([z, z[:, :, -1:]], dim=2)  # (N, c, 1 + k + 1, h, w): odd count
        return self.module.decode(padded).sample[:, :, : -self.spec.temporal_compression]


def _per_channel(values, channels: int) -> list[list[float]]:
    """A flat (channels x frames) list, row-major as released -> one row of floats per channel."""
    flat = [float(v) for v in values]
    frames = len(flat) // channels
    return [flat[k * frames : (k + 1) * frames] for k in range(channels)]


class CosmosVAEBackend(_VideoVAEBackend):
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


class MochiVAEBackend(_VideoVAEBackend):
    """Mochi 1 VAE (1 + 6k frames). Pipeline: ``(z - latents_mean) / latents_std * scaling_factor``."""

    class_names = ("AutoencoderKLMochi",)
    family = "Mochi"

    @staticmethod
    def compression(cfg) -> tuple[int, int]:
        return math.prod(cfg["spatial_expansions"]), math.prod(cfg["temporal_expansions"])

    @staticmethod
    def normalization(cfg) -> LatentNormalization:
        if cfg.get("latents_mean") is None:
            return LatentNormalization(scale=float(cfg["scaling_factor"]))
        return LatentNormalization(
            scale=float(cfg["scaling_factor"]), mean=tuple(cfg["latents_mean"]), std=tuple(cfg["latents_std"])
        )


# ------------------------------------------------------------------------------------------ presets
# Hub presets: real diffusers-format checkpoints (loaded with from_pretrained(source, subfolder)).
# Tiny presets: the same classes at a few hundred thousand parameters, random init, f8 and the real
# temporal rule, so every code path (causal caches, frame batching) runs on CPU in about a second;
# each states the config keys its spec reads (the class defaults), so the registry lists it from config.

_HUB = (
    ("wan2.1-vae", "AutoencoderKLWan", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "Wan 2.1 video VAE (f8 t4 c16, 1 + 4k frames, per-channel mean/std)"),
    ("hunyuan-video-vae", "AutoencoderKLHunyuanVideo", "hunyuanvideo-community/HunyuanVideo", "HunyuanVideo VAE (f8 t4 c16, 1 + 4k frames, scaling 0.476986)"),
    ("cogvideox-vae", "AutoencoderKLCogVideoX", "THUDM/CogVideoX-2b", "CogVideoX-2b VAE (f8 t4 c16, 1 + 4k frames, scaling 1.15258426)"),
    ("cosmos-vae", "AutoencoderKLCosmos", "nvidia/Cosmos-1.0-Tokenizer-CV8x8x8", "Cosmos 1.0 CV8x8x8 tokenizer (f8 t8 c16, 1 + 8k frames, deterministic)"),
    ("mochi-vae", "AutoencoderKLMochi", "genmo/mochi-1-preview", "Mochi 1 VAE (f8 t6 c12, 1 + 6k frames, per-channel mean/std)"),
)  # fmt: skip

# Non-trivial per-channel stats in the tiny presets, so a normalization round trip can fail.
_TINY_MEAN = [0.1, -0.2, 0.3, 0.05]
_TINY_STD = [1.5, 0.5, 0.8, 1.2]

_TINY = {
    "wan-vae-tiny": (
        "AutoencoderKLWan",
        # 4 levels (3 spatial downsamples, 2 temporal) like Wan 2.1, 8 base channels, no attention
        {"base_dim": 8, "z_dim": 4, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1,
         "temperal_downsample": [False, True, True], "latents_mean": _TINY_MEAN, "latents_std": _TINY_STD},
        "Wan 2.1-style VAE (f8 t4 c4), random init",
    ),
    "hunyuan-video-vae-tiny": (
        "AutoencoderKLHunyuanVideo",
        {"latent_channels": 4, "block_out_channels": [8, 8, 16, 16], "layers_per_block": 1,
         "norm_num_groups": 4, "scaling_factor": 0.476986, "spatial_compression_ratio": 8,
         "temporal_compression_ratio": 4},
        "HunyuanVideo-style VAE (f8 t4 c4, mid-block attention), random init",
    ),
    "cogvideox-vae-tiny": (
        "AutoencoderKLCogVideoX",
        {"latent_channels": 4, "block_out_channels": [8, 8, 16, 16], "layers_per_block": 1,
         "norm_num_groups": 4, "sample_height": 64, "sample_width": 64, "scaling_factor": 1.15258426,
         "temporal_compression_ratio": 4},
        "CogVideoX-style VAE (f8 t4 c4), random init",
    ),
    "cosmos-vae-tiny": (
        "AutoencoderKLCosmos",
        # haar patch 4 then one 2x stage; temporal 4x (Cosmos ships 4x and 8x variants)
        {"latent_channels": 4, "encoder_block_out_channels": [8, 16, 16, 16],
         "decode_block_out_channels": [8, 16, 16, 16], "attention_resolutions": [], "resolution": 64,
         "num_layers": 1, "patch_size": 4, "spatial_compression_ratio": 8, "temporal_compression_ratio": 4,
         "latents_mean": _TINY_MEAN, "latents_std": _TINY_STD},
        "Cosmos-style deterministic tokenizer (f8 t4 c4), random init",
    ),
    "mochi-vae-tiny": (
        "AutoencoderKLMochi",
        # Mochi's GroupNorm has 32 groups, so 32 channels is the narrowest width
        {"latent_channels": 4, "encoder_block_out_channels": [32, 32, 32, 32],
         "decoder_block_out_channels": [32, 32, 32, 32], "layers_per_block": [1, 1, 1, 1, 1],
         "add_attention_block": [False] * 5, "latents_mean": _TINY_MEAN, "latents_std": _TINY_STD,
         "scaling_factor": 1.0, "spatial_expansions": [2, 2, 2], "temporal_expansions": [1, 2, 3]},
        "Mochi-style VAE (f8 t6 c4, 1 + 6k frames), random init",
    ),
}  # fmt: skip
BACKENDS = (WanVAEBackend, HunyuanVideoVAEBackend, CogVideoXVAEBackend, CosmosVAEBackend, MochiVAEBackend)
PRESETS = (
    *(
        Preset(name=name, class_name=class_name, source=source, subfolder="vae", description=description)
        for name, class_name, source, description in _HUB
    ),
    *(
        Preset(name=name, class_name=class_name, config=config, description=description, random_init=True)
        for name, (class_name, config, description) in _TINY.items()
    ),
)
