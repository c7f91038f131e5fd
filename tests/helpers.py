"""What several test modules share (fixtures live in conftest.py): paths, tiny-preset discovery, and
code the tests need that the library and the applications do not (so it is not kept in them)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from tokenizers_svc.crops import DEFAULT_SCALES
from tokenizers_svc.errors import InvalidRequestError
from tokenizers_svc.pixels import to_uint8_pixels

if TYPE_CHECKING:  # evals is imported where it is used: conftest imports this module before any test
    from evals.fid import FeatureStats

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SAFETENSORS_DTYPES = {  # torch dtype -> (header name, bytes per element, rank in safetensors' Dtype enum)
    torch.float16: ("F16", 2, 7),
    torch.bfloat16: ("BF16", 2, 8),
    torch.float32: ("F32", 4, 11),
    torch.int64: ("I64", 8, 13),
}


def small_presets(max_params: int) -> dict:
    """Random-init presets with at most ``max_params`` parameters -> their specs (name -> TokenizerSpec).

    Built on the meta device (no memory, no init), at collection time, so tests parametrized over it
    cover every family's tiny presets, including families added later.
    """
    from tokenizers_svc.registry import backend_for, list_presets, model_class

    specs = {}
    for preset in list_presets():
        if not preset.random_init:
            continue
        with torch.device("meta"):
            module = model_class(preset.class_name)(**preset.config)
        if sum(p.numel() for p in module.parameters()) <= max_params:
            specs[preset.name] = backend_for(preset.class_name).from_module(module, preset.name).spec
    return specs


def noise(images: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    """uint8 images plus Gaussian noise of ``std`` grey levels (seeded), rounded half up."""
    gen = torch.Generator().manual_seed(seed)
    x = images.float() / 127.5 - 1 + torch.randn(images.shape, generator=gen) * (std / 127.5)
    return to_uint8_pixels(x.clamp(-1, 1))


def frechet_distance_sqrtm(a: FeatureStats, b: FeatureStats) -> float:
    """Independent method for cross-checks: ``scipy.linalg.sqrtm(S_a @ S_b)`` (real part of the trace)."""
    import scipy.linalg

    covmean = scipy.linalg.sqrtm(a.sigma @ b.sigma)
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean).real)


@dataclass
class Dataset:
    """Every item in memory, for small sets and tests: uint8 (N, 3, R, R) images or (N, 3, T, R, R) clips."""

    pixels: torch.Tensor
    names: list[str]
    kind: str  # "image" | "video"
    scales: list[int | None]


def load_dataset(
    data: Path,
    resolution: int,
    crop: str,
    max_items: int | None,
    frames: int = 17,
    scales: tuple[int, ...] = DEFAULT_SCALES,
) -> Dataset:
    """The items the streaming evaluation would see, stacked."""
    from evals import sources

    kind, entries = sources.list_entries(data)
    spec = sources.CropSpec(kind, crop, resolution, tuple(scales), frames)
    items = [
        item
        for entry in sources.limit_entries(entries, spec, max_items)
        for item in sources.entry_items(entry, spec)
    ]
    if not items:
        raise InvalidRequestError(f"no usable {kind}s under {data} at resolution {resolution}", param="data")
    return Dataset(
        torch.stack([p for _, _, p in items]), [n for n, _, _ in items], kind, [s for _, s, _ in items]
    )


def safetensors_bytes(state_dict: dict[str, torch.Tensor]) -> int:
    """Size of the safetensors file ``save_pretrained`` writes for ``state_dict``, from shapes only
    (meta tensors work): an 8-byte header length, the JSON header (compact, sorted keys,
    ``{"format": "pt"}`` metadata, space-padded to a multiple of 8), then the raw tensors in
    safetensors' order (dtype descending, then name), which fixes the offsets' digit counts.

    Comparing it with a released file's size checks every tensor name and shape without the download.
    """
    header, offset = {}, 0
    for name in sorted(state_dict, key=lambda n: (-SAFETENSORS_DTYPES[state_dict[n].dtype][2], n)):
        tensor = state_dict[name]
        dtype, itemsize, _ = SAFETENSORS_DTYPES[tensor.dtype]
        size = tensor.numel() * itemsize
        header[name] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    length = len(json.dumps(header, separators=(",", ":"), sort_keys=True).encode())
    return 8 + length + (-length) % 8 + offset
