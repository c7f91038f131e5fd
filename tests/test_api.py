"""The Tokenizer contract with ``sd-vae-tiny`` on a real photo: padding, dtypes, normalization,
posterior, resize policies and input validation."""

from __future__ import annotations

import pytest
import torch

from tokenizers_svc.errors import DTypeMismatchError, InvalidRequestError, ShapeMismatchError
from tokenizers_svc.loading import load_tokenizer, resolved_dtype
from tokenizers_svc.pixels import to_float_pixels


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("sd-vae-tiny")


@pytest.fixture(scope="module")
def odd_photo(photo_nchw) -> torch.Tensor:
    """Real photo, (1, 3, 37, 53) uint8: both sides odd, so sd-vae-tiny (multiple 2) must pad."""
    return photo_nchw[:, :, :37, :53].contiguous()


def test_pad_then_crop_is_identity(tokenizer, odd_photo):
    prepared = tokenizer.prepare(odd_photo)
    assert prepared.pixels.shape == (1, 3, 38, 54)
    assert prepared.padding == (1, 1, 0) and prepared.original_size == (37, 53)
    assert prepared.resized_from is None
    cropped = prepared.pixels[..., :37, :53]
    assert torch.equal(cropped, to_float_pixels(odd_photo))
    latents = tokenizer.encode(odd_photo)
    assert latents.latents.shape == (1, 4, 19, 27)
    decoded = tokenizer.decode(latents, output_dtype=torch.uint8)
    assert decoded.shape == odd_photo.shape and decoded.dtype == torch.uint8
    assert tokenizer.decode(latents).shape == odd_photo.shape


def test_uint8_and_float_inputs_agree(tokenizer, odd_photo):
    from_uint8 = tokenizer.encode(odd_photo)
    from_float = tokenizer.encode(odd_photo.float() / 127.5 - 1.0)
    torch.testing.assert_close(from_float.latents, from_uint8.latents, rtol=0, atol=1e-6)


def test_uint8_that_needs_no_padding_is_converted_in_the_model_call(tokenizer, photo_nchw):
    even = photo_nchw[:, :, :36, :52]  # sd-vae-tiny's multiple is 2: no padding
    prepared = tokenizer.prepare(even)
    assert prepared.pixels is even and prepared.padding == (0, 0, 0)
    from_uint8 = tokenizer.encode(even)
    from_float = tokenizer.encode(to_float_pixels(even))
    torch.testing.assert_close(from_float.latents, from_uint8.latents, rtol=0, atol=1e-6)


def test_normalize_flag(tokenizer, odd_photo):
    normalized = tokenizer.encode(odd_photo, normalize=True)
    raw = tokenizer.encode(odd_photo, normalize=False)
    assert normalized.normalized and not raw.normalized
    norm = tokenizer.spec.normalization
    assert norm.scale == pytest.approx(0.18215)
    torch.testing.assert_close(normalized.latents, norm.apply(raw.latents))
    torch.testing.assert_close(normalized.latents, raw.latents * 0.18215)
    torch.testing.assert_close(normalized.raw(), raw.latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokenizer.decode(normalized), tokenizer.decode(raw), rtol=1e-4, atol=1e-4)
    bare = tokenizer.decode(raw.latents, normalized=False)  # no crop for bare tensors
    assert bare.shape == (1, 3, 38, 54)
    with pytest.raises(InvalidRequestError, match="normalized=True or normalized=False"):
        tokenizer.decode(raw.latents)


def test_posterior_and_sampling(tokenizer, odd_photo):
    mode = tokenizer.encode(odd_photo, normalize=False, return_posterior=True)
    assert mode.mean.shape == mode.logvar.shape == mode.latents.shape
    assert torch.equal(mode.latents, mode.mean) and not mode.sampled
    first = tokenizer.encode(
        odd_photo, normalize=False, sample=True, generator=torch.Generator().manual_seed(3)
    )
    again = tokenizer.encode(
        odd_photo, normalize=False, sample=True, generator=torch.Generator().manual_seed(3)
    )
    assert first.sampled and torch.equal(first.latents, again.latents)
    assert not torch.allclose(first.latents, mode.mean)
    noise = torch.randn(mode.mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(first.latents, mode.mean + torch.exp(0.5 * mode.logvar) * noise)
    assert first.mean is None  # posterior only when asked for


@pytest.mark.parametrize(
    ("policy", "resolution"),
    [("none", None), ("shorter-side", 24), ("fit", 40)],
)
def test_resize_policies(tokenizer, odd_photo, policy, resolution):
    h, w = 37, 53
    if policy == "shorter-side":
        scale = resolution / min(h, w)
    elif policy == "fit":
        scale = resolution / max(h, w)
    else:
        scale = 1.0
    expected = (round(h * scale), round(w * scale))
    latents = tokenizer.encode(odd_photo, resize=policy, resolution=resolution)
    assert latents.original_size == expected
    assert latents.resized_from == (None if policy == "none" else (h, w))
    if policy != "none":
        side = min(expected) if policy == "shorter-side" else max(expected)
        assert side == resolution
    assert tokenizer.decode(latents).shape[-2:] == expected


def test_resize_needs_resolution(tokenizer, odd_photo):
    with pytest.raises(InvalidRequestError, match="needs a positive resolution"):
        tokenizer.encode(odd_photo, resize="fit")
    # a resolution alone was ignored: the photo was encoded at its own size without a word
    with pytest.raises(InvalidRequestError, match="resolution=24 needs resize='shorter-side'") as info:
        tokenizer.encode(odd_photo, resolution=24)
    assert info.value.param == "resolution"
    with pytest.raises(InvalidRequestError, match="resize must be one of"):
        tokenizer.encode(odd_photo, resize="crop")


@pytest.mark.parametrize(
    ("pixels", "error", "message"),
    [
        (
            torch.zeros(3, 8, 8, dtype=torch.uint8),
            ShapeMismatchError,
            r"expects pixels in NCHW layout, got shape \(3, 8, 8\)",
        ),
        (torch.zeros(1, 3, 2, 8, 8, dtype=torch.uint8), ShapeMismatchError, "NCHW layout"),
        (
            torch.zeros(1, 4, 8, 8, dtype=torch.uint8),
            ShapeMismatchError,
            "expects 3 channels at dim 1, got 4",
        ),
        (torch.zeros(1, 8, 8, 3, dtype=torch.uint8), ShapeMismatchError, "channels-first"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.int32), DTypeMismatchError, "uint8 .* or float .*, got int32"),
        (
            torch.full((1, 3, 8, 8), 2.0),
            InvalidRequestError,
            r"must be in \[-1, 1\], got range \[2.000, 2.000\]",
        ),
        (torch.full((1, 3, 8, 8), 255.0), InvalidRequestError, "pass uint8"),
        (torch.full((1, 3, 8, 8), float("nan")), InvalidRequestError, "NaN"),
        (torch.zeros(1, 3, 0, 8), ShapeMismatchError, "must not be empty"),
    ],
)
def test_bad_pixels(tokenizer, pixels, error, message):
    with pytest.raises(error, match=message):
        tokenizer.encode(pixels)


def test_auto_dtype_is_bfloat16_on_cuda_only():
    assert resolved_dtype("auto", "cuda") == resolved_dtype("auto", "cuda:1") == "bfloat16"
    assert resolved_dtype("auto", "cpu") == "float32"
    assert resolved_dtype("float16", "cuda") == "float16"  # an explicit choice wins


def test_inference_runs_in_eval_mode_and_leaves_the_mode_as_it_found_it(tokenizer, odd_photo):
    """A module in training mode (a training loop's validation) runs encode and decode in eval mode
    and is back in training mode after; one in eval mode (every loaded one) is not walked again."""
    module = tokenizer.backend.module
    seen: list[bool] = []
    submodule = next(m for m in module.modules() if m is not module and not list(m.children()))
    hook = submodule.register_forward_hook(lambda m, args, out: seen.append(m.training))
    try:
        module.train()
        latents = tokenizer.encode(odd_photo)
        tokenizer.decode(latents)
        assert seen and not any(seen) and all(m.training for m in module.modules())
        module.eval()
        seen.clear()
        tokenizer.decode(tokenizer.encode(odd_photo))
        assert seen and not any(seen) and not any(m.training for m in module.modules())
    finally:
        hook.remove()
        module.eval()
