"""ViTok backend and presets (the network: :mod:`tokenizers_svc.families.vitok_model`).

Paper: Hansen-Estruch et al., "Learnings from Scaling Visual Tokenizers for Reconstruction and
Generation" (arXiv 2501.09755). Latents are the token grid channels-first: ``(N, c, H/p, W/p)`` for
images, ``(N, c, T/q, H/p, W/p)`` for videos. The network module is named by path in
``MODEL_CLASSES`` so that listing the registry does not import diffusers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from tokenizers_svc.families.base import Backend, Preset
from tokenizers_svc.spec import FrameRule, LatentNormalization, TokenizerSpec

if TYPE_CHECKING:  # torch is imported where tensors are made: listing specs needs no torch
    pass


class ViTokBackend(Backend):
    """Native ViTok. Normalization: ``(z - shift_factor) * scaling_factor`` from the saved config."""

    class_names = ("ViTokModel",)

    @classmethod
    def spec_from_config(cls, config: Mapping, name: str) -> TokenizerSpec:
        return TokenizerSpec(
            name=name,
            family="ViTok",
            modality=config["modality"],
            spatial_compression=config["patch_size"],
            latent_channels=config["latent_channels"],
            frame_rule=FrameRule(temporal_compression=config["tubelet_size"], causal=False),
            normalization=LatentNormalization(
                scale=float(config["scaling_factor"]), shift=float(config["shift_factor"])
            ),
            is_kl=bool(config["variational"]),
            in_channels=config["in_channels"],
        )


# ---------------------------------------------------------------------------------------------- presets
# Named as in the paper: S-B/16 = Small encoder, Base decoder, 16x16 patches; S-B/4x8 = 4x8x8 tubelets.

# What the spec reads, stated in every preset (ViTokModel's defaults) so the registry can list it.
_SPEC_KEYS = {
    "in_channels": 3,
    "modality": "image",
    "tubelet_size": 1,
    "variational": True,
    "scaling_factor": 1.0,
    "shift_factor": 0.0,
}
_S = {"encoder_width": 384, "encoder_depth": 12, "encoder_heads": 6}
_B = {"decoder_width": 768, "decoder_depth": 12, "decoder_heads": 12}
_L = {"decoder_width": 1024, "decoder_depth": 24, "decoder_heads": 16}
_TINY = {
    "encoder_width": 64,
    "encoder_depth": 2,
    "encoder_heads": 2,
    "decoder_width": 96,
    "decoder_depth": 3,
    "decoder_heads": 2,
    "latent_channels": 8,
}

VITOK_PRESETS: dict[str, tuple[dict, str]] = {
    "vitok-s-b-16": (
        {**_S, **_B, "patch_size": 16, "latent_channels": 16},
        "ViTok S-B/16 (image, p=16, c=16)",
    ),
    "vitok-s-l-16": (
        {**_S, **_L, "patch_size": 16, "latent_channels": 16},
        "ViTok S-L/16 (image, p=16, c=16)",
    ),
    "vitok-s-b-4x8": (
        {**_S, **_B, "modality": "video", "tubelet_size": 4, "patch_size": 8, "latent_channels": 16},
        "ViTok S-B/4x8 (video, 4x8x8 tubelets, c=16)",
    ),
    "vitok-s-b-4x16": (
        {**_S, **_B, "modality": "video", "tubelet_size": 4, "patch_size": 16, "latent_channels": 16},
        "ViTok S-B/4x16 (video, 4x16x16 tubelets, c=16)",
    ),
    "vitok-tiny-8": ({**_TINY, "patch_size": 8}, "tiny ViTok (image, p=8, c=8); tests and CPU training"),
    "vitok-tiny-2x8": (
        {**_TINY, "modality": "video", "tubelet_size": 2, "patch_size": 8},
        "tiny ViTok (video, 2x8x8 tubelets, c=8); tests and CPU training",
    ),
}

BACKENDS = (ViTokBackend,)
# native: config.json names it, diffusers does not know it; imported when a model is built
MODEL_CLASSES = {"ViTokModel": "tokenizers_svc.families.vitok_model"}
PRESETS = tuple(
    Preset(
        name=name,
        class_name="ViTokModel",
        config={**_SPEC_KEYS, **config},
        description=f"{description}, random init",
        random_init=True,
    )
    for name, (config, description) in VITOK_PRESETS.items()
)
