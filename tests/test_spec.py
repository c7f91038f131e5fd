"""tokenizers_svc.spec: frame rules and the latent normalization, the arithmetic every family shares."""

from __future__ import annotations

import pytest
import torch

from tokenizers_svc.spec import FrameRule, LatentNormalization


@pytest.mark.parametrize(
    "rule, valid, invalid",
    [
        (FrameRule(temporal_compression=4, causal=True), [1, 5, 9, 17], [0, 2, 4, 8, 16]),
        (FrameRule(temporal_compression=4, causal=False), [4, 8, 16], [0, 1, 5, 17]),
        (FrameRule(), [1, 2, 7], [0]),
    ],
)
def test_frame_rules_accept_exactly_their_counts(rule, valid, invalid):
    assert all(rule.is_valid(n) for n in valid)
    assert not any(rule.is_valid(n) for n in invalid)


@pytest.mark.parametrize("rule", [FrameRule(4, True), FrameRule(8, True), FrameRule(4, False), FrameRule()])
def test_padding_gives_the_smallest_valid_count_and_latent_frames_invert(rule):
    for frames in range(1, 40):
        padded = rule.padded_frames(frames)
        assert padded >= frames and rule.is_valid(padded)
        assert not any(rule.is_valid(n) for n in range(frames, padded))  # none smaller is valid
        assert rule.pixel_frames(rule.latent_frames(padded)) == padded


def test_normalization_round_trips_and_applies_per_channel_statistics():
    normalization = LatentNormalization(scale=0.5, shift=0.1, mean=(1.0, -2.0), std=(2.0, 0.5))
    raw = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    normalized = normalization.apply(raw)
    expected = (raw - 0.1 - torch.tensor([1.0, -2.0]).view(1, 2, 1, 1)) / torch.tensor([2.0, 0.5]).view(
        1, 2, 1, 1
    )
    torch.testing.assert_close(normalized, expected * 0.5)
    torch.testing.assert_close(normalization.invert(normalized), raw)
    assert normalization.apply(raw.half()).dtype == torch.float16  # dtype is kept


def test_normalization_travels_as_a_dict():
    normalization = LatentNormalization(scale=0.3, mean=(0.1, 0.2), std=(1.5, 0.7))
    assert LatentNormalization.from_dict(normalization.to_dict()) == normalization
    assert LatentNormalization().is_identity and not normalization.is_identity
