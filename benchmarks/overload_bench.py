"""Load test: a bounded burst of concurrent encodes against the shipped config, on loopback only.

Starts local Ray + the app from ``serving/config.yaml`` with one model (default the shipped image
tokenizer, its config entry unchanged), sends one warm-up request, then ``--count`` concurrent
512x512 JPEG encodes (crops of a real photo) and waits at most ``--deadline`` seconds. Reports the
count of each status (200/503/504/other), p50/p99 latency per status, and the replica's RSS before,
at its peak during, and after the burst. Not a test: the numbers go to docs/benchmarks.md. Run it
against another checkout's code (``PYTHONPATH=/path/to/checkout``) to compare before and after.

    PYTHONPATH=. .venv/bin/python benchmarks/overload_bench.py [--count 100] [--model tsvc-image-f8c4]
        [--size 512] [--model-cpus N] [--request-timeout-s S] [--bursts 1]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections import Counter

import httpx
import numpy as np
import psutil
import ray
from ray import serve
from skimage import data

from serving.app import DEFAULT_CONFIG, build_app, free_port, load_config_file
from tokenizers_svc import media
from tokenizers_svc.memory import PeakRss

MAX_COUNT = 200  # the burst stays bounded whatever the flags say
APP = "overload-bench"


def _bodies(count: int, size: int) -> list[bytes]:
    photo = np.tile(data.astronaut(), (2, 2, 1))  # (1024, 1024, 3): room for distinct 512 crops
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        y, x = rng.integers(0, 1024 - size, 2)
        out.append(media.encode_image(photo[y : y + size, x : x + size].copy(), "jpeg", quality=90))
    return out


def _replica(model: dict) -> psutil.Process:
    """The process the model computes in: the ingress's, for a model served inside it (``in_ingress``)."""
    deployment = "Ingress" if model.get("in_ingress") else f"tokenizer-{model['name']}"
    title = f"ServeReplica:{APP}:{deployment}"
    for process in psutil.process_iter(["cmdline"]):
        if any(title in part for part in process.info["cmdline"] or []):
            return process
    raise RuntimeError(f"no replica process titled {title}")


async def _burst(url: str, model: str, bodies: list[bytes], deadline: float) -> list[tuple[int, float]]:
    async def one(client: httpx.AsyncClient, body: bytes) -> tuple[int, float]:
        started = time.perf_counter()
        try:
            response = await client.post(
                f"/v1/models/{model}/encode", content=body, headers={"content-type": "image/jpeg"}
            )
            status = response.status_code
        except httpx.HTTPError:
            status = 0  # no answer within the deadline
        return status, time.perf_counter() - started

    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=deadline, limits=limits) as client:
        return await asyncio.gather(*(one(client, body) for body in bodies))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=100, help=f"concurrent requests (at most {MAX_COUNT})")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--model", default="tsvc-image-f8c4", help="a model of serving/config.yaml")
    parser.add_argument("--deadline", type=float, default=180.0, help="seconds the burst may take in all")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument(
        "--model-cpus",
        type=float,
        help="the model's num_cpus (its torch threads; default: its config entry's). With 2, small "
        "requests that queue run side by side (serving/threads.py)",
    )
    parser.add_argument(
        "--request-timeout-s", type=float, help="the service's request_timeout_s (default: the config's)"
    )
    parser.add_argument(
        "--bursts",
        type=int,
        default=1,
        help="bursts one after the other; the later ones meet the rates the earlier ones measured",
    )
    args = parser.parse_args()
    count = min(args.count, MAX_COUNT)

    config = load_config_file(DEFAULT_CONFIG)["args"]
    config["models"] = [m for m in config["models"] if m["name"] == args.model]
    config["api_key_env"] = None
    if args.model_cpus is not None:
        config["models"][0]["num_cpus"] = args.model_cpus
    if args.request_timeout_s is not None:
        config["request_timeout_s"] = args.request_timeout_s
    port = free_port()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name=APP, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    bodies = _bodies(count + 1, args.size)
    try:
        (warm,) = asyncio.run(_burst(url, args.model, bodies[:1], args.deadline))
        replica = _replica(config["models"][0])
        rss_before = replica.memory_info().rss
        bursts = []
        with PeakRss(replica.pid, interval_s=0.1) as peak:
            for _ in range(args.bursts):
                started = time.perf_counter()
                results = asyncio.run(_burst(url, args.model, bodies[1:], args.deadline))
                bursts.append((results, time.perf_counter() - started))
        time.sleep(5)  # let abandoned work (if any) stop before reading memory back
        rss_after = replica.memory_info().rss
    finally:
        serve.shutdown()
        ray.shutdown()

    print(
        f"model {args.model}, {count} concurrent {args.size}x{args.size} JPEG encodes, warm-up {warm[1]:.2f} s"
    )
    for index, (results, wall) in enumerate(bursts, 1):
        counts = Counter(status for status, _ in results)
        print(
            f"burst {index}: statuses {dict(sorted(counts.items()))}  (0 = no answer within "
            f"{args.deadline:g} s); wall {wall:.1f} s"
        )
        latencies = [elapsed for _, elapsed in results]
        print(f"  all: p50 {statistics.median(latencies):.2f} s, p99 {_percentile(latencies, 0.99):.2f} s")
        for status in sorted(counts):
            subset = [elapsed for s, elapsed in results if s == status]
            print(f"  {status}: p50 {statistics.median(subset):.2f} s, p99 {_percentile(subset, 0.99):.2f} s")
    mib = 2**20
    print(
        f"replica RSS: before {rss_before / mib:.0f} MiB, peak during {peak.peak / mib:.0f} MiB, "
        f"after {rss_after / mib:.0f} MiB"
    )


if __name__ == "__main__":
    main()
