"""Token ids and the self-describing token file (safetensors + string metadata).

A token file holds tensor ``ids``: int32, ``(N, h, w)`` for images or ``(N, t, h, w)`` for videos
(the latent grid of a quantized tokenizer without its channel axis, raster order), plus metadata
that says which tokenizer and weights made it, its vocabulary and levels, and how decode crops back
to the original size (the same fields as a latent file: :func:`latents.placement_metadata`).
:func:`tokens_from_bytes` validates all of it; :func:`validate_tokens_for` refuses ids that a
tokenizer did not make or cannot decode.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save as st_save

from tokenizers_svc.errors import InvalidLatentsError, ShapeMismatchError
from tokenizers_svc.latents import (
    FORMAT_NAME as LATENTS_FORMAT,
)
from tokenizers_svc.latents import (
    Latents,
    latents_from_bytes,
    parse_placement,
    placement_metadata,
    read_safetensors,
    validate_crop,
    validate_source,
)
from tokenizers_svc.spec import ID_DTYPE

if TYPE_CHECKING:
    from tokenizers_svc.spec import TokenizerSpec

FORMAT_NAME = "tokenizers-svc.tokens"
FORMAT_VERSION = 1
TOKEN_LAYOUTS = {"NHW": 3, "NTHW": 4}  # layout -> tensor rank


@dataclass
class TokenIds:
    """Token ids plus everything needed to decode them back and to train on them.

    ``ids``: int32 (N, h, w) or (N, t, h, w) in ``[0, vocabulary_size)``; ``levels``: the FSQ levels
    whose mixed-radix digits the ids are (``(n,)`` for an n-row codebook: one digit, the row index).
    The other fields are a latent file's (:class:`Latents`).
    """

    ids: torch.Tensor
    tokenizer: str
    vocabulary_size: int
    levels: tuple[int, ...]
    original_size: tuple[int, int]
    original_frames: int | None = None
    padding: tuple[int, int, int] = (0, 0, 0)
    weights_hash: str = ""
    fps: float | None = None
    source_sha256: str | None = None
    resized_from: tuple[int, int] | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def layout(self) -> str:
        return "NHW" if self.ids.ndim == 3 else "NTHW"

    def select(self, index: int) -> TokenIds:
        """Item ``index`` of the batch as a batch of one."""
        return replace(self, ids=self.ids[index : index + 1])

    def metadata(self) -> dict[str, str]:
        meta = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "layout": self.layout,
            "dtype": ID_DTYPE,
            "shape": json.dumps(list(self.ids.shape)),
            "vocabulary_size": str(self.vocabulary_size),
            "levels": json.dumps(list(self.levels)),
            "id_base": "0",
            **placement_metadata(self),
        }
        meta.update({f"x-{k}": v for k, v in self.extra.items()})
        return meta

    def to_bytes(self) -> bytes:
        """Serialize to safetensors bytes (the file format, also the HTTP body)."""
        return st_save({"ids": self.ids.detach().cpu().contiguous()}, metadata=self.metadata())

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.to_bytes())
        return path


def tokens_from_bytes(data: bytes) -> TokenIds:
    """Parse and validate a token file's bytes: format, version, dtype, shape, vocabulary, id range."""
    tensors, meta = read_safetensors(data)
    return _tokens(tensors, meta)


def _tokens(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> TokenIds:
    if meta.get("format") != FORMAT_NAME:
        raise InvalidLatentsError(
            f"metadata 'format' must be {FORMAT_NAME!r}, got {meta.get('format')!r}", param="format"
        )
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise InvalidLatentsError(
            f"token file format_version must be {FORMAT_VERSION}, got {meta.get('format_version')!r}",
            param="format_version",
        )
    ids = tensors.get("ids")
    if ids is None:
        raise InvalidLatentsError("token file has no tensor named 'ids'", param="ids")
    layout = meta.get("layout")
    if TOKEN_LAYOUTS.get(layout) != ids.ndim:
        raise ShapeMismatchError(
            f"token layout must be NHW (3-d ids) or NTHW (4-d ids) and match the tensor; got layout "
            f"{layout!r} and shape {tuple(ids.shape)}",
            param="ids",
        )
    if str(ids.dtype).removeprefix("torch.") != ID_DTYPE or meta.get("dtype") != ID_DTYPE:
        raise InvalidLatentsError(
            f"token ids must be {ID_DTYPE}, got tensor {ids.dtype} / metadata {meta.get('dtype')!r}",
            param="ids",
        )
    if meta.get("shape") != json.dumps(list(ids.shape)):
        raise ShapeMismatchError(
            f"metadata shape {meta.get('shape')} does not match tensor shape {list(ids.shape)}", param="shape"
        )
    try:
        vocabulary = int(meta.get("vocabulary_size", ""))
        levels = tuple(json.loads(meta.get("levels", "")))
    except (ValueError, TypeError, json.JSONDecodeError):
        raise InvalidLatentsError(
            "metadata 'vocabulary_size' must be an integer and 'levels' a JSON list of integers",
            param="vocabulary_size",
        ) from None
    if not (
        all(isinstance(v, int) and v >= 2 for v in levels) and levels and math.prod(levels) == vocabulary
    ):
        raise InvalidLatentsError(
            f"metadata vocabulary_size {vocabulary} must be the product of levels {list(levels)}",
            param="vocabulary_size",
        )
    check_id_range(ids, vocabulary)
    return TokenIds(ids=ids, vocabulary_size=vocabulary, levels=levels, **parse_placement(meta, layout))


def check_id_range(ids: torch.Tensor, vocabulary_size: int, param: str = "ids") -> None:
    if ids.numel() == 0:
        raise ShapeMismatchError(f"token ids must not be empty, got shape {tuple(ids.shape)}", param=param)
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocabulary_size:
        raise InvalidLatentsError(
            f"token ids must be in [0, {vocabulary_size}), got values in [{low}, {high}]", param=param
        )


def load_tokens(path: str | Path) -> TokenIds:
    return tokens_from_bytes(Path(path).read_bytes())


def encoded_from_bytes(data: bytes) -> Latents | TokenIds:
    """A latent file or a token file, told apart by its ``format`` metadata."""
    tensors, meta = read_safetensors(data)
    if meta.get("format") == FORMAT_NAME:
        return _tokens(tensors, meta)
    if meta.get("format") == LATENTS_FORMAT:
        return latents_from_bytes(data)
    raise InvalidLatentsError(
        f"metadata 'format' must be {LATENTS_FORMAT!r} or {FORMAT_NAME!r}, got {meta.get('format')!r}",
        param="format",
    )


def validate_tokens_for(tokens: TokenIds, spec: TokenizerSpec, *, weights_hash: str | None = None) -> None:
    """Refuse ids this tokenizer did not make or cannot decode, naming the expected value."""
    quantizer = spec.quantizer
    if quantizer is None:
        raise InvalidLatentsError(
            f"{spec.name} is a continuous tokenizer; it decodes latents, not token ids", param="model"
        )
    validate_source(tokens, spec, weights_hash, what="token ids")
    if tokens.layout != spec.token_layout and not (spec.modality == "both" and tokens.ids.ndim in (3, 4)):
        raise ShapeMismatchError(
            f"{spec.name} expects token ids in {spec.token_layout} layout, got shape {tuple(tokens.ids.shape)}",
            param="ids",
        )
    if tokens.levels != quantizer.levels:
        raise InvalidLatentsError(
            f"token ids use levels {list(tokens.levels)}, {spec.name} has {list(quantizer.levels)}",
            param="levels",
        )
    check_id_range(tokens.ids, quantizer.vocabulary_size)
    validate_crop(tokens, spec, tuple(tokens.ids.shape[1:]), what="token ids")
