"""Wan 2.1 (and Wan-style, e.g. Cosmos 2) video VAE on diffusers ``AutoencoderKLWan``.

A causal video VAE: the spec and the frame rule come from
:class:`~tokenizers_svc.families.base.CausalVideoVAEBackend`, which this file's backend configures.
"""

from __future__ import annotations

from tokenizers_svc.families.base import TINY_LATENT_MEAN, TINY_LATENT_STD, CausalVideoVAEBackend
from tokenizers_svc.spec import LatentNormalization


class WanVAEBackend(CausalVideoVAEBackend):
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


BACKENDS = (WanVAEBackend,)
PRESETS = WanVAEBackend.presets(
    hub=("wan2.1-vae", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "Wan 2.1 video VAE (f8 t4 c16, 1 + 4k frames, per-channel mean/std)"),
    # 4 levels (3 spatial downsamples, 2 temporal) like Wan 2.1, 8 base channels, no attention
    tiny=("wan-vae-tiny", {"base_dim": 8, "z_dim": 4, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1,
          "temperal_downsample": [False, True, True], "latents_mean": TINY_LATENT_MEAN, "latents_std": TINY_LATENT_STD},
          "Wan 2.1-style VAE (f8 t4 c4), random init"),
)  # fmt: skip
