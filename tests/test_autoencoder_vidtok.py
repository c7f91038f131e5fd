"""diffusers AutoencoderVidTok with its FSQ regularizer as a discrete video tokenizer
(tokenizers_svc/families/autoencoder_vidtok.py): a tiny random-init model saved with save_pretrained
and loaded offline through load_tokenizer; its ids are diffusers' own FSQ indices under the causal
frame rule, its latents diffusers' quantized codes, and ids round-trip through the token file and
the CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import cli_tokens_round_trip
from tokenizers_svc.api import Tokenizer
from tokenizers_svc.errors import InvalidLatentsError, ShapeMismatchError, UnsupportedModelError
from tokenizers_svc.families.autoencoder_vidtok import AutoencoderVidTokBackend
from tokenizers_svc.loading import build_module, load_tokenizer
from tokenizers_svc.media import encode_video, read_video
from tokenizers_svc.quantizers import FSQ
from tokenizers_svc.registry import get_preset
from tokenizers_svc.tokens import TokenIds, tokens_from_bytes

LEVELS = (8, 8, 8, 8)  # FSQRegularizer(levels=[8] * z_channels), z_channels 4
FRAMES, HEIGHT, WIDTH = 9, 40, 56  # 1 + 4 * 2 frames -> 3 latent frames of 5 x 7 (f8)


@pytest.fixture(scope="module")
def clip(photo_uint8) -> torch.Tensor:
    """(1, 3, 9, 40, 56) uint8: a camera pan over the real photo, 3 pixels a frame."""
    frames = np.stack(
        [photo_uint8[180 : 180 + HEIGHT, 200 + 3 * i : 200 + 3 * i + WIDTH] for i in range(FRAMES)]
    )
    return torch.from_numpy(frames).permute(3, 0, 1, 2).unsqueeze(0).contiguous()


def _save(directory, seed: int):
    build_module(get_preset("vidtok-fsq-tiny"), seed=seed).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("a") / "vidtok", seed=0)


@pytest.fixture(scope="module")
def tokenizer(saved):
    return load_tokenizer(saved)


def _diffusers_encode(module, pixels: torch.Tensor):
    """What AutoencoderVidTok.forward does before its decoder: uint8 pixels to [-1, 1], frame 0
    repeated t - 1 = 3 times in front, then diffusers' encode: (quantized codes, indices) for FSQ,
    an AutoencoderKLOutput for KL."""
    x = pixels.float() / 127.5 - 1
    with torch.no_grad():
        return module.encode(torch.cat([x[:, :, :1].expand(-1, -1, 3, -1, -1), x], dim=2))


def test_loads_offline_from_save_pretrained_and_states_its_tokens(saved, tokenizer):
    assert isinstance(tokenizer.backend, AutoencoderVidTokBackend) and tokenizer.source == str(saved)
    spec = tokenizer.spec
    assert (spec.family, spec.modality, spec.spatial_compression, spec.latent_channels) == (
        "VidTok",
        "video",
        8,
        4,
    )
    assert spec.frame_rule.describe() == "1 + 4k" and spec.frame_rule.causal and not spec.is_kl
    tokens = spec.to_dict()["tokens"]
    assert (tokens["kind"], tokens["levels"], tokens["vocabulary_size"]) == ("fsq", list(LEVELS), 4096)
    assert tokens["vocabulary_size"] == json.loads((saved / "config.json").read_text())["codebook_size"]
    assert (tokens["id_dtype"], tokens["id_base"], tokens["layout"]) == ("int32", 0, "NTHW")
    assert "causal first frame" in tokens["order"] and tokens["latents"].startswith("quantized")
    # the project's FSQ stands in for diffusers' FSQRegularizer: attached, nothing of it in the file
    assert tokenizer.backend.attached_quantizer and isinstance(tokenizer.backend.quantizer, FSQ)
    (weights,) = saved.glob("*.safetensors")
    assert not [key for key in load_file(weights) if key.startswith("quantize.")]


def test_ids_and_latents_are_diffusers_own(tokenizer, clip):
    ids = tokenizer.encode(clip, tokens=True)
    assert isinstance(ids, TokenIds) and ids.ids.dtype == torch.int32 and ids.ids.shape == (1, 3, 5, 7)
    assert int(ids.ids.min()) >= 0 and int(ids.ids.max()) < 4096 and len(ids.ids.unique()) > 10
    codes, indices = _diffusers_encode(tokenizer.module, clip)
    assert torch.equal(ids.ids, indices)  # FSQRegularizer's ids, from the project's FSQ
    latents = tokenizer.encode(clip, normalize=False).latents  # (1, 4, 3, 5, 7)
    assert torch.equal(latents, codes)  # quantized, as diffusers' encode returns them
    assert torch.equal(latents * 4, (latents * 4).round()) and latents.min() >= -1 and latents.max() <= 0.75
    with torch.no_grad():  # the encoder's output before quantization is not on that grid
        before, _ = tokenizer.backend.encode_moments(clip.float() / 127.5 - 1)
    assert not torch.equal(before, latents)


def test_ids_decode_as_diffusers_forward(tokenizer, clip):
    ids = tokenizer.encode(clip, tokens=True)
    from_ids = tokenizer.decode(ids)
    assert from_ids.shape == (1, 3, FRAMES, HEIGHT, WIDTH)
    assert torch.equal(from_ids, tokenizer.decode(tokenizer.encode(clip)))
    with torch.no_grad():
        reference = tokenizer.module(clip.float() / 127.5 - 1).sample.clamp(-1, 1)  # VidTok's own round trip
    assert torch.equal(from_ids, reference)


def test_ids_follow_the_causal_frame_rule(tokenizer, clip):
    """Latent frame 0 is frame 0 alone, latent frame 1 frames 1-4: changing frames 5-8 leaves the
    first two latent frames' ids unchanged, and changes the last one's."""
    ids = tokenizer.encode(clip, tokens=True).ids
    changed = clip.clone()
    changed[:, :, 5:] = 255 - changed[:, :, 5:]
    other = tokenizer.encode(changed, tokens=True).ids
    assert torch.equal(other[:, :2], ids[:, :2]) and not torch.equal(other[:, 2], ids[:, 2])
    one_frame = tokenizer.encode(clip[:, :, :1], tokens=True)  # an image is a one-frame clip
    assert torch.equal(one_frame.ids, ids[:, :1])
    assert tokenizer.decode(one_frame).shape == (1, 3, 1, HEIGHT, WIDTH)


def test_token_file_round_trip_and_refusals(tokenizer, clip, tmp_path):
    ids = tokenizer.encode(clip, tokens=True)
    back = tokens_from_bytes(ids.save(tmp_path / "ids.safetensors").read_bytes())
    assert torch.equal(back.ids, ids.ids) and back.levels == LEVELS and back.layout == "NTHW"
    assert back.original_frames == FRAMES and back.original_size == (HEIGHT, WIDTH)
    assert torch.equal(tokenizer.decode(back), tokenizer.decode(ids))
    other = load_tokenizer(_save(tmp_path / "b" / "vidtok", seed=1))  # same name, other weights
    assert other.name == tokenizer.name
    with pytest.raises(InvalidLatentsError, match="weights"):
        other.decode(back)
    with pytest.raises(ShapeMismatchError, match="NTHW"):
        tokenizer.decode(replace(back, ids=back.ids[:, 0]))  # image-layout ids


def test_cli_encode_tokens_info_and_decode(saved, clip, tmp_path):
    frames = clip[0].permute(1, 2, 3, 0).numpy()  # (T, H, W, 3)
    (tmp_path / "pan.mp4").write_bytes(encode_video(frames, 24.0))
    info, _ = cli_tokens_round_trip(tmp_path / "pan.mp4", str(saved), tmp_path / "back.mp4")
    assert info["dtype"] == "int32" and info["vocabulary_size"] == 4096 and info["layout"] == "NTHW"
    assert info["shape"] == [1, 3, 5, 7] and info["levels"] == list(LEVELS)
    video = read_video(tmp_path / "back.mp4")
    assert video.frames.shape == (FRAMES, HEIGHT, WIDTH, 3) and video.fps == pytest.approx(24.0)


def test_kl_variant_and_non_causal_models(clip):
    """The same class with regularizer "kl" is a continuous causal VAE: (mean, logvar) as diffusers'
    posterior gives them; the non-causal variant is refused."""
    preset = get_preset("vidtok-fsq-tiny")
    config = {**preset.config, "regularizer": "kl", "double_z": True}
    tokenizer = Tokenizer(
        AutoencoderVidTokBackend.from_module(build_module(replace(preset, config=config)), "kl")
    )
    assert tokenizer.spec.is_kl and tokenizer.spec.quantizer is None
    latents = tokenizer.encode(clip, normalize=False, return_posterior=True)
    assert latents.latents.shape == (1, 4, 3, 5, 7)
    posterior = _diffusers_encode(tokenizer.module, clip).latent_dist
    assert torch.equal(latents.mean, posterior.mean) and torch.equal(latents.logvar, posterior.logvar)
    assert tokenizer.decode(latents).shape == (1, 3, FRAMES, HEIGHT, WIDTH)
    with pytest.raises(UnsupportedModelError, match="non-causal"):
        AutoencoderVidTokBackend.spec_from_config({**preset.config, "is_causal": False}, "non-causal")
