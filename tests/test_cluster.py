"""The port of `make serve` / `tokenizers-svc serve` (Ray token authentication: tests/test_batch.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _make_plan(*args: str) -> list[str]:
    """The commands `make -n` would run, one per line. Under `make test` this runs as a sub-make
    that prints "Entering directory" lines; --no-print-directory keeps only the commands."""
    venv = Path(sys.executable).parents[1]
    out = subprocess.run(
        ["make", "--no-print-directory", "-n", "serve", f"VENV={venv}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line.rstrip() for line in out.splitlines() if "tokenizers-svc serve" in line]


def test_make_serve_passes_the_port():
    venv = Path(sys.executable).parents[1]
    assert _make_plan("PORT=8300") == [f"{venv}/bin/tokenizers-svc serve --port 8300"]
    assert _make_plan() == [f"{venv}/bin/tokenizers-svc serve"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_serve_listens_on_the_port_given(tmp_path):
    """`tokenizers-svc serve --port P` (what `make serve PORT=P` runs) answers on P, not on the
    config's port, and stops cleanly on SIGTERM."""
    config = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())
    config["applications"][0]["args"]["models"] = [{"name": "sd-vae-tiny", "num_cpus": 0.5}]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = Path(sys.executable).with_name("tokenizers-svc")
    command = [script, "serve", "--config", path, "--port", str(port), "--num-cpus", "1"]
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, server.stdout.read()
            time.sleep(1)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["models"]
        assert [m["served_name"] for m in models] == ["sd-vae-tiny"]
    finally:
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=120)
    assert server.returncode == 0, output
    assert f"listening on http://127.0.0.1:{port}" in output
