"""The held-out video groups (evals.heldout_video): still shots and camera moves over the validation
photos, the real clips' held-out ends, and the two bicubic baselines at equal floats."""

from __future__ import annotations

import torch

from evals.heldout_video import compare_video, spatial_bicubic, spatiotemporal_bicubic
from tokenizers_svc.camera import MOTION_KINDS, STILL_SCALES, photo_clips
from tokenizers_svc.crops import bicubic_round_trip, list_media


def test_stills_and_motion_are_built_from_every_val_photo_deterministically(shared_data):
    val = shared_data / "images" / "val"
    photos = [p.name for p in list_media(val, "image")]
    stills, still_names = photo_clips(val, "stills", frames=5, resolution=64)
    motion, motion_names = photo_clips(val, "motion", frames=5, resolution=64)
    assert stills.shape == (len(photos) * len(STILL_SCALES), 3, 5, 64, 64) and stills.dtype == torch.uint8
    assert motion.shape == (len(photos) * len(MOTION_KINDS), 3, 5, 64, 64)
    assert sorted({name.split("@")[0] for name in still_names + motion_names}) == sorted(photos)
    assert {name.rsplit(":", 1)[1] for name in motion_names} == set(MOTION_KINDS)
    assert all(torch.equal(stills[:, :, t], stills[:, :, 0]) for t in range(5))  # held for every frame
    moving = (motion[:, :, 1:].float() - motion[:, :, :-1].float()).abs().flatten(1).mean(1)
    assert bool((moving > 0).all()), moving  # every motion clip changes from frame to frame
    again, again_names = photo_clips(val, "motion", frames=5, resolution=64)
    assert torch.equal(again, motion) and again_names == motion_names
    other_seed, _ = photo_clips(val, "motion", frames=5, resolution=64, seed=1)
    assert not torch.equal(other_seed, motion)


def test_baselines_on_still_shots_are_the_image_codec_at_their_share_of_floats(shared_data):
    """On a still shot the spatio-temporal baseline is bicubic on one frame with the floats of all
    kept frames' share (5 kept of 17), the spatial one bicubic with 1/17 of them; the model's gain is
    paired per clip against each."""
    clips, names = photo_clips(shared_data / "images" / "val", "stills", frames=17, resolution=64)
    clips, names = clips[:4], names[:4]
    floats = 16 * 5 * 4 * 4  # a c16 t4 f16 latent of a 17x64x64 clip
    first = clips[:, :, 0]  # (4, 3, 64, 64)
    assert torch.equal(spatiotemporal_bicubic(clips, floats)[:, :, 7], bicubic_round_trip(first, floats // 5))
    assert torch.equal(spatial_bicubic(clips, floats)[:, :, 7], bicubic_round_trip(first, floats // 17))
    result = compare_video(clips, names, lambda x: spatiotemporal_bicubic(x, floats), floats)
    assert result["best_baseline"] == "bicubic_spatiotemporal"
    assert abs(result["gains"]["bicubic_spatiotemporal"]["gain_db"]) < 1e-9  # the baseline against itself
    assert result["gains"]["bicubic_spatial"]["gain_db"] > 1  # 3.4x the floats per frame
    assert result["n"] == 4 and len(result["clip_psnr"]["model"]) == 4
