"""Losses, discriminator, LPIPS gating, EMA and phase parameter selection (fast, real photo)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from evals.image_metrics import ssim as eval_ssim
from tokenizers_svc.errors import ConfigError
from tokenizers_svc.loading import build_module
from tokenizers_svc.registry import get_preset
from training import losses
from training.config import PhaseSection
from training.discriminator import PatchDiscriminator, PatchDiscriminatorConfig
from training.ema import Ema
from training.model import last_layer_name, phase_parameters


def as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


def test_ssim_loss_matches_the_eval_metric(photo_nchw):
    noisy = (
        photo_nchw.float() + torch.randn(photo_nchw.shape, generator=torch.Generator().manual_seed(0)) * 12
    )
    noisy = noisy.round().clamp(0, 255).to(torch.uint8)
    expected = float(eval_ssim(photo_nchw, noisy)[0])
    assert float(losses.ssim(as_float(photo_nchw), as_float(noisy))) == pytest.approx(expected, abs=1e-4)
    assert float(losses.ssim(as_float(photo_nchw), as_float(photo_nchw))) == pytest.approx(1.0, abs=1e-6)
    clip = as_float(photo_nchw).unsqueeze(2).expand(-1, -1, 3, -1, -1)  # video: frames folded
    assert float(losses.ssim(clip, clip)) == pytest.approx(1.0, abs=1e-6)


def test_kl_and_reconstruction():
    mean, logvar = torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)
    assert float(losses.kl_loss(mean, logvar)) == 0.0
    assert float(losses.kl_loss(mean + 1, logvar)) == pytest.approx(0.5 * 36)  # sum over 36 latents
    x, y = torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.5)
    assert float(losses.reconstruction_loss(x, y, "l1")) == pytest.approx(0.5)
    assert float(losses.reconstruction_loss(x, y, "l2")) == pytest.approx(0.25)


def test_hinge_losses():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert float(losses.hinge_d_loss(real, fake)) == pytest.approx(0.5 * (0.25 + 0.5))
    assert float(losses.hinge_g_loss(fake)) == pytest.approx(1.0)


def test_adaptive_weight_is_the_gradient_norm_ratio():
    layer = torch.nn.Linear(4, 4)
    out = layer(torch.ones(1, 4))
    rec, gan = out.sum() * 3.0, out.sum()  # same direction, 3x the magnitude
    weight = losses.adaptive_weight(rec, gan, layer.weight, max_weight=1e4)
    assert float(weight) == pytest.approx(3.0, rel=1e-3)
    assert not weight.requires_grad
    assert float(losses.adaptive_weight(rec, gan, layer.weight, max_weight=2.0)) == 2.0


def test_patch_discriminator_images_and_clips():
    disc = PatchDiscriminator(PatchDiscriminatorConfig(channels=8, layers=3))
    assert disc(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)  # 70-px patches
    assert disc(torch.zeros(2, 3, 5, 64, 64)).shape == (10, 1, 6, 6)  # frames judged separately


def test_lpips_needs_package_and_local_backbone(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lpips", None)  # as on a machine without the package
    with pytest.raises(ConfigError, match="pip install lpips") as info:
        losses.Perceptual("alex")
    assert "loss.perceptual=none" in str(info.value)
    monkeypatch.setitem(sys.modules, "lpips", types.ModuleType("lpips"))  # package there, no weights
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ConfigError) as info:
        losses.Perceptual("vgg")
    message = str(info.value)
    assert str(tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth") in message
    assert "loss.perceptual=none" in message


def test_phase_parameters_and_last_layer():
    module = build_module(get_preset("dc-ae-f32c32-tiny"))
    middle = PhaseSection(name="m", steps=1, trainable=["encoder.down_blocks.5.*", "decoder.up_blocks.5.*"])
    names = {
        name for name, p in module.named_parameters() if any(p is q for q in phase_parameters(module, middle))
    }
    assert names and all(n.startswith(("encoder.down_blocks.5.", "decoder.up_blocks.5.")) for n in names)
    with pytest.raises(ConfigError, match="match no parameter"):
        phase_parameters(module, PhaseSection(name="x", steps=1, trainable=["nothing.*"]))
    assert last_layer_name(module, None) == "decoder.conv_out.conv.weight"
    assert last_layer_name(build_module(get_preset("sd-vae-tiny")), None) == "decoder.conv_out.weight"
    with pytest.raises(ConfigError, match="not a weight"):
        last_layer_name(module, "decoder.nope")


def test_ema_follows_with_warmup_and_round_trips():
    model = torch.nn.Linear(2, 2)
    ema = Ema(model, decay=0.99, warmup=True)
    start = ema.shadow.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # warmup decay (1 + 1) / (10 + 1)
    assert torch.allclose(ema.shadow.weight, start + (1 - 2 / 11))
    other = Ema(torch.nn.Linear(2, 2), decay=0.99, warmup=True)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow.weight, ema.shadow.weight) and other.updates == 1
