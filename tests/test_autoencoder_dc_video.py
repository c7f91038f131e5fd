"""AutoencoderDCVideo: an image DC-AE per frame plus a causal temporal codec (tiny preset, CPU)."""

from __future__ import annotations

import pytest
import torch

from tokenizers_svc.families.autoencoder_dc_video_model import AutoencoderDCVideo
from tokenizers_svc.loading import build_module
from tokenizers_svc.registry import backend_for, get_preset, model_class


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """A saved tiny image DC-AE with fitted per-channel statistics, as training.latent_stats writes."""
    preset = get_preset("dc-ae-video-tiny")
    image = model_class("AutoencoderDC")(**preset.config["spatial_config"])
    image.register_to_config(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 0.8, 1.2])
    path = tmp_path_factory.mktemp("image")
    image.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def model(image_dir):
    torch.manual_seed(0)
    return AutoencoderDCVideo.from_image_model(image_dir, temporal_width=16).eval()


def clip(frames: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(2, 3, frames, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_spec_and_shapes_follow_the_frame_rule():
    spec = backend_for("AutoencoderDCVideo").spec_from_config(get_preset("dc-ae-video-f8t4c4").config, "v")
    assert (spec.spatial_compression, spec.temporal_compression, spec.latent_channels) == (8, 4, 4)
    assert spec.frame_rule.causal and spec.frame_rule.is_valid(17) and not spec.frame_rule.is_valid(16)
    module = build_module(get_preset("dc-ae-video-tiny")).eval()
    with torch.no_grad():
        for frames, latent_frames in ((1, 1), (5, 2), (9, 3)):
            z = module.encode(clip(frames)).latent
            assert z.shape == (2, 4, latent_frames, 4, 4)
            assert module.decode(z).sample.shape == (2, 3, frames, 32, 32)


def test_an_untrained_model_is_the_image_model_on_every_fourth_frame(model, image_dir):
    """Zero-initialised corrections: latent frame j is frame 4j's normalized image latent, and the
    decoded frames 0, 4, 8 are the image model's reconstructions of those frames (weights copied)."""
    image = model_class("AutoencoderDC").from_pretrained(str(image_dir)).eval()
    mean = torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1)
    std = torch.tensor([1.5, 0.5, 0.8, 1.2]).view(1, 4, 1, 1)
    x = clip(9)
    with torch.no_grad():
        z = model.encode(x).latent  # (2, 4, 3, 4, 4)
        recon = model.decode(z).sample
        for j, frame in enumerate((0, 4, 8)):
            expected = (image.encode(x[:, :, frame]).latent - mean) / std
            assert torch.allclose(z[:, :, j], expected, atol=1e-5)
            assert torch.allclose(
                recon[:, :, frame], image.decode(image.encode(x[:, :, frame]).latent).sample, atol=1e-4
            )


def test_the_encoder_is_causal_and_trained_corrections_change_the_codec(model):
    """Latent frame j depends on frames up to 4j only, also once the corrections are non-zero."""
    trained = AutoencoderDCVideo.from_config(model.config).eval()
    trained.load_state_dict(model.state_dict())
    with torch.no_grad():
        for layer in (trained.temporal_encoder.conv_out, trained.temporal_decoder.conv_out):
            layer.weight.normal_(0, 0.05)
        x = clip(9)
        later = x.clone()
        later[:, :, 5:] = clip(9, seed=1)[:, :, 5:]  # frames after latent frame 1's window
        z, z_later = trained.encode(x).latent, trained.encode(later).latent
        assert torch.equal(z[:, :, :2], z_later[:, :, :2]) and not torch.equal(z[:, :, 2], z_later[:, :, 2])
        assert not torch.allclose(z, model.encode(x).latent)
        prediction, target = trained.frame_latent_objective(x)
        assert prediction.shape == target.shape == (2, 4, 9, 4, 4)
        assert not target.requires_grad
