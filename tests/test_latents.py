"""Latent file format: every metadata field round-trips; every mismatch is refused with a typed error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save as st_save

from tokenizers_svc.errors import InvalidLatentsError, ShapeMismatchError
from tokenizers_svc.latents import (
    FORMAT_VERSION,
    Latents,
    latents_from_bytes,
    load_latents,
    validate_for,
    validate_tensor_for,
)
from tokenizers_svc.spec import FrameRule, LatentNormalization, TokenizerSpec

IMAGE_SPEC = TokenizerSpec(
    name="img-f8c4",
    family="AutoencoderKL",
    modality="image",
    spatial_compression=8,
    latent_channels=4,
    normalization=LatentNormalization(scale=0.5, shift=0.1),
    is_kl=True,
)
VIDEO_SPEC = TokenizerSpec(
    name="vid-f8t4c16",
    family="test",
    modality="video",
    spatial_compression=8,
    latent_channels=16,
    frame_rule=FrameRule(4, causal=True),
    normalization=LatentNormalization(scale=1.2, mean=tuple(range(16)), std=(2.0,) * 16),
    is_kl=True,
)


def make_video_latents(**overrides) -> Latents:
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(1, 16, 3, 4, 5, generator=generator)
    fields = dict(
        latents=z,
        tokenizer=VIDEO_SPEC.name,
        normalized=True,
        normalization=VIDEO_SPEC.normalization,
        original_size=(30, 37),
        original_frames=7,
        padding=(2, 3, 2),
        weights_hash="ab" * 32,
        mean=torch.randn(z.shape, generator=generator),
        logvar=torch.randn(z.shape, generator=generator),
        fps=29.97002997002997,
        source_sha256="cd" * 32,
        resized_from=(60, 74),
        sampled=True,
        extra={"caption": "a cat", "split": "val"},
    )
    fields.update(overrides)
    return Latents(**fields)


def make_image_latents(**overrides) -> Latents:
    fields = dict(
        latents=torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(1)),
        tokenizer=IMAGE_SPEC.name,
        normalized=False,
        normalization=IMAGE_SPEC.normalization,
        original_size=(20, 40),
    )
    fields.update(overrides)
    return Latents(**fields)


def rewrite(latents: Latents, *, tensors: dict | None = None, **meta_changes) -> bytes:
    """The file bytes of ``latents`` with metadata keys changed (None deletes) or tensors replaced."""
    meta = latents.metadata()
    for key, value in meta_changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    body = {"latents": latents.latents} if tensors is None else tensors
    return st_save(body, metadata=meta)


def test_round_trip_keeps_every_field(tmp_path):
    original = make_video_latents()
    path = original.save(tmp_path / "clip.safetensors")
    loaded = load_latents(path)
    torch.testing.assert_close(loaded.latents, original.latents, rtol=0, atol=0)
    torch.testing.assert_close(loaded.mean, original.mean, rtol=0, atol=0)
    torch.testing.assert_close(loaded.logvar, original.logvar, rtol=0, atol=0)
    for name in (
        "tokenizer",
        "normalized",
        "normalization",
        "original_size",
        "original_frames",
        "padding",
        "weights_hash",
        "fps",
        "source_sha256",
        "resized_from",
        "sampled",
        "extra",
    ):
        assert getattr(loaded, name) == getattr(original, name), name
    assert loaded.layout == "NCTHW"
    validate_for(loaded, VIDEO_SPEC, weights_hash="ab" * 32)


def test_round_trip_minimal_image_and_dtypes():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        original = make_image_latents(latents=make_image_latents().latents.to(dtype))
        loaded = latents_from_bytes(original.to_bytes())
        assert loaded.latents.dtype == dtype
        assert torch.equal(loaded.latents, original.latents)
        assert loaded.mean is None and loaded.fps is None and loaded.original_frames is None
        assert loaded.resized_from is None and loaded.source_sha256 is None
        validate_for(loaded, IMAGE_SPEC)


def test_normalization_travels_with_the_tensor():
    raw = make_image_latents()
    loaded = latents_from_bytes(raw.with_normalized(True).to_bytes())
    assert loaded.normalized
    torch.testing.assert_close(loaded.latents, IMAGE_SPEC.normalization.apply(raw.latents))
    torch.testing.assert_close(loaded.raw(), raw.latents, rtol=1e-6, atol=1e-6)


def test_wrong_tokenizer():
    with pytest.raises(InvalidLatentsError, match="expected 'vid-f8t4c16'") as info:
        validate_for(make_image_latents(tokenizer="other"), VIDEO_SPEC)
    assert info.value.param == "tokenizer"


def test_wrong_weights():
    with pytest.raises(InvalidLatentsError, match="this model has 0123456789ab"):
        validate_for(make_video_latents(), VIDEO_SPEC, weights_hash="0123456789ab" * 4)


def test_wrong_rank_for_tokenizer():
    image = make_image_latents(tokenizer=VIDEO_SPEC.name)
    with pytest.raises(ShapeMismatchError, match="expects latents in NCTHW layout"):
        validate_for(image, VIDEO_SPEC)


def test_wrong_channels():
    with pytest.raises(ShapeMismatchError, match="expects 4 latent channels, got 16"):
        validate_tensor_for(make_video_latents().latents[:, :, 0], IMAGE_SPEC)


def test_wrong_dtype():
    with pytest.raises(InvalidLatentsError, match=r"must be one of .*got int32"):
        validate_tensor_for(torch.zeros(1, 4, 2, 2, dtype=torch.int32), IMAGE_SPEC)
    with pytest.raises(InvalidLatentsError, match="got float64"):
        validate_tensor_for(torch.zeros(1, 4, 2, 2, dtype=torch.float64), IMAGE_SPEC)
    latents = make_image_latents()
    with pytest.raises(InvalidLatentsError, match="metadata dtype 'float16' does not match"):
        latents_from_bytes(rewrite(latents, dtype="float16"))


def test_shape_metadata_must_match_tensor():
    latents = make_image_latents()
    with pytest.raises(ShapeMismatchError, match=r"metadata shape \[2, 4, 3, 6\]"):
        latents_from_bytes(rewrite(latents, shape=json.dumps([2, 4, 3, 6])))
    with pytest.raises(ShapeMismatchError, match="layout NCTHW expects a 5-d tensor"):
        latents_from_bytes(rewrite(latents, layout="NCTHW"))
    bad_mean = {
        "latents": latents.latents,
        "mean": torch.zeros(1, 4, 3, 5),
        "logvar": torch.zeros(1, 4, 3, 5),
    }
    with pytest.raises(ShapeMismatchError, match="'mean' shape"):
        latents_from_bytes(rewrite(latents, tensors=bad_mean))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite(value):
    z = make_image_latents().latents.clone()
    z[0, 1, 2, 3] = value
    with pytest.raises(InvalidLatentsError, match="1 NaN/Inf values; expected finite"):
        latents_from_bytes(make_image_latents(latents=z).to_bytes())
    with pytest.raises(InvalidLatentsError, match="NaN/Inf"):
        validate_tensor_for(z, IMAGE_SPEC)


@pytest.mark.parametrize("blob", [b"", b"garbage bytes that are not safetensors", b"\xff" * 64])
def test_garbage_bytes(blob):
    with pytest.raises(InvalidLatentsError, match="not a safetensors latent file"):
        latents_from_bytes(blob)


def test_safetensors_without_our_metadata():
    with pytest.raises(InvalidLatentsError, match=r"'format' must be 'tokenizers-svc\.latents', got None"):
        latents_from_bytes(st_save({"latents": torch.zeros(1, 4, 2, 2)}))


@pytest.mark.parametrize("key", ["tokenizer", "layout", "dtype", "shape", "normalization", "original_height"])
def test_missing_metadata(key):
    with pytest.raises(InvalidLatentsError, match=f"missing '{key}'") as info:
        latents_from_bytes(rewrite(make_image_latents(), **{key: None}))
    assert info.value.param == key


def test_newer_format_version():
    newer = str(FORMAT_VERSION + 1)
    with pytest.raises(
        InvalidLatentsError, match=f"{newer} is newer than supported version {FORMAT_VERSION}"
    ):
        latents_from_bytes(rewrite(make_image_latents(), format_version=newer))


# Issue 13 case 4: each malformed field -> InvalidLatentsError (422) naming the field and what was expected.
MALFORMED_METADATA = {
    "padding": ("padding", json.dumps([1, -1, 0]), "padding", "non-negative integers"),
    "height not int": ("original_height", "x", "original_height", "an integer >= 1"),
    "height negative": ("original_height", "-5", "original_height", "an integer >= 1"),
    "height zero": ("original_height", "0", "original_height", "an integer >= 1"),
    "frames not int": ("original_frames", "x", "original_frames", "an integer >= 1"),
    "frames negative": ("original_frames", "-3", "original_frames", "an integer >= 1"),
    "fps not a number": ("fps", "abc", "fps", "a number in"),
    "fps tiny": ("fps", "1e-09", "fps", "a number in"),
    "fps huge": ("fps", "1e9", "fps", "a number in"),
    "resized_from not json": ("resized_from", "notjson", "resized_from", r"JSON \[height, width\]"),
    "resized_from negative": ("resized_from", "[-1, 4]", "resized_from", "positive integers"),
    "scale not a number": ("normalization", '{"scale": "abc"}', "normalization.scale", "a finite number"),
    "scale zero": ("normalization", '{"scale": 0}', "normalization.scale", "not 0"),
    "normalization a list": ("normalization", "[1, 2]", "normalization", "a JSON object"),
    "normalization not json": ("normalization", "{", "normalization", "a JSON object"),
    "unknown key": ("normalization", '{"scale": 1, "offset": 2}', "normalization.offset", "known keys"),
    "mean wrong length": ("normalization", '{"mean": [0, 0]}', "normalization.mean", "a list of 16"),
    "std not positive": ("normalization", json.dumps({"std": [0.0] * 16}), "normalization.std", "> 0"),
    "normalized not bool": ("normalized", "yes", "normalized", "'true' or 'false'"),
}


@pytest.mark.parametrize("case", list(MALFORMED_METADATA))
def test_malformed_metadata_names_the_field(case):
    key, value, param, expected = MALFORMED_METADATA[case]
    with pytest.raises(InvalidLatentsError, match=f"'{param}' must be .*{expected}") as info:
        latents_from_bytes(rewrite(make_video_latents(), **{key: value}))
    assert info.value.param == param and info.value.http_status == 422


def test_image_latents_refuse_frames_and_missing_tensor():
    latents = make_image_latents()
    with pytest.raises(InvalidLatentsError, match="'original_frames' must be empty for image latents"):
        latents_from_bytes(rewrite(latents, original_frames="3"))
    with pytest.raises(InvalidLatentsError, match="no tensor named 'latents'"):
        latents_from_bytes(rewrite(latents, tensors={"z": latents.latents}))


def test_crop_larger_than_the_latents_decode_to_is_refused():
    """The original size and frames must fit what the latents decode to (f=8: 4x5 latents -> 32x40)."""
    with pytest.raises(InvalidLatentsError, match="original size 33x37 is larger than") as info:
        validate_for(latents_from_bytes(rewrite(make_video_latents(), original_height="33")), VIDEO_SPEC)
    assert info.value.param == "original_height"
    with pytest.raises(InvalidLatentsError, match="original_frames 10 is more than") as info:
        validate_for(latents_from_bytes(rewrite(make_video_latents(), original_frames="10")), VIDEO_SPEC)
    assert info.value.param == "original_frames"


def test_huge_finite_latents_are_named_as_such():
    """3e38 is finite; it used to be reported as NaN/Inf once un-normalized."""
    z = torch.zeros(1, 4, 3, 5)
    z[0, 0, 0, 0] = 3e38
    with pytest.raises(InvalidLatentsError, match=r"values up to 3e\+38 in magnitude"):
        latents_from_bytes(make_image_latents(latents=z).to_bytes())


def test_posterior_sharing_memory_with_latents_serializes():
    """A deterministic encode returns its mean as the latents: the same storage must still save."""
    base = make_image_latents()
    shared = make_image_latents(mean=base.latents, logvar=torch.zeros_like(base.latents))
    loaded = latents_from_bytes(shared.to_bytes())
    assert torch.equal(loaded.mean, base.latents) and torch.equal(loaded.latents, base.latents)


def test_a_file_with_an_extra_or_half_a_posterior_tensor_is_refused_naming_it():
    """An extra tensor was accepted and silently ignored; so was a mean without its logvar."""
    latents = make_video_latents()
    extra = {
        "latents": latents.latents,
        "mean": latents.mean,
        "logvar": latents.logvar,
        "noise": latents.mean.clone(),
    }
    with pytest.raises(InvalidLatentsError, match=r"unexpected tensor\(s\) \['noise'\]") as info:
        latents_from_bytes(rewrite(latents, tensors=extra))
    assert info.value.param == "noise" and info.value.http_status == 422
    with pytest.raises(InvalidLatentsError, match="mean without its logvar") as info:
        latents_from_bytes(rewrite(latents, tensors={"latents": latents.latents, "mean": latents.mean}))
    assert info.value.param == "logvar"
    assert torch.equal(latents_from_bytes(latents.to_bytes()).logvar, latents.logvar)  # both: fine
