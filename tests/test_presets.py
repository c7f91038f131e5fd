"""The contract every tiny trainable preset of issue 3 keeps, through the public Tokenizer API, on a
real photo (scikit-image's astronaut) or a real clip (../shared/data/videos/carphone_pristine.mp4):
shapes and compression math, gradients reaching every parameter, save/load equality, deterministic
eval outputs, tiling that is a no-op when one tile covers the input; and the listing's parameter and
GFLOP counts, computed on the meta device."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from tests.helpers import safetensors_bytes
from tokenizers_svc.families.base import state_dict_hash
from tokenizers_svc.loading import build_module, load_tokenizer
from tokenizers_svc.media import read_video, video_to_tensor
from tokenizers_svc.model_stats import (
    count_params,
    meta_backend,
    preset_stats,
    reference_shape,
)
from tokenizers_svc.registry import backend_for, get_preset, list_presets, preset_config
from tokenizers_svc.tiling import TilingOptions

TINY = ["vitok-tiny-8", "vitok-tiny-2x8", "dc-ae-f32c32-tiny", "video-vae-tiny"]
CLIP_NAME = "carphone_pristine.mp4"  # real footage (MANIFEST: "content": "real"), 176x144
CLIP_FRAMES = 9  # 1 + 4*2 for the causal 4x model; padded to 10 for the 2-frame tubelets


@pytest.fixture(scope="module")
def clip(shared_data) -> torch.Tensor:
    """(1, 3, 9, 100, 120) uint8: the first frames of a real clip, cropped (not a multiple of 16 or 8,
    so padding is exercised) to keep the tests fast."""
    video = read_video(shared_data / "videos" / CLIP_NAME, max_frames=CLIP_FRAMES)
    return video_to_tensor(video.frames[:, 20:120, 30:150])


@pytest.fixture
def pixels(request, photo_nchw):
    """The real input for a preset: the (1, 3, 48, 64) photo for images, the clip for videos."""
    tokenizer = load_tokenizer(request.param)
    if tokenizer.spec.modality == "video":
        return tokenizer, request.getfixturevalue("clip")
    return tokenizer, photo_nchw


def _loss(backend, x: torch.Tensor) -> torch.Tensor:
    """Reconstruction + KL on a posterior sample: every parameter (incl. the logvar head) is used."""
    mean, logvar = backend.encode_moments(x)
    z = mean
    kl = torch.zeros(())
    if logvar is not None:
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
    return (backend.decode_latents(z) - x).pow(2).mean() + 1e-3 * kl


@pytest.mark.parametrize("pixels", TINY, indirect=True)
def test_shapes_and_compression(pixels):
    tokenizer, x = pixels
    spec = tokenizer.spec
    latents = tokenizer.encode(x)
    prepared = tokenizer.prepare(x)
    assert latents.latents.shape == spec.latent_shape(tuple(prepared.pixels.shape))
    assert latents.latents.shape[1] == spec.latent_channels
    # the listing's ratio is exactly pixel floats / latent floats of a real encode at that size
    padded = prepared.pixels.shape
    frames = padded[2] if len(padded) == 5 else 1
    ratio = math.prod(padded[1:]) / math.prod(latents.latents.shape[1:])
    assert ratio == pytest.approx(spec.compression_ratio(padded[-2], padded[-1], frames))
    decoded = tokenizer.decode(latents, output_dtype=torch.uint8)
    assert decoded.shape == x.shape and decoded.dtype == torch.uint8


@pytest.mark.parametrize("name", TINY)
def test_gradients_reach_every_parameter(name, photo_nchw, request):
    torch.manual_seed(0)
    module = build_module(get_preset(name)).train()
    backend = backend_for(get_preset(name).class_name).from_module(module, name)
    spec = backend.spec
    x = photo_nchw.float() / 127.5 - 1  # (1, 3, 48, 64), [-1, 1]
    if spec.modality == "video":
        clip = request.getfixturevalue("clip")[:, :, :, :48, :64].float() / 127.5 - 1
        frames = max(n for n in range(1, clip.shape[2] + 1) if spec.frame_rule.is_valid(n))
        x = clip[:, :, :frames]  # (1, 3, T, 48, 64), T valid for the frame rule
    m = spec.multiple
    x = x[..., : x.shape[-2] // m * m, : x.shape[-1] // m * m]  # (.., 32, 64) for DC-AE's f32
    _loss(backend, x).backward()
    missing = [n for n, p in module.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"


@pytest.mark.parametrize("pixels", TINY, indirect=True)
def test_save_load_equality(pixels, tmp_path):
    tokenizer, x = pixels
    tokenizer.backend.save_pretrained(tmp_path)
    (weights,) = tmp_path.glob("*.safetensors")
    assert (tmp_path / "config.json").is_file()
    # the byte count model_stats predicts from shapes alone (used against released files)
    assert weights.stat().st_size == safetensors_bytes(tokenizer.module.state_dict())
    loaded = load_tokenizer(tmp_path)
    assert type(loaded.module) is type(tokenizer.module)
    assert state_dict_hash(loaded.module) == state_dict_hash(tokenizer.module)
    assert {k: v for k, v in loaded.spec.to_dict().items() if k != "name"} == {
        k: v for k, v in tokenizer.spec.to_dict().items() if k != "name"
    }
    a, b = tokenizer.encode(x, normalize=False), loaded.encode(x, normalize=False)
    assert torch.equal(a.latents, b.latents)
    assert torch.equal(tokenizer.decode(a), loaded.decode(b))


@pytest.mark.parametrize("pixels", TINY, indirect=True)
def test_eval_outputs_are_deterministic(pixels):
    tokenizer, x = pixels
    first = tokenizer.encode(x)
    assert torch.equal(first.latents, tokenizer.encode(x).latents)
    assert torch.equal(tokenizer.decode(first), tokenizer.decode(first))
    again = load_tokenizer(tokenizer.name)  # seeded random init: the same weights every time
    assert again.weights_hash == tokenizer.weights_hash
    assert torch.equal(again.encode(x).latents, first.latents)


@pytest.mark.parametrize("pixels", TINY, indirect=True)
def test_one_tile_tiling_is_exact(pixels):
    """Forced tiling whose tile and chunk cover the whole input must not change a single value."""
    tokenizer, x = pixels
    whole = TilingOptions(enabled=True, tile_size=1024, tile_overlap=0, chunk_frames=65, chunk_overlap=0)
    plain = tokenizer.encode(x, tiling=TilingOptions(enabled=False))
    tiled = tokenizer.encode(x, tiling=whole)
    assert torch.equal(plain.latents, tiled.latents)
    assert torch.equal(
        tokenizer.decode(plain, tiling=TilingOptions(enabled=False)), tokenizer.decode(plain, tiling=whole)
    )


def test_every_preset_has_stats_without_allocating_weights():
    """All presets with a config (the 1.1B DC-AE included) are counted on meta tensors in seconds."""
    for preset in list_presets():
        if not preset.config:
            continue
        stats = preset_stats(preset)
        assert stats.params > 0 and stats.encoder_gflops > 0 and stats.decoder_gflops > 0


@pytest.mark.parametrize("name", TINY)
def test_meta_stats_match_the_real_module(name):
    """The meta-device parameter count equals the allocated module's, and the reference input follows
    the frame rule (17 frames padded to it, 256x256)."""
    stats = preset_stats(name)
    tokenizer = load_tokenizer(name)
    assert stats.params == count_params(tokenizer.module)
    assert stats.input_shape == reference_shape(tokenizer.spec)
    assert stats.input_shape[-2:] == (256, 256)
    if tokenizer.spec.modality == "video":
        assert tokenizer.spec.frame_rule.is_valid(stats.input_shape[2])
        assert stats.input_shape[2] == tokenizer.spec.frame_rule.padded_frames(17)


def test_flop_convention_is_macs():
    """GFLOPs are 10^9 multiply-accumulates: a 1x1 conv from 4 to 8 channels over 256^2 pixels costs
    4*8*256^2 MACs. Counted through a real DC-AE-sized conv on the meta device."""
    from tokenizers_svc.model_stats import count_gflops

    class OneConv:
        module = torch.nn.Conv2d(4, 8, 1, bias=False, device="meta")

        def encode_moments(self, x):
            return self.module(x), None

        def decode_latents(self, z):
            return z[:, :0]

    encoder, decoder = count_gflops(OneConv(), (1, 4, 256, 256))
    assert encoder == pytest.approx(4 * 8 * 256 * 256 / 1e9)
    assert decoder == 0


def test_models_listing_row_reports_compression_params_and_gflops():
    """The `tokenizers-svc models --stats` row of a paper preset: compression, parameters and GFLOPs."""
    from tokenizers_svc.cli import _preset_row

    row = _preset_row(get_preset("vitok-s-b-4x16"), stats=True)
    assert (row["family"], row["modality"], row["weights"]) == ("ViTok", "video", "random-init")
    assert (row["spatial_compression"], row["temporal_compression"], row["latent_channels"]) == (16, 4, 16)
    assert row["compression_ratio"] == pytest.approx(3 * 4 * 16 * 16 / 16)  # 17 frames padded to 20
    assert row["gflops_input"] == [1, 3, 20, 256, 256]
    stats = preset_stats("vitok-s-b-4x16")
    assert row["params"] == stats.params and row["gflops"] == pytest.approx(stats.gflops, abs=0.005)
    assert _preset_row(get_preset("dc-ae-f32c32"), stats=True)["params"] == 323_356_460  # 1.1 GB fp32
    assert "params" not in _preset_row(get_preset("dc-ae-f32c32"))  # the plain listing builds nothing


@pytest.mark.parametrize("preset", [p for p in list_presets() if preset_config(p)], ids=lambda p: p.name)
def test_spec_from_config_is_the_built_models_spec(preset):
    """`models` describes presets from their configs alone; a module built from the same config
    (meta device) must have the same spec, quantizer included, so a config that leaves a key the
    spec reads to the class's default fails here. LTX's per-channel statistics are weights, not config."""
    config = preset_config(preset)
    listed = backend_for(preset.class_name).described_spec(config, preset.name)
    built = meta_backend(preset, config).spec
    if built.family == "LTX-Video":
        built = replace(built, normalization=replace(built.normalization, mean=None, std=None))
    assert listed == built
