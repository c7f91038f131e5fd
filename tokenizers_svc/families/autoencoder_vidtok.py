"""VidTok causal video tokenizer on diffusers ``AutoencoderVidTok``, continuous (KL) or discrete (FSQ).

A causal video VAE: the spec and the frame rule come from
:class:`~tokenizers_svc.families.base.CausalVideoVAEBackend`, which this file's backend configures.
``(N, 3, 1 + k t, H, W)`` float [-1, 1] clips map to ``(N, z_channels, 1 + k, H/f, W/f)`` latents,
``f = 2 ** len(spatial_ds)``, ``t = 2 ** len(tempo_ds)`` (the released "4x8x8" models: t 4, f 8).
VidTok's own ``forward`` repeats the first frame ``t - 1`` times in front of a ``1 + k t`` clip, so
the encoder sees ``(1 + k) t`` frames and frame 0 forms latent frame 0 alone; its ``decode`` drops
those ``t - 1`` frames again. :meth:`AutoencoderVidTokBackend.encode_moments` pads the same way.

With ``regularizer="fsq"`` diffusers quantizes with ``FSQRegularizer(levels=[8] * z_channels)``:
the same bound, rounding and mixed-radix ids (first channel least significant) as this project's
:class:`~tokenizers_svc.quantizers.FSQ`, without projections. The spec therefore declares that
quantizer (levels ``(8,) * z_channels``, vocabulary ``8 ** z_channels`` = the config's
``codebook_size``) and the backend attaches ours, so ids are int32, base 0, ``(N, t, h, w)`` raster
order through the same code as every FSQ model, and equal diffusers' indices
(``tests/test_autoencoder_vidtok.py``). Latents before quantization vs ids: the encoder's output is
the latent before quantization; like diffusers' ``encode``, this backend's latents are the
quantized codes (values ``q / 4`` in [-1, 0.75]), exactly what the ids decode from, and its decode
does not quantize again.

Normalization: none (scale 1): no diffusers pipeline consumes VidTok latents. Only the causal
variant is supported: the non-causal one decodes whole 16-frame batches, which no frame rule here
expresses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

from tokenizers_svc.errors import UnsupportedModelError
from tokenizers_svc.families.base import CausalVideoVAEBackend, Preset
from tokenizers_svc.spec import LatentNormalization, QuantizerSpec, TokenizerSpec

if TYPE_CHECKING:  # torch is imported where tensors are made: listing specs needs no torch
    import torch
    from torch import nn

FSQ_LEVEL = 8  # diffusers' FSQRegularizer(levels=[8] * z_channels)


class AutoencoderVidTokBackend(CausalVideoVAEBackend):
    """VidTok (Tang et al., arXiv 2412.13061), causal; KL or FSQ (module docstring)."""

    class_names = ("AutoencoderVidTok",)
    family = "VidTok"

    @classmethod
    def spec_from_config(cls, config: Mapping, name: str) -> TokenizerSpec:
        if not config["is_causal"]:
            raise UnsupportedModelError(
                f"{name}: non-causal AutoencoderVidTok decodes whole 16-frame batches only; "
                "supported: is_causal true",
                param="model",
            )
        spec = super().spec_from_config(config, name)
        if config["regularizer"] != "fsq":
            return spec  # KL: a Gaussian posterior (mean, logvar)
        levels = (FSQ_LEVEL,) * spec.latent_channels
        return replace(spec, is_kl=False, quantizer=QuantizerSpec("fsq", levels, projection=False))

    @classmethod
    def meta_module(cls, module_class: type, config: Mapping) -> nn.Module:
        """diffusers' ``FSQRegularizer`` cannot be built on the meta device (its ``__init__`` reads the
        product of its levels with ``.item()``). It has no parameters and the network does not depend
        on it (FSQ requires ``double_z`` False, and then the KL network is the same), so the meta twin
        of an FSQ model is the KL-regularized network, recorded with the config's regularizer."""
        if config["regularizer"] != "fsq":
            return super().meta_module(module_class, config)
        module = super().meta_module(module_class, {**config, "regularizer": "kl"})
        module.register_to_config(regularizer="fsq")
        return module

    @staticmethod
    def compression(cfg) -> tuple[int, int]:
        # as diffusers' VidTokEncoder3D defaults them: every level but the last downsamples in space,
        # the two before it in time too
        levels = len(cfg["ch_mult"])
        spatial_ds = cfg.get("spatial_ds")
        tempo_ds = cfg.get("tempo_ds")
        spatial = len(spatial_ds) if spatial_ds is not None else levels - 1
        temporal = len(tempo_ds) if tempo_ds is not None else 2
        return 2**spatial, 2**temporal

    @staticmethod
    def latent_channels(cfg) -> int:
        return int(cfg["z_channels"])

    @staticmethod
    def normalization(cfg) -> LatentNormalization:
        return LatentNormalization()

    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (N, 3, 1 + k t, H, W) float [-1, 1] -> latents (N, c, 1 + k, H/f, W/f) before any
        quantization: KL (mean, logvar), or FSQ (the encoder's output, None), which the Tokenizer
        quantizes with the attached FSQ after tiling has blended the pieces."""
        import torch

        t = self.spec.temporal_compression
        front = x[:, :, :1].expand(-1, -1, t - 1, -1, -1)  # (N, 3, t - 1, H, W): frame 0 repeated
        x = torch.cat([front, x], dim=2)  # (N, 3, (1 + k) t, H, W), as AutoencoderVidTok.forward pads
        if self.spec.quantizer is None:
            return super().encode_moments(x)
        # diffusers' encode would quantize too; _encode is its encoder with the causal caches reset
        return self.module._encode(x), None

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """z: (N, c, 1 + k, h, w) -> pixels (N, 3, 1 + k t, H, W), nominally [-1, 1]; diffusers'
        ``decode`` returns the tensor itself (no ``DecoderOutput``) and drops the padded frames."""
        return self.module.decode(z)


BACKENDS = (AutoencoderVidTokBackend,)
PRESETS = (
    # The released "4x8x8" layout (ch_mult of 4 levels: f8, t4) at 8..16 channels, one res block per
    # level, FSQ with 4 code channels (vocabulary 8^4 = 4096, the smallest released VidTok codebook).
    Preset(
        name="vidtok-fsq-tiny",
        class_name="AutoencoderVidTok",
        config={
            "in_channels": 3,
            "out_channels": 3,
            "ch": 8,
            "ch_mult": [1, 2, 2, 2],
            "z_channels": 4,
            "double_z": False,
            "num_res_blocks": 1,
            "spatial_ds": [0, 1, 2],
            "tempo_ds": [2, 1],
            "regularizer": "fsq",
            "codebook_size": 4096,
            "is_causal": True,
        },
        description="VidTok-style causal FSQ tokenizer (f8 t4, levels 8^4 = 4096 ids), random init",
        random_init=True,
    ),
)
