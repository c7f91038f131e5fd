"""HunyuanVideo video VAE on diffusers ``AutoencoderKLHunyuanVideo``.

A causal video VAE: the spec and the frame rule come from
:class:`~tokenizers_svc.families.base.CausalVideoVAEBackend`, which this file's backend configures.
"""

from __future__ import annotations

from tokenizers_svc.families.base import CausalVideoVAEBackend, group_norm_min_latent_size
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
PRESETS = HunyuanVideoVAEBackend.presets(
    hub=("hunyuan-video-vae", "hunyuanvideo-community/HunyuanVideo", "HunyuanVideo VAE (f8 t4 c16, 1 + 4k frames, scaling 0.476986)"),
    tiny=("hunyuan-video-vae-tiny", {"latent_channels": 4, "block_out_channels": [8, 8, 16, 16], "layers_per_block": 1,
          "norm_num_groups": 4, "scaling_factor": 0.476986, "spatial_compression_ratio": 8,
          "temporal_compression_ratio": 4},
          "HunyuanVideo-style VAE (f8 t4 c4, mid-block attention), random init"),
)  # fmt: skip
