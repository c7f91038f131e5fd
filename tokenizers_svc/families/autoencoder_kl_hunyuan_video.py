"""HunyuanVideo video VAE on diffusers ``AutoencoderKLHunyuanVideo``.

A causal video VAE: the spec and the frame rule come from
:class:`~tokenizers_svc.families.base.CausalVideoVAEBackend`, which this file's backend configures.
"""

from __future__ import annotations

from tokenizers_svc.families.base import CausalVideoVAEBackend, Preset, group_norm_min_latent_size
from tokenizers_svc.spec import LatentNormalization


class HunyuanVideoVAEBackend(CausalVideoVAEBackend):
    """HunyuanVideo VAE. Pipeline: ``z * scaling_factor``."""

    class_names = ("AutoencoderKLHunyuanVideo",)
    family = "HunyuanVideo"

    @staticmethod
    def compression(cfg) -> tuple[int, int]:
        return int(cfg["spatial_compression_ratio"]), int(cfg["temporal_compression_ratio"])

    @staticmethod
    def min_latent_size(cfg) -> int:
        return group_norm_min_latent_size(cfg["block_out_channels"], cfg.get("norm_num_groups", 32))

    @staticmethod
    def normalization(cfg) -> LatentNormalization:
        return LatentNormalization(scale=float(cfg["scaling_factor"]))


BACKENDS = (HunyuanVideoVAEBackend,)
PRESETS = (
    Preset(
        name="hunyuan-video-vae",
        class_name="AutoencoderKLHunyuanVideo",
        source="hunyuanvideo-community/HunyuanVideo",
        subfolder="vae",
        description="HunyuanVideo VAE (f8 t4 c16, 1 + 4k frames, scaling 0.476986)",
    ),
    # the same class at a few hundred thousand parameters, random init, f8 and the real temporal rule,
    # so every code path (causal caches, frame batching) runs on CPU in about a second; it states the
    # config keys its spec reads (the class defaults), so the registry lists it from config
    Preset(
        name="hunyuan-video-vae-tiny",
        class_name="AutoencoderKLHunyuanVideo",
        config={"latent_channels": 4, "block_out_channels": [8, 8, 16, 16], "layers_per_block": 1,
         "norm_num_groups": 4, "scaling_factor": 0.476986, "spatial_compression_ratio": 8,
         "temporal_compression_ratio": 4},
        description="HunyuanVideo-style VAE (f8 t4 c4, mid-block attention), random init",
        random_init=True,
    ),
)  # fmt: skip
