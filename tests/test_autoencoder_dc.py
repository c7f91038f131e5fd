"""DC-AE presets (tokenizers_svc/families/autoencoder_dc.py) on diffusers' AutoencoderDC: the published
architecture configs (built on the meta device), scaling factors, deterministic latents, and the
tiny trainable presets on a real photo."""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import AutoencoderDC

from tests.helpers import safetensors_bytes
from tokenizers_svc.errors import InvalidRequestError
from tokenizers_svc.loading import load_tokenizer
from tokenizers_svc.media import image_to_tensor, read_image
from tokenizers_svc.model_stats import count_params, meta_backend
from tokenizers_svc.registry import get_preset

# dc-ae-f32c32-in-1.0 as written by diffusers' scripts/convert_dcae_to_diffusers.py (the config of
# mit-han-lab/dc-ae-f32c32-in-1.0-diffusers); the keys it leaves out take AutoencoderDC defaults.
PUBLISHED_F32C32_IN = {
    "latent_channels": 32,
    "encoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "decoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "encoder_layers_per_block": [0, 4, 8, 2, 2, 2],
    "decoder_layers_per_block": [0, 5, 10, 2, 2, 2],
    "encoder_qkv_multiscales": [[]] * 6,
    "decoder_qkv_multiscales": [[]] * 6,
    "decoder_norm_types": ["batch_norm"] * 3 + ["rms_norm"] * 3,
    "decoder_act_fns": ["relu"] * 3 + ["silu"] * 3,
    "scaling_factor": 0.3189,
}
# f64c128 / f128c512 add one / two 2048-channel EfficientViT stages with 2 layers each.
PUBLISHED_DEEPER = {
    "dc-ae-f64c128": (128, [128, 256, 512, 512, 1024, 1024, 2048], 0.2889),
    "dc-ae-f128c512": (512, [128, 256, 512, 512, 1024, 1024, 2048, 2048], 0.4883),
}
# Parameters of the published configs counted on the meta device (pinned; checked against the
# released files' sizes below).
PARAMS = {"dc-ae-f32c32": 323_356_460, "dc-ae-f64c128": 676_896_140, "dc-ae-f128c512": 1_120_682_252}
# Released float32 weight files as the hub lists them (GB = 10^9 bytes, 2 decimals): f128c512-in
# diffusion_pytorch_model.safetensors 4.48 GB; the f64c128 and f32c32 "mix" files, which share the
# "in" architecture, 2.71 GB (diffusers format) and 1.29 GB (original format, same tensors). The
# f32c32-sana file (other blocks) is 1.25 GB, so 0.01 GB separates architectures.
RELEASED_GB = {"dc-ae-f32c32": 1.29, "dc-ae-f64c128": 2.71, "dc-ae-f128c512": 4.48}
HUB_IDS = {
    "dc-ae-f32c32": "mit-han-lab/dc-ae-f32c32-in-1.0-diffusers",
    "dc-ae-f64c128": "mit-han-lab/dc-ae-f64c128-in-1.0-diffusers",
    "dc-ae-f128c512": "mit-han-lab/dc-ae-f128c512-in-1.0-diffusers",
}


def _as_lists(value):
    return [_as_lists(v) for v in value] if isinstance(value, (list, tuple)) else value


def test_f32c32_is_the_published_config():
    module = meta_backend(get_preset("dc-ae-f32c32")).module
    for key, expected in PUBLISHED_F32C32_IN.items():
        assert _as_lists(module.config[key]) == expected, key
    # keys the conversion script does not set are AutoencoderDC's defaults in our preset too
    defaults = {k: v.default for k, v in inspect.signature(AutoencoderDC.__init__).parameters.items()}
    for key in ("attention_head_dim", "upsample_block_type", "downsample_block_type", "decoder_conv_act_fn"):
        assert module.config[key] == defaults[key], key


@pytest.mark.parametrize("name", sorted(PUBLISHED_DEEPER))
def test_deeper_variants_follow_the_published_pattern(name):
    channels, widths, scale = PUBLISHED_DEEPER[name]
    extra = len(widths) - 6
    module = meta_backend(get_preset(name)).module
    expected = {
        **PUBLISHED_F32C32_IN,
        "latent_channels": channels,
        "encoder_block_types": PUBLISHED_F32C32_IN["encoder_block_types"] + ["EfficientViTBlock"] * extra,
        "decoder_block_types": PUBLISHED_F32C32_IN["decoder_block_types"] + ["EfficientViTBlock"] * extra,
        "encoder_block_out_channels": widths,
        "decoder_block_out_channels": widths,
        "encoder_layers_per_block": [0, 4, 8, 2, 2, 2] + [2] * extra,
        "decoder_layers_per_block": [0, 5, 10, 2, 2, 2] + [2] * extra,
        "encoder_qkv_multiscales": [[]] * len(widths),
        "decoder_qkv_multiscales": [[]] * len(widths),
        "decoder_norm_types": ["batch_norm"] * 3 + ["rms_norm"] * (3 + extra),
        "decoder_act_fns": ["relu"] * 3 + ["silu"] * (3 + extra),
        "scaling_factor": scale,
    }
    for key, value in expected.items():
        assert _as_lists(module.config[key]) == value, key


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_released_presets_spec_and_params(name):
    preset = get_preset(name)
    assert preset.source == HUB_IDS[name] and not preset.random_init  # weights by hub id, never faked
    backend = meta_backend(preset)
    assert set(preset.config) <= set(backend.module.config)  # no key silently dropped by from_config
    assert count_params(backend.module) == PARAMS[name]
    assert round(safetensors_bytes(backend.module.state_dict()) / 1e9, 2) == RELEASED_GB[name]
    spec = backend.spec
    factor = int(name.split("-f")[1].split("c")[0])
    channels = int(name.rsplit("c", 1)[1])
    assert (spec.spatial_compression, spec.latent_channels, spec.modality) == (factor, channels, "image")
    assert spec.normalization.scale == preset.config["scaling_factor"] and spec.normalization.shift == 0
    assert not spec.is_kl
    assert spec.compression_ratio(512, 512) == pytest.approx(3 * factor * factor / channels)


@pytest.fixture(scope="module")
def plant(shared_data) -> torch.Tensor:
    """A real photo, (1, 3, 333, 500) uint8 (images/val/plant.jpg)."""
    return image_to_tensor(read_image(shared_data / "images" / "val" / "plant.jpg"))


def test_tiny_f32c32_on_a_real_photo(plant):
    tokenizer = load_tokenizer("dc-ae-f32c32-tiny")
    latents = tokenizer.encode(plant)
    assert latents.latents.shape == (1, 32, 11, 16)  # padded to 352 x 512
    assert latents.padding == (19, 12, 0) and latents.normalized
    raw = tokenizer.encode(plant, normalize=False)
    torch.testing.assert_close(latents.latents, raw.latents * tokenizer.spec.normalization.scale)
    assert tokenizer.decode(latents, output_dtype=torch.uint8).shape == plant.shape
    with pytest.raises(InvalidRequestError, match="deterministic"):
        tokenizer.encode(plant, return_posterior=True)
    assert torch.equal(
        tokenizer.encode(plant, sample=True).latents, latents.latents
    )  # no posterior to sample


def test_tiny_f64c128_compression(photo_nchw):
    tokenizer = load_tokenizer("dc-ae-f64c128-tiny")
    latents = tokenizer.encode(photo_nchw)  # (1, 3, 48, 64) -> padded to 64 x 64
    assert latents.latents.shape == (1, 128, 1, 1)
    assert tokenizer.spec.compression_ratio(256, 256) == pytest.approx(3 * 64 * 64 / 128)
    assert tokenizer.decode(latents).shape == photo_nchw.shape
