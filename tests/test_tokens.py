"""Discrete tokens: FSQ codes <-> ids exactly, the quantizer in every kind of family, token files,
the CLI's --tokens / info / decode, and a tiny FSQ recipe trained with real Accelerate."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tests.helpers import cli_tokens_round_trip
from tokenizers_svc.api import Tokenizer
from tokenizers_svc.cli import app
from tokenizers_svc.errors import ConfigError, InvalidLatentsError, InvalidRequestError
from tokenizers_svc.loading import build_module, load_tokenizer
from tokenizers_svc.metrics import codebook_health, id_counts
from tokenizers_svc.quantizers import FSQ
from tokenizers_svc.registry import backend_for, get_preset
from tokenizers_svc.spec import QuantizerSpec
from tokenizers_svc.tokens import TokenIds, encoded_from_bytes, tokens_from_bytes


def quantized(preset_name: str, levels: list[int], seed: int = 0, **overrides) -> Tokenizer:
    """A tiny preset with an FSQ block in its config, seeded random weights."""
    preset = get_preset(preset_name)
    config = {**preset.config, **overrides, "quantizer": {"kind": "fsq", "levels": levels}}
    module = build_module(replace(preset, config=config), seed=seed)
    return Tokenizer(backend_for(preset.class_name).from_module(module, preset_name))


@settings(max_examples=25, deadline=None)
@given(levels=st.lists(st.integers(2, 9), min_size=1, max_size=6))
def test_every_id_round_trips_through_codes_exactly(levels):
    spec = QuantizerSpec("fsq", tuple(levels))
    fsq = FSQ(spec, len(levels))
    ids = torch.arange(spec.vocabulary_size, dtype=torch.int32).view(1, -1, 1)  # (N, h, w)
    codes = fsq.ids_to_codes(ids)  # (1, K, V, 1) on the grid, in [-1, 1]
    assert codes.shape == (1, len(levels), spec.vocabulary_size, 1)
    assert float(codes.abs().max()) <= 1.0
    again = fsq.codes_to_ids(codes)
    assert again.dtype == torch.int32 and torch.equal(again, ids)
    assert len(torch.unique(codes[0, :, :, 0], dim=1).T) == spec.vocabulary_size  # one code per id


def test_quantizer_rounds_to_the_grid_and_passes_gradients_straight_through():
    fsq = FSQ(QuantizerSpec("fsq", (8, 5, 5, 5)), 4)
    z = (torch.randn(2, 4, 3, 5) * 3).requires_grad_()
    codes = fsq.codes(z)
    half = torch.tensor([4.0, 2, 2, 2]).view(1, -1, 1, 1)
    assert torch.equal(codes * half, torch.round(codes * half))  # on the grid
    ids = fsq.codes_to_ids(codes)
    assert ids.shape == (2, 3, 5) and int(ids.min()) >= 0 and int(ids.max()) < 1000
    assert torch.equal(fsq.ids_to_codes(ids), codes.detach())
    codes.sum().backward()
    assert z.grad is not None and float(z.grad.abs().sum()) > 0  # rounding did not cut the gradient


def test_quantizer_config_is_validated_with_the_key_named():
    with pytest.raises(ConfigError, match=r"quantizer\.levels"):
        QuantizerSpec.from_config({"quantizer": {"kind": "fsq", "levels": [1, 5]}}, 2)
    with pytest.raises(ConfigError, match="projection: true"):
        QuantizerSpec.from_config({"quantizer": {"kind": "fsq", "levels": [5, 5], "projection": False}}, 4)
    with pytest.raises(ConfigError, match="kind"):
        QuantizerSpec.from_config({"quantizer": {"kind": "vq", "levels": [5]}}, 1)
    spec = QuantizerSpec.from_config({"quantizer": {"kind": "fsq", "levels": [8, 8, 8, 5, 5, 5]}}, 16)
    assert spec.vocabulary_size == 64000 and spec.projection  # 16 latent channels -> 6 code channels


@pytest.mark.parametrize(
    ("preset", "levels", "overrides", "shape"),
    [
        ("dc-ae-f32c32-tiny", [8, 5, 5, 5], {}, (2, 3, 64, 96)),  # projection 32 -> 4
        ("vitok-tiny-8", [8, 8, 8, 5, 5, 5], {"variational": False}, (2, 3, 40, 48)),
        ("wan-vae-tiny", [5, 5, 5, 5], {}, (1, 3, 9, 32, 40)),  # causal video VAE, no projection
    ],
)
def test_ids_round_trip_exactly_through_library_and_token_file(preset, levels, overrides, shape, tmp_path):
    tokenizer = quantized(preset, levels, **overrides)
    spec = tokenizer.spec
    tokens_info = spec.to_dict()["tokens"]
    assert tokens_info["vocabulary_size"] == math.prod(levels) and tokens_info["id_dtype"] == "int32"
    assert tokens_info["id_base"] == 0 and tokens_info["layout"] == spec.token_layout
    if spec.modality == "video":
        assert "causal first frame" in tokens_info["order"]
    pixels = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ids = tokenizer.encode(pixels, tokens=True)
    assert isinstance(ids, TokenIds) and ids.ids.dtype == torch.int32
    padded = tokenizer.prepare(pixels).pixels.shape
    assert tuple(ids.ids.shape) == spec.token_shape(tuple(padded))
    assert int(ids.ids.min()) >= 0 and int(ids.ids.max()) < spec.quantizer.vocabulary_size
    # decode(ids) is decode(latents): latents are quantized before the decoder, as VQModel does
    from_ids = tokenizer.decode(ids, output_dtype=torch.uint8)
    assert from_ids.shape == pixels.shape
    assert torch.equal(from_ids, tokenizer.decode(tokenizer.encode(pixels), output_dtype=torch.uint8))
    back = tokens_from_bytes(ids.save(tmp_path / "t.safetensors").read_bytes())
    assert torch.equal(back.ids, ids.ids) and back.levels == tuple(levels)
    assert back.original_size == ids.original_size and back.padding == ids.padding
    assert torch.equal(tokenizer.decode(back, output_dtype=torch.uint8), from_ids)
    # a saved model reloads with its projections: the same ids
    tokenizer.backend.save_pretrained(tmp_path / "model")
    reloaded = load_tokenizer(tmp_path / "model")
    assert torch.equal(reloaded.encode(pixels, tokens=True).ids, ids.ids)


def test_token_files_refuse_the_wrong_model_and_bad_ids(tmp_path):
    tokenizer = quantized("dc-ae-f32c32-tiny", [8, 5, 5, 5])
    pixels = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    ids = tokenizer.encode(pixels, tokens=True)
    other_weights = quantized("dc-ae-f32c32-tiny", [8, 5, 5, 5], seed=1)
    with pytest.raises(InvalidLatentsError, match="weights"):
        other_weights.decode(ids)
    with pytest.raises(InvalidLatentsError, match="levels"):
        quantized("dc-ae-f32c32-tiny", [5, 5, 5, 8]).decode(replace(ids, weights_hash=""))
    continuous = load_tokenizer("dc-ae-f32c32-tiny")
    with pytest.raises(InvalidLatentsError, match="continuous"):
        continuous.decode(replace(ids, tokenizer=continuous.name))
    with pytest.raises(InvalidRequestError, match="continuous"):
        continuous.encode(pixels, tokens=True)
    with pytest.raises(InvalidLatentsError, match=r"\[0, 1000\)"):
        tokenizer.decode(replace(ids, ids=ids.ids + 1000))
    data = bytearray(ids.to_bytes())
    meta_start = data.find(b'"vocabulary_size":"1000"')
    data[meta_start : meta_start + 24] = b'"vocabulary_size":"1001"'
    with pytest.raises(InvalidLatentsError, match="product of levels"):
        tokens_from_bytes(bytes(data))
    assert isinstance(encoded_from_bytes(tokenizer.encode(pixels).to_bytes()), type(tokenizer.encode(pixels)))


def test_codebook_health_counts_usage_and_perplexity():
    counts = id_counts(torch.tensor([[0, 1], [2, 3]], dtype=torch.int32), 8)
    health = codebook_health(counts)
    assert health["codebook_usage"] == 0.5 and health["perplexity"] == pytest.approx(4.0)
    assert codebook_health(id_counts(torch.zeros(10, dtype=torch.int32), 8))["perplexity"] == pytest.approx(
        1.0
    )


def test_cli_encode_tokens_info_and_decode(photo_nchw, tmp_path):
    tokenizer = quantized("dc-ae-f32c32-tiny", [8, 5, 5, 5])
    tokenizer.backend.save_pretrained(tmp_path / "model")
    from tokenizers_svc.media import encode_image, tensor_to_image

    (tmp_path / "photo.png").write_bytes(encode_image(tensor_to_image(photo_nchw), "png"))
    model = str(tmp_path / "model")
    info, ids = cli_tokens_round_trip(tmp_path / "photo.png", model, tmp_path / "back.png")
    assert info["dtype"] == "int32" and info["vocabulary_size"] == 1000 and info["layout"] == "NHW"
    assert info["shape"] == [1, 2, 2] and info["original_size"] == [48, 64]  # 64x64 padded, f32
    loaded = load_tokenizer(model)
    expected = loaded.decode(tokens_from_bytes(ids.read_bytes()), output_dtype=torch.uint8)
    from tokenizers_svc.media import image_to_tensor, read_image

    assert torch.equal(image_to_tensor(read_image(tmp_path / "back.png")), expected)
    continuous = CliRunner().invoke(
        app,
        [
            "encode",
            str(tmp_path / "photo.png"),
            "-o",
            str(tmp_path / "x.safetensors"),
            "-m",
            "dc-ae-f32c32-tiny",
            "--tokens",
        ],
    )
    assert continuous.exit_code == 1 and "continuous" in continuous.output
