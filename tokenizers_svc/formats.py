"""File formats by name and suffix: the one list every part reads (media, CLI, client, batch job,
training data, evals).

A leaf module (it imports only the errors), so that listing files or naming an output format never
pulls in Pillow, PyAV or torch. Kinds are decided from magic bytes when bytes are read
(:func:`tokenizers_svc.media.sniff_media`); suffixes only choose which files a listing picks up
and which content type a client announces.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from tokenizers_svc.errors import InvalidRequestError, UnsupportedMediaTypeError

# Frame rates a video is written at and a latent file may record. Below MIN_FPS an mp4 time base
# (1/1001 s steps) cannot represent the rate: the encoder fell back to 24 fps without a word.
MIN_FPS, MAX_FPS = 0.001, 1000.0
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # what directory listings treat as images
VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".avi", ".mkv", ".webm")  # ... and as videos
MEDIA_SUFFIXES = IMAGE_SUFFIXES + VIDEO_SUFFIXES
# Image formats the evaluation reads: the served ones plus BMP and TIFF, which datasets ship and
# Pillow decodes but the service refuses (by suffix for listings, by Pillow format name for the decoder).
EVAL_IMAGE_SUFFIXES = (*IMAGE_SUFFIXES, ".bmp", ".tif", ".tiff")
EVAL_ONLY_IMAGE_FORMATS = ("BMP", "TIFF")

# Pillow format names of the image formats this service writes, by the names users type.
IMAGE_FORMATS: dict[str, str] = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
IMAGE_MEDIA_TYPES: dict[str, str] = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
VIDEO_MEDIA_TYPE = "video/mp4"
# Output formats of decode (image formats and mp4) -> the media type of their bytes.
OUTPUT_FORMATS: dict[str, str] = {
    **{name: IMAGE_MEDIA_TYPES[pillow] for name, pillow in IMAGE_FORMATS.items()},
    "mp4": VIDEO_MEDIA_TYPE,
}
# What a client announces for a file it uploads (the server sniffs the bytes anyway).
SUFFIX_MEDIA_TYPES: dict[str, str] = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".mp4": "video/mp4",
    ".m4v": "video/mp4",
    ".webm": "video/webm",
    ".mov": "video/quicktime",
    ".avi": "video/x-msvideo",
    ".mkv": "video/x-matroska",
}


def _key(name: str) -> str:
    return name.lower().lstrip(".")


def image_format(name: str) -> str:
    """'png' / 'jpeg' / 'jpg' / 'webp' (any case, optional dot) -> Pillow's format name."""
    if _key(name) not in IMAGE_FORMATS:
        raise UnsupportedMediaTypeError(
            f"image format must be one of {sorted(IMAGE_FORMATS)}, got {name!r}", param="format"
        )
    return IMAGE_FORMATS[_key(name)]


def output_media_type(format: str) -> str:
    """'png' / 'jpeg' / 'jpg' / 'webp' / 'mp4' (any case, optional dot) -> media type."""
    if _key(format) not in OUTPUT_FORMATS:
        raise UnsupportedMediaTypeError(
            f"output format must be one of {sorted(OUTPUT_FORMATS)}, got {format!r}", param="format"
        )
    return OUTPUT_FORMATS[_key(format)]


def is_media_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in MEDIA_SUFFIXES


def is_video_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


# safetensors dtypes read by :func:`read_safetensors_vector` -> (struct format, bytes per element)
_VECTOR_DTYPES = {"F64": ("d", 8), "F32": ("f", 4), "F16": ("e", 2), "BF16": ("H", 2)}


def read_safetensors_vector(path: Path, name: str) -> tuple[float, ...] | None:
    """The values of tensor ``name`` (any shape, flattened) in a ``.safetensors`` file, read from its
    JSON header and byte range without torch or numpy; None if the file or tensor is absent or of
    another dtype. For small tensors (a model's latent statistics), read where importing torch would
    cost seconds (``tokenizers-svc models``)."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
            entry = header.get(name)
            if not isinstance(entry, dict) or entry.get("dtype") not in _VECTOR_DTYPES:
                return None
            start, end = entry["data_offsets"]
            handle.seek(8 + length + start)
            data = handle.read(end - start)
    except (OSError, ValueError, struct.error):
        return None
    code, size = _VECTOR_DTYPES[entry["dtype"]]
    values = struct.unpack(f"<{len(data) // size}{code}", data)
    if entry["dtype"] == "BF16":  # the high half of a float32
        values = struct.unpack(
            f"<{len(values)}f", struct.pack(f"<{len(values)}I", *(v << 16 for v in values))
        )
    return tuple(float(v) for v in values)


def check_fps(fps: object, param: str = "fps") -> float:
    """``fps`` as a float when it is a finite number in [MIN_FPS, MAX_FPS], else InvalidRequestError
    (422) naming ``param``: the HTTP decode, the CLI's ``--fps`` and the mp4 writer refuse alike."""
    number = float(fps) if isinstance(fps, (int, float)) and not isinstance(fps, bool) else math.nan
    if not (math.isfinite(number) and MIN_FPS <= number <= MAX_FPS):
        raise InvalidRequestError(
            f"{param} must be a frame rate in [{MIN_FPS:g}, {MAX_FPS:g}], got {fps!r}", param=param
        )
    return number
