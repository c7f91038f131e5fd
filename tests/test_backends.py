"""Every small random-init backend preset through the public API, on a real photo and a real clip.

Per preset: encode/decode shapes and compression math, pad-then-crop identity on odd sizes and
frame counts, save_pretrained -> load_tokenizer(dir) equality, normalization round trip, latent
file round trip, posterior (KL models) or its refusal (deterministic ones). Presets are discovered
at collection time (every family's tiny presets, up to ``MAX_PARAMS``), so new families are
covered without editing this file. Video presets also get a hub-preset description check.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import small_presets
from tokenizers_svc.api import Tokenizer
from tokenizers_svc.errors import InvalidRequestError, ShapeMismatchError
from tokenizers_svc.latents import Latents, latents_from_bytes
from tokenizers_svc.loading import load_tokenizer
from tokenizers_svc.media import image_to_tensor, read_image, read_video, video_to_tensor
from tokenizers_svc.pixels import pad_spatial
from tokenizers_svc.registry import backend_for, get_preset, model_class
from tokenizers_svc.spec import TokenizerSpec
from tokenizers_svc.tiling import TilingOptions

MAX_PARAMS = 30_000_000  # paper-size random-init presets are too slow for CPU CI
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PHOTO = DATA / "images" / "val" / "plant.jpg"  # real photos (MANIFEST.json: opencv-doc)
CLIP = DATA / "videos" / "bikes.mp4"  # real footage (MANIFEST.json: content "real")
UNTILED = TilingOptions(enabled=False)


SPECS = small_presets(MAX_PARAMS)
# (preset, "image" | "video") for every modality a preset accepts
CASES = [
    pytest.param(name, kind, id=f"{name}-{kind}")
    for name, spec in SPECS.items()
    for kind in ("image", "video")
    if spec.modality in (kind, "both")
]


@functools.cache
def _tokenizer(name: str) -> Tokenizer:
    return load_tokenizer(name)


def _odd_size(spec: TokenizerSpec) -> tuple[int, int]:
    """An odd (H, W) that needs padding on both axes and pads to about two multiples."""
    m = spec.multiple
    return max(m + m // 2 + 1, 37), max(2 * m - 1, 45)


@functools.cache
def _real_photo() -> np.ndarray:
    """(H, W, 3) uint8: a real photo from ../shared/data, else scikit-image's astronaut."""
    if PHOTO.is_file():
        return read_image(PHOTO)
    from skimage import data

    return data.astronaut()


@functools.cache
def _real_clip() -> np.ndarray:
    """(T, H, W, 3) uint8: real footage from ../shared/data, else a pan over the real photo."""
    if CLIP.is_file():
        return read_video(CLIP, max_frames=16).frames
    photo = _real_photo()
    return np.stack([photo[3 * i : 3 * i + 256, 100:356] for i in range(16)])


def _pixels(spec: TokenizerSpec, kind: str) -> torch.Tensor:
    """uint8 NCHW photo / NCTHW clip at an odd size (and a frame count the rule rejects)."""
    h, w = _odd_size(spec)
    if kind == "image":
        photo = _real_photo()
        top, left = (photo.shape[0] - h) // 2, (photo.shape[1] - w) // 2
        return image_to_tensor(photo[top : top + h, left : left + w])
    rule = spec.frame_rule
    frames = next(n for n in range(2, 16) if not rule.is_valid(n) and n % 2 == 1)  # odd, invalid: padded
    clip = _real_clip()
    top, left = (clip.shape[1] - h) // 2, (clip.shape[2] - w) // 2
    return video_to_tensor(clip[:frames, top : top + h, left : left + w])


@functools.cache
def _encoded(name: str, kind: str) -> tuple[torch.Tensor, Latents, torch.Tensor]:
    """(input uint8, raw Latents with posterior when KL, decoded float) for a preset and modality."""
    tok = _tokenizer(name)
    pixels = _pixels(tok.spec, kind)
    latents = tok.encode(pixels, normalize=False, return_posterior=tok.spec.is_kl, tiling=UNTILED)
    return pixels, latents, tok.decode(latents, tiling=UNTILED)


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_shapes_compression_and_pad_then_crop(name, kind):
    tok = _tokenizer(name)
    spec = tok.spec
    pixels, latents, decoded = _encoded(name, kind)
    h, w = pixels.shape[-2:]
    m, f = spec.multiple, spec.spatial_compression
    padded_h, padded_w = math.ceil(h / m) * m, math.ceil(w / m) * m
    assert (padded_h, padded_w) != (h, w)
    if kind == "image":
        padded_shape = (1, 3, padded_h, padded_w)
        assert latents.latents.shape == (1, spec.latent_channels, padded_h // f, padded_w // f)
    else:
        frames = pixels.shape[2]
        padded_frames = spec.frame_rule.padded_frames(frames)
        padded_shape = (1, 3, padded_frames, padded_h, padded_w)
        latent_frames = spec.frame_rule.latent_frames(padded_frames)
        assert latents.latents.shape == (1, spec.latent_channels, latent_frames, padded_h // f, padded_w // f)
        assert latents.original_frames == frames
        assert latents.padding[2] == padded_frames - frames
    assert latents.latents.shape == spec.latent_shape(padded_shape)
    assert math.prod(padded_shape) / latents.latents.numel() == pytest.approx(
        spec.compression_ratio(padded_h, padded_w, padded_shape[2] if len(padded_shape) == 5 else 1)
    )
    assert latents.original_size == (h, w)
    assert latents.padding[:2] == (padded_h - h, padded_w - w)

    # decode crops back to the original size and frame count ...
    assert decoded.shape == pixels.shape
    # ... and the crop is exactly the top-left of decoding the padded input
    full = tok.decode(latents.latents, normalized=False, tiling=UNTILED)
    assert full.shape == padded_shape
    crop = full[..., :h, :w] if kind == "image" else full[:, :, : pixels.shape[2], :h, :w]
    assert torch.equal(decoded, crop)
    # padding is replicate: encoding a hand-padded input gives the same latents
    x = pixels.float() / 127.5 - 1
    x = pad_spatial(x, padded_h - h, padded_w - w)
    if x.ndim == 5 and x.shape[2] < padded_shape[2]:
        x = torch.cat([x, x[:, :, -1:].expand(-1, -1, padded_shape[2] - x.shape[2], -1, -1)], dim=2)
    by_hand = tok.encode(x, normalize=False, tiling=UNTILED)
    torch.testing.assert_close(by_hand.latents, latents.latents, rtol=1e-5, atol=1e-5)
    assert by_hand.padding == (0, 0, 0)


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_normalization_round_trip(name, kind):
    tok = _tokenizer(name)
    _, raw, decoded = _encoded(name, kind)
    norm = tok.spec.normalization
    normalized = raw.with_normalized(True)
    assert normalized.normalized and not raw.normalized
    torch.testing.assert_close(normalized.latents, norm.apply(raw.latents))
    torch.testing.assert_close(norm.invert(normalized.latents), raw.latents, rtol=1e-5, atol=1e-5)
    probe = torch.ones_like(raw.latents)
    if not torch.allclose(norm.apply(probe), probe):  # a non-trivial convention must change latents
        assert not torch.allclose(normalized.latents, raw.latents)
    # decode undoes the normalization it is told about, whichever space the latents are in
    torch.testing.assert_close(tok.decode(normalized, tiling=UNTILED), decoded, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_latent_file_round_trip(name, kind):
    tok = _tokenizer(name)
    _, raw, decoded = _encoded(name, kind)
    normalized = raw.with_normalized(True)
    loaded = latents_from_bytes(normalized.to_bytes())
    assert torch.equal(loaded.latents, normalized.latents)
    assert loaded.normalized and loaded.normalization == tok.spec.normalization
    assert (loaded.original_size, loaded.original_frames, loaded.padding) == (
        raw.original_size,
        raw.original_frames,
        raw.padding,
    )
    assert loaded.weights_hash == tok.weights_hash and loaded.tokenizer == name
    if tok.spec.is_kl:
        assert torch.equal(loaded.mean, raw.mean) and torch.equal(loaded.logvar, raw.logvar)
    torch.testing.assert_close(tok.decode(loaded, tiling=UNTILED), decoded, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_posterior(name, kind):
    tok = _tokenizer(name)
    pixels, raw, _ = _encoded(name, kind)
    if not tok.spec.is_kl:
        assert raw.mean is None
        with pytest.raises(InvalidRequestError, match="deterministic"):
            tok.encode(pixels, return_posterior=True)
        return
    assert raw.mean.shape == raw.logvar.shape == raw.latents.shape
    assert torch.equal(raw.latents, raw.mean)  # the default is the posterior's mode
    sampled = tok.encode(
        pixels, normalize=False, sample=True, generator=torch.Generator().manual_seed(0), tiling=UNTILED
    )
    noise = torch.randn(raw.mean.shape, generator=torch.Generator().manual_seed(0))
    assert sampled.sampled
    torch.testing.assert_close(sampled.latents, raw.mean + torch.exp(0.5 * raw.logvar) * noise)


@pytest.mark.parametrize("name", list(SPECS))
def test_save_pretrained_then_load_directory(name, tmp_path):
    tok = _tokenizer(name)
    kind = "image" if tok.spec.modality in ("image", "both") else "video"
    pixels, raw, _ = _encoded(name, kind)
    tok.backend.save_pretrained(tmp_path / name)
    config = json.loads((tmp_path / name / "config.json").read_text())
    assert config["_class_name"] == get_preset(name).class_name
    loaded = load_tokenizer(tmp_path / name)
    assert {**loaded.spec.to_dict(), "name": name} == tok.spec.to_dict()
    state, loaded_state = tok.module.state_dict(), loaded.module.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    again = loaded.encode(pixels, normalize=False, tiling=UNTILED)
    assert torch.equal(again.latents, raw.latents)


VIDEO_HUB = {
    "wan2.1-vae": ("Wan", 8, "1 + 4k", True),
    "hunyuan-video-vae": ("HunyuanVideo", 8, "1 + 4k", True),
    "cogvideox-vae": ("CogVideoX", 8, "1 + 4k", True),
    "cosmos-vae": ("Cosmos", 8, "1 + 8k", False),
    "mochi-vae": ("Mochi", 8, "1 + 6k", True),
}


@pytest.mark.parametrize("name", list(VIDEO_HUB))
def test_video_hub_presets_describe_the_released_models(name):
    """Hub presets build their spec from the class defaults (the released configs) on the meta
    device: no download. Cosmos' defaults are its 8x8x8 release; Wan/Hunyuan/CogVideoX/Mochi's the
    released models'."""
    preset = get_preset(name)
    assert preset.source and preset.subfolder == "vae" and not preset.random_init
    with torch.device("meta"):
        module = model_class(preset.class_name)()
    spec = backend_for(preset.class_name).from_module(module, name).spec
    family, f, rule, is_kl = VIDEO_HUB[name]
    assert (spec.family, spec.spatial_compression, spec.frame_rule.describe(), spec.is_kl) == (
        family,
        f,
        rule,
        is_kl,
    )
    assert not spec.normalization.is_identity


def test_cogvideox_even_latent_count_decodes_to_the_frame_rule():
    """diffusers' CogVideoX decoder turns an even latent count k into 4k frames; the adapter pads to
    an odd count so k latents give 1 + 4(k - 1) frames, leaving the earlier frames unchanged."""
    tok = _tokenizer("cogvideox-vae-tiny")
    z = torch.randn(1, tok.spec.latent_channels, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        even = tok.backend.decode_latents(z)  # (1, 3, 13, 24, 24)
        odd = tok.backend.decode_latents(z[:, :, :3])  # (1, 3, 9, 24, 24), diffusers' own path
    assert even.shape[2] == tok.spec.frame_rule.pixel_frames(4) == 13
    assert odd.shape[2] == tok.spec.frame_rule.pixel_frames(3) == 9
    assert torch.equal(even[:, :, :9], odd)


@pytest.mark.parametrize("name", [n for n, s in SPECS.items() if s.modality == "video"])
def test_video_tokenizer_takes_a_photo_as_a_one_frame_clip(name):
    tok = _tokenizer(name)
    photo = _pixels(tok.spec, "image")  # (1, 3, H, W) uint8 real photo
    latents = tok.encode(photo, tiling=UNTILED)
    frames = tok.spec.frame_rule.padded_frames(1)
    h, w = photo.shape[-2:]
    m, f = tok.spec.multiple, tok.spec.spatial_compression
    assert latents.latents.shape == tok.spec.latent_shape(
        (1, 3, frames, math.ceil(h / m) * m, math.ceil(w / m) * m)
    )
    assert latents.latents.shape[2] == 1 and latents.latents.shape[-1] == math.ceil(w / m) * m // f
    assert tok.decode(latents, tiling=UNTILED).shape == (1, 3, 1, h, w)


def test_cosmos_sigma_data_is_the_edm_schedulers_default():
    """The Cosmos normalization scale is copied from diffusers' EDMEulerScheduler so that listing
    the registry does not import diffusers; this keeps the copy equal to the source."""
    import inspect

    from diffusers import EDMEulerScheduler

    from tokenizers_svc.families.autoencoder_kl_cosmos import COSMOS_SIGMA_DATA

    default = inspect.signature(EDMEulerScheduler.__init__).parameters["sigma_data"].default
    assert default == COSMOS_SIGMA_DATA


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_inputs_under_the_minimum_size_are_padded_up_and_cropped_back(name, kind):
    """1x1, 2x2 and 1-pixel-tall inputs (a GroupNorm with one value per group raised ValueError,
    a 500 on the server): padded to the model's ``min_size`` and cropped back on decode."""
    tok = _tokenizer(name)
    spec = tok.spec
    for h, w in ((1, 1), (2, 2), (1, 5)):
        pixels = torch.full((1, 3, h, w) if kind == "image" else (1, 3, 2, h, w), 200, dtype=torch.uint8)
        latents = tok.encode(pixels, tiling=UNTILED)
        assert min(latents.latents.shape[-2:]) >= spec.min_latent_size
        padded = [max(math.ceil(side / spec.multiple) * spec.multiple, spec.min_size) for side in (h, w)]
        assert latents.padding[:2] == (padded[0] - h, padded[1] - w)
        assert tok.decode(latents, tiling=UNTILED, output_dtype=torch.uint8).shape == pixels.shape


@pytest.mark.parametrize("name", [n for n, s in SPECS.items() if s.min_latent_size > 1])
def test_the_declared_minimum_size_is_needed_and_latents_under_it_are_refused(name):
    """The families whose GroupNorm has one channel per group declare 2x2 latents as their minimum:
    the network itself fails one cell below it, and a latent tensor under it is a 422 naming it."""
    tok = _tokenizer(name)
    spec = tok.spec
    below = spec.min_size - spec.multiple
    shape = (1, 3, below, below) if spec.modality == "image" else (1, 3, 1, below, below)
    with pytest.raises(ValueError, match="more than 1 value per channel"), torch.no_grad():
        tok.backend.encode_moments(torch.zeros(shape))
    tensor = torch.zeros(spec.latent_shape(shape))
    with pytest.raises(ShapeMismatchError, match=f"at least {spec.min_latent_size}x{spec.min_latent_size}"):
        tok.decode(tensor, normalized=False)
