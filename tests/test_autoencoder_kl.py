"""The SD-family presets carry their published architectures (checked on the meta device, no weights)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import free_port
from tokenizers_svc.errors import UnsupportedModelError
from tokenizers_svc.loading import load_tokenizer
from tokenizers_svc.model_stats import meta_backend, preset_stats
from tokenizers_svc.registry import get_preset

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("name", "params", "channels", "scale", "shift"),
    [
        ("sd-vae-ft-mse", 83_653_863, 4, 0.18215, 0.0),  # parameter count of the released checkpoint
        ("sdxl-vae", 83_653_863, 4, 0.13025, 0.0),
        ("flux-vae", 83_819_683, 16, 0.3611, 0.1159),
    ],
)
def test_published_architecture(name, params, channels, scale, shift):
    spec = meta_backend(get_preset(name)).spec
    assert (spec.spatial_compression, spec.latent_channels) == (8, channels)
    assert (spec.normalization.scale, spec.normalization.shift) == (scale, shift)
    assert preset_stats(name).params == params


def test_hub_preset_without_local_weights_is_refused_not_random(tmp_path, monkeypatch):
    """Offline, a hub preset fails at once, without touching the network, naming the places it
    looked; FLUX.1-dev says that its repository is gated."""
    monkeypatch.setenv("TOKENIZERS_SVC_HOME", str(tmp_path))

    def no_network(*args, **kwargs):
        raise AssertionError(f"offline loading tried to connect: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(UnsupportedModelError) as refused:
        load_tokenizer("flux-vae")
    message = refused.value.message
    assert (
        str(tmp_path / "weights" / "flux-vae") in message
        and "models--black-forest-labs--FLUX.1-dev" in message
    )
    assert "HF_HUB_OFFLINE=1 forbids downloading" in message
    assert "black-forest-labs/FLUX.1-dev is a gated repository" in message
    with pytest.raises(UnsupportedModelError) as refused:
        load_tokenizer("sd-vae-ft-mse")
    assert (
        "models--stabilityai--sd-vae-ft-mse" in refused.value.message and "gated" not in refused.value.message
    )


def test_unreachable_hub_fails_fast_without_retries(tmp_path):
    """Online mode with no route to the hub: one connection attempt (the probe), not the hub
    client's retries (which took ~30 s). A fresh process, since huggingface_hub reads its endpoint
    and offline flag at import; it counts its connection attempts to the hub's port."""
    port = free_port()  # a port nothing listens on
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{port}"}
    env.update(TOKENIZERS_SVC_HOME=str(tmp_path), HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO))
    code = f"""
import atexit, socket
attempts = []
connect = socket.socket.connect
def counted(self, address):
    if isinstance(address, tuple) and address[1] == {port}:
        attempts.append(address)
    return connect(self, address)
socket.socket.connect = counted
atexit.register(lambda: print("hub connection attempts:", len(attempts)))
from tokenizers_svc.loading import load_tokenizer
load_tokenizer("sd-vae-ft-mse")
"""
    result = subprocess.run(  # the timeout only guards against a hang
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1
    assert f"the hub (http://127.0.0.1:{port}) cannot be reached" in result.stderr.splitlines()[-1]
    assert result.stdout.strip() == "hub connection attempts: 1"
