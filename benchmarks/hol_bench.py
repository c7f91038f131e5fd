"""Head-of-line blocking: a small request's latency with and without a large request running.

Starts local Ray + one ``sd-vae-tiny`` model (one replica, one CPU, a ``--timeout`` second request
timeout) on loopback, then measures ``--count`` small encodes (64x64 PNG crops of a real photo),
sent one after another: first alone, then while a large request runs (a 600x800 encode in 16-px
tiles: tens of seconds of model work, so it runs to its timeout; two are sent one after the
other). The second phase ends when the smalls are done or the large requests are. Reports
p50/p95/max of the small requests in both phases and what the large requests answered. Before the
lanes (serving/admission.py) each small request waited for a large one to time out.
Not a test: the numbers go to docs/benchmarks.md. Run it against another checkout's code
(``PYTHONPATH=/path/to/checkout``) to compare before and after.

    PYTHONPATH=. .venv/bin/python benchmarks/hol_bench.py [--count 40] [--timeout 30]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections import Counter

import httpx
import numpy as np
import ray
from ray import serve
from skimage import data

from serving.app import build_app, free_port
from tokenizers_svc import media

MAX_COUNT = 200  # the run stays bounded whatever the flags say
LARGE_COUNT = 2  # large requests sent one after another while the small ones are measured
LARGE = {"resize": "fit", "resolution": 800, "tiling": "true", "tile_size": 16, "tile_overlap": 8}


def _config(timeout_s: float) -> dict:
    return {
        "request_timeout_s": timeout_s,
        "api_key_env": None,
        "models": [
            {
                "name": "tiny",
                "model": "sd-vae-tiny",
                "num_cpus": 1,
                "max_batch_size": 8,
                "max_batch_pixels": 100_000,
                "batch_wait_timeout_s": 0.01,
            }
        ],
    }


def _small_bodies(count: int) -> list[bytes]:
    photo = data.astronaut()
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        y, x = rng.integers(0, 512 - 64, 2)
        out.append(media.encode_image(np.ascontiguousarray(photo[y : y + 64, x : x + 64]), "png"))
    return out


async def _post(client: httpx.AsyncClient, body: bytes, **params) -> tuple[int, float]:
    started = time.perf_counter()
    response = await client.post(
        "/v1/models/tiny/encode", content=body, params=params, headers={"content-type": "image/png"}
    )
    return response.status_code, time.perf_counter() - started


def _summary(name: str, results: list[tuple[int, float]]) -> str:
    seconds = sorted(s for _, s in results)
    p95 = seconds[min(len(seconds) - 1, round(0.95 * (len(seconds) - 1)))]
    statuses = dict(Counter(status for status, _ in results))
    return (
        f"{name:24} n={len(seconds):3}  p50 {statistics.median(seconds) * 1000:8.1f} ms  "
        f"p95 {p95 * 1000:8.1f} ms  max {seconds[-1] * 1000:8.1f} ms  statuses {statuses}"
    )


async def _run(base_url: str, count: int) -> None:
    smalls = _small_bodies(count)
    large_body = smalls[0]
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        for body in smalls[:3]:  # warm-up: the replica measures its rate
            await _post(client, body)
        alone = [await _post(client, body) for body in smalls]
        print(_summary("small, alone", alone), flush=True)

        large_results: list[tuple[int, float]] = []

        async def large_requests() -> None:
            for _ in range(LARGE_COUNT):
                large_results.append(await _post(client, large_body, **LARGE))

        larges = asyncio.create_task(large_requests())
        await asyncio.sleep(2.0)  # the first large request is running
        beside = []
        while not larges.done() and len(beside) < len(smalls):
            beside.append(await _post(client, smalls[len(beside)]))
        larges.cancel()  # the client leaves: the replica abandons the work at its next tile
        print(_summary("small, beside a large", beside), flush=True)
        if large_results:
            print(_summary("large", large_results), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--count", type=int, default=40, help=f"small requests per phase (at most {MAX_COUNT})"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="the model's request_timeout_s")
    args = parser.parse_args(argv)
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(_config(args.timeout)), name="hol-bench", route_prefix="/", blocking=False)
        base_url = f"http://127.0.0.1:{port}"
        httpx.get(f"{base_url}/v1/models", timeout=300)
        asyncio.run(_run(base_url, min(args.count, MAX_COUNT)))
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
