"""The port of `make serve` / `tokenizers-svc serve` (Ray token authentication: tests/test_batch.py)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq
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
    assert _make_plan("VERBOSE=1") == [f"{venv}/bin/tokenizers-svc serve  --verbose"]


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


# ---------------------------------------------------------------------------------------------- two nodes


RAY = Path(sys.executable).with_name("ray")
CLI = Path(sys.executable).with_name("tokenizers-svc")
TINY_MODEL = "dc-ae-f32c32-tiny"


def _session_pids(session: int) -> list[int]:
    """Every process of a session (from /proc): Ray's workers make process groups of their own,
    but stay in the session of the `ray start` that started their raylet."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state ppid pgrp session ...
            if int(fields[3]) == session:
                pids.append(int(stat.parent.name))
    return pids


class _Started:
    """A process this test starts in a session of its own; :meth:`kill` stops that session's
    processes and nothing else (never `ray stop`, which would stop every Ray on the machine)."""

    def __init__(self, command: list, log: Path, env: dict) -> None:
        self.log = log
        with log.open("w") as out:
            self.process = subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def kill(self) -> None:
        for pid in _session_pids(self.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def output(self) -> str:
        return self.log.read_text()


def _ray_node(args: list[str], temp_dir: Path, env: dict) -> _Started:
    """`ray start --block` with the node's own temp dir: Ray's address file stays out of /tmp/ray,
    where every other ``ray.init()`` on this machine would find it."""
    temp_dir.mkdir(parents=True)
    command = [RAY, "start", "--block", "--disable-usage-stats", f"--temp-dir={temp_dir}", *args]
    command += ["--node-ip-address=127.0.0.1", f"--dashboard-agent-listen-port={_free_port()}"]
    return _Started(command, temp_dir / "ray-start.log", env)


def _cluster_state(address: str, env: dict) -> dict:
    """Alive nodes (their ``tsvc_*`` label -> node id) and live actors (class name, node id), asked
    of the GCS from a separate driver (this pytest process may hold another Ray)."""
    code = """
import json, ray
ray.init(address=ADDRESS, log_to_driver=False, logging_level="ERROR")
nodes = {}
for node in ray.nodes():
    labels = [r for r in node["Resources"] if r.startswith("tsvc_")]
    if node["Alive"] and labels:
        nodes[labels[0]] = node["NodeID"]
actors = [
    {"class": a["ActorClassName"], "node": a["Address"]["NodeID"]}
    for a in ray._private.state.actors().values() if a["State"] == "ALIVE"
]
print("STATE " + json.dumps({"nodes": nodes, "actors": actors}))
""".replace("ADDRESS", repr(address))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True
    ).stdout
    return json.loads(out.split("STATE ", 1)[1])


class _Cluster:
    """A head node (2 CPUs, resource ``tsvc_head``) on this machine; worker nodes (1 CPU,
    ``tsvc_worker<N>``) join it. Token auth is on, as Ray's default; every port is chosen free."""

    def __init__(self, temp: Path) -> None:
        self.temp = temp
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "token", "OMP_NUM_THREADS": "1"}
        self.env.pop("RAY_ADDRESS", None)
        port = _free_port()
        self.address = f"127.0.0.1:{port}"
        self.started: list[_Started] = []
        head = [
            "--head",
            f"--port={port}",
            f"--ray-client-server-port={_free_port()}",
            "--include-dashboard=false",
            "--num-cpus=2",
            '--resources={"tsvc_head": 1}',
        ]
        self.head = self._start(_ray_node(head, temp / "head", self.env))
        deadline = time.monotonic() + 120
        while not (temp / "head" / "ray_current_cluster").is_file():
            assert self.head.process.poll() is None and time.monotonic() < deadline, self.head.output()
            time.sleep(0.5)

    def _start(self, started: _Started) -> _Started:
        self.started.append(started)
        return started

    def add_worker(self, label: str) -> tuple[_Started, dict]:
        """Start a worker node labelled ``label``; returns it and the live nodes (label -> id)."""
        args = [f"--address={self.address}", "--num-cpus=1", f'--resources={{"{label}": 1}}']
        node = self._start(_ray_node(args, self.temp / label, self.env))
        deadline = time.monotonic() + 120
        while label not in (nodes := self.state()["nodes"]):
            assert node.process.poll() is None and time.monotonic() < deadline, node.output()
            time.sleep(1)
        return node, nodes

    def state(self) -> dict:
        return _cluster_state(self.address, self.env)

    def client_env(self) -> dict:
        """A driver's environment: RAY_ADDRESS names the head, RAY_AUTH_MODE=token sends the token."""
        return {**self.env, "RAY_ADDRESS": self.address}

    def run(self, command: list, name: str) -> _Started:
        return self._start(_Started(command, self.temp / f"{name}.log", self.client_env()))

    def stop(self) -> None:
        for started in reversed(self.started):
            started.kill()


@pytest.fixture(scope="module")
def cluster():
    temp = Path(tempfile.mkdtemp(prefix="tsvc-", dir="/tmp"))  # short: Ray's socket paths must fit
    made = None
    try:
        made = _Cluster(temp)
        yield made
    finally:
        if made is not None:
            made.stop()
        shutil.rmtree(temp, ignore_errors=True)


def _rows(output: Path) -> list[dict]:
    rows = []
    for shard in sorted(output.glob("part-*.parquet")):
        rows += pq.read_table(shard, columns=["source_path", "encoder_node", "error"]).to_pylist()
    return rows


@pytest.mark.slow
def test_batch_job_on_two_nodes_survives_losing_one(cluster, shared_data, tmp_path):
    """batch-encode with RAY_ADDRESS on 40 photos: encoder actors on both nodes; the worker node is
    killed (its whole process session) once it has written rows; the job finishes, or a rerun
    resumes, with every input exactly one row."""
    worker, nodes = cluster.add_worker("tsvc_worker1")
    inputs = sorted((shared_data / "images" / "train").resolve().iterdir())
    assert len(inputs) >= 40
    output = tmp_path / "latents"
    command = [CLI, "batch-encode", "--input", shared_data / "images" / "train", "--output", output]
    command += ["--model", TINY_MODEL, "--resize", "shorter-side", "--resolution", "64"]
    command += ["--workers", "2", "--cpus-per-worker", "0.5", "--batch-size", "2", "--shard-rows", "2"]
    job = cluster.run(command, "batch-1")
    deadline = time.monotonic() + 300
    while not any(row["encoder_node"] == nodes["tsvc_worker1"] for row in _rows(output)):
        assert job.process.poll() is None and time.monotonic() < deadline, job.output()
        time.sleep(0.5)
    written_before_kill = len(_rows(output))
    worker.kill()
    try:
        first_exit = job.process.wait(timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the job hung after the node was lost:\n{job.output()[-3000:]}")
    print(f"rows before the kill: {written_before_kill}; first run exit {first_exit}")
    if first_exit != 0:
        rerun = cluster.run(command, "batch-2")
        assert rerun.process.wait(timeout=300) == 0, rerun.output()
    rows = _rows(output)
    assert sorted(row["source_path"] for row in rows) == [str(path) for path in inputs]  # none lost or twice
    assert all(row["error"] is None for row in rows)
    assert {row["encoder_node"] for row in rows} == {nodes["tsvc_head"], nodes["tsvc_worker1"]}
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["complete"] and manifest["outputs"]["duplicate_rows"] == 0
