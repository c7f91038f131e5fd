"""Shared fixtures: real photos and clips from ../shared/data when present, else scikit-image's."""

from __future__ import annotations

import os
from pathlib import Path

# Tests never reach a hub: hub presets must fail fast with the library's "not available locally"
# error instead of spending ~30 s in network retries. Set before anything imports huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from tests.helpers import SHARED_DATA


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def photo_uint8() -> np.ndarray:
    """A real photo, (H, W, 3) uint8 (scikit-image's astronaut, 512x512), available to every user."""
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="session")
def photo_nchw(photo_uint8) -> torch.Tensor:
    """The real photo center-cropped to 64x48 as (1, 3, 48, 64) uint8."""
    image = torch.from_numpy(photo_uint8[100:292:4, 100:356:4].copy())  # (48, 64, 3)
    return image.permute(2, 0, 1).unsqueeze(0).contiguous()
