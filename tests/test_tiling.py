"""Spatial tiling and temporal chunking (tokenizers_svc/tiling.py) against untiled results.

Every registered random-init preset up to ``MAX_PARAMS`` parameters (counted on the meta device at
collection time, so presets added by any family are covered automatically) is tiled on a real photo
(images) or a real clip (videos) with small tiles and must score at least ``PSNR_BOUND_DB`` against
its untiled output, both for decode alone (same latents) and for the encode -> decode round trip.
Random-init networks are the worst case for tiling (global self-attention and GroupNorm statistics
see only one tile and nothing is trained to be local), so the bound is low; trained VAEs should do
better (not measured: no weights offline). Wan and CogVideoX stream frame groups themselves and are
not chunked in time, so their temporal result is exact.
Measured (decode / round trip, dB): spatial 15.1 (hunyuan-video-vae-tiny round trip, the lowest)
to 40.5 (vitok-tiny-2x8); temporal 15.9 (hunyuan) to 86 (cosmos). Every preset's numbers are
tabulated in docs/backends.md (the test prints them with ``-s``). For calibration, on sd-vae-tiny
diffusers' own ``tiled_decode`` at the same geometry scores 21.0 dB against our 23.3 dB, which
``test_not_worse_than_diffusers_own_tiling`` asserts.

A purely local backend (average-pool encoder, repeat decoder) checks the tile/chunk geometry and
blending themselves: there tiling must be exact.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import small_presets
from tokenizers_svc import tiling
from tokenizers_svc.errors import InvalidRequestError
from tokenizers_svc.loading import load_tokenizer
from tokenizers_svc.spec import FrameRule, TokenizerSpec
from tokenizers_svc.tiling import TilingOptions

MAX_PARAMS = 30_000_000  # larger random-init presets (paper-size configs) are too slow on CPU CI
PSNR_BOUND_DB = 14.0  # tiled vs untiled, random init; see the module docstring and docs/backends.md
CLIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos" / "bikes.mp4"  # real footage


SMALL_PRESETS = small_presets(MAX_PARAMS)
VIDEO_PRESETS = [name for name, spec in SMALL_PRESETS.items() if spec.temporal_compression > 1]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of float pixels in [-1, 1] (peak-to-peak 2)."""
    mse = float(((a.float() - b.float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def _photo(photo_uint8: np.ndarray, height: int, width: int) -> torch.Tensor:
    """A (1, 3, height, width) uint8 view of the real photo (strided crop of the 512x512 astronaut)."""
    step = max(1, min(512 // height, 512 // width))
    crop = photo_uint8[: height * step : step, : width * step : step]
    return torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).unsqueeze(0)


def _clip(photo_uint8: np.ndarray, frames: int, height: int, width: int) -> torch.Tensor:
    """(1, 3, frames, height, width) uint8 real footage: a crop of bikes.mp4 when ../shared/data is
    present, else a camera pan over the real photo (so every user can run this)."""
    if CLIP.is_file():
        from tokenizers_svc.media import read_video

        video = read_video(CLIP, max_frames=frames).frames  # (T, H, W, 3)
        top, left = (video.shape[1] - height) // 2, (video.shape[2] - width) // 2
        crop = video[:, top : top + height, left : left + width]
    else:
        crop = np.stack(
            [photo_uint8[100 + 3 * i : 100 + 3 * i + height, 150 : 150 + width] for i in range(frames)]
        )
    return torch.from_numpy(np.ascontiguousarray(crop)).permute(3, 0, 1, 2).unsqueeze(0)


def _compare(tok, pixels: torch.Tensor, options: TilingOptions) -> tuple[float, float]:
    """(decode PSNR, round-trip PSNR) of tiled vs untiled processing of ``pixels``."""
    off = TilingOptions(enabled=False)
    latents = tok.encode(pixels, tiling=off)
    reference = tok.decode(latents, tiling=off)
    decoded = tok.decode(latents, tiling=options)
    round_trip = tok.decode(tok.encode(pixels, tiling=options), tiling=options)
    assert decoded.shape == reference.shape == round_trip.shape
    return psnr(decoded, reference), psnr(round_trip, reference)


@pytest.mark.parametrize("name", list(SMALL_PRESETS))
def test_spatial_tiling_close_to_untiled(name, photo_uint8):
    tok = load_tokenizer(name)
    spec = tok.spec
    align = math.lcm(spec.multiple, spec.spatial_compression)
    tile = max(2 * align, min(64, 16 * spec.spatial_compression))
    options = TilingOptions(tile_size=tile, tile_overlap=tile // 2)
    height, width = tile * 3 // 2, tile * 2  # a 2 x 3 grid of tiles
    if spec.modality == "video":
        pixels = _clip(photo_uint8, spec.frame_rule.pixel_frames(1), height, width)  # shortest clip
    else:
        pixels = _photo(photo_uint8, height, width)
    jobs, _ = tiling._spatial_jobs(height, width, tiling._Grid.build(spec, options), encoding=True)
    assert len(jobs) == 6
    decode_db, round_trip_db = _compare(tok, pixels, options)
    print(f"{name}: spatial tiled vs untiled decode {decode_db:.1f} dB, round trip {round_trip_db:.1f} dB")
    assert decode_db >= PSNR_BOUND_DB
    assert round_trip_db >= PSNR_BOUND_DB


@pytest.mark.parametrize("name", VIDEO_PRESETS)
def test_temporal_chunking_close_to_untiled(name, photo_uint8):
    tok = load_tokenizer(name)
    spec = tok.spec
    t = spec.temporal_compression
    side = 2 * math.lcm(spec.multiple, spec.spatial_compression)
    # 4 latent groups in chunks of 2 sharing 1 -> 3 chunks; tiles larger than the frame
    options = TilingOptions(tile_size=4 * side, chunk_frames=1 + 2 * t, chunk_overlap=t)
    clip = _clip(photo_uint8, spec.frame_rule.pixel_frames(5 if spec.frame_rule.causal else 4), side, side)
    decode_db, round_trip_db = _compare(tok, clip, options)
    print(f"{name}: temporal chunked vs whole decode {decode_db:.1f} dB, round trip {round_trip_db:.1f} dB")
    if getattr(tok.backend, "streams_frames", False):  # streams frame groups itself: never chunked
        assert decode_db == round_trip_db == math.inf
        return
    jobs, _ = tiling._temporal_jobs(4, tiling._Grid.build(spec, options), encoding=True)
    assert len(jobs) == 3
    assert decode_db >= PSNR_BOUND_DB
    assert round_trip_db >= PSNR_BOUND_DB


def test_auto_tiling_leaves_small_inputs_untouched(photo_nchw):
    tok = load_tokenizer("sd-vae-tiny")
    auto = tok.encode(photo_nchw, tiling=TilingOptions(tile_size=64))  # 48 x 64: one tile
    off = tok.encode(photo_nchw, tiling=TilingOptions(enabled=False))
    assert torch.equal(auto.latents, off.latents)
    forced = tok.encode(photo_nchw, tiling=TilingOptions(enabled=True, tile_size=32, tile_overlap=16))
    assert not torch.equal(forced.latents, off.latents)


def test_posterior_is_blended_with_the_mean(photo_uint8):
    tok = load_tokenizer("sd-vae-tiny")
    pixels = _photo(photo_uint8, 64, 96)
    options = TilingOptions(tile_size=48, tile_overlap=16)
    tiled = tok.encode(pixels, tiling=options, return_posterior=True, normalize=False)
    whole = tok.encode(pixels, tiling=TilingOptions(enabled=False), return_posterior=True, normalize=False)
    assert tiled.logvar.shape == tiled.mean.shape == whole.logvar.shape
    assert torch.equal(tiled.latents, tiled.mean)
    assert psnr(tiled.mean / 4, whole.mean / 4) >= PSNR_BOUND_DB  # raw latents span about [-4, 4]
    correlation = torch.corrcoef(torch.stack([tiled.logvar.flatten(), whole.logvar.flatten()]))[0, 1]
    assert correlation > 0.9


def test_not_worse_than_diffusers_own_tiling(photo_uint8):
    """Same model, same tile geometry (64 px tiles sharing 16 px): our decode is at least as close
    to the untiled decode as diffusers' ``AutoencoderKL.tiled_decode``."""
    tok = load_tokenizer("sd-vae-tiny")
    latents = tok.encode(_photo(photo_uint8, 96, 128), tiling=TilingOptions(enabled=False))
    reference = tok.decode(latents, tiling=TilingOptions(enabled=False))
    ours = tok.decode(latents, tiling=TilingOptions(tile_size=64, tile_overlap=16))
    vae = tok.module
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = 64, 32, 0.25
    with torch.no_grad():
        theirs = vae.tiled_decode(latents.raw()).sample.clamp(-1, 1)
    print(
        f"sd-vae-tiny decode vs untiled: ours {psnr(ours, reference):.1f} dB, diffusers {psnr(theirs, reference):.1f} dB"
    )
    assert psnr(ours, reference) >= psnr(theirs, reference)


@pytest.mark.parametrize(
    "bad", [{"tile_size": 0}, {"tile_overlap": -1}, {"chunk_frames": 0}, {"chunk_overlap": 1.5}]
)
def test_invalid_options_are_refused(bad):
    with pytest.raises(InvalidRequestError, match=next(iter(bad))):
        TilingOptions(**bad)


class LocalBackend:
    """Average-pool encoder and repeat decoder (2x space, ``t``x time, causal or not): every output
    depends only on its own input cells, so tiling must reproduce the untiled result exactly."""

    streams_frames = False

    def __init__(self, causal: bool, modality: str = "video") -> None:
        rule = FrameRule(4, causal) if modality == "video" else FrameRule()
        self.spec = TokenizerSpec(
            name="local",
            family="test",
            modality=modality,
            spatial_compression=2,
            latent_channels=3,
            frame_rule=rule,
        )

    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim == 4:
            z = F.avg_pool2d(x, 2)  # (N, 3, H/2, W/2)
        else:
            t = self.spec.temporal_compression
            head = x[:, :, :1] if self.spec.frame_rule.causal else x[:, :, :0]
            rest = x[:, :, head.shape[2] :]
            groups = rest.unflatten(2, (rest.shape[2] // t, t)).mean(3)  # (N, 3, k, H, W)
            z = F.avg_pool3d(torch.cat([head, groups], 2), (1, 2, 2))  # (N, 3, [1+]k, H/2, W/2)
        return z, -z.abs()

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        x = z.repeat_interleave(2, -1).repeat_interleave(2, -2)
        if z.ndim == 5:
            t = self.spec.temporal_compression
            causal = self.spec.frame_rule.causal
            head, rest = (x[:, :, :1], x[:, :, 1:]) if causal else (x[:, :, :0], x)
            x = torch.cat([head, rest.repeat_interleave(t, 2)], 2)
        return x

    # what tiling calls: a Backend's inference entry points (traced per shape where a family opted in)
    def inference_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_moments(x)

    def inference_pixels(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode_latents(z)


@pytest.mark.parametrize(
    ("modality", "causal", "frames"), [("image", False, 0), ("video", True, 37), ("video", False, 36)]
)
@pytest.mark.parametrize(
    "options",
    [
        TilingOptions(tile_size=16, tile_overlap=4, chunk_frames=9, chunk_overlap=4),
        TilingOptions(tile_size=16, tile_overlap=0, chunk_frames=9, chunk_overlap=0),
        TilingOptions(enabled=True, tile_size=24, tile_overlap=6, chunk_frames=13, chunk_overlap=5),
    ],
)
def test_blending_is_exact_for_a_local_backend(modality, causal, frames, options):
    backend = LocalBackend(causal, modality)
    torch.manual_seed(0)
    x = torch.rand(2, 3, *((frames,) if frames else ()), 40, 54) * 2 - 1
    mean, logvar = backend.encode_moments(x)
    tiled_mean, tiled_logvar = tiling.encode(backend, x, options)
    assert tiled_mean.shape == mean.shape
    torch.testing.assert_close(tiled_mean, mean)
    torch.testing.assert_close(tiled_logvar, logvar)
    torch.testing.assert_close(tiling.decode(backend, mean, options), backend.decode_latents(mean))


def test_spans_cover_with_at_least_the_overlap():
    for length, tile, overlap, align in [
        (100, 64, 16, 4),
        (200, 64, 16, 8),
        (512, 96, 32, 32),
        (64, 64, 0, 8),
    ]:
        spans = tiling._spans(length, tile, overlap, align)
        assert spans[0][0] == 0 and spans[-1][1] == length
        assert all(s % align == 0 and e - s == min(tile, length) for s, e in spans)
        assert all(b[0] <= a[1] - overlap for a, b in itertools.pairwise(spans))


class RecordingBackend(LocalBackend):
    """LocalBackend that records the largest input it was given (what bounds model memory)."""

    def __init__(self, causal: bool) -> None:
        super().__init__(causal)
        self.largest: list[int] = [0, 0, 0]  # (frames, height, width) seen by encode / latents by decode

    def _see(self, x: torch.Tensor) -> None:
        self.largest = [max(a, b) for a, b in zip(self.largest, x.shape[2:], strict=True)]

    def encode_moments(self, x):
        self._see(x)
        return super().encode_moments(x)

    def decode_latents(self, z):
        self._see(z)
        return super().decode_latents(z)


@pytest.mark.parametrize("causal", [True, False])
def test_the_model_never_sees_more_than_one_tile(causal):
    backend = RecordingBackend(causal)
    options = TilingOptions(tile_size=16, tile_overlap=4, chunk_frames=9, chunk_overlap=4)
    x = torch.zeros(1, 3, 65 if causal else 64, 96, 128)  # 16 latent groups, 8 x 11 tiles of 16 px
    z, _ = tiling.encode(backend, x, options)
    assert backend.largest == [9 if causal else 8, 16, 16]
    backend.largest = [0, 0, 0]
    tiling.decode(backend, z, options)
    assert backend.largest == [3 if causal else 2, 8, 8]  # 1 + 2 / 2 latent frames, 16 px / f2
