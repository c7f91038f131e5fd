"""Clips made from still photos (tokenizers_svc.camera): still shots, pans and zooms on a real photo."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenizers_svc.camera import MOVE_KINDS, CameraMove, random_move, render_clip


@pytest.fixture(scope="module")
def photo(photo_uint8) -> torch.Tensor:
    return torch.from_numpy(photo_uint8[:300, :400].copy()).permute(2, 0, 1).contiguous()  # (3, 300, 400)


def test_a_still_shot_repeats_one_exact_crop(photo):
    move = random_move("still", 300, 400, 64, 9, np.random.default_rng(0))
    clip = render_clip(photo, move, 9, 64)  # (3, 9, 64, 64)
    top, left = round(move.center[0] - 32), round(move.center[1] - 32)
    assert clip.shape == (3, 9, 64, 64)
    assert torch.equal(clip[:, 0], photo[:, top : top + 64, left : left + 64])
    assert all(torch.equal(clip[:, t], clip[:, 0]) for t in range(9))


def test_a_pan_by_whole_pixels_is_a_sequence_of_exact_crops(photo):
    """Bicubic resampling at whole-pixel offsets returns the photo's own pixels: frame t is the crop
    moved by t * velocity, so the renderer's geometry (centres, half-pixel convention) is right."""
    move = CameraMove("pan", center=(100.0, 120.0), side=64.0, velocity=(1.0, 3.0))
    clip = render_clip(photo, move, 5, 64)
    for t in range(5):
        top, left = 100 - 32 + t, 120 - 32 + 3 * t
        assert torch.equal(clip[:, t], photo[:, top : top + 64, left : left + 64]), t


def test_a_zoom_in_magnifies_the_centre(photo):
    move = CameraMove("zoom", center=(150.0, 200.0), side=128.0, zoom=0.5)
    clip = render_clip(photo, move, 2, 128)
    # frame 1 sees the central 64x64 pixels at twice the size: its centre matches the crop's centre
    crop = photo[:, 150 - 32 : 150 + 32, 200 - 32 : 200 + 32].float()
    half = torch.nn.functional.interpolate(clip[:, 1].float()[None], size=(64, 64), mode="area")[0]
    assert (half - crop).abs().mean() < 4.0


@pytest.mark.parametrize("kind", MOVE_KINDS)
def test_random_moves_stay_inside_the_photo_and_are_seeded(kind):
    for seed in range(50):
        h, w = (300, 400) if seed % 2 else (260, 900)
        move = random_move(kind, h, w, 256, 17, np.random.default_rng(seed))
        assert move == random_move(kind, h, w, 256, 17, np.random.default_rng(seed))
        for t in range(17):
            cy, cx, side = move.window(t)
            assert side <= 256 + 1e-6
            assert cy - side / 2 >= -1e-6 and cy + side / 2 <= h + 1e-6, (seed, t)
            assert cx - side / 2 >= -1e-6 and cx + side / 2 <= w + 1e-6, (seed, t)
        if kind != "still":
            assert move.window(16) != move.window(0)  # it moves
