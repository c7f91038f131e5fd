"""The one cost model (tokenizers_svc.limits): a decode's price counts the frames the model really
writes, under each frame rule, and the caps refuse what is over them, naming the number."""

from __future__ import annotations

import pytest
import torch

from tokenizers_svc.errors import LimitExceededError
from tokenizers_svc.limits import FILE_LIMITS, Limits, check_cost, decode_cost
from tokenizers_svc.loading import load_tokenizer
from tokenizers_svc.spec import FrameRule


@pytest.mark.parametrize(
    ("rule", "latent_frames", "frames"),
    [
        (FrameRule(4, causal=True), 3, 9),  # 1 + 4k: the first frame alone, then 4 per latent frame
        (FrameRule(4, causal=True), 1, 1),
        (FrameRule(4, causal=False), 3, 12),  # 4k
        (FrameRule(1), 5, 5),  # any count
    ],
)
def test_decode_cost_counts_frames_by_the_frame_rule(rule, latent_frames, frames):
    cost = decode_cost((2, 16, latent_frames, 4, 6), 8, rule)
    assert (cost.items, cost.frames, cost.height, cost.width) == (2, frames, 32, 48)
    assert cost.total_pixels == 2 * frames * 32 * 48
    assert cost.latent_elements == 2 * 16 * latent_frames * 4 * 6


def test_decode_cost_of_image_latents_is_one_frame_per_item():
    cost = decode_cost((3, 4, 8, 8), 8, FrameRule(4, causal=True))
    assert (cost.items, cost.frames, cost.total_pixels) == (3, 1, 3 * 64 * 64)


@pytest.mark.parametrize("model", ["video-vae-tiny", "vitok-tiny-2x8", "sd-vae-tiny"])
def test_decode_cost_is_what_the_model_writes(model):
    """The price (and so the server's batch units and admission) equals the decoded tensor's size:
    a causal 1 + 4k model, a 2k tubelet model, an image model."""
    tokenizer = load_tokenizer(model, allow_random_init=True)
    spec = tokenizer.spec
    shape = (
        (1, spec.latent_channels, 3, 4, 4) if spec.modality != "image" else (1, spec.latent_channels, 4, 4)
    )
    with torch.no_grad():
        pixels = tokenizer.decode(
            torch.randn(shape, generator=torch.Generator().manual_seed(0)), normalized=False
        )
    cost = decode_cost(shape, spec.spatial_compression, spec.frame_rule)
    assert cost.total_pixels == pixels[:, 0].numel()
    assert cost.frames == (pixels.shape[2] if pixels.ndim == 5 else 1)


def test_caps_name_the_number_over_them():
    cost = decode_cost((1, 16, 3, 100, 100), 16, FrameRule(4, causal=True))  # 9 frames of 1600x1600
    with pytest.raises(LimitExceededError, match="2,560,000 pixels per frame; the limit is 1,000,000"):
        check_cost(cost, Limits(max_pixels=1_000_000))
    with pytest.raises(LimitExceededError, match="9 frames; the limit is 8"):
        check_cost(cost, Limits(max_frames=8))
    check_cost(cost, Limits())


def test_file_readers_allow_more_than_the_service():
    """One Limits type; the file readers' defaults are wider than the service's on every media cap."""
    service = Limits()
    for name in ("max_pixels", "max_frames", "max_duration_s", "max_total_pixels"):
        assert getattr(FILE_LIMITS, name) > getattr(service, name), name
