"""``load_tokenizer`` and the :class:`Tokenizer` interface shared by every family.

The data path (see ARCHITECTURE.md): pixels -> prepare (validate, explicit resize, pad to the
model's constraints, remember the crop) -> encode (tiled/chunked) -> normalize -> :class:`Latents`;
and back: latents -> raw -> decode (tiled/chunked) -> crop to the original size and frame count.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from tokenizers_svc import tiling
from tokenizers_svc.errors import (
    DTypeMismatchError,
    InvalidRequestError,
    ShapeMismatchError,
    UnsupportedModelError,
)
from tokenizers_svc.families.base import Backend, directory_hash
from tokenizers_svc.latents import Latents, validate_for, validate_tensor_for
from tokenizers_svc.registry import (
    Preset,
    backend_for,
    get_preset,
    local_weights_dir,
    model_class,
    read_class_name,
)
from tokenizers_svc.spec import TokenizerSpec
from tokenizers_svc.tiling import TilingOptions

ResizePolicy = Literal["none", "shorter-side", "fit"]
RESIZE_POLICIES: tuple[str, ...] = ("none", "shorter-side", "fit")
PIXEL_RANGE_TOLERANCE = 1e-3  # float pixels may exceed [-1, 1] by rounding error only


@dataclass(frozen=True)
class Prepared:
    """Pixels ready for the backend plus what decode needs to undo the preparation."""

    pixels: torch.Tensor  # (N, C, H', W') or (N, C, T', H', W') float in [-1, 1], valid size
    original_size: tuple[int, int]  # (H, W) after resize, before padding
    original_frames: int | None
    padding: tuple[int, int, int]  # (bottom rows, right cols, end frames) added
    resized_from: tuple[int, int] | None


def to_float_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [-1, 1] (any layout) -> float32 [-1, 1]. Refuses other dtypes/ranges."""
    if pixels.dtype == torch.uint8:
        return pixels.float() / 127.5 - 1.0
    if not torch.is_floating_point(pixels):
        raise DTypeMismatchError(
            f"pixels must be uint8 [0, 255] or float [-1, 1], got {str(pixels.dtype).removeprefix('torch.')}",
            param="pixels",
        )
    if not bool(torch.isfinite(pixels).all()):
        raise InvalidRequestError("pixels contain NaN/Inf; expected finite floats in [-1, 1]", param="pixels")
    low, high = float(pixels.min()), float(pixels.max())
    if low < -1 - PIXEL_RANGE_TOLERANCE or high > 1 + PIXEL_RANGE_TOLERANCE:
        raise InvalidRequestError(
            f"float pixels must be in [-1, 1], got range [{low:.3f}, {high:.3f}] "
            "(pass uint8 for [0, 255] data)",
            param="pixels",
        )
    return pixels.float().clamp(-1, 1)


def to_uint8_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], round half up (the convention the eval metrics use)."""
    return torch.floor((pixels.float().clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8)


def resize_pixels(pixels: torch.Tensor, policy: str, resolution: int | None) -> torch.Tensor:
    """Explicit resize of float (N, C, [T,] H, W): 'shorter-side' -> shorter side == resolution,
    'fit' -> longer side == resolution; 'none' returns the input untouched. Antialiased bicubic."""
    if policy not in RESIZE_POLICIES:
        raise InvalidRequestError(
            f"resize must be one of {list(RESIZE_POLICIES)}, got {policy!r}", param="resize"
        )
    if policy == "none":
        return pixels
    if not resolution or resolution < 1:
        raise InvalidRequestError(
            f"resize={policy!r} needs a positive resolution, got {resolution}", param="resolution"
        )
    h, w = pixels.shape[-2:]
    scale = resolution / (min(h, w) if policy == "shorter-side" else max(h, w))
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    if size == (h, w):
        return pixels
    lead = pixels.shape[:-2]
    flat = (
        pixels.reshape(-1, *pixels.shape[-3:])
        if pixels.ndim == 4
        else pixels.transpose(1, 2).reshape(-1, pixels.shape[1], h, w)
    )
    out = F.interpolate(flat, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
    if pixels.ndim == 4:
        return out
    n, c, t = lead
    return out.reshape(n, t, c, *size).transpose(1, 2)


class Tokenizer:
    """One interface over every tokenizer family.

    ``encode``: pixels (N, C, H, W) images or (N, C, T, H, W) videos, uint8 [0, 255] or float
    [-1, 1] -> :class:`Latents`. ``decode``: :class:`Latents` (or a bare tensor with an explicit
    ``normalized`` flag) -> pixels cropped back to the original size, float [-1, 1] or uint8.
    """

    def __init__(self, backend: Backend, source: str = "") -> None:
        self.backend = backend
        self.source = source

    @property
    def spec(self) -> TokenizerSpec:
        return self.backend.spec

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def module(self) -> torch.nn.Module:
        return self.backend.module

    @property
    def weights_hash(self) -> str:
        return self.backend.weights_hash

    def describe(self) -> dict:
        return {
            **self.spec.to_dict(),
            "weights_hash": self.weights_hash,
            "source": self.source,
            "dtype": str(self.backend.dtype).removeprefix("torch."),
            "device": str(self.backend.device),
        }

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Tokenizer:
        _place(self.backend.module, device, dtype)
        return self

    def prepare(
        self, pixels: torch.Tensor, *, resize: ResizePolicy = "none", resolution: int | None = None
    ) -> Prepared:
        """Validate layout/dtype/range, apply the explicit resize policy, pad to the constraints."""
        spec = self.spec
        if not isinstance(pixels, torch.Tensor):
            raise ShapeMismatchError(
                f"pixels must be a torch.Tensor, got {type(pixels).__name__}", param="pixels"
            )
        if pixels.ndim == 4 and spec.modality == "video":
            pixels = pixels.unsqueeze(2)  # an image is a one-frame clip: (N, C, 1, H, W)
        allowed = {"image": (4,), "video": (5,), "both": (4, 5)}[spec.modality]
        if pixels.ndim not in allowed:
            want = " or ".join(("NCHW", "NCTHW")[r - 4] for r in allowed)
            raise ShapeMismatchError(
                f"{spec.name} ({spec.modality}) expects pixels in {want} layout, got shape {tuple(pixels.shape)}",
                param="pixels",
            )
        if pixels.shape[1] != spec.in_channels:
            raise ShapeMismatchError(
                f"{spec.name} expects {spec.in_channels} channels at dim 1, got {pixels.shape[1]} "
                f"(shape {tuple(pixels.shape)}; layout is channels-first)",
                param="pixels",
            )
        if 0 in pixels.shape:
            raise ShapeMismatchError(
                f"pixels must not be empty, got shape {tuple(pixels.shape)}", param="pixels"
            )
        x = to_float_pixels(pixels)
        source_hw = tuple(x.shape[-2:])
        x = resize_pixels(x, resize, resolution)
        h, w = x.shape[-2:]
        m = spec.multiple
        pad_h, pad_w = (-h) % m, (-w) % m
        frames = x.shape[2] if x.ndim == 5 else None
        pad_t = spec.frame_rule.padded_frames(frames) - frames if frames is not None else 0
        if pad_h or pad_w:
            x = pad_spatial(x, pad_h, pad_w)
        if pad_t:
            x = torch.cat([x, x[:, :, -1:].expand(-1, -1, pad_t, -1, -1)], dim=2)  # repeat last frame
        return Prepared(
            pixels=x,
            original_size=(h, w),
            original_frames=frames,
            padding=(pad_h, pad_w, pad_t),
            resized_from=source_hw if (h, w) != source_hw else None,
        )

    @torch.no_grad()
    def encode(
        self,
        pixels: torch.Tensor,
        *,
        normalize: bool = True,
        sample: bool = False,
        return_posterior: bool = False,
        resize: ResizePolicy = "none",
        resolution: int | None = None,
        tiling: TilingOptions | None = None,
        generator: torch.Generator | None = None,
        fps: float | None = None,
        source_sha256: str | None = None,
    ) -> Latents:
        """pixels -> Latents. ``sample`` draws from the posterior (KL models); default is its mode.

        ``normalize=True`` gives diffusion-ready latents (the spec's normalization applied),
        ``False`` raw latents; the choice is recorded in the result.
        """
        if return_posterior and not self.spec.is_kl:
            raise InvalidRequestError(
                f"{self.name} is deterministic; it has no posterior to return", param="return_posterior"
            )
        prepared = self.prepare(pixels, resize=resize, resolution=resolution)
        x = prepared.pixels.to(device=self.backend.device, dtype=self.backend.dtype)
        with self._eval_mode():
            mean, logvar = tiling_encode(self.backend, x, tiling)
        mean = mean.float()
        logvar = None if logvar is None else logvar.float()
        z = mean
        if sample and logvar is not None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * noise
        if normalize:
            z = self.spec.normalization.apply(z)
        return Latents(
            latents=z.cpu(),
            tokenizer=self.name,
            normalized=normalize,
            normalization=self.spec.normalization,
            original_size=prepared.original_size,
            original_frames=prepared.original_frames,
            padding=prepared.padding,
            weights_hash=self.weights_hash,
            mean=mean.cpu() if return_posterior else None,
            logvar=logvar.cpu() if return_posterior and logvar is not None else None,
            fps=fps,
            source_sha256=source_sha256,
            resized_from=prepared.resized_from,
            sampled=bool(sample and logvar is not None),
        )

    @torch.no_grad()
    def decode(
        self,
        latents: Latents | torch.Tensor,
        *,
        normalized: bool | None = None,
        tiling: TilingOptions | None = None,
        output_dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Latents -> pixels (N, C, H, W) / (N, C, T, H, W), cropped to the original size.

        Bare tensors carry no metadata, so ``normalized`` must say which space they are in, and no
        crop is applied. ``output_dtype``: float32 gives [-1, 1], uint8 gives [0, 255].
        """
        if isinstance(latents, Latents):
            validate_for(latents, self.spec, weights_hash=self.weights_hash)
            raw = latents.raw()
            crop = latents
        else:
            if normalized is None:
                raise InvalidRequestError(
                    "bare latent tensors need normalized=True or normalized=False", param="normalized"
                )
            validate_tensor_for(latents, self.spec)
            raw = self.spec.normalization.invert(latents) if normalized else latents
            crop = None
        z = raw.to(device=self.backend.device, dtype=self.backend.dtype)
        with self._eval_mode():
            x = tiling_decode(self.backend, z, tiling).float().clamp(-1, 1)
        if crop is not None:
            h, w = crop.original_size
            x = x[..., :h, :w]
            if x.ndim == 5 and crop.original_frames is not None:
                x = x[:, :, : crop.original_frames]
        x = x.cpu()
        if output_dtype == torch.uint8:
            return to_uint8_pixels(x)
        if output_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise InvalidRequestError(
                f"output_dtype must be float32 or uint8, got {output_dtype}", param="output_dtype"
            )
        return x.to(output_dtype)

    @contextlib.contextmanager
    def _eval_mode(self):
        was_training = self.backend.module.training
        self.backend.module.eval()
        try:
            yield
        finally:
            self.backend.module.train(was_training)


def _place(module: torch.nn.Module, device, dtype: torch.dtype | None) -> torch.nn.Module:
    """Move, and cast only when the dtype changes (diffusers warns on every ``.to(dtype)`` call)."""
    if device is not None:
        module.to(device=device)
    if dtype is not None and next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
    return module


def pad_spatial(x: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """Replicate-pad the bottom rows and right columns of (N, C, [T,] H, W)."""
    if x.ndim == 5:
        n, c, t, h, w = x.shape
        flat = x.transpose(1, 2).reshape(n * t, c, h, w)
        flat = F.pad(flat, (0, pad_w, 0, pad_h), mode="replicate")
        return flat.reshape(n, t, c, h + pad_h, w + pad_w).transpose(1, 2)
    return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")


def tiling_encode(backend: Backend, x: torch.Tensor, options: TilingOptions | None):
    return tiling.encode(backend, x, options or TilingOptions())


def tiling_decode(backend: Backend, z: torch.Tensor, options: TilingOptions | None) -> torch.Tensor:
    return tiling.decode(backend, z, options or TilingOptions())


def build_module(preset: Preset, seed: int = 0) -> torch.nn.Module:
    """Instantiate a preset's module from its config with seeded random weights (training, tests)."""
    cls = model_class(preset.class_name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(**preset.config)


def load_tokenizer(
    name_or_path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    allow_random_init: bool | None = None,
) -> Tokenizer:
    """Load a tokenizer by preset name, local model directory, or hub id (from the local cache only
    when offline). Directories hold ``config.json`` (whose ``_class_name`` picks the backend) and
    safetensors weights, as written by ``save_pretrained``.

    Presets without weights are built with seeded random weights only when ``random_init`` is set
    on the preset (tiny test presets) or ``allow_random_init=True`` is passed.
    """
    path = Path(name_or_path)
    if path.is_dir():
        return _load_directory(path, name=_directory_name(path), device=device, dtype=dtype)
    preset = get_preset(str(name_or_path))
    weights = local_weights_dir(preset)
    if weights is not None:
        return _load_directory(weights, name=preset.name, device=device, dtype=dtype)
    if preset.source and not (allow_random_init or (allow_random_init is None and preset.random_init)):
        return _load_hub(preset, device=device, dtype=dtype)
    if not (allow_random_init or (allow_random_init is None and preset.random_init)):
        raise UnsupportedModelError(
            f"preset {preset.name!r} has no weights; train it (tokenizers-svc train) and load the exported "
            "directory, or pass allow_random_init=True",
            param="model",
        )
    module = build_module(preset)
    backend = backend_for(preset.class_name).from_module(module, preset.name)
    _place(module, device, dtype).eval()
    return Tokenizer(backend, source=f"preset:{preset.name} (random init, seed 0)")


def _directory_name(path: Path) -> str:
    """A model directory's name: the card's ``name`` when a training card is present, else the folder."""
    import json

    card = path / "card.json"
    if card.is_file():
        try:
            return str(json.loads(card.read_text()).get("name") or path.name)
        except (OSError, json.JSONDecodeError):
            pass
    return path.resolve().name


def _load_directory(path: Path, *, name: str, device, dtype) -> Tokenizer:
    class_name = read_class_name(path)
    backend_cls = backend_for(class_name)
    cls = model_class(class_name)
    try:
        module = cls.from_pretrained(str(path))
    except (OSError, ValueError, RuntimeError) as exc:
        raise UnsupportedModelError(
            f"cannot load {class_name} from model directory {path.name!r}: {exc}"
        ) from None
    _place(module, device, dtype).eval()
    backend = backend_cls.from_module(module, name)
    backend._weights_hash = directory_hash(path)
    return Tokenizer(backend, source=str(path))


def _load_hub(preset: Preset, *, device, dtype) -> Tokenizer:
    """Real hub loading path (``from_pretrained(hub_id)``); offline it fails with a clear message."""
    cls = model_class(preset.class_name)
    try:
        module = cls.from_pretrained(preset.source, subfolder=preset.subfolder)
    except (OSError, ValueError) as exc:
        raise UnsupportedModelError(
            f"weights for {preset.name!r} ({preset.source}) are not available locally and could not be "
            f"downloaded ({type(exc).__name__}); download them and pass the directory, or place them in "
            f"$TOKENIZERS_SVC_HOME/weights/{preset.name}",
            param="model",
        ) from None
    _place(module, device, dtype).eval()
    return Tokenizer(
        backend_for(preset.class_name).from_module(module, preset.name), source=preset.source or ""
    )
