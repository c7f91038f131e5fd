"""Memory of the shipped service (serving/config.yaml's models): each model in a replica of its own
vs the models inside the ingress's process (``in_ingress``), on one local Ray instance.

For each layout: start Ray and the app, send one encode per image model, wait until the models'
process has been idle long enough to hand its freed heap back (``serving.threads.IDLE_TRIM_S``: the
memory of a quiet service, not of its last call), then count the processes
this run started (the driver's descendants: Ray's daemons, Serve's controller and proxy, replicas)
and their resident (RSS) and unique (USS: what the process alone holds; shared library pages are
counted once in the first) memory. Also a bare Ray actor's, the floor every replica stands on, and
a bare Serve replica's (Ray Serve's own imports and threads, nothing of ours).

The HTTP ingress is HAProxy, as ``tokenizers-svc serve`` ships (its manager actor, the haproxy
process and Serve's fallback proxy are counted), unless ``--ingress python``.

    .venv/bin/python benchmarks/serve_memory.py [--num-cpus 2] [--ingress haproxy|python]
"""

from __future__ import annotations

import argparse
import os
import time

import httpx
import psutil
import ray
from ray import serve
from skimage import data

from serving.app import (
    DEFAULT_CONFIG,
    HAPROXY_PORT_VARIABLES,
    build_app,
    free_port,
    load_config_file,
    use_haproxy_ingress,
)
from serving.threads import IDLE_TRIM_S
from tokenizers_svc import media


@ray.remote(num_cpus=0)
class _Bare:
    def rss_mb(self) -> float:
        return psutil.Process().memory_info().rss / 2**20


@serve.deployment(ray_actor_options={"num_cpus": 0})
class _BareReplica:
    """A Serve replica that imports nothing of ours: what Ray Serve itself holds per replica."""

    def rss_mb(self) -> float:
        return psutil.Process().memory_info().rss / 2**20


def _processes() -> list[tuple[str, float, float]]:
    """(title, RSS MB, USS MB) of every process this driver started, directly or not."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            info = process.memory_full_info()
            title = " ".join(process.cmdline())[:60] or process.name()
        except psutil.Error:
            continue
        found.append((title, info.rss / 2**20, info.uss / 2**20))
    return found


# ports the operator chose for HAProxy's side listeners; the others are picked fresh per Ray instance
OPERATOR_PORTS = {name: os.environ[name] for name in HAPROXY_PORT_VARIABLES if name in os.environ}


def measure(args_config: dict, in_ingress: bool, num_cpus: int, ingress: str) -> None:
    if ingress == "haproxy":
        for name in HAPROXY_PORT_VARIABLES:  # the last instance's picks go; the operator's stay
            os.environ.pop(name, None)
        os.environ.update(OPERATOR_PORTS)
        use_haproxy_ingress()
    config = {**args_config, "api_key_env": None}
    config["models"] = [{**m, "in_ingress": in_ingress} for m in config["models"]]
    port = free_port()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name="memory", route_prefix="/", blocking=False)
    body = media.encode_image(data.astronaut()[:256, :256].copy(), "png")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as http:
        while http.get("/readyz").status_code != 200:
            time.sleep(1)
        for model in http.get("/v1/models").json()["models"]:
            if model["modality"] != "video":
                http.post(
                    f"/v1/models/{model['served_name']}/encode",
                    content=body,
                    headers={"content-type": "image/png"},
                ).raise_for_status()
    bare_actor = _Bare.remote()
    bare = ray.get(bare_actor.rss_mb.remote())
    ray.kill(bare_actor)
    time.sleep(IDLE_TRIM_S + 2)
    processes = _processes()  # the service's own, before the bare Serve replica joins them
    bare_replica = serve.run(_BareReplica.bind(), name="bare", route_prefix="/bare")
    bare_serve = bare_replica.rss_mb.remote().result()
    layout = "models in the ingress" if in_ingress else "a replica per model"
    print(
        f"{layout}: {len(processes)} processes, RSS {sum(p[1] for p in processes) / 1024:.2f} GB, "
        f"USS {sum(p[2] for p in processes) / 1024:.2f} GB (bare Ray actor RSS {bare:.0f} MB, "
        f"bare Serve replica RSS {bare_serve:.0f} MB)"
    )
    for title, rss, uss in processes:
        if "ServeReplica" in title:
            print(f"    {title:60s} RSS {rss:6.0f} MB  USS {uss:6.0f} MB")
    serve.shutdown()
    ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--ingress", choices=("haproxy", "python"), default="haproxy")
    args = parser.parse_args()
    config = load_config_file(DEFAULT_CONFIG)["args"]
    print(f"models: {', '.join(m['name'] for m in config['models'])}; {args.ingress} ingress")
    for in_ingress in (False, True):
        measure(config, in_ingress, args.num_cpus, args.ingress)


if __name__ == "__main__":
    main()
