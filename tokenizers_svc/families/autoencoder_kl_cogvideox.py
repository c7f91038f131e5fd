"""CogVideoX video VAE on diffusers ``AutoencoderKLCogVideoX``.

A causal video VAE: the spec and the frame rule come from
:class:`~tokenizers_svc.families.base.CausalVideoVAEBackend`, which this file's backend configures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenizers_svc.families.base import CausalVideoVAEBackend, group_norm_min_latent_size
from tokenizers_svc.spec import LatentNormalization

if TYPE_CHECKING:  # torch is imported where tensors are made: listing specs needs no torch
    import torch


class CogVideoXVAEBackend(CausalVideoVAEBackend):
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
    def min_latent_size(cfg) -> int:
        return group_norm_min_latent_size(cfg["block_out_channels"], cfg.get("norm_num_groups", 32))

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


BACKENDS = (CogVideoXVAEBackend,)
PRESETS = CogVideoXVAEBackend.presets(
    hub=("cogvideox-vae", "THUDM/CogVideoX-2b", "CogVideoX-2b VAE (f8 t4 c16, 1 + 4k frames, scaling 1.15258426)"),
    tiny=("cogvideox-vae-tiny", {"latent_channels": 4, "block_out_channels": [8, 8, 16, 16], "layers_per_block": 1,
          "norm_num_groups": 4, "sample_height": 64, "sample_width": 64, "scaling_factor": 1.15258426,
          "temporal_compression_ratio": 4},
          "CogVideoX-style VAE (f8 t4 c4), random init"),
)  # fmt: skip
