"""What several test modules share (fixtures live in conftest.py): paths, tiny-preset discovery, and
code the tests need that the library and the applications do not (so it is not kept in them)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import psutil
import torch

from tokenizers_svc import media
from tokenizers_svc.crops import DEFAULT_SCALES
from tokenizers_svc.errors import InvalidRequestError
from tokenizers_svc.pixels import to_uint8_pixels
from tokenizers_svc.registry import list_presets

if TYPE_CHECKING:  # evals is imported where it is used: conftest imports this module before any test
    import httpx

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
    from tokenizers_svc.model_stats import count_params, meta_backend
    from tokenizers_svc.registry import list_presets

    specs = {}
    for preset in list_presets():
        if not preset.random_init:
            continue
        backend = meta_backend(preset, dict(preset.config))
        if count_params(backend.module) <= max_params:
            specs[preset.name] = backend.spec
    return specs


def cli_tokens_round_trip(media_path: Path, model: str, decoded: Path) -> tuple[dict, Path]:
    """``tokenizers-svc encode --tokens``, ``info --json`` and ``decode`` of ``media_path`` with
    ``model`` (each must exit 0; the token file lands next to the media, the decoded media at
    ``decoded``) -> (what ``info`` printed, the token file)."""
    from typer.testing import CliRunner

    from tokenizers_svc.cli import app

    runner, ids = CliRunner(), media_path.with_suffix(".safetensors")
    encoded = runner.invoke(app, ["encode", str(media_path), "-o", str(ids), "-m", model, "--tokens"])
    assert encoded.exit_code == 0, encoded.output
    info = runner.invoke(app, ["info", str(ids), "--json", "-m", model])
    assert info.exit_code == 0, info.output
    result = runner.invoke(app, ["decode", str(ids), "-o", str(decoded), "-m", model])
    assert result.exit_code == 0, result.output
    return json.loads(info.stdout), ids


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


# ---- the Ray Serve app the serving tests share (tests/conftest.py starts it per module) ----
MODEL = "sd-vae-tiny"
MAX_BODY = 1_000_000
MAX_PIXELS = 500_000
BOUNDED = "tiny-bounded"
IN_INGRESS = "tiny-in-ingress"  # served inside the ingress's process (no deployment of its own)
# A replica of sd-vae-tiny serves in about 0.6 GB (Ray worker + torch + model); an input that the caps
# failed to stop (a 20000-px resize, a decode of gigapixels) takes it to several GB.
REPLICA_RSS_BOUND = 1.5 * 2**30
# 600x800 after the resize, in 16-px tiles: well over 20 s of model work on one core, a few ms a tile
SLOW = {"resize": "fit", "resolution": 800, "tiling": "true", "tile_size": 16, "tile_overlap": 8}
SERVING_CONFIG = {
    "request_timeout_s": 60,
    "api_key_env": None,
    "limits": {"max_body_bytes": MAX_BODY, "max_pixels": MAX_PIXELS, "max_latent_elements": 200_000},
    "models": [
        {"name": MODEL, "num_cpus": 0.5, "max_batch_size": 8, "batch_wait_timeout_s": 0.05},
        {
            "name": "tiny-queue1",
            "model": MODEL,
            "num_cpus": 0.5,
            "max_batch_size": 1,
            "max_ongoing_requests": 1,
            "max_queued_requests": 1,
        },
        {"name": "tiny-timeout", "model": MODEL, "num_cpus": 0.5, "request_timeout_s": 0.001},
        {"name": BOUNDED, "model": MODEL, "num_cpus": 0, "max_batch_size": 1, "request_timeout_s": 8},
        {"name": IN_INGRESS, "model": MODEL, "num_cpus": 0, "batch_wait_timeout_s": 0.05, "in_ingress": True},
    ],
}
# A discrete (FSQ) model: tiny-fsq.yaml's architecture, random init, written by save_tiny_fsq when
# served_app starts (served models are presets or directories); no CPU reserved, like BOUNDED. It and
# the video model are served inside the ingress, as the shipped config serves its models; the
# sd-vae-tiny entries above keep replicas of their own, so both layouts are exercised.
FSQ_MODEL = "tiny-fsq"
FSQ_DIR = Path(tempfile.mkdtemp(prefix="tsvc-fsq-")) / FSQ_MODEL
SERVING_CONFIG["models"].append(
    {"name": FSQ_MODEL, "model": str(FSQ_DIR), "num_cpus": 0, "max_batch_size": 4, "in_ingress": True}
)
VIDEO_MODEL = "video-vae-tiny"  # served too once the models helper registers it
HAS_VIDEO = VIDEO_MODEL in {p.name for p in list_presets()}
if HAS_VIDEO:
    SERVING_CONFIG["models"].append(
        {"name": VIDEO_MODEL, "num_cpus": 0.5, "max_batch_size": 2, "in_ingress": True}
    )


def save_tiny_fsq(directory: Path) -> Path:
    """tiny-fsq.yaml's model (an FSQ DC-AE f8, vocabulary 1000) with seeded random weights, saved."""
    import yaml

    from tokenizers_svc.loading import build_module
    from tokenizers_svc.registry import get_preset

    recipe = yaml.safe_load((REPO / "training" / "recipes" / "tiny-fsq.yaml").read_text())["model"]
    preset = get_preset(recipe["preset"])
    build_module(replace(preset, config={**preset.config, **recipe["config"]})).save_pretrained(directory)
    return directory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def worker_in_this_process(monkeypatch) -> Iterator[None]:
    """Around ``serving.worker.TokenizerWorker`` objects built in the pytest process: a replica sets
    process-wide state (torch's thread count to its ``num_cpus``; glibc's heap thresholds and
    Pillow's allocator, tokenizers_svc.memory.tune_for_model_calls), and this process runs other
    tests after. The allocators are left alone and the thread count restored (an in-process worker
    once left it at 1, and a later test's subprocess summed with another count:
    tests/test_evals_streaming.py)."""
    from serving import worker

    threads = torch.get_num_threads()
    monkeypatch.setattr(worker, "tune_for_model_calls", lambda: None)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def local_ray() -> Iterator[None]:
    """A local Ray (2 CPUs, no dashboard, Ray's process logs kept out of the test output) unless one is
    running: another module's is reused, not replaced, and only the one started here is shut down."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        if started_here:
            ray.shutdown()


@contextlib.contextmanager
def served_app(config: dict, name: str) -> Iterator[str]:
    """The service built from ``config`` (``ServiceConfig`` args) as Serve app ``name`` on
    127.0.0.1 and a free port: its base URL. Starts a local Ray with 2 CPUs unless one is running
    (another module's is reused, not replaced), and stops what it started."""
    from ray import serve

    from serving.app import build_app

    if any(model.get("model") == str(FSQ_DIR) for model in config["models"]):
        save_tiny_fsq(FSQ_DIR)  # a served directory must exist before the app is built
    port = free_port()
    with local_ray():
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config), name=name, route_prefix="/", blocking=False)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            serve.shutdown()


@contextlib.contextmanager
def served_process(env: dict[str, str] | None = None, ready_timeout_s: float = 300) -> Iterator[str]:
    """``tokenizers-svc serve`` (the shipped ``serving/config.yaml``, what ``make serve`` runs) on a
    free port as its own process; yields its URL once ``/readyz`` answers 200, stops it after."""
    import httpx
    import pytest

    port = free_port()
    command = [str(Path(sys.executable).with_name("tokenizers-svc")), "serve", "--port", str(port)]
    env = {**(env or os.environ), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout_s
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"tokenizers-svc serve exited: {process.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"tokenizers-svc serve did not become ready in {ready_timeout_s:.0f} s")
            time.sleep(1)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def png(pixels: np.ndarray) -> bytes:
    return media.encode_image(pixels, "png")


def assert_healthy(http: httpx.Client, crops) -> None:
    assert http.get("/healthz").status_code == 200
    response = http.post(
        f"/v1/models/{MODEL}/encode", content=png(crops[0]), headers={"content-type": "image/png"}
    )
    assert response.status_code == 200, response.text


def error_body(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message", "param"}
    assert response.headers.get("x-request-id")
    return body["error"]


def own_ray_processes(title: str) -> list[psutil.Process]:
    """The processes of this test process's own Ray (its raylet is a child of this process) whose
    command line holds ``title`` (Ray titles a worker by its actor, e.g.
    ``ServeReplica:<app>:<deployment>``). Another pytest worker, or a server beside the tests, may
    run actors of the same name."""
    return [
        p for p in psutil.Process().children(recursive=True) if any(title in part for part in _cmdline(p))
    ]


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:  # it ended while we looked
        return []
