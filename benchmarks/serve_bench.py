"""Serving overhead: HTTP + Ray Serve vs the same model called in-process, at concurrency 1/4/16.

Both sides do the same work per request: decode a PNG (crops of a real photo), encode it and write
the latent file, with the same torch threads (``--threads``: the replica's ``num_cpus`` and the
in-process loop's ``torch.set_num_threads``; by default every CPU of the local Ray instance, as
the shipped config's ingress takes on a 2-CPU machine and as a plain loop computes at its best
there). The in-process baseline runs the work in batches of
min(concurrency, max_batch_size, max_batch_pixels / pixels per image) requests, the batch the server
can form at that concurrency.

Each level runs ``--rounds`` times (served, then in-process, alternating, so that a noisy neighbour
hits both); the ratio served/in-process is reported as the median of the rounds with its spread
(min-max). Where the served request's time goes comes from the ``Server-Timing`` header the service
sends (medians, ms): ``proxy`` = client latency less the ingress's time (client, HTTP, Serve's
proxy and its hop to the ingress), ``ingress`` = the ingress's own work (middleware, parsing,
admission), ``hop`` = its handle call less the replica's time (the actor hop both ways), ``media``
= PNG decoding in the replica, ``queue`` = waiting for the model or a batch, and ``model``; the last
column is the in-process model call's median, so that a run shows how much of its gap is the two
processes' model speed. Also prints the resident memory (RSS) of the model's replica right after the
run (a busy replica's: the heap its calls freed is kept for the next, serving/threads.py) and of a bare
Ray actor.
The model is served inside the ingress (``in_ingress``, one actor hop) unless ``--separate-replica``.
The load generator runs on the same two cores as the service; it uses aiohttp (~0.2 ms of CPU per
request here, against httpx's ~0.85 ms; ``--client``), so that it takes as little from them as it
can: a real client runs on another machine.

    .venv/bin/python benchmarks/serve_bench.py [--model tsvc-image-f8c4] [--size 256] [--requests 60]
                                               [--rounds 3] [--threads N] [--num-cpus 2]
                                               [--max-batch-size 8] [--max-batch-pixels 65536]
                                               [--client aiohttp|httpx]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import psutil
import ray
import torch
from ray import serve
from skimage import data

from serving.app import build_app, free_port, use_haproxy_ingress
from tokenizers_svc import media
from tokenizers_svc.loading import load_tokenizer
from tokenizers_svc.memory import tune_for_model_calls
from tokenizers_svc.pipeline import EncodeOptions, MediaInput, encode_media, load_media
from tokenizers_svc.traced import HOT_CALLS

APP = "bench"
TIMING_PARTS = ("proxy", "ingress", "hop", "media", "queue", "model")


def _bodies(size: int, count: int) -> list[bytes]:
    photo = data.astronaut()  # (512, 512, 3) uint8
    repeats = size // 512 + 1  # larger sizes: the photo tiled
    photo = np.tile(photo, (repeats, repeats, 1))
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        y, x = rng.integers(0, photo.shape[0] - size + 1, 2)
        out.append(media.encode_image(photo[y : y + size, x : x + size].copy(), "png"))
    return out


def _p50_p95(latencies: list[float]) -> tuple[float, float]:
    ordered = sorted(latencies)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def in_process(tokenizer, bodies: list[bytes], batch: int) -> tuple[float, list[float], list[float]]:
    """Same work, batched like the server: returns (req/s, per-request latency = its batch's time,
    per-request model time = its batch's model call)."""
    latencies, model_times = [], []
    start = time.perf_counter()
    for i in range(0, len(bodies), batch):
        t0 = time.perf_counter()
        inputs = [load_media(b) for b in bodies[i : i + batch]]
        called = time.perf_counter()  # the stacking counts as model time, as in the replica's model thread
        stacked = MediaInput(
            torch.cat([m.pixels for m in inputs]), "image", None, "", inputs[0].original_size
        )
        latents = encode_media(tokenizer, stacked, EncodeOptions())
        model_times += [time.perf_counter() - called] * len(inputs)
        for j in range(len(inputs)):
            latents.select(j).to_bytes()
        latencies += [time.perf_counter() - t0] * len(inputs)
    return len(bodies) / (time.perf_counter() - start), latencies, model_times


def _server_timing(header: str, latency: float) -> dict[str, float]:
    """``hop;dur=1.2, media;dur=3.4, ...`` (ms) -> seconds by part, plus ``outside``."""
    parts = {}
    for entry in header.split(","):
        name, _, duration = entry.strip().partition(";dur=")
        parts[name] = float(duration) / 1e3
    replica = parts["media"] + parts["queue"] + parts["model"]
    parts["ingress"] -= parts["hop"] + replica  # the ingress's own work: HTTP, parsing, admission
    parts["proxy"] = latency - parts["ingress"] - parts["hop"] - replica  # client <-> proxy <-> ingress
    return parts


@contextlib.asynccontextmanager
async def _encoder(
    client_library: str, url: str, model: str, concurrency: int
) -> AsyncIterator[Callable[[bytes], Awaitable[str]]]:
    """``post(body)`` -> the answer's Server-Timing, over at most ``concurrency`` connections of
    ``client_library`` (aiohttp or httpx: the module docstring); it raises on an error status."""
    path = f"/v1/models/{model}/encode"
    headers = {"content-type": "image/png"}
    if client_library == "aiohttp":
        connector = aiohttp.TCPConnector(limit=concurrency)
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as session:

            async def post(body: bytes) -> str:
                async with session.post(path, data=body, headers=headers) as response:
                    response.raise_for_status()
                    await response.read()
                    return ", ".join(response.headers.getall("server-timing"))  # one entry per header

            yield post
        return
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:

        async def post(body: bytes) -> str:
            response = await http.post(path, content=body, headers=headers)
            response.raise_for_status()
            return response.headers["server-timing"]  # httpx joins repeated headers

        yield post


async def served(
    url: str, model: str, bodies: list[bytes], concurrency: int, client_library: str = "aiohttp"
) -> tuple[float, list[float], list[dict]]:
    """``concurrency`` closed-loop clients sharing the request list: (req/s, latencies, timings)."""
    queue = list(bodies)
    latencies: list[float] = []
    timings: list[dict] = []

    async def client(post: Callable[[bytes], Awaitable[str]]) -> None:
        while queue:
            body = queue.pop()
            t0 = time.perf_counter()
            server_timing = await post(body)
            latencies.append(time.perf_counter() - t0)
            timings.append(_server_timing(server_timing, latencies[-1]))

    async with _encoder(client_library, url, model, concurrency) as post:
        start = time.perf_counter()
        await asyncio.gather(*(client(post) for _ in range(concurrency)))
        return len(bodies) / (time.perf_counter() - start), latencies, timings


def _replicas(deployment: str) -> list[psutil.Process]:
    """The processes whose title names the deployment's replicas (``ray::ServeReplica:...``)."""
    return [
        process
        for process in psutil.process_iter(["cmdline"])
        if f"ServeReplica:{APP}:{deployment}" in " ".join(process.info["cmdline"] or [])
    ]


def _cpu_and_faults(processes: list[psutil.Process]) -> tuple[float, int]:
    """(CPU seconds, minor page faults) the processes have used so far (Linux: /proc/PID/stat)."""
    cpu, faults = 0.0, 0
    for process in processes:
        times = process.cpu_times()
        cpu += times.user + times.system
        stat = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        faults += int(stat[7])  # minflt, field 10 of proc(5)
    return cpu, faults


@ray.remote(num_cpus=0)
class _Bare:
    """A Ray actor that imports nothing of ours: the floor every replica stands on."""

    def rss_mb(self) -> float:
        return psutil.Process().memory_info().rss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tsvc-image-f8c4", help="preset or model directory")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    # 60: a round of 24 lasted ~2.7 s, so its first calls after the idle in-process round between
    # weighed more than a service under steady load sees them (when the replica trimmed its heap after
    # 1 s idle, they faulted their activations in again; it now waits 10 s: serving/threads.py)
    parser.add_argument("--requests", type=int, default=60, help="requests per concurrency level and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per concurrency level (median, spread)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads: replica num_cpus and in-process (default: --num-cpus, the whole instance)",
    )
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument(
        "--max-batch-pixels",
        type=int,
        default=65536,
        help="summed pixels per model call, as the shipped CPU config (serving/config.yaml)",
    )
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    parser.add_argument(
        "--separate-replica",
        action="store_true",
        help="serve the model in a replica of its own (in_ingress: false) instead of inside the ingress",
    )
    parser.add_argument(
        "--ingress",
        choices=("haproxy", "python"),
        default="haproxy",
        help="HTTP ingress, as `tokenizers-svc serve --ingress` (default: HAProxy, what it ships)",
    )
    parser.add_argument(
        "--client",
        choices=("aiohttp", "httpx"),
        default="aiohttp",
        help="HTTP client library of the load generator (default: aiohttp, the lighter on CPU)",
    )
    args = parser.parse_args()
    args.threads = args.threads or args.num_cpus
    if args.ingress == "haproxy":
        use_haproxy_ingress()  # before ray.init: the processes Ray starts read it
    # The baseline calls the model in this main thread; the replica (serving.worker) keeps its heap
    # and allocates images the same way, so neither side page-faults its activations in again on
    # every call, and both decode alike.
    tune_for_model_calls()

    bodies = _bodies(args.size, args.requests)
    port = free_port()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    name = "bench-model"
    config = {
        "api_key_env": None,
        "models": [
            {
                "name": name,
                "model": args.model,
                "num_cpus": args.threads,
                "max_batch_size": args.max_batch_size,
                "max_batch_pixels": args.max_batch_pixels,
                "batch_wait_timeout_s": args.batch_wait_timeout_s,
                "in_ingress": not args.separate_replica,
            }
        ],
    }
    serve.run(build_app(config), name=APP, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model, allow_random_init=True)
    # warm-up on both sides: past the calls after which a hot shape runs traced (tokenizers_svc.traced)
    warm_up = bodies[: HOT_CALLS + 4]
    asyncio.run(served(url, name, warm_up, 1, args.client))
    in_process(tokenizer, warm_up, 1)

    print(
        f"{args.model} encode, {args.size}x{args.size} PNG, {args.requests} requests x {args.rounds} rounds "
        f"per level, {args.threads} torch thread(s) on each side, Ray with {args.num_cpus} CPUs, "
        f"{args.ingress} ingress, {args.client} client"
    )
    print(
        f"{'conc':>4} {'batch':>5} | {'served req/s':>12} {'p50 ms':>7} | {'in-proc req/s':>13} {'p50 ms':>7} | "
        f"{'ratio median [min-max]':>23} | served p50 ms: "
        + " ".join(f"{p:>7}" for p in TIMING_PARTS)
        + " | in-process model p50 ms"
    )
    replicas = _replicas("tokenizer-" + name if args.separate_replica else "Ingress")
    driver = [psutil.Process()]
    costs = []
    for concurrency in args.concurrency:
        batch = min(concurrency, args.max_batch_size, max(1, args.max_batch_pixels // args.size**2))
        ratios, served_rps, local_rps, served_lat, local_lat, local_model, timings = ([] for _ in range(7))
        spent = np.zeros(4)  # replica CPU s, replica faults, in-process CPU s, in-process faults
        for _ in range(args.rounds):
            before = _cpu_and_faults(replicas)
            rps, latencies, round_timings = asyncio.run(served(url, name, bodies, concurrency, args.client))
            after, local_before = _cpu_and_faults(replicas), _cpu_and_faults(driver)
            local, local_latencies, local_model_times = in_process(tokenizer, bodies, batch)
            local_after = _cpu_and_faults(driver)
            spent += np.subtract((*after, *local_after), (*before, *local_before))
            ratios.append(rps / local)
            served_rps.append(rps)
            local_rps.append(local)
            served_lat += latencies
            local_lat += local_latencies
            local_model += local_model_times
            timings += round_timings
        parts = " ".join(f"{statistics.median(t[p] for t in timings) * 1e3:>7.1f}" for p in TIMING_PARTS)
        spread = f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]"
        print(
            f"{concurrency:>4} {batch:>5} | {statistics.median(served_rps):>12.2f} "
            f"{_p50_p95(served_lat)[0] * 1e3:>7.1f} | {statistics.median(local_rps):>13.2f} "
            f"{_p50_p95(local_lat)[0] * 1e3:>7.1f} | {spread:>23} | served p50 ms: {parts} | "
            f"{statistics.median(local_model) * 1e3:>7.1f}"
        )
        costs.append((concurrency, spent / (args.rounds * len(bodies))))
    print("per request: CPU ms and minor page faults, the replica process vs the in-process one")
    for concurrency, (cpu, faults, local_cpu, local_faults) in costs:
        print(
            f"{concurrency:>4} | replica {cpu * 1e3:6.1f} ms, {faults:7.0f} faults | "
            f"in-process {local_cpu * 1e3:6.1f} ms, {local_faults:7.0f} faults"
        )
    bare = _Bare.remote()
    bare_mb = ray.get(bare.rss_mb.remote())
    print(
        f"{'model' if args.separate_replica else 'ingress (model inside)'} replica RSS right after the run "
        "(the activations its calls freed kept for the next; serve_memory.py measures a quiet one): "
        f"{', '.join(f'{p.memory_info().rss / 2**20:.0f}' for p in replicas)} MB; a bare Ray actor: {bare_mb:.0f} MB; "
        f"in-process driver (model loaded, benchmark run): {psutil.Process().memory_info().rss / 2**20:.0f} MB"
    )
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
