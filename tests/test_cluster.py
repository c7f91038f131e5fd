"""The port of `make serve` / `tokenizers-svc serve` (Ray token authentication: tests/test_batch.py)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from tests.helpers import error_body, free_port
from tokenizers_svc.latents import latents_from_bytes
from tokenizers_svc.loading import load_tokenizer
from tokenizers_svc.pipeline import EncodeOptions, encode_media, load_media

pytestmark = pytest.mark.slow  # the whole module starts Ray nodes: `make test-fast` skips it

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


# Ray's noise that a normal run must not print: its C++ E-level lines ("[time E pid tid] file.cc"),
# the token-authentication banner, the dashboard's address.
RAY_NOISE = re.compile(r"\] E |^\[[^]]* E \d|Token authentication is|View the dashboard at", re.MULTILINE)


def _wait_for_line(started, text: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in started.output():
        assert started.process.poll() is None and time.monotonic() < deadline, started.output()
        time.sleep(1)


@pytest.mark.slow
def test_two_servers_and_a_batch_job_side_by_side(tmp_path, shared_data, photo_uint8):
    """Two `tokenizers-svc serve` (what `make serve PORT=...` runs) on two ports and a batch job,
    all at once on this machine, each with its own Ray: no port collides (no dashboard), each
    server answers on its --port through HAProxy (its default ``--ingress haproxy``), whose files
    live in a directory of that server's own, the job completes; nobody prints Ray's E lines or its
    token banner; each server says what it does before its URL, which is its last start-up line;
    SIGTERM stops each cleanly and takes its HAProxy files with it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_MODE", None)  # as a user's shell: Ray decides, and must stay quiet
    config = _tiny_config(tmp_path / "config.yaml")
    ports = [free_port(), free_port()]
    servers: list[_Started] = []
    job = None
    try:
        for port in ports:
            command = [CLI, "serve", "--config", config, "--port", str(port), "--num-cpus", "1"]
            servers.append(_Started(command, tmp_path / f"serve-{port}.log", env))
            if len(servers) == 1:  # its Ray is up: a first-ever start has written ~/.ray/auth_token,
                _wait_for_line(servers[0], "loading models")  # which the others then read, not race to write
        output = tmp_path / "latents"
        photos = sorted((shared_data / "images" / "val").iterdir())[:6]
        inputs = tmp_path / "photos"
        inputs.mkdir()
        for photo in photos:
            shutil.copy(photo, inputs / photo.name)
        command = [CLI, "batch-encode", "--input", inputs, "--output", output, "--model", TINY_MODEL]
        command += ["--resize", "shorter-side", "--resolution", "64", "--engine", "ray"]  # a Ray of its own
        job = _Started(command, tmp_path / "batch.log", env)
        png = _png(photo_uint8)
        for server, port in zip(servers, ports, strict=True):
            _wait_for_line(server, "listening on")
            lines = server.output().strip().splitlines()
            assert lines[-1].startswith(f"tokenizers-svc listening on http://127.0.0.1:{port}"), lines
            assert lines[0] == "tokenizers-svc serve: loading the service code"  # before the imports
            starting = next(i for i, line in enumerate(lines) if "starting a local Ray instance" in line)
            loading = next(i for i, line in enumerate(lines) if "loading models" in line)
            assert starting < loading < len(lines) - 1
            assert _encode_status(port, png) == 200
        haproxy_files = [_haproxy_files(port) for port in ports]
        assert len(set(haproxy_files)) == 2  # each server's own
        _assert_answers_as_in_process(ports[0], png)
        assert job.process.wait(timeout=300) == 0, job.output()
        assert "complete" in job.output().strip().splitlines()[-1]
        for server, port in zip(servers, ports, strict=True):  # both still serve after the job
            assert _encode_status(port, png) == 200
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(timeout=120) == 0, server.output()
        assert not any(files.exists() for files in haproxy_files)  # removed when each server stopped
        for started in [*servers, job]:
            assert not RAY_NOISE.search(started.output()), started.output()
    finally:
        for started in [*servers, job]:
            if started is not None:
                started.kill()


def _listeners(port: int) -> dict[str, list[str]]:
    """This user's processes listening on 127.0.0.1:``port``: name -> command line."""
    found = {}
    for process in psutil.process_iter(["name", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(
                c.laddr.port == port and c.status == psutil.CONN_LISTEN
                for c in process.net_connections("tcp")
            ):
                found[process.info["name"]] = process.info["cmdline"]
    return found


def _haproxy_files(port: int) -> Path:
    """The directory of the HAProxy that alone listens on ``port`` (its config, sockets, logs)."""
    # HAProxy reloads when Serve's routes change, handing its listening socket to a new process;
    # a scan during that hand-over can miss both, so look again for a few seconds
    deadline = time.monotonic() + 15
    while not (listeners := _listeners(port)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert set(listeners) == {"haproxy"}, listeners
    config = Path(listeners["haproxy"][listeners["haproxy"].index("-f") + 1])
    assert config.exists() and config.parents[1].name.startswith("tsvc-haproxy-"), config
    return config.parents[1]


def _assert_answers_as_in_process(port: int, png: bytes) -> None:
    """Through HAProxy, results, typed errors and timing headers come as through Serve's Python
    proxy (tests/test_serving.py): the latents of the same encode in this process."""
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        headers = {"content-type": "image/png"}
        response = client.post(f"/v1/models/{TINY_MODEL}/encode", content=png, headers=headers)
        assert response.status_code == 200, response.text
        assert "model;dur=" in response.headers["server-timing"]
        expected = encode_media(load_tokenizer(TINY_MODEL), load_media(png), EncodeOptions())
        torch.testing.assert_close(latents_from_bytes(response.content).latents, expected.latents)
        refused = client.post(f"/v1/models/{TINY_MODEL}/encode", content=b"not a png", headers=headers)
        assert 400 <= refused.status_code < 500 and error_body(refused)["param"]
        unknown = client.post("/v1/models/no-such-model/encode", content=png, headers=headers)
        assert unknown.status_code == 404 and error_body(unknown)["type"]
        assert client.get("/healthz").status_code == 200


# ---------------------------------------------------------------------------------------------- two nodes


RAY = Path(sys.executable).with_name("ray")
CLI = Path(sys.executable).with_name("tokenizers-svc")
TINY_MODEL = "dc-ae-f32c32-tiny"
NODE_START_ATTEMPTS = 3


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
    command += ["--node-ip-address=127.0.0.1", f"--dashboard-agent-listen-port={free_port()}"]
    return _Started(command, temp_dir / "ray-start.log", env)


def _cluster_state(address: str, env: dict) -> dict:
    """Alive nodes (their ``tsvc_*`` label -> node id) and every actor (class, node, state, the
    resources it was created with), read from the GCS by a separate driver (this pytest process
    may hold another Ray). The GCS actor table is read raw: Ray's parsed view leaves out the
    required resources, and the state API needs a dashboard, which these nodes do not run."""
    code = """
import json, ray
from ray.core.generated import gcs_pb2
ray.init(address=ADDRESS, log_to_driver=False, logging_level="ERROR")
nodes = {}
for node in ray.nodes():
    labels = [r for r in node["Resources"] if r.startswith("tsvc_")]
    if node["Alive"] and labels:
        nodes[labels[0]] = node["NodeID"]
actors = []
for blob in ray._private.state.state._connect_and_get_accessor().get_actor_table(None, None):
    actor = gcs_pb2.ActorTableData.FromString(blob)
    actors.append({
        "class": actor.class_name,
        "node": actor.address.node_id.hex(),
        "state": gcs_pb2.ActorTableData.ActorState.Name(actor.state),
        "resources": dict(actor.required_resources),
    })
print("STATE " + json.dumps({"nodes": nodes, "actors": actors}))
""".replace("ADDRESS", repr(address))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True
    ).stdout
    return json.loads(out.split("STATE ", 1)[1])


class _Cluster:
    """A head node (2 CPUs, resource ``tsvc_head``) on this machine; worker nodes (1 CPU,
    ``tsvc_worker<N>``) join it. Each node declares one GPU: a logical resource on this CPU machine
    that stands in for a GPU, so the tests see GPU options reach Ray's actors. Token auth is on, as
    Ray's default; every port is chosen free."""

    def __init__(self, temp: Path) -> None:
        self.temp = temp
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "token", "OMP_NUM_THREADS": "1"}
        self.env.pop("RAY_ADDRESS", None)
        self.started: list[_Started] = []
        # ray start uses token auth only when a token exists (a local ray.init makes one, ray start
        # does not): make one if this machine has none, as docs/serving.md says to.
        subprocess.run([RAY, "get-auth-token", "--generate"], env=self.env, capture_output=True, check=True)
        self.address = ""
        self.head = self._start_node(
            "head", self._head_args, lambda temp: (temp / "ray_current_cluster").is_file()
        )

    def _head_args(self) -> list[str]:
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        return [
            "--head",
            f"--port={port}",
            f"--ray-client-server-port={free_port()}",
            "--include-dashboard=false",
            "--num-cpus=2",
            "--num-gpus=1",
            '--resources={"tsvc_head": 1}',
        ]

    def _start_node(self, name: str, args, ready) -> _Started:
        """Start a node until ``ready(its temp dir)``. Ray gives a raylet 30 s to register with the
        GCS and then gives up; on a machine loaded by other work a start may miss that, so a node
        that exits is started again (a few times, each in a fresh session and temp dir)."""
        for attempt in range(NODE_START_ATTEMPTS):
            temp = self.temp / f"{name}-{attempt}"
            node = _ray_node(args(), temp, self.env)
            self.started.append(node)
            deadline = time.monotonic() + 180
            while node.process.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(subprocess.SubprocessError):
                    if ready(temp):
                        return node
                time.sleep(1)
            node.kill()
        pytest.fail(f"{name} did not start in {NODE_START_ATTEMPTS} tries:\n{node.output()[-3000:]}")

    def add_worker(self, label: str) -> tuple[_Started, dict]:
        """Start a worker node labelled ``label``; returns it and the live nodes (label -> id)."""
        args = [f"--address={self.address}", "--num-cpus=1", "--num-gpus=1", f'--resources={{"{label}": 1}}']
        node = self._start_node(label, lambda: args, lambda _: label in self.state()["nodes"])
        return node, self.state()["nodes"]

    def state(self) -> dict:
        return _cluster_state(self.address, self.env)

    def client_env(self) -> dict:
        """A driver's environment: RAY_ADDRESS names the head, RAY_AUTH_MODE=token sends the token."""
        return {**self.env, "RAY_ADDRESS": self.address}

    def run(self, command: list, name: str) -> _Started:
        started = _Started(command, self.temp / f"{name}.log", self.client_env())
        self.started.append(started)
        return started

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
    """batch-encode with RAY_ADDRESS on 200 photos: encoder actors on both nodes; the worker node is
    killed (its whole process session) once it has written rows; the job finishes, or a rerun
    resumes, with every input exactly one row."""
    worker, nodes = cluster.add_worker("tsvc_worker1")
    # the training photos five times over (distinct files): enough work that the head's actor cannot
    # finish it alone while the worker node's actor is still starting on a busy machine
    folder = tmp_path / "photos"
    folder.mkdir()
    for copy in range(5):
        for photo in sorted((shared_data / "images" / "train").iterdir()):
            shutil.copyfile(photo, folder / f"{copy}-{photo.name}")
    inputs = sorted(folder.resolve().iterdir())
    assert len(inputs) >= 200
    output = tmp_path / "latents"
    command = [CLI, "batch-encode", "--input", folder, "--output", output]
    command += ["--model", TINY_MODEL, "--resize", "shorter-side", "--resolution", "64"]
    command += ["--workers", "2", "--cpus-per-worker", "0.5", "--batch-size", "2", "--shard-rows", "2"]
    command += ["--num-gpus-per-worker", "0"]  # the nodes' stand-in GPUs cannot run torch
    job = cluster.run(command, "batch-1")
    deadline = time.monotonic() + 300
    while not any(row["encoder_node"] == nodes["tsvc_worker1"] for row in _rows(output)):
        assert job.process.poll() is None and time.monotonic() < deadline, job.output()
        time.sleep(0.2)
    written_before_kill = len(_rows(output))
    worker.kill()
    assert written_before_kill < len(inputs), "the job ended before the node could be killed"
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


def _tiny_config(path: Path, **model) -> Path:
    config = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())
    config["applications"][0]["args"]["models"] = [{"name": TINY_MODEL, "num_cpus": 0.5, **model}]
    path.write_text(yaml.safe_dump(config))
    return path


def _png(photo_uint8) -> bytes:
    """A 128x128 crop of the real test photo as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(photo_uint8[:128, :128]).save(buffer, format="PNG")
    return buffer.getvalue()


def _encode_status(port: int, png: bytes) -> int:
    try:
        url = f"http://127.0.0.1:{port}/v1/models/{TINY_MODEL}/encode"
        return httpx.post(url, content=png, headers={"content-type": "image/png"}, timeout=30).status_code
    except httpx.TransportError:
        return 0


@pytest.mark.slow
def test_service_on_two_nodes_answers_after_losing_one(cluster, tmp_path, photo_uint8):
    """`tokenizers-svc serve --address` deploys two replicas of a model, one on each node; the
    worker node is killed; the service answers an encode again within a bounded time."""
    worker, nodes = cluster.add_worker("tsvc_worker2")
    png = _png(photo_uint8)
    port = free_port()
    config = _tiny_config(tmp_path / "config.yaml", num_replicas=2, num_gpus=0.5)  # device: cpu
    command = [CLI, "serve", "--config", config, "--port", str(port), "--address", cluster.address]
    server = cluster.run(command, "serve")
    deadline = time.monotonic() + 300
    while "listening on" not in server.output():
        assert server.process.poll() is None and time.monotonic() < deadline, server.output()
        time.sleep(1)
    replicas = [a for a in cluster.state()["actors"] if TINY_MODEL in a["class"] and a["state"] == "ALIVE"]
    assert sorted(a["node"] for a in replicas) == sorted([nodes["tsvc_head"], nodes["tsvc_worker2"]])
    assert all(a["resources"] == {"CPU": 0.5, "GPU": 0.5} for a in replicas)  # num_gpus reached them
    assert _encode_status(port, png) == 200
    worker.kill()
    killed = time.monotonic()
    statuses = []
    while (status := _encode_status(port, png)) != 200:
        statuses.append(status)
        assert time.monotonic() - killed < 120, f"no answer 120 s after losing a node: {statuses}"
        time.sleep(0.5)
    print(f"answered {time.monotonic() - killed:.1f} s after the node was killed; before: {statuses}")
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=120) == 0, server.output()


@pytest.mark.slow
def test_batch_gpu_option_reaches_the_encoder_actors(cluster, shared_data, tmp_path):
    """--num-gpus-per-worker 1 on a cluster whose GPUs are stand-ins: the encoder actor is created
    with one GPU and the plan's device is cuda, so it fails to load there (this machine has no CUDA)
    and the job stops with that error instead of encoding on the CPU."""
    photos = shared_data / "images" / "val"
    command = [CLI, "batch-encode", "--input", photos, "--output", tmp_path / "latents", "--limit", "1"]
    command += ["--model", TINY_MODEL, "--num-gpus-per-worker", "1", "--cpus-per-worker", "0.5"]
    job = cluster.run(command, "batch-gpu")
    assert job.process.wait(timeout=300) != 0
    assert "cuda" in job.output().lower(), job.output()[-3000:]
    encoders = [a for a in cluster.state()["actors"] if "EncodeWorker" in a["class"]]
    assert {"CPU": 0.5, "GPU": 1.0} in [a["resources"] for a in encoders], encoders
