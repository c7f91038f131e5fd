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
from tokenizers_svc.spec import LatentNormalization

if TYPE_CHECKING:
    from tokenizers_svc.spec import TokenizerSpec

FORMAT_NAME = "tokenizers-svc.latents"
FORMAT_VERSION = 1
LATENT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
            "tokenizer": self.tokenizer,
            "weights_hash": self.weights_hash,
            "layout": self.layout,
            "dtype": str(self.latents.dtype).removeprefix("torch."),
            "shape": json.dumps(list(self.latents.shape)),
            "normalized": "true" if self.normalized else "false",
            "normalization": json.dumps(self.normalization.to_dict()),
            "original_height": str(self.original_size[0]),
            "original_width": str(self.original_size[1]),
            "original_frames": "" if self.original_frames is None else str(self.original_frames),
            "padding": json.dumps(list(self.padding)),
            "fps": "" if self.fps is None else repr(float(self.fps)),
            "source_sha256": self.source_sha256 or "",
            "resized_from": "" if self.resized_from is None else json.dumps(list(self.resized_from)),
            "sampled": "true" if self.sampled else "false",
            "has_posterior": "true" if self.mean is not None else "false",
        }
        meta.update({f"x-{k}": v for k, v in self.extra.items()})
        return meta

    def to_bytes(self) -> bytes:
        """Serialize to safetensors bytes (the file format, also the HTTP body)."""
        tensors = {"latents": self.latents}
        if self.mean is not None and self.logvar is not None:
            tensors["mean"] = self.mean
            tensors["logvar"] = self.logvar
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


def _parse_int(meta: dict[str, str], key: str) -> int:
    value = _meta(meta, key)
    try:
        return int(value)
    except ValueError:
        raise InvalidLatentsError(f"metadata '{key}' must be an integer, got {value!r}", param=key) from None


def _parse_json(meta: dict[str, str], key: str):
    value = _meta(meta, key)
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise InvalidLatentsError(f"metadata '{key}' must be JSON, got {value!r}", param=key) from None


def latents_from_bytes(data: bytes) -> Latents:
    """Parse and validate a latent file's bytes (internal consistency, finiteness)."""
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
    except (SafetensorError, ValueError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidLatentsError(
            f"not a safetensors latent file ({type(exc).__name__}); expected the format written by "
            "Latents.save / the encode endpoint"
        ) from None
    meta = header.get("__metadata__") or {}
    fmt = meta.get("format")
    if fmt != FORMAT_NAME:
        raise InvalidLatentsError(f"metadata 'format' must be {FORMAT_NAME!r}, got {fmt!r}", param="format")
    version = _parse_int(meta, "format_version")
    if version > FORMAT_VERSION:
        raise InvalidLatentsError(
            f"latent file format_version {version} is newer than supported version {FORMAT_VERSION}",
            param="format_version",
        )
    if "latents" not in tensors:
        raise InvalidLatentsError("latent file has no tensor named 'latents'", param="latents")
    latents = tensors["latents"]
    layout = _meta(meta, "layout")
    expected_rank = {"NCHW": 4, "NCTHW": 5}.get(layout)
    if expected_rank is None:
        raise InvalidLatentsError(f"metadata 'layout' must be NCHW or NCTHW, got {layout!r}", param="layout")
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
    shape = _parse_json(meta, "shape")
    if list(latents.shape) != shape:
        raise ShapeMismatchError(
            f"metadata shape {shape} does not match tensor shape {list(latents.shape)}", param="shape"
        )
    mean, logvar = tensors.get("mean"), tensors.get("logvar")
    for name, tensor in (("mean", mean), ("logvar", logvar)):
        if tensor is not None and tensor.shape != latents.shape:
            raise ShapeMismatchError(
                f"'{name}' shape {tuple(tensor.shape)} must equal latents shape {tuple(latents.shape)}",
                param=name,
            )
    padding = _parse_json(meta, "padding")
    if not (
        isinstance(padding, list)
        and len(padding) == 3
        and all(isinstance(p, int) and p >= 0 for p in padding)
    ):
        raise InvalidLatentsError(
            f"metadata 'padding' must be 3 non-negative ints, got {padding}", param="padding"
        )
    frames = meta.get("original_frames", "")
    fps = meta.get("fps", "")
    resized = meta.get("resized_from", "")
    result = Latents(
        latents=latents,
        tokenizer=_meta(meta, "tokenizer"),
        normalized=_meta(meta, "normalized") == "true",
        normalization=LatentNormalization.from_dict(_parse_json(meta, "normalization")),
        original_size=(_parse_int(meta, "original_height"), _parse_int(meta, "original_width")),
        original_frames=int(frames) if frames else None,
        padding=tuple(padding),
        weights_hash=meta.get("weights_hash", ""),
        mean=mean,
        logvar=logvar,
        fps=float(fps) if fps else None,
        source_sha256=meta.get("source_sha256") or None,
        resized_from=tuple(json.loads(resized)) if resized else None,
        sampled=meta.get("sampled") == "true",
        extra={k[2:]: v for k, v in meta.items() if k.startswith("x-")},
    )
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


def validate_for(latents: Latents, spec: TokenizerSpec, *, weights_hash: str | None = None) -> None:
    """Refuse latents that this tokenizer cannot decode, naming the expected value."""
    if latents.tokenizer != spec.name:
        raise InvalidLatentsError(
            f"latents were made by tokenizer {latents.tokenizer!r}, expected {spec.name!r}", param="tokenizer"
        )
    if weights_hash and latents.weights_hash and latents.weights_hash != weights_hash:
        raise InvalidLatentsError(
            f"latents were made with weights {latents.weights_hash[:12]}, this model has {weights_hash[:12]}",
            param="weights_hash",
        )
    validate_tensor_for(latents.latents, spec)


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
    check_finite(tensor, param)
