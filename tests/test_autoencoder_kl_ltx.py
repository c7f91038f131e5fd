"""The causal video VAE presets (tokenizers_svc/families/autoencoder_kl_ltx.py) on diffusers'
AutoencoderKLLTXVideo: the released LTX-Video VAE architecture (checked against the byte size of the
released weights file), 1:192 compression, the causal 1 + 8k / 1 + 4k frame rule, normalization
as in diffusers' LTX pipeline, and the tiny preset on a real clip."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import safetensors_bytes
from tokenizers_svc.families.autoencoder_kl_ltx import LTXVideoBackend
from tokenizers_svc.loading import build_module, load_tokenizer
from tokenizers_svc.media import read_video, video_to_tensor
from tokenizers_svc.model_stats import count_params, meta_backend
from tokenizers_svc.registry import get_preset

# Lightricks/LTX-Video at revision 8984fa25007f376c1a299016d0957a37a2f797bb:
# vae/diffusion_pytorch_model.safetensors is 1,676,798,532 bytes (float32).
RELEASED_VAE_BYTES = 1_676_798_532


def test_ltx_preset_builds_exactly_the_released_weights_layout():
    """Every tensor name and shape of the released file is implied by its byte count to the byte:
    a single extra, missing or reshaped tensor would change the total."""
    preset = get_preset("ltx-video-vae")
    assert (preset.source, preset.subfolder) == ("Lightricks/LTX-Video", "vae")
    module = meta_backend(preset).module
    assert safetensors_bytes(module.state_dict()) == RELEASED_VAE_BYTES
    assert count_params(module) == 419_193_649


def test_trainable_preset_has_the_ltx_architecture_and_1_to_192():
    ltx, ours = meta_backend(get_preset("ltx-video-vae")), meta_backend(get_preset("video-vae-f32t8c128"))
    assert dict(ours.module.config) == dict(ltx.module.config)
    assert get_preset("video-vae-f32t8c128").random_init and get_preset("video-vae-f32t8c128").source is None
    spec = ours.spec
    assert (spec.spatial_compression, spec.temporal_compression, spec.latent_channels) == (32, 8, 128)
    assert spec.frame_rule.causal and spec.frame_rule.describe() == "1 + 8k"
    # each 8-frame group of 32x32 pixels becomes one 128-float latent cell: 3*8*32*32 / 128 = 192
    assert spec.compression_ratio(256, 256, 1 + 8 * 1000) == pytest.approx(192, rel=1e-3)
    k = 2
    assert spec.compression_ratio(256, 256, 1 + 8 * k) == pytest.approx(
        3 * (1 + 8 * k) * 256 * 256 / (128 * (1 + k) * 8 * 8)
    )


def test_tiny_preset_compresses_at_least_4x_in_time_and_16x_in_space():
    spec = meta_backend(get_preset("video-vae-tiny")).spec
    assert spec.temporal_compression >= 4 and spec.spatial_compression >= 16
    assert spec.frame_rule.causal and spec.modality == "video" and spec.is_kl
    assert spec.compression_ratio(256, 256, 1 + 4 * 1000) == pytest.approx(192, rel=1e-3)


@pytest.fixture(scope="module")
def clip(shared_data) -> torch.Tensor:
    """(1, 3, 9, 144, 176) uint8 from a real clip."""
    return video_to_tensor(read_video(shared_data / "videos" / "carphone_pristine.mp4", max_frames=9).frames)


def test_encoder_is_causal_on_a_real_clip(clip):
    """Latent 0 depends on frame 0 only, latents 0..i on frames 0..4i only."""
    tokenizer = load_tokenizer("video-vae-tiny")
    whole = tokenizer.encode(clip, normalize=False).latents  # (1, 16, 3, 9, 11)
    assert whole.shape == (1, 16, 3, 9, 11)
    first = tokenizer.encode(clip[:, :, :1], normalize=False).latents  # a single image
    assert first.shape == (1, 16, 1, 9, 11)
    torch.testing.assert_close(first, whole[:, :, :1], rtol=1e-5, atol=1e-5)
    changed = clip.clone()
    changed[:, :, 5:] = 255 - changed[:, :, 5:]  # alter the future of latent 1 (frames 5..8)
    altered = tokenizer.encode(changed, normalize=False).latents
    torch.testing.assert_close(altered[:, :, :2], whole[:, :, :2], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(altered[:, :, 2], whole[:, :, 2], atol=1e-3)


def test_frames_are_padded_to_the_rule_and_cropped_back(clip):
    tokenizer = load_tokenizer("video-vae-tiny")
    latents = tokenizer.encode(clip[:, :, :7])  # 7 frames -> padded to 1 + 4*2 = 9
    assert latents.padding[2] == 2 and latents.original_frames == 7
    assert latents.latents.shape[2] == 3
    assert tokenizer.decode(latents).shape == (1, 3, 7, 144, 176)


def test_normalization_matches_the_diffusers_ltx_pipeline(tmp_path):
    module = build_module(get_preset("video-vae-tiny"))
    generator = torch.Generator().manual_seed(0)
    channels = module.config.latent_channels
    module.latents_mean.copy_(torch.randn(channels, generator=generator))
    module.latents_std.copy_(torch.rand(channels, generator=generator) + 0.5)
    module.register_to_config(scaling_factor=0.7)
    spec = LTXVideoBackend.from_module(module, "ltx-stats").spec
    z = torch.randn(2, channels, 3, 4, 5, generator=generator)
    mean = module.latents_mean.view(1, -1, 1, 1, 1)
    std = module.latents_std.view(1, -1, 1, 1, 1)
    expected = (z - mean) * 0.7 / std  # LTXPipeline._normalize_latents (needs transformers to import)
    torch.testing.assert_close(spec.normalization.apply(z), expected, rtol=1e-6, atol=1e-6)
    back = expected * std / 0.7 + mean  # LTXPipeline._denormalize_latents
    torch.testing.assert_close(spec.normalization.invert(expected), back, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(back, z, rtol=1e-5, atol=1e-5)
    # the statistics are weights: they survive save_pretrained -> load_tokenizer
    module.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.spec.normalization == spec.normalization
    assert math.isclose(loaded.spec.normalization.scale, 0.7)
