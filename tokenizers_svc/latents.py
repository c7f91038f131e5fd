"""Latents and the self-describing latent file (safetensors + string metadata).

A latent file holds tensor ``latents`` (and optionally the posterior ``mean``/``logvar``, always in
raw space) plus metadata that says which tokenizer made it, whether it is normalized and with which
constants, and how to crop the decode back to the original size. :func:`load_latents` validates all
of it and names the expected value in every refusal.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tokenizers_svc.errors import InvalidLatentsError, ShapeMismatchError
from tokenizers_svc.formats import MAX_FPS, MIN_FPS
from tokenizers_svc.spec import LatentNormalization

if TYPE_CHECKING:
    from tokenizers_svc.spec import TokenizerSpec

FORMAT_NAME = "tokenizers-svc.latents"
FORMAT_VERSION = 1
LATENT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FILE_TENSORS = ("latents", "mean", "logvar")  # the tensors a latent file may hold, by name
MAX_LATENT_ABS = 1e6  # VAE latents are O(10); larger finite values overflow once un-normalized


@dataclass
class Latents:
    """Latents plus everything needed to decode them back exactly.

    ``latents``: (N, C, h, w) for images or (N, C, t, h, w) for video, float. Normalized (ready for a
    diffusion model) when ``normalized`` is True, raw encoder output otherwise. ``mean``/``logvar``:
    the Gaussian posterior in raw space (KL models, when requested), same shape as ``latents``.
    ``original_size``/``original_frames``: pixel size before padding; ``padding`` = (bottom, right,
    end-frames) added to meet the tokenizer's constraints, cropped off by decode.
    """

    latents: torch.Tensor
    tokenizer: str
    normalized: bool
    normalization: LatentNormalization
    original_size: tuple[int, int]
    original_frames: int | None = None
    padding: tuple[int, int, int] = (0, 0, 0)
    weights_hash: str = ""
    mean: torch.Tensor | None = None
    logvar: torch.Tensor | None = None
    fps: float | None = None
    source_sha256: str | None = None
    resized_from: tuple[int, int] | None = None  # (H, W) before an explicit resize policy
    sampled: bool = False  # True when drawn from the posterior, False for its mode
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def layout(self) -> str:
        return "NCHW" if self.latents.ndim == 4 else "NCTHW"

    def raw(self) -> torch.Tensor:
        """Raw latents, whatever was stored."""
        return self.normalization.invert(self.latents) if self.normalized else self.latents

    def as_normalized(self) -> torch.Tensor:
        """Diffusion-ready latents, whatever was stored."""
        return self.latents if self.normalized else self.normalization.apply(self.latents)

    def with_normalized(self, normalized: bool) -> Latents:
        """Same latents converted to the requested space (the flag travels with the tensor)."""
        if normalized == self.normalized:
            return self
        tensor = self.as_normalized() if normalized else self.raw()
        return replace(self, latents=tensor, normalized=normalized)

    def select(self, index: int) -> Latents:
        """Item ``index`` of the batch as a batch of one."""
        pick = slice(index, index + 1)
        return replace(
            self,
            latents=self.latents[pick],
            mean=None if self.mean is None else self.mean[pick],
            logvar=None if self.logvar is None else self.logvar[pick],
        )

    def metadata(self) -> dict[str, str]:
        meta = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "layout": self.layout,
            "dtype": str(self.latents.dtype).removeprefix("torch."),
            "shape": json.dumps(list(self.latents.shape)),
            "normalized": "true" if self.normalized else "false",
            "normalization": json.dumps(self.normalization.to_dict()),
            **placement_metadata(self),
            "sampled": "true" if self.sampled else "false",
            "has_posterior": "true" if self.mean is not None else "false",
        }
        meta.update({f"x-{k}": v for k, v in self.extra.items()})
        return meta

    def to_bytes(self) -> bytes:
        """Serialize to safetensors bytes (the file format, also the HTTP body)."""
        tensors = {"latents": self.latents}
        if self.mean is not None and self.logvar is not None:
            tensors.update(mean=self.mean, logvar=self.logvar)
        # Own storage per tensor: safetensors refuses tensors that share memory, as raw latents
        # and the posterior mean do when a deterministic encode also returns its posterior.
        owned = {key: tensor.detach().cpu().clone().contiguous() for key, tensor in tensors.items()}
        return st_save(owned, metadata=self.metadata())

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.to_bytes())
        return path


def _meta(meta: dict[str, str], key: str) -> str:
    if key not in meta:
        raise InvalidLatentsError(f"latent file metadata is missing '{key}'", param=key)
    return meta[key]


def _bad(key: str, expected: str, value: object) -> InvalidLatentsError:
    return InvalidLatentsError(f"metadata '{key}' must be {expected}, got {value!r}", param=key)


def _parse_int(meta: dict[str, str], key: str, low: int = 0, *, optional: bool = False) -> int | None:
    """An integer >= ``low``; an empty string is None when ``optional``."""
    value = _meta(meta, key) if not optional else meta.get(key, "")
    if optional and value == "":
        return None
    try:
        number = int(value)
    except ValueError:
        raise _bad(key, f"an integer >= {low}", value) from None
    if number < low:
        raise _bad(key, f"an integer >= {low}", value)
    return number


def _parse_json(meta: dict[str, str], key: str, expected: str):
    value = _meta(meta, key)
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise _bad(key, expected, value) from None


def _is_int(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _parse_normalization(meta: dict[str, str], channels: int) -> LatentNormalization:
    """A JSON object with finite ``scale`` (non-zero) and ``shift``, optional per-channel
    ``mean``/``std`` lists of ``channels`` finite numbers (std > 0) and an optional
    ``scalar_fallback`` ``{scaling_factor, shift_factor}`` (finite, the factor non-zero); no other keys."""
    key = "normalization"
    known = ("scale", "shift", "mean", "std", "scalar_fallback")
    data = _parse_json(meta, key, "a JSON object {scale, shift, mean, std}")
    if not isinstance(data, dict):
        raise _bad(key, "a JSON object {scale, shift, mean, std}", meta[key])
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise _bad(f"{key}.{unknown[0]}", f"absent (known keys: {', '.join(known)})", data[unknown[0]])
    for name, default in (("scale", 1.0), ("shift", 0.0)):
        value = data.get(name, default)
        if not _is_number(value) or (name == "scale" and value == 0):
            raise _bad(f"{key}.{name}", "a finite number" + (", not 0" if name == "scale" else ""), value)
    fallback = data.get("scalar_fallback")
    if fallback is not None and not (
        isinstance(fallback, dict)
        and set(fallback) == {"scaling_factor", "shift_factor"}
        and all(_is_number(v) for v in fallback.values())
        and fallback["scaling_factor"] != 0
    ):
        expected = "a JSON object {scaling_factor, shift_factor} of finite numbers, the factor not 0"
        raise _bad(f"{key}.scalar_fallback", expected, fallback)
    for name in ("mean", "std"):
        value = data.get(name)
        if value is None:
            continue
        if not (
            isinstance(value, list)
            and len(value) == channels
            and all(_is_number(v) and (name == "mean" or v > 0) for v in value)
        ):
            sign = "finite numbers" if name == "mean" else "finite numbers > 0"
            raise _bad(f"{key}.{name}", f"a list of {channels} {sign} (one per latent channel)", value)
    return LatentNormalization.from_dict(data)


def _parse_pair(meta: dict[str, str], key: str) -> tuple[int, int] | None:
    """Optional JSON [height, width] of positive integers."""
    if not meta.get(key, ""):
        return None
    value = _parse_json(meta, key, "JSON [height, width] of positive integers")
    if not (isinstance(value, list) and len(value) == 2 and all(_is_int(v, 1) for v in value)):
        raise _bad(key, "JSON [height, width] of positive integers", meta[key])
    return value[0], value[1]


def _parse_fps(meta: dict[str, str]) -> float | None:
    value = meta.get("fps", "")
    if value == "":
        return None
    try:
        fps = float(value)
    except ValueError:
        raise _bad("fps", f"a number in [{MIN_FPS:g}, {MAX_FPS:g}]", value) from None
    if not MIN_FPS <= fps <= MAX_FPS:
        raise _bad("fps", f"a number in [{MIN_FPS:g}, {MAX_FPS:g}]", value)
    return fps


def _parse_bool(meta: dict[str, str], key: str, *, required: bool) -> bool:
    value = _meta(meta, key) if required else meta.get(key, "false")
    if value not in ("true", "false"):
        raise _bad(key, "'true' or 'false'", value)
    return value == "true"


def parse_metadata(meta: dict[str, str], latents: torch.Tensor) -> dict:
    """The one validating parser of a latent file's metadata -> :class:`Latents` fields (all but the
    tensors). Every malformed field is an InvalidLatentsError (422) naming the field and what was
    expected; the tensor's rank, dtype and shape are checked against the metadata here too."""
    layout = _meta(meta, "layout")
    expected_rank = {"NCHW": 4, "NCTHW": 5}.get(layout)
    if expected_rank is None:
        raise _bad("layout", "NCHW or NCTHW", layout)
    if latents.ndim != expected_rank:
        raise ShapeMismatchError(
            f"layout {layout} expects a {expected_rank}-d tensor, got shape {tuple(latents.shape)}",
            param="latents",
        )
    dtype = _meta(meta, "dtype")
    if str(latents.dtype).removeprefix("torch.") != dtype:
        raise InvalidLatentsError(
            f"metadata dtype {dtype!r} does not match tensor dtype {latents.dtype}", param="dtype"
        )
    shape = _parse_json(meta, "shape", "a JSON list of integers")
    if list(latents.shape) != shape:
        raise ShapeMismatchError(
            f"metadata shape {shape} does not match tensor shape {list(latents.shape)}", param="shape"
        )
    return {
        "normalized": _parse_bool(meta, "normalized", required=True),
        "normalization": _parse_normalization(meta, int(latents.shape[1])),
        **parse_placement(meta, layout),
        "sampled": _parse_bool(meta, "sampled", required=False),
    }


def placement_metadata(item) -> dict[str, str]:
    """The metadata a latent file and a token file share: who made it (tokenizer, weights hash),
    where it came from, and how decode crops back (original size and frames, padding, fps)."""
    return {
        "tokenizer": item.tokenizer,
        "weights_hash": item.weights_hash,
        "original_height": str(item.original_size[0]),
        "original_width": str(item.original_size[1]),
        "original_frames": "" if item.original_frames is None else str(item.original_frames),
        "padding": json.dumps(list(item.padding)),
        "fps": "" if item.fps is None else repr(float(item.fps)),
        "source_sha256": item.source_sha256 or "",
        "resized_from": "" if item.resized_from is None else json.dumps(list(item.resized_from)),
    }


def parse_placement(meta: dict[str, str], layout: str) -> dict:
    """The fields :func:`placement_metadata` writes, validated (``layout``: the file's, an image
    layout has no frame count), plus the ``x-`` extras."""
    padding = _parse_json(meta, "padding", "JSON [bottom, right, end_frames] of non-negative integers")
    if not (isinstance(padding, list) and len(padding) == 3 and all(_is_int(p, 0) for p in padding)):
        raise _bad("padding", "JSON [bottom, right, end_frames] of non-negative integers", meta["padding"])
    frames = _parse_int(meta, "original_frames", 1, optional=True)
    if "T" not in layout and frames is not None:
        raise _bad(
            "original_frames", f"empty for image latents and tokens ({layout})", meta["original_frames"]
        )
    return {
        "tokenizer": _meta(meta, "tokenizer"),
        "original_size": (_parse_int(meta, "original_height", 1), _parse_int(meta, "original_width", 1)),
        "original_frames": frames,
        "padding": tuple(padding),
        "weights_hash": meta.get("weights_hash", ""),
        "fps": _parse_fps(meta),
        "source_sha256": meta.get("source_sha256") or None,
        "resized_from": _parse_pair(meta, "resized_from"),
        "extra": {k[2:]: v for k, v in meta.items() if k.startswith("x-")},
    }


def read_safetensors(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A latent or token file's bytes -> (tensors, string metadata), before any validation."""
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
    except (SafetensorError, ValueError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidLatentsError(
            f"not a safetensors latent file or token file ({type(exc).__name__}); expected one written "
            "by this project (Latents.save / TokenIds.save / the encode endpoint)"
        ) from None
    return tensors, header.get("__metadata__") or {}


def latents_from_bytes(data: bytes) -> Latents:
    """Parse and validate a latent file's bytes (metadata: :func:`parse_metadata`; finiteness)."""
    tensors, meta = read_safetensors(data)
    fmt = meta.get("format")
    if fmt != FORMAT_NAME:
        raise InvalidLatentsError(f"metadata 'format' must be {FORMAT_NAME!r}, got {fmt!r}", param="format")
    version = _parse_int(meta, "format_version", 1)
    if version > FORMAT_VERSION:
        raise InvalidLatentsError(
            f"latent file format_version {version} is newer than supported version {FORMAT_VERSION}",
            param="format_version",
        )
    if "latents" not in tensors:
        raise InvalidLatentsError("latent file has no tensor named 'latents'", param="latents")
    unexpected = sorted(set(tensors) - set(FILE_TENSORS))
    if unexpected:
        raise InvalidLatentsError(
            f"latent file holds unexpected tensor(s) {unexpected}; expected 'latents', and 'mean' with "
            "'logvar' when it carries the posterior",
            param=unexpected[0],
        )
    if ("mean" in tensors) != ("logvar" in tensors):
        missing = "logvar" if "mean" in tensors else "mean"
        raise InvalidLatentsError(
            f"latent file holds the posterior's {'mean' if missing == 'logvar' else 'logvar'} without its "
            f"{missing}; expected both or neither",
            param=missing,
        )
    latents = tensors["latents"]
    fields = parse_metadata(meta, latents)
    mean, logvar = tensors.get("mean"), tensors.get("logvar")
    for name, tensor in (("mean", mean), ("logvar", logvar)):
        if tensor is not None and tensor.shape != latents.shape:
            raise ShapeMismatchError(
                f"'{name}' shape {tuple(tensor.shape)} must equal latents shape {tuple(latents.shape)}",
                param=name,
            )
    result = Latents(latents=latents, mean=mean, logvar=logvar, **fields)
    check_finite(result.latents)
    return result


def load_latents(path: str | Path) -> Latents:
    return latents_from_bytes(Path(path).read_bytes())


def check_finite(latents: torch.Tensor, param: str = "latents") -> None:
    if not torch.is_floating_point(latents):
        raise InvalidLatentsError(
            f"latents must be float32/bfloat16/float16, got {str(latents.dtype).removeprefix('torch.')}",
            param=param,
        )
    if not bool(torch.isfinite(latents).all()):
        bad = int((~torch.isfinite(latents)).sum())
        raise InvalidLatentsError(
            f"latents contain {bad} NaN/Inf values; expected finite floats", param=param
        )
    largest = float(latents.abs().max()) if latents.numel() else 0.0
    if largest > MAX_LATENT_ABS:
        raise InvalidLatentsError(
            f"latents hold values up to {largest:.3g} in magnitude; expected |value| <= {MAX_LATENT_ABS:g}",
            param=param,
        )


def validate_for(latents: Latents, spec: TokenizerSpec, *, weights_hash: str | None = None) -> None:
    """Refuse latents that this tokenizer cannot decode, naming the expected value."""
    validate_source(latents, spec, weights_hash, what="latents")
    validate_tensor_for(latents.latents, spec)
    validate_crop(latents, spec, tuple(latents.latents.shape[2:]), what="latents")


def validate_source(item, spec: TokenizerSpec, weights_hash: str | None, *, what: str) -> None:
    """Refuse a latent or token file made by another tokenizer, or by other weights of it."""
    if item.tokenizer != spec.name:
        raise InvalidLatentsError(
            f"{what} were made by tokenizer {item.tokenizer!r}, expected {spec.name!r}", param="tokenizer"
        )
    if weights_hash and item.weights_hash and item.weights_hash != weights_hash:
        raise InvalidLatentsError(
            f"{what} were made with weights {item.weights_hash[:12]}, this model has {weights_hash[:12]}",
            param="weights_hash",
        )


def validate_crop(item, spec: TokenizerSpec, grid: tuple[int, ...], *, what: str) -> None:
    """The recorded original size and frames fit what a latent grid ``([t,] h, w)`` decodes to."""
    f = spec.spatial_compression
    height, width = (int(d) * f for d in grid[-2:])
    if item.original_size[0] > height or item.original_size[1] > width:
        raise InvalidLatentsError(
            f"metadata original size {item.original_size[0]}x{item.original_size[1]} is larger than "
            f"these {what} decode to ({height}x{width}); expected at most that",
            param="original_height",
        )
    if len(grid) == 3 and item.original_frames is not None:
        frames = spec.frame_rule.pixel_frames(int(grid[0]))
        if item.original_frames > frames:
            raise InvalidLatentsError(
                f"metadata original_frames {item.original_frames} is more than these {what} decode "
                f"to ({frames}); expected at most that",
                param="original_frames",
            )


def validate_tensor_for(tensor: torch.Tensor, spec: TokenizerSpec, param: str = "latents") -> None:
    """Rank, channels, dtype and finiteness of a bare latent tensor for ``spec``."""
    expected_rank = 4 if spec.modality == "image" else 5
    allowed = (4, 5) if spec.modality == "both" else (expected_rank,)
    if tensor.ndim not in allowed:
        want = " or ".join(("NCHW", "NCTHW")[r - 4] for r in allowed)
        raise ShapeMismatchError(
            f"{spec.name} expects latents in {want} layout, got shape {tuple(tensor.shape)}", param=param
        )
    if tensor.shape[1] != spec.latent_channels:
        raise ShapeMismatchError(
            f"{spec.name} expects {spec.latent_channels} latent channels, got {tensor.shape[1]} "
            f"(shape {tuple(tensor.shape)})",
            param=param,
        )
    if str(tensor.dtype).removeprefix("torch.") not in LATENT_DTYPES:
        raise InvalidLatentsError(
            f"latents dtype must be one of {sorted(LATENT_DTYPES)}, got {str(tensor.dtype).removeprefix('torch.')}",
            param=param,
        )
    if math.prod(tensor.shape) == 0:
        raise ShapeMismatchError(f"latents must not be empty, got shape {tuple(tensor.shape)}", param=param)
    least = spec.min_latent_size
    if min(tensor.shape[-2:]) < least:
        raise ShapeMismatchError(
            f"{spec.name} decodes latents of at least {least}x{least} (height x width), got shape "
            f"{tuple(tensor.shape)}; its encode pads smaller images up to {spec.min_size}x{spec.min_size} pixels",
            param=param,
        )
    check_finite(tensor, param)
