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

from tests.helpers import MODEL, SERVING_CONFIG, SHARED_DATA, png, served_app
from tests.helpers import local_ray as ray_for_the_module


def pytest_configure(config):
    """`make test` runs two workers (pytest-xdist).

    Each worker gets its share of the cores as torch threads: two workers with torch's default of a
    thread per core oversubscribe a 2-core machine, and the suite ran slower than with one thread
    each. (Subprocesses and Ray's workers choose their own threads.)

    Each worker may start the first Ray this machine has seen at the same moment; both would write
    Ray's token file (~/.ray/auth_token). The controller writes it first, with Ray's own function,
    so the workers only read it."""
    if hasattr(config, "workerinput"):
        workers = int(config.workerinput.get("workercount", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
        return
    from ray._private.authentication.authentication_token_setup import (
        _get_default_token_path,
        generate_and_save_token,
    )

    if not _get_default_token_path().exists():
        generate_and_save_token()


def pytest_collection_modifyitems(config, items):
    """GPU tests skip without CUDA."""
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


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for a module's batch jobs (tests.helpers.local_ray)."""
    with ray_for_the_module():
        yield


# ---- the Ray Serve app of the serving test modules (one app per module: local Ray, random port) ----


@pytest.fixture(scope="module")
def base_url():
    """The app of tests.helpers.SERVING_CONFIG on a local Ray (2 CPUs) at 127.0.0.1:<free port>."""
    with served_app(SERVING_CONFIG, "tokenizers-test") as url:
        yield url


@pytest.fixture(scope="module")
def http(base_url):
    import httpx

    with httpx.Client(base_url=base_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def crops(photo_uint8) -> list[np.ndarray]:
    """Eight different real 48x64 crops of the astronaut photo, (48, 64, 3) uint8."""
    return [photo_uint8[y : y + 48, x : x + 64].copy() for y in (0, 120, 240, 360) for x in (40, 300)]


@pytest.fixture(scope="module")
def latent_file(http, crops) -> bytes:
    response = http.post(
        f"/v1/models/{MODEL}/encode", content=png(crops[3]), headers={"content-type": "image/png"}
    )
    assert response.status_code == 200
    return response.content
