"""Discrete image tokens from diffusers ``VQModel`` (the VQ-GAN first stage of LDM's "VQ-f4" models).

``VQModel`` quantizes with a learned codebook (diffusers' ``VectorQuantizer``): each latent position
becomes the nearest of ``num_vq_embeddings`` rows of ``vq_embed_dim`` channels (``latent_channels``
when unset). The adapter exposes the row indices as token ids through the project's quantizer
interface (:class:`~tokenizers_svc.quantizers.Codebook`): int32, base 0, ``(N, h, w)`` in raster
order, vocabulary ``num_vq_embeddings``, ``levels = (num_vq_embeddings,)`` (one mixed-radix digit), so
the token file, the CLI, the server and the batch job take them as they take FSQ ids.

Latents before quantization vs ids. Pixels: ``(N, 3, H, W)`` float in [-1, 1]. Latents:
``(N, D, H/f, W/f)`` float, what ``VQModel.encode`` returns: the encoder's output after ``quant_conv``,
*before* quantization, the space LDM's diffusion model is trained in (``LDMPipeline`` divides by
``scaling_factor`` before decoding, hence the normalization ``z * scaling_factor``). Ids: the index
of each position's nearest codebook row, what an autoregressive model trains on. Decoding latents
quantizes them to their nearest rows first, as ``VQModel.decode`` does by default, so a latent file
and the ids of the same pixels decode to the same pixels; the ids lose what the latents held
beyond that choice of row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from tokenizers_svc.errors import UnsupportedModelError
from tokenizers_svc.families.base import Backend, Preset, group_norm_min_latent_size
from tokenizers_svc.spec import VQ_KIND, LatentNormalization, QuantizerSpec, TokenizerSpec

if TYPE_CHECKING:  # torch is imported where tensors are made: listing specs needs no torch
    import torch
    from torch import nn

    from tokenizers_svc.quantizers import Codebook

# VQModel's default ``scaling_factor`` (diffusers 0.42.1, vq_model.py): configs saved before the key
# existed (the LDM ones) get it when loaded, and LDMPipeline divides by it.
VQMODEL_SCALING_FACTOR = 0.18215


class VQModelBackend(Backend):
    """diffusers ``VQModel`` with its codebook as the token vocabulary (module docstring)."""

    class_names = ("VQModel",)

    def __init__(self, module: nn.Module, spec: TokenizerSpec, weights_hash: str | None = None) -> None:
        super().__init__(module, spec, weights_hash)
        from tokenizers_svc.quantizers import Codebook

        self._codebook = Codebook(module.quantize, self.spec.quantizer)

    @property
    def quantizer(self) -> Codebook:
        """The model's own codebook (``module.quantize``, loaded by diffusers), as token ids see it."""
        return self._codebook

    @classmethod
    def spec_from_config(cls, config: Mapping, name: str) -> TokenizerSpec:
        if config.get("lookup_from_codebook"):
            raise UnsupportedModelError(
                f"{name}: a VQModel with lookup_from_codebook (aMUSEd's VQ-GAN) decodes ids in place of "
                "latents and works on [0, 1] pixels; not supported",
                param="model",
            )
        return TokenizerSpec(
            name=name,
            family="VQModel",
            modality="image",
            spatial_compression=2 ** (len(config["block_out_channels"]) - 1),
            latent_channels=int(config.get("vq_embed_dim") or config["latent_channels"]),  # the codebook's D
            normalization=LatentNormalization(
                scale=float(config.get("scaling_factor", VQMODEL_SCALING_FACTOR))
            ),
            is_kl=False,
            in_channels=config["in_channels"],
            min_latent_size=group_norm_min_latent_size(
                config["block_out_channels"], config.get("norm_num_groups", 32)
            ),
            quantizer=QuantizerSpec(
                VQ_KIND, (int(config["num_vq_embeddings"]),), latents_before_quantization=True
            ),
        )

    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        """x: (N, 3, H, W) float [-1, 1] -> (latents (N, D, H/f, W/f) before quantization, None)."""
        return self.module.encode(x).latents, None

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """z: (N, D, h, w) latents, before or after quantization -> pixels (N, 3, H, W), nominally
        [-1, 1]. Quantized to the nearest rows by :attr:`quantizer` (float32, as the ids are) and then
        decoded without diffusers' own second quantization, so ids and latents agree in any dtype."""
        codes = self.quantizer.codes(z).to(z.dtype)  # (N, D, h, w): codebook rows
        return self.module.decode(codes, force_not_quantize=True).sample


# The released LDM CelebA-HQ first stage, as published in CompVis/ldm-celebahq-256/vqvae/config.json
# (converted from LDM's configs/latent-diffusion/celebahq-ldm-vq-4.yaml: embed_dim 3, n_embed 8192,
# ch 128, ch_mult [1, 2, 4], 2 res blocks, no attention resolutions); the published config has no
# scaling_factor, so VQModel's default is what diffusers loads.
_LDM_VQ_F4 = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [128, 256, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "layers_per_block": 2,
    "latent_channels": 3,
    "num_vq_embeddings": 8192,
    "sample_size": 256,
    "scaling_factor": VQMODEL_SCALING_FACTOR,
}

# The LDM layout (f4, three levels) at 16..32 channels, and a codebook dimension (3) unlike the
# encoder's output channels (4), so quant_conv / post_quant_conv and D != latent_channels are exercised.
_TINY = {
    **_LDM_VQ_F4,
    "block_out_channels": [16, 32, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "vq_embed_dim": 3,
    "num_vq_embeddings": 64,
    "norm_num_groups": 8,
    "sample_size": 64,
}

BACKENDS = (VQModelBackend,)
PRESETS = (
    Preset(
        name="ldm-celebahq-vq-f4",
        class_name="VQModel",
        config=_LDM_VQ_F4,
        source="CompVis/ldm-celebahq-256",
        subfolder="vqvae",
        description="LDM CelebA-HQ VQ-f4 (f4, codebook 8192 x 3, scale 0.18215)",
    ),
    Preset(
        name="vq-model-tiny",
        class_name="VQModel",
        config=_TINY,
        description="VQModel (f4, codebook 64 x 3), random init; for tests and CPU development",
        random_init=True,
    ),
)
