"""Serving overhead: HTTP + Ray Serve vs the same model called in-process, at concurrency 1/4/16.

Both sides do the same work per request: decode a PNG (real photo crop), encode it with
``sd-vae-tiny`` and write the latent file. The in-process baseline runs the work in batches of
min(concurrency, max_batch_size) requests, the batch size the server can form at that
concurrency. Prints throughput (req/s), p50/p95 latency, and the ratio served/in-process.

    .venv/bin/python benchmarks/serve_bench.py [--size 64] [--requests 48] [--num-cpus 2]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import time

import httpx
import numpy as np
import ray
import torch
from ray import serve
from skimage import data

from serving.app import build_app
from tokenizers_svc import media
from tokenizers_svc.loading import load_tokenizer
from tokenizers_svc.pipeline import EncodeOptions, MediaInput, encode_media, load_media

MODEL = "sd-vae-tiny"


def _bodies(size: int, count: int) -> list[bytes]:
    photo = data.astronaut()  # (512, 512, 3) uint8
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        y, x = rng.integers(0, 512 - size, 2)
        out.append(media.encode_image(photo[y : y + size, x : x + size].copy(), "png"))
    return out


def _percentiles(latencies: list[float]) -> tuple[float, float]:
    ordered = sorted(latencies)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def in_process(tokenizer, bodies: list[bytes], batch: int) -> tuple[float, list[float]]:
    """Same work, batched like the server: returns (req/s, per-request latency = its batch's time)."""
    latencies = []
    start = time.perf_counter()
    for i in range(0, len(bodies), batch):
        t0 = time.perf_counter()
        inputs = [load_media(b) for b in bodies[i : i + batch]]
        stacked = MediaInput(
            torch.cat([m.pixels for m in inputs]), "image", None, "", inputs[0].original_size
        )
        latents = encode_media(tokenizer, stacked, EncodeOptions())
        for j in range(len(inputs)):
            latents.select(j).to_bytes()
        latencies += [time.perf_counter() - t0] * len(inputs)
    return len(bodies) / (time.perf_counter() - start), latencies


async def served(url: str, bodies: list[bytes], concurrency: int) -> tuple[float, list[float]]:
    """``concurrency`` closed-loop clients sharing the request list."""
    queue = list(bodies)
    latencies: list[float] = []

    async def client(http: httpx.AsyncClient) -> None:
        while queue:
            body = queue.pop()
            t0 = time.perf_counter()
            response = await http.post(
                f"/v1/models/{MODEL}/encode", content=body, headers={"content-type": "image/png"}
            )
            response.raise_for_status()
            latencies.append(time.perf_counter() - t0)

    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        return len(bodies) / (time.perf_counter() - start), latencies


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=8)
    args = parser.parse_args()

    bodies = _bodies(args.size, args.requests)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = {
        "api_key_env": None,
        "models": [
            {
                "name": MODEL,
                "num_cpus": 1,
                "max_batch_size": args.max_batch_size,
                "batch_wait_timeout_s": 0.01,
            }
        ],
    }
    serve.run(build_app(config), name="bench", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    torch.set_num_threads(1)  # the replica runs with num_cpus=1 -> 1 torch thread
    tokenizer = load_tokenizer(MODEL, allow_random_init=True)
    asyncio.run(served(url, bodies[:4], 1))  # warm-up
    in_process(tokenizer, bodies[:4], 1)

    print(f"sd-vae-tiny encode, {args.size}x{args.size} PNG, {args.requests} requests per level")
    print(
        f"{'conc':>4} {'batch':>5} | {'served req/s':>12} {'p50 ms':>7} {'p95 ms':>7} | "
        f"{'in-proc req/s':>13} {'p50 ms':>7} {'p95 ms':>7} | {'ratio':>5}"
    )
    for concurrency in (1, 4, 16):
        batch = min(concurrency, args.max_batch_size)
        served_rps, served_lat = asyncio.run(served(url, bodies, concurrency))
        local_rps, local_lat = in_process(tokenizer, bodies, batch)
        s50, s95 = _percentiles(served_lat)
        l50, l95 = _percentiles(local_lat)
        print(
            f"{concurrency:>4} {batch:>5} | {served_rps:>12.1f} {s50 * 1e3:>7.1f} {s95 * 1e3:>7.1f} | "
            f"{local_rps:>13.1f} {l50 * 1e3:>7.1f} {l95 * 1e3:>7.1f} | {served_rps / local_rps:>5.2f}"
        )
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
